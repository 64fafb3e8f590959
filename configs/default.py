"""The built-in default: a tiny CLIP on procedural coloured shapes, offline, on a CPU.

    clipjax train                                   # this config, workdir ./clipjax-default
    clipjax train --config default --workdir /tmp/run total_steps=200 optimizer.lr=3e-3
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "clip"  # clip | clip4clip | actionclip | lseg | groupvit | glip (clipjax.heads)
    c.model = "ViT-tiny"
    c.model_overrides = ml_collections.ConfigDict()  # any architecture field: embed_dim=64,
    # vision.width=128, text.layers=6, ... (`model_overrides.vision.width=128` on the command line)
    c.dtype = "float32"  # compute dtype of matmuls: float32 | bfloat16
    c.scan = False
    c.remat = "none"  # none | full | dots
    c.init_checkpoint = ""  # a training workdir, clipjax .safetensors or PyTorch checkpoint
    c.init_checkpoint_keep = ()  # regexes: take only these parameters from it (LiT: ^visual/)

    c.loss = "softmax"  # softmax | tiled | sigmoid | sigmoid_ring | multi_positive
    c.loss_tile = 512
    c.accum_steps = 1
    c.global_batch = 256
    c.total_steps = 1500
    c.seed = 0

    c.optimizer = ml_collections.ConfigDict(dict(
        lr=2e-3, warmup_steps=100, end_lr_ratio=0.0, weight_decay=0.1,
        b1=None, b2=None, eps=None,  # None: by architecture (ViT 0.9/0.98/1e-6, RN 0.9/0.999/1e-8)
        grad_clip_norm=1.0, freeze=(), lr_multipliers={}))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic", image_size=32, context_length=16, num_workers=0, num_examples=0))
    c.eval = ml_collections.ConfigDict(dict(every_steps=500, zeroshot="synthetic",
                                            num_examples=1024))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3))
    c.log_every_steps = 25
    return c
