"""CLIP ViT-B-16 as in the paper: global batch 32768, AdamW lr 5e-4, warmup 2000, cosine, 32 epochs.

    clipjax train --config clip_vit_b16 --workdir /mnt/gcs/runs/clip_vit_b16 \
        data.source="wds:/data/laion400m/{00000..41407}.tar" data.num_examples=400000000
    clipjax train --config clip_vit_b16:runlocal --workdir /tmp/clip_vit_b16   # CPU smoke run
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("clipjax_config_paper",
                                               pathlib.Path(__file__).with_name("_paper.py"))
_paper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_paper)


def get_config(arg=None):
    return _paper.clip_recipe("ViT-B-16", arg)
