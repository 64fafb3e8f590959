"""GroupViT on the built-in shapes: learns to segment from captions alone, on a CPU.

    clipjax train                                   # the default CLIP run (its text tower)
    clipjax train --config groupvit_synthetic
    clipjax train --config groupvit_synthetic init_checkpoint=   # both towers from scratch
    clipjax eval segmentation --checkpoint clipjax-groupvit_synthetic --dataset synthetic
    clipjax segment shape.png --checkpoint clipjax-groupvit_synthetic --labels "circle, ring"

Training sees image-caption pairs only ("a red circle and a blue box"), never a mask:
the contrastive loss over the batch plus the multi-label loss on the caption's nouns (found
by an offline tagger) in ImageNet templates. Held-out images are segmented zero-shot by
naming each final group with the class prompts, background below head.bg_thresh.

Scaled to a CPU budget: the text tower starts from the default run's (init_checkpoint with
init_checkpoint_keep=^text/: trained on the built-in captions, never a mask; the paper
trains both towers from scratch, which needs far more steps here), and images hold one or
two shapes of a fifth to a third of the image (at 32 px, smaller shapes are a few patches).
"""

import ml_collections

from clipjax.configs import _dense, default


def get_config(arg=None):
    c = default.get_config()
    c.task = "groupvit"
    c.model = "GroupViT-synthetic"  # 32 px, patch 4, groups 16 -> 4 (the paper: GroupViT-S/16)
    c.head = ml_collections.ConfigDict(dict(multi_label=3, multi_label_weight=1.0, gumbel=True,
                                            bg_thresh=0.95, top_k=5))
    c.loss = "softmax"
    c.init_checkpoint = "clipjax-default"
    c.init_checkpoint_keep = ("^text/",)
    c.global_batch = 128
    c.total_steps = 1200
    c.optimizer.lr = 4e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 0.05
    c.optimizer.grad_clip_norm = 5.0
    c.optimizer.end_lr_ratio = 0.025
    _dense.on_builtin_images(c, image_size=32)
    c.data.max_shapes, c.data.shape_size = 2, (0.2, 0.32)
    c.eval.every_steps = c.checkpoint.every_steps = 400
    _dense.runlocal(c, arg, "groupvit_synthetic")
    if arg == "runlocal":
        c.data.image_size = 32
        c.init_checkpoint, c.init_checkpoint_keep = "", ()
    return c
