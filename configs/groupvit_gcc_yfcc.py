"""GroupViT on CC3M + CC12M + YFCC14M (Xu et al. 2022): the paper's recipe.

    clipjax train --config groupvit_gcc_yfcc --workdir gv-gcc-yfcc \\
        data.source='wds:/data/cc3m/{00000..00331}.tar; wds:/data/cc12m/{00000..01242}.tar; wds:/data/yfcc14m/{00000..01454}.tar' \\
        data.num_examples=26000000 eval.segmentation='voc:/data/VOCdevkit/VOC2012?split=val'
    clipjax eval segmentation --checkpoint gv-gcc-yfcc --dataset 'voc:/data/VOCdevkit/VOC2012?split=val'
    clipjax eval segmentation --checkpoint gv-gcc-yfcc --bg-thresh 0.35 \\
        --dataset 'context:/data/VOCdevkit/VOC2010?split=val'
    clipjax train --config groupvit_gcc_yfcc:runlocal   # the same path at CPU size

GroupViT-S/16 (patch 16 at 224, width 384, 6 heads, depths 6/3/3, group tokens 64/8, text
width 256, 12 layers), global batch 4096, AdamW lr 1.6e-3, weight decay 0.05, cosine to
4e-5 after 2 warmup epochs, gradient clipping 5.0, 30 epochs; the contrastive loss over the
global batch plus the multi-label loss with 3 prompts a caption. Zero-shot segmentation
as published: short side 448, 448 windows at stride 224, background below 0.95 (VOC,
COCO-Object) or 0.35 (Context). Left out: RandAugment and random erasing (the pipeline
has CLIP's random resized crop only) and drop path 0.1.
"""

import ml_collections

from clipjax.configs import _dense, default


def get_config(arg=None):
    c = default.get_config()
    c.task = "groupvit"
    c.model = "GroupViT-S/16"
    c.head = ml_collections.ConfigDict(dict(multi_label=3, multi_label_weight=1.0, gumbel=True,
                                            bg_thresh=0.95, top_k=5, short_side=448,
                                            eval_mode="slide", eval_crop=448))
    c.dtype = "bfloat16"
    c.scan, c.remat = True, "full"
    c.loss = "tiled"  # softmax over the global batch of 4096, without the 4096 x 4096 logits
    c.global_batch = 4096
    c.epochs = 30
    c.total_steps = 0  # epochs x data.num_examples / global_batch
    c.optimizer.lr = 1.6e-3
    c.optimizer.warmup_steps = 0
    c.optimizer.warmup_fraction = 2 / 30  # 2 of the 30 epochs
    c.optimizer.end_lr_ratio = 4e-5 / 1.6e-3
    c.optimizer.weight_decay = 0.05
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
    c.optimizer.grad_clip_norm = 5.0
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.data.source = ""  # required: image-caption shards (wds:, csv:, ...), ";"-separated
    c.data.num_examples = 0  # required with total_steps=0: examples in one epoch
    c.data.image_size = 224
    c.data.context_length = 77
    c.data.num_workers = 16
    c.eval.zeroshot = ""
    c.eval.segmentation = ""  # e.g. voc:/data/VOCdevkit/VOC2012?split=val
    c.eval.num_examples = 0
    c.eval.every_steps = 2000
    c.checkpoint.every_steps = 1000
    c.log_every_steps = 50
    if arg not in (None, "", "runlocal"):
        raise ValueError(f"unknown config argument {arg!r}; groupvit_gcc_yfcc takes 'runlocal' "
                         "or nothing.")
    _dense.runlocal(c, arg, "groupvit_gcc_yfcc")
    if arg == "runlocal":
        c.model, c.data.image_size, c.data.context_length = "GroupViT-tiny", 32, 16
        c.head.short_side, c.head.eval_crop, c.eval.segmentation = 0, 0, "synthetic"
        c.loss, c.loss_tile = "tiled", 8
    return c
