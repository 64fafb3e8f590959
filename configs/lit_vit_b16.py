"""LiT ViT-B-16: a locked, pre-trained image tower and a text tower trained from scratch.

    clipjax convert ViT-B-16.pt vitb16.safetensors     # or any training workdir
    clipjax train --config lit_vit_b16 --workdir /runs/lit init_checkpoint=vitb16.safetensors \\
        data.source="wds:/data/cc12m/{0000..1242}.tar" data.num_examples=10000000
    clipjax train --config lit_vit_b16:runlocal --workdir /tmp/lit init_checkpoint=RUN_OR_FILE
"""

from clipjax.configs._paper import clip_recipe


def get_config(arg=None):
    c = clip_recipe("ViT-B-16", arg)
    c.optimizer.freeze = ("^visual/",)  # locked image tower: no updates, no Adam moments
    c.init_checkpoint_keep = ("^visual/",)  # take only the image tower from init_checkpoint
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 1e-4
    return c
