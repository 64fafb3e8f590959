"""ActionCLIP on the built-in moving-shapes videos: learns on a CPU in minutes.

    clipjax train --config actionclip_synthetic                      # from scratch
    clipjax train --config actionclip_synthetic init_checkpoint=clipjax-default
    clipjax train --config actionclip_synthetic head.fusion=meanP --workdir ac-meanp
    clipjax eval action --checkpoint clipjax-actionclip_synthetic --dataset synthetic

The six classes are motions whose mirror (left/right, up/down, grow/shrink) has the same
frames in reverse order: meanP stays near chance on them, Transf and TSM do not.
"""

import ml_collections

from clipjax.configs import _video, default


def get_config(arg=None):
    c = default.get_config()
    c.task = "actionclip"
    c.head = ml_collections.ConfigDict(dict(
        frames=8, fusion="Transf",  # meanP | Conv_1D | LSTM | Transf | Transf_cls
        fusion_layers=2, tsm=False, joint=False))
    c.loss = "kl_multi_positive"
    c.global_batch = 32
    c.total_steps = 1200
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.lr_multipliers = {}  # from scratch every module learns at one rate
    _video.on_builtin_clips(c)  # or eval.video=ucf101:/data/ucf101?split=1
    _video.runlocal(c, arg, "actionclip_synthetic")
    return c
