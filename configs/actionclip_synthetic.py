"""ActionCLIP on the built-in moving-shapes videos: learns on a CPU in minutes.

    clipjax train --config actionclip_synthetic                      # from scratch
    clipjax train --config actionclip_synthetic init_checkpoint=clipjax-default
    clipjax train --config actionclip_synthetic head.fusion=meanP --workdir ac-meanp
    clipjax eval action --checkpoint clipjax-actionclip_synthetic --dataset synthetic

The six classes are motions whose mirror (left/right, up/down, grow/shrink) has the same
frames in reverse order: meanP stays near chance on them, Transf and TSM do not.
"""

import ml_collections

from clipjax.configs import default


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
    c.data.source = "synthetic"
    c.eval.zeroshot = ""
    c.eval.video = "synthetic"  # or a labelled dataset spec: ucf101:/data/ucf101?split=1
    c.eval.views = "1x1"
    c.eval.num_examples = 512
    c.eval.every_steps = 400
    c.checkpoint.every_steps = 400
    c.log_every_steps = 50
    if arg == "runlocal":
        c.total_steps, c.global_batch, c.eval.num_examples = 4, 16, 32
        c.eval.every_steps = c.checkpoint.every_steps = 2
        c.log_every_steps = 1
        c.head.frames = 4
        c.optimizer.warmup_steps = 1
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; actionclip_synthetic takes "
                         "'runlocal' or nothing.")
    return c
