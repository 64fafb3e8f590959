"""SigLIP ViT-B-16: the sigmoid loss (temperature init 10, bias init -10), batch 32768.

    clipjax train --config siglip_vit_b16 --workdir /runs/siglip \\
        data.source="wds:/data/webli/{00000..09999}.tar" data.num_examples=1000000000
    clipjax train --config siglip_vit_b16:runlocal --workdir /tmp/siglip
"""

import math

from clipjax.configs._paper import clip_recipe


def get_config(arg=None):
    c = clip_recipe("ViT-B-16", arg)
    c.model_overrides.init_logit_scale = math.log(10.0)
    c.model_overrides.init_logit_bias = -10.0
    c.loss = "sigmoid_ring"
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 1e-4
    return c
