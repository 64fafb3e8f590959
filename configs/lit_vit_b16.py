"""LiT ViT-B-16: a locked, pre-trained image tower and a text tower trained from scratch.

    clipjax convert ViT-B-16.pt vitb16.safetensors
    clipjax train --config lit_vit_b16 --workdir /runs/lit init_checkpoint=vitb16.safetensors \\
        data.source="wds:/data/cc12m/{0000..1242}.tar" data.num_examples=10000000
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("clipjax_config_paper",
                                               pathlib.Path(__file__).with_name("_paper.py"))
_paper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_paper)


def get_config(arg=None):
    c = _paper.clip_recipe("ViT-B-16", arg)
    c.optimizer.freeze = ("^visual/",)  # locked image tower: no updates, no Adam moments
    c.init_checkpoint_keep = ("^visual/",)  # take only the image tower from init_checkpoint
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 1e-4
    return c
