"""GLIP-T's recipe (Li et al., 2022) on COCO, on a CLIP image tower and CLIP's text tower.

    clipjax train --config glip_coco --workdir glip-coco init_checkpoint=/weights/RN50.pt \\
        data.source='coco:/data/coco?split=train2017' \\
        eval.detection='coco:/data/coco?split=val2017'
    clipjax train --config glip_coco:b16 init_checkpoint=/weights/ViT-B-16.pt ...
    clipjax eval detection --checkpoint glip-coco --coco /data/coco --split val2017
    clipjax eval detection --checkpoint glip-coco --lvis /data/lvis    # 40 classes a prompt
    clipjax train --config glip_coco:runlocal      # the same path at CPU size

The reference's settings: AdamW lr 1e-4 (the language tower at 1e-5), weight decay 1e-4,
batch 64, 2,000 warmup steps, lr x0.1 at 67% and 89% of training, gradient clipping 1.0,
30 epochs; 6 fusion layers (joint width 2048, 8 heads) over a 256-channel five-level
pyramid (strides 8-128, anchors 8 x stride), ATSS top 9, focal loss 0.25/2, GIoU x2,
prompts of every positive class and up to 85 negatives in 256 tokens. Variant: the
reference uses Swin-T and BERT; here the towers are CLIP's (RN50 by default, `:b16`
ViT-B/16) and the text context grows from CLIP's 77 tokens to 256 (the first 77 positions
from the checkpoint). Images are letterboxed onto an 800 x 800 canvas (the reference
resizes the short side to 800, long side at most 1333). Not here: the model EMA (0.999)
and the Objects365 / GoldG / CC pre-training mixture.
"""

import ml_collections

from clipjax.configs import _paper, default


def get_config(arg=None):
    c = default.get_config()
    c.task = "glip"
    variant = arg if arg in ("rn50", "b16") else "rn50"
    c.model = {"rn50": "RN50", "b16": "ViT-B-16"}[variant]
    c.model_overrides = ml_collections.ConfigDict({"text": {"context_length": 256}})
    c.head = ml_collections.ConfigDict(dict(
        fpn_channels=256, fusion_layers=6, joint_dim=2048, fusion_heads=8, deformable=True,
        fusion=True, strides=(8, 16, 32, 64, 128), gn_groups=32, anchor_scale=8.0, topk=9,
        focal_alpha=0.25, focal_gamma=2.0, giou_weight=2.0, max_boxes=100, max_negatives=85,
        per_prompt=40))
    c.init_checkpoint = ""  # required: a CLIP checkpoint of c.model (weights or a workdir)
    c.dtype = "bfloat16"
    c.scan, c.remat = False, "full"
    c.global_batch = 64
    c.epochs = 30
    c.total_steps = 0  # epochs x data.num_examples / global_batch
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-4, warmup_steps=2000, weight_decay=1e-4, grad_clip_norm=1.0, freeze=(),
        lr_multipliers={"^text/": 0.1}, schedule="steps", steps_at=(0.67, 0.89)))
    c.mesh.data, c.mesh.fsdp = -1, 1
    c.data.source = "coco:/data/coco?split=train2017"
    c.data.num_examples = 117266  # train2017 images with boxes
    c.data.image_size = 800
    c.data.context_length = 256
    c.data.num_workers = 8
    c.eval.zeroshot = ""
    c.eval.detection = "coco:/data/coco?split=val2017"
    c.eval.num_examples = 0  # all 5,000
    c.eval.every_steps = c.checkpoint.every_steps = 5000
    if arg == "runlocal":
        c.model_overrides = _paper._tiny(c.model)
        c.model_overrides.text.context_length = 40
        c.data.context_length = 40
        c.head.update(fpn_channels=32, fusion_layers=1, joint_dim=64, fusion_heads=4,
                      gn_groups=8, strides=(8, 16, 32), anchor_scale=4.0, max_boxes=4,
                      max_negatives=8)
        c.init_checkpoint, c.epochs, c.data.num_workers, c.dtype = "", 0, 0, "float32"
        c.data.image_size = 64
        c.data.source = c.eval.detection = "synthetic"
        c.data.max_shapes = 3
        c.global_batch, c.total_steps = 16, 4
        c.optimizer.warmup_steps = 0
        c.eval.num_examples = 16
        c.eval.every_steps, c.checkpoint.every_steps, c.log_every_steps = 4, 2, 1
    elif arg not in (None, "", "rn50", "b16"):
        raise ValueError(f"unknown config argument {arg!r}; glip_coco takes rn50, b16 or "
                         "runlocal.")
    return c
