"""CLIP4Clip on MSR-VTT (Luo et al. 2021): the paper's recipe from OpenAI's ViT-B/32.

    clipjax train --config clip4clip_msrvtt --workdir c4c-msrvtt \\
        init_checkpoint=/weights/ViT-B-32.pt data.source='msrvtt:/data/msrvtt?split=train' \\
        eval.video='msrvtt:/data/msrvtt?split=test'
    clipjax eval video-retrieval --checkpoint c4c-msrvtt --dataset msrvtt:/data/msrvtt
    clipjax train --config clip4clip_msrvtt:runlocal      # the same path at CPU size

12 frames at 1 fps, 32 words, seqTransf (the paper's best, 44.5 t2v R@1 on 1k-A), batch
128, 5 epochs of the 9k training videos, lr 1e-4 for the new modules and 1e-7 for CLIP
(x 1e-3), warmup-cosine with 10% warmup, AdamW betas 0.9/0.98, eps 1e-6, weight decay 0.2,
gradient clipping 1.0. Add data.source='...&captions=all' (and data.num_examples=180000)
to train on every caption pair, as the paper's expanded setting.
"""

import ml_collections

from clipjax.configs import _video, default


def get_config(arg=None):
    c = default.get_config()
    c.task = "clip4clip"
    c.model = "ViT-B-32-quickgelu"  # OpenAI's weights; ViT-B-16-quickgelu for B/16
    c.head = ml_collections.ConfigDict(dict(frames=12, sim_header="seqTransf",
                                            linear_patch="2d", cross_layers=4, fps=1,
                                            slice_framepos=2))
    c.init_checkpoint = ""  # required: OpenAI / OpenCLIP weights or a clipjax CLIP workdir
    c.dtype = "bfloat16"
    c.scan, c.remat = True, "full"
    c.loss = "softmax"  # the global batch of 128 fits; tiled for larger
    c.global_batch = 128
    c.epochs = 5
    c.total_steps = 0  # epochs x data.num_examples / global_batch
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.warmup_fraction = 0.1
    c.optimizer.weight_decay = 0.2
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.98, 1e-6
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.lr_multipliers = {"^(visual|text)/|^logit_scale$": 1e-3}  # CLIP at 1e-7
    c.mesh.data, c.mesh.fsdp = -1, 1
    c.data.source = "msrvtt:/data/msrvtt?split=train"
    c.data.num_examples = 9000  # MSRVTT_train.9k.csv
    c.data.image_size = 224
    c.data.context_length = 32  # max_words
    c.data.num_workers = 8
    c.eval.zeroshot = ""
    c.eval.video = "msrvtt:/data/msrvtt?split=test"  # the 1k-A test (JSFusion)
    c.eval.views = "1x1"
    c.eval.every_steps = 70  # about once an epoch
    c.checkpoint.every_steps = 70
    c.log_every_steps = 10
    _video.runlocal(c, arg, "clip4clip_msrvtt", shrink_model=True)
    if arg == "runlocal":
        c.model_overrides.embed_dim = 64  # seqTransf's blocks come from the text tower
        c.head.cross_layers = 2
    return c
