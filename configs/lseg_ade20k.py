"""LSeg on ADE20K (Li et al. 2022): the paper's recipe on a CLIP ViT image tower.

    clipjax train --config lseg_ade20k --workdir lseg-ade \\
        init_checkpoint=/weights/clip-vit-l16 \\
        data.source='ade20k:/data/ADEChallengeData2016?split=training' \\
        eval.segmentation='ade20k:/data/ADEChallengeData2016?split=validation'
    clipjax train --config lseg_ade20k:b16 init_checkpoint=/weights/ViT-B-16.pt ...
    clipjax eval segmentation --checkpoint lseg-ade --dataset \\
        'ade20k:/data/ADEChallengeData2016?split=validation' --scales 0.5,0.75,1,1.25,1.5,1.75 --flip
    clipjax train --config lseg_ade20k:runlocal        # the same path at CPU size

ViT-L/16 tapped at blocks 5/11/17/23, DPT reassemble to [256, 512, 1024, 1024] and fusion at
256, crop 480 from a base size 520 (random scale 0.5-2, flip), SGD momentum 0.9, lr 0.004
(x batch / 16), weight decay 1e-4, poly 0.9, 240 epochs of the 20,210 training images, the
decoder at 10x, the text tower frozen. The reference starts its image tower from an
ImageNet ViT-L/16 and normalises with mean = std = 0.5; here both towers come from one CLIP
checkpoint and images are normalised with CLIP's mean and std. `:b16` is the same recipe
on ViT-B/16 (OpenAI's weights; hooks 2/5/8/11, reassemble [96, 192, 384, 768]).
Evaluation: sliding 480 windows at stride 320, optionally multi-scale and flipped; mIoU
is reported both ways (absent classes skipped, and counted as 0 as LSeg's paper does).
"""

import ml_collections

from clipjax.configs import _dense, default


def get_config(arg=None):
    c = default.get_config()
    c.task = "lseg"
    variant = arg if arg in ("l16", "b16") else "l16"
    c.model = {"l16": "ViT-L-16", "b16": "ViT-B-16"}[variant]
    c.head = ml_collections.ConfigDict(dict(
        features=256, hooks=(), readout_dims=(), template="{}", base_size=520,
        eval_mode="slide", eval_scales=(1.0,), eval_flip=False, train_words="canonical",
        held_out_classes=()))
    c.init_checkpoint = ""  # required: a CLIP checkpoint of c.model (weights or a workdir)
    c.dtype = "bfloat16"
    c.scan, c.remat = False, "full"  # the taps read every block's output
    c.global_batch = 16
    c.epochs = 240
    c.total_steps = 0  # epochs x data.num_examples / global_batch
    c.optimizer.name = "sgd"
    c.optimizer.schedule = "poly"
    c.optimizer.power = 0.9
    c.optimizer.lr = 0.004  # x global_batch / 16
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 1e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.grad_clip_norm = 0.0
    c.optimizer.lr_multipliers = {"^scratch/": 10.0}
    c.mesh.data, c.mesh.fsdp = -1, 1
    c.data.source = "ade20k:/data/ADEChallengeData2016?split=training"
    c.data.num_examples = 20210
    c.data.image_size = 480
    c.data.context_length = 77
    c.data.num_workers = 8
    c.eval.zeroshot = ""
    c.eval.segmentation = "ade20k:/data/ADEChallengeData2016?split=validation"
    c.eval.num_examples = 0  # all 2,000
    c.eval.every_steps = 20000
    c.checkpoint.every_steps = 5000
    c.log_every_steps = 50
    if arg not in (None, "", "l16", "b16", "runlocal"):
        raise ValueError(f"unknown config argument {arg!r}; lseg_ade20k takes l16, b16, "
                         "runlocal or nothing.")
    _dense.runlocal(c, arg if arg == "runlocal" else None, "lseg_ade20k", shrink_model=True)
    if arg == "runlocal":
        c.head.features, c.head.base_size = 32, 64
        c.model_overrides.vision.patch_size = 16
    return c
