"""LSeg on the built-in shapes with masks: learns on a CPU in minutes.

    clipjax train                                           # the default CLIP run first
    clipjax train --config lseg_synthetic init_checkpoint=clipjax-default
    clipjax eval segmentation --checkpoint clipjax-lseg_synthetic --dataset synthetic
    clipjax segment shape.png --checkpoint clipjax-lseg_synthetic --labels "other, circle, ring"

It trains with the label words "other", "circle", "square", ...; the held-out evaluation
scores them and, separately, synonyms it never trained with ("disc", "box", "hoop", ...),
which only CLIP's frozen text tower can map onto the trained classes.
"""

import ml_collections

from clipjax.configs import _dense, default


def get_config(arg=None):
    c = default.get_config()
    c.task = "lseg"
    c.head = ml_collections.ConfigDict(dict(
        features=32, hooks=(), readout_dims=(), template="{}", base_size=64,
        eval_mode="whole", eval_scales=(1.0,), eval_flip=False, train_words="canonical",
        held_out_classes=()))  # e.g. ("diamond", "ring"): LSeg's zero-shot setting
    c.init_checkpoint = "clipjax-default"  # the default run's CLIP (its towers, its text)
    c.global_batch = 32
    c.total_steps = 600
    # AdamW: the paper's SGD (configs/lseg_ade20k.py) leaves this tiny decoder predicting
    # background everywhere for hundreds of steps.
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.01
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.lr_multipliers = {"^scratch/": 10.0}  # the decoder at 10x, as the paper
    _dense.on_builtin_images(c, image_size=64)
    c.eval.every_steps = c.checkpoint.every_steps = 200
    _dense.runlocal(c, arg, "lseg_synthetic")
    if arg == "runlocal":
        c.init_checkpoint = ""
    return c
