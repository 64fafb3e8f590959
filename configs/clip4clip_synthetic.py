"""CLIP4Clip on the built-in moving-shapes videos: learns on a CPU in minutes.

    clipjax train --config clip4clip_synthetic                       # from scratch
    clipjax train --config clip4clip_synthetic init_checkpoint=clipjax-default  # from the default run
    clipjax train --config clip4clip_synthetic head.sim_header=meanP --workdir c4c-meanp
    clipjax eval video-retrieval --checkpoint clipjax-clip4clip_synthetic --dataset synthetic

A clip's mirror motion (left/right, up/down, grow/shrink) has the same frames in reverse
order, so meanP cannot tell them apart; seqTransf and tightTransf can.
"""

import ml_collections

from clipjax.configs import _video, default


def get_config(arg=None):
    c = default.get_config()
    c.task = "clip4clip"
    c.head = ml_collections.ConfigDict(dict(
        frames=8, sim_header="seqTransf",  # meanP | seqLSTM | seqTransf | tightTransf
        linear_patch="2d", cross_layers=2, fps=1, slice_framepos=2,
        # A tiny text tower's positional embedding is about 1% of a frame embedding, so
        # copied as is (OpenAI's are trained, larger) the frames start nearly order-blind and
        # each clip and its mirror pair sit at a saddle: both towers blind to the direction,
        # neither gets a gradient to see it. Scaled up, the heads start order-aware.
        position_scale=30.0))
    c.global_batch = 32
    c.total_steps = 1200
    # As the paper's recipe, CLIP learns slower than the new modules (here 10x, there 1000x):
    # the temporal head must move before the towers settle on what a mean can tell.
    c.optimizer.lr = 1e-2
    c.optimizer.lr_multipliers = {"^(visual|text)/|^logit_scale$": 0.1}
    c.optimizer.warmup_steps = 100
    _video.on_builtin_clips(c)  # or eval.video=msrvtt:/data/msrvtt?split=test
    # Each clip beside itself played backwards (its mirror motion, its own caption): the
    # in-batch negatives that only the frames' order tells apart. Without them a random
    # batch almost never holds two clips of one colour and shape on one axis.
    c.data.mirror_pairs = True
    _video.runlocal(c, arg, "clip4clip_synthetic")
    return c
