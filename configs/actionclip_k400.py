"""ActionCLIP on Kinetics-400 (Wang et al. 2021): the paper's recipe from OpenAI's ViT-B/32.

    clipjax train --config actionclip_k400 --workdir ac-k400 \\
        init_checkpoint=/weights/ViT-B-32.pt data.source='k400:/data/k400?split=train' \\
        eval.video='k400:/data/k400?split=val'
    clipjax eval action --checkpoint ac-k400 --dataset k400:/data/k400?split=val --views 10x3
    clipjax train --config actionclip_k400:runlocal       # the same path at CPU size

8 TSN frames, the Transf fusion (6 blocks), 16 prompt templates (one at random per sample),
the KL loss over the global batch of 128, 50 epochs with 5 of warmup then cosine, AdamW lr
5e-6 for CLIP and 10x for the fusion, betas 0.9/0.98, weight decay 0.2, clipping at 20.
The reference's RandAugment (N 2, M 9) is not applied.
"""

import ml_collections

from clipjax.configs import _video, default


def get_config(arg=None):
    c = default.get_config()
    c.task = "actionclip"
    c.model = "ViT-B-32-quickgelu"  # ViT-B-16-quickgelu with 8, 16 or 32 frames for B/16
    c.head = ml_collections.ConfigDict(dict(frames=8, fusion="Transf", fusion_layers=6,
                                            tsm=False, joint=False))
    c.init_checkpoint = ""  # required: OpenAI / OpenCLIP weights or a clipjax CLIP workdir
    c.dtype = "bfloat16"
    c.scan, c.remat = True, "full"
    c.loss = "kl_multi_positive"
    c.global_batch = 128
    c.epochs = 50
    c.total_steps = 0  # epochs x data.num_examples / global_batch
    c.optimizer.lr = 5e-6
    c.optimizer.warmup_steps = 0
    c.optimizer.warmup_fraction = 0.1  # 5 of 50 epochs
    c.optimizer.weight_decay = 0.2
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.98, 1e-6
    c.optimizer.grad_clip_norm = 20.0
    c.optimizer.lr_multipliers = {"^temporal": 10.0}  # the fusion module at 5e-5
    c.mesh.data, c.mesh.fsdp = -1, 1
    c.data.source = "k400:/data/k400?split=train"
    c.data.num_examples = 240_000  # set it to the clips your copy holds
    c.data.image_size = 224
    c.data.context_length = 77
    c.data.num_workers = 16
    c.eval.zeroshot = ""
    c.eval.video = "k400:/data/k400?split=val"
    c.eval.views = "1x1"  # the paper's 83.8 top-1 (B/16, 32 frames) is 10x3
    c.eval.every_steps = 1875  # once an epoch
    c.checkpoint.every_steps = 1875
    c.log_every_steps = 50
    _video.runlocal(c, arg, "actionclip_k400", shrink_model=True)
    if arg == "runlocal":
        c.head.fusion_layers, c.head.tsm = 1, True
    return c
