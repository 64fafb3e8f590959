"""SigLIP ViT-B-16: the sigmoid loss (temperature init 10, bias init -10), batch 32768.

    clipjax train --config siglip_vit_b16 --workdir /runs/siglip \\
        data.source="wds:/data/webli/{00000..09999}.tar" data.num_examples=1000000000
    clipjax train --config siglip_vit_b16:runlocal --workdir /tmp/siglip
"""

import importlib.util
import math
import pathlib

import ml_collections

_spec = importlib.util.spec_from_file_location("clipjax_config_paper",
                                               pathlib.Path(__file__).with_name("_paper.py"))
_paper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_paper)


def get_config(arg=None):
    c = _paper.clip_recipe("ViT-B-16", arg)
    c.model_overrides = ml_collections.ConfigDict(dict(
        init_logit_scale=math.log(10.0), init_logit_bias=-10.0))
    c.loss = "sigmoid_ring" if arg != "runlocal" else "sigmoid"
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 1e-4
    c.optimizer.warmup_steps = 2000
    return c
