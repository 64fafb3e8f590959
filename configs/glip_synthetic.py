"""GLIP on the built-in shapes with boxes: grounding that learns on a CPU in minutes.

    clipjax train                                           # the default CLIP run first
    clipjax train --config glip_synthetic init_checkpoint=clipjax-default
    clipjax eval detection --checkpoint clipjax-glip_synthetic --dataset synthetic
    clipjax detect shapes.png --checkpoint clipjax-glip_synthetic --prompt "red circle. blue ring"

Training images never show six colour-shape pairs (data.synthetic_det.HELD_OUT: "blue
circle", "purple square", ...) and its prompts never name them; the evaluation reports AP
over the seen pairs and, separately, over the held-out ones, which the model can only find
by composing a colour and a shape it learned apart through the prompt. Both towers start
from the default run (ViT-tiny); the text context grows from its 16 tokens to 40 (the
first 16 positions from the checkpoint).
"""

import ml_collections

from clipjax.configs import default


def get_config(arg=None):
    c = default.get_config()
    c.task = "glip"
    c.model_overrides = ml_collections.ConfigDict({"text": {"context_length": 40}})
    c.head = ml_collections.ConfigDict(dict(
        fpn_channels=32, fusion_layers=2, joint_dim=64, fusion_heads=4, deformable=True,
        fusion=True, strides=(8, 16, 32), gn_groups=8, anchor_scale=4.0, topk=9,
        focal_alpha=0.25, focal_gamma=2.0, giou_weight=2.0, max_boxes=4, max_negatives=8,
        per_prompt=40))
    c.init_checkpoint = "clipjax-default"
    c.global_batch = 32
    c.total_steps = 2400
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=2e-3, warmup_steps=100, weight_decay=1e-4, grad_clip_norm=1.0, freeze=(),
        lr_multipliers={"^text/": 0.1}, schedule="steps", steps_at=(0.67, 0.89)))
    c.data.source = "synthetic"
    c.data.image_size = 64
    c.data.context_length = 40
    c.data.max_shapes = 3
    c.eval.zeroshot = ""
    c.eval.detection = "synthetic"
    c.eval.num_examples = 256
    c.eval.every_steps = c.checkpoint.every_steps = 800
    c.log_every_steps = 50
    if arg == "runlocal":
        c.init_checkpoint = ""
        c.global_batch, c.total_steps = 16, 4
        c.optimizer.warmup_steps = 0
        c.eval.num_examples = 16
        c.eval.every_steps, c.checkpoint.every_steps, c.log_every_steps = 4, 2, 1
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; glip_synthetic takes 'runlocal' or "
                         "nothing.")
    return c
