"""CLIP ViT-B-16 as in the paper: global batch 32768, AdamW lr 5e-4, warmup 2000, cosine, 32 epochs.

    clipjax train --config clip_vit_b16 --workdir /mnt/gcs/runs/clip_vit_b16 \
        data.source="wds:/data/laion400m/{00000..41407}.tar" data.num_examples=400000000
    clipjax train --config clip_vit_b16:runlocal --workdir /tmp/clip_vit_b16   # CPU smoke run
"""

from clipjax.configs._paper import clip_recipe


def get_config(arg=None):
    return clip_recipe("ViT-B-16", arg)
