"""Shared settings of the CLIP paper's recipes (Radford et al. 2021, OpenCLIP's defaults)."""

import ml_collections

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "clipjax_config_default", pathlib.Path(__file__).with_name("default.py"))
_default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_default)


def clip_recipe(model: str, arg=None) -> ml_collections.ConfigDict:
    """Global batch 32768, AdamW lr 5e-4, warmup 2000, cosine over 32 epochs of your data.

    arg "runlocal" shrinks the run to a CPU smoke test of the same code path.
    """
    c = _default.get_config()
    c.model = model
    c.dtype = "bfloat16"
    c.scan = True
    c.remat = "full"
    c.loss = "tiled"
    c.global_batch = 32768
    c.epochs = 32
    c.total_steps = 0  # 0: epochs x data.num_examples / global_batch
    c.optimizer.lr = 5e-4
    c.optimizer.warmup_steps = 2000
    c.optimizer.weight_decay = 0.2
    c.mesh.fsdp = -1
    c.mesh.data = 1
    c.data.source = ""  # required: e.g. "wds:/data/laion/{00000..41407}.tar"
    c.data.image_size = 224
    c.data.context_length = 77
    c.data.num_workers = 16
    c.data.num_examples = 0  # required with total_steps=0: examples in one epoch
    c.eval.zeroshot = ""  # e.g. "tfds:imagenet2012?data_dir=/data/tfds&split=validation"
    c.eval.every_steps = 2000
    c.checkpoint.every_steps = 1000
    c.log_every_steps = 50
    if arg == "runlocal":
        c.global_batch, c.total_steps, c.epochs = 16, 4, 0
        c.dtype, c.loss = "float32", "softmax"
        c.model_overrides = ml_collections.ConfigDict()
        c.data.source, c.data.image_size, c.data.num_workers = "synthetic", 224, 0
        c.eval.zeroshot, c.eval.every_steps, c.checkpoint.every_steps = "", 0, 2
        c.mesh.fsdp, c.mesh.data = 1, -1
    return c
