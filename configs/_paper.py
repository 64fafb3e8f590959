"""Shared settings of the CLIP paper's recipes (Radford et al. 2021, OpenCLIP's defaults)."""

import ml_collections

from clipjax.configs import default


def _tiny(model: str) -> ml_collections.ConfigDict:
    """Overrides that shrink `model` to a CPU size with its kind of towers (ViT or ResNet)."""
    text = dict(width=64, heads=4, layers=2, context_length=16)
    if model.startswith("RN"):
        vision = dict(image_size=64, layers=(1, 1, 1, 1), width=16, head_width=32)
    else:
        vision = dict(image_size=64, layers=2, width=64, patch_size=16, head_width=16)
    return ml_collections.ConfigDict(dict(embed_dim=32, vision=vision, text=text))


def clip_recipe(model: str, arg=None) -> ml_collections.ConfigDict:
    """Global batch 32768, AdamW lr 5e-4, warmup 2000, cosine over 32 epochs of your data.

    arg "runlocal": the same code path (loss, bf16, scanned and rematerialised blocks,
    FSDP over every device, evaluation during training) at CPU size: the architecture's
    towers shrunk to a few layers, 16 pairs a step, 4 steps of the built-in data.
    """
    c = default.get_config()
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
        c.model_overrides = _tiny(model)
        c.global_batch, c.total_steps, c.epochs = 16, 4, 0
        c.optimizer.warmup_steps = 1
        c.data.source, c.data.num_workers = "synthetic", 0
        c.data.image_size = c.model_overrides.vision.image_size
        c.data.context_length = c.model_overrides.text.context_length
        c.loss_tile = 4  # several tiles per device, as at scale
        c.eval.zeroshot, c.eval.num_examples = "synthetic", 64
        c.eval.every_steps, c.checkpoint.every_steps, c.log_every_steps = 4, 2, 1
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; the paper recipes take 'runlocal' "
                         "or nothing.")
    return c
