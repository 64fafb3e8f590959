"""CLIP RN50 as in the paper: global batch 32768, AdamW lr 5e-4, warmup 2000, cosine, 32 epochs.

    clipjax train --config clip_rn50 --workdir /mnt/gcs/runs/clip_rn50 \
        data.source="wds:/data/laion400m/{00000..41407}.tar" data.num_examples=400000000
    clipjax train --config clip_rn50:runlocal --workdir /tmp/clip_rn50   # CPU smoke run
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("clipjax_config_paper",
                                               pathlib.Path(__file__).with_name("_paper.py"))
_paper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_paper)


def get_config(arg=None):
    return _paper.clip_recipe("RN50", arg)
