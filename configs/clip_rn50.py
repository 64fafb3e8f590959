"""CLIP RN50 as in the paper: global batch 32768, AdamW lr 5e-4, warmup 2000, cosine, 32 epochs.

    clipjax train --config clip_rn50 --workdir /mnt/gcs/runs/clip_rn50 \
        data.source="wds:/data/laion400m/{00000..41407}.tar" data.num_examples=400000000
    clipjax train --config clip_rn50:runlocal --workdir /tmp/clip_rn50   # CPU smoke run
"""

from clipjax.configs._paper import clip_recipe


def get_config(arg=None):
    return clip_recipe("RN50", arg)
