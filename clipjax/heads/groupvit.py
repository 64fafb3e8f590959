"""GroupViT (Xu et al. 2022): semantic segmentation that emerges from captions alone.

The image tower merges patches into learned groups stage by stage: each stage
self-attends over [image tokens; group tokens], then a grouping block assigns every token
to one group by a hard, straight-through Gumbel-softmax over the groups and pools it
there (196 patches -> 64 groups -> 8 at 224 px). The image embedding is the mean of the
final groups. Both towers start from scratch (no CLIP weights) and train with CLIP's
contrastive loss plus a multi-label one: each image against up to `multi_label` words of
its caption put in random ImageNet templates (clipjax.heads.nouns).

Zero-shot segmentation (`segmenter`) multiplies the stages' soft assignments into a
patch -> final-group map, gives each pixel its arg-max group and each group a class from
the image's top-5 classes, and marks background where that class's affinity is below a
threshold, as the paper's `group_vit_seg.py` does.

Departures from NVlabs/GroupViT (each also said where it is made):
- the projection MLPs normalise with LayerNorm, not BatchNorm (see ProjectMlp);
- no stochastic depth (drop_path 0.1 in the paper's config);
- the stages' self-attention blocks are clipjax's (layers.Transformer: LeCun-normal
  initialisation, not truncated normal 0.02), and so is the text tower, which adds a
  learned width x width `text_projection` before its projection MLP;
- positions are resized with JAX's cubic kernel (Keys a = -0.5; torch's bicubic is -0.75)
  whenever the patch grid differs, in training too;
- images are normalised with CLIP's mean and std (clipjax's data), not ImageNet's.

    clipjax train --config groupvit_synthetic
"""

import dataclasses
import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clipjax import losses
from clipjax.models import layers
from clipjax.models.clip import _normalize
from clipjax.models.grouping import GroupViTVision
from clipjax.models.layers import EMBED, MLP, Dtype
from clipjax.models.text import TextTransformer
from clipjax.models.variants import TextConfig

MAX_SCALE = 100.0  # GroupViT clamps both exp(logit scales) here
_TRUNC = nn.initializers.truncated_normal(0.02)  # GroupViT's init of its own linear layers


# --- Sizes ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GroupVisionConfig:
    image_size: int
    patch_size: int
    width: int
    heads: int
    depths: tuple[int, ...]  # blocks per stage
    group_tokens: tuple[int, ...]  # learned group tokens per stage (0: none, the last)
    output_groups: tuple[int, ...]  # groups each grouping block makes (one fewer than stages)
    mlp_ratio: float = 4.0

    @property
    def is_resnet(self) -> bool:  # train.py asks (BatchNorm statistics); never a ResNet
        return False

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class GroupViTConfig:
    embed_dim: int
    vision: GroupVisionConfig
    text: TextConfig
    proj_hidden: int = 4096  # the projection MLPs' hidden width
    activation: str = "gelu"
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: None = None  # no sigmoid loss: read by code written for CLIP


_V, _T = GroupVisionConfig, TextConfig
VARIANTS: dict[str, GroupViTConfig] = {
    # configs/group_vit_gcc_yfcc_30e.yml: the published model.
    "GroupViT-S/16": GroupViTConfig(256, _V(224, 16, 384, 6, (6, 3, 3), (64, 8, 0), (64, 8)),
                                    _T(256, 4, 12)),
    # For tests and the synthetic config: 8x8 patches -> 8 groups -> 2.
    "GroupViT-tiny": GroupViTConfig(32, _V(32, 4, 32, 2, (1, 1, 1), (8, 2, 0), (8, 2)),
                                    _T(32, 2, 2, context_length=16), proj_hidden=64),
    # The built-in shapes (configs/groupvit_synthetic.py): up to 3 shapes and background, so
    # 4 final groups; 64 patches of 4 x 4 pixels; the default run's text tower (ViT-tiny's).
    "GroupViT-synthetic": GroupViTConfig(64, _V(32, 4, 64, 4, (2, 1, 1), (16, 4, 0), (16, 4)),
                                         _T(32, 2, 2, context_length=16), proj_hidden=256),
}


def get_variant(name: str) -> GroupViTConfig:
    if name not in VARIANTS:
        raise ValueError(f"Unknown GroupViT variant {name!r}; set model to one of "
                         f"{', '.join(VARIANTS)}.")
    return VARIANTS[name]


class ProjectMlp(nn.Module):
    """Linear -> norm -> ReLU -> Linear into the joint space (GroupViT's ProjectMLP).

    LayerNorm stands in for the reference's (Sync)BatchNorm: batch statistics would tie
    rows together across gradient-cached micro-batches and need running averages.
    """

    hidden: int
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.Dense(self.hidden, (EMBED, MLP), dtype=self.dtype, name="linear_hidden")(x)
        h = jax.nn.relu(layers.LayerNorm(name="norm")(h))
        # (MLP, EMBED), not (MLP, JOINT): JOINT maps to the tensor axis that MLP already
        # uses, so this way FSDP splits the kernel too.
        out = layers.Dense(self.features, (MLP, EMBED), dtype=self.dtype, name="linear_out")(h)
        return out.astype(jnp.float32)


class GroupViT(nn.Module):
    """Grouping image tower under `visual/`, CLIP's text tower under `text/`, a projection
    MLP after each, and two logit scales (contrastive and multi-label)."""

    config: GroupViTConfig
    dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    train: bool = False  # Gumbel noise in the assignments (with a seed or 'gumbel' rng)
    unroll: bool = False

    def setup(self):
        c, v, t = self.config, self.config.vision, self.config.text
        self.visual = GroupViTVision(v.image_size, v.patch_size, v.width, v.heads,
                                     tuple(v.depths), tuple(v.group_tokens),
                                     tuple(v.output_groups), v.mlp_ratio, self.dtype, self.scan,
                                     self.remat, self.unroll, self.train)
        self.text = TextTransformer(t.context_length, t.vocab_size, t.width, t.layers, t.heads,
                                    t.width, c.activation, self.dtype, self.scan, self.remat,
                                    self.unroll)
        self.visual_projector = ProjectMlp(c.proj_hidden, c.embed_dim, self.dtype)
        self.text_projector = ProjectMlp(c.proj_hidden, c.embed_dim, self.dtype)
        scale = nn.initializers.constant(c.init_logit_scale)
        self.logit_scale = layers.param_with_axes(self, "logit_scale", scale, (), ())
        self.multi_label_logit_scale = layers.param_with_axes(self, "multi_label_logit_scale",
                                                              scale, (), ())

    def example_inputs(self, batch: int = 1) -> tuple:
        v, t = self.config.vision, self.config.text
        return (jnp.zeros((batch, v.image_size, v.image_size, 3), jnp.float32),
                jnp.zeros((batch, t.context_length), jnp.int32))

    def encode_image(self, img_BHWC: jax.Array, normalize: bool = False,
                     seed_B: jax.Array | None = None) -> jax.Array:
        """[B, E]: the projected mean of the final groups. `seed_B` (int [B]) draws the
        training Gumbel noise per row."""
        tokens_BOD, _, _ = self.visual(img_BHWC, seed_B)
        out_BE = self.visual_projector(jnp.mean(tokens_BOD.astype(jnp.float32), axis=1))
        return _normalize(out_BE) if normalize else out_BE

    def encode_text(self, tokens_BL: jax.Array, normalize: bool = False) -> jax.Array:
        out_BE = self.text_projector(self.text(tokens_BL))
        return _normalize(out_BE) if normalize else out_BE

    def assignments(self, img_BHWC: jax.Array, hard: bool = False) -> list[jax.Array]:
        """Per grouping stage, each input token's assignment over that stage's groups,
        [B, tokens, groups]: the softmax (segmentation reads it) or the hard one-hot."""
        _, soft, hard_maps = self.visual(img_BHWC)
        return [m.swapaxes(1, 2) for m in (hard_maps if hard else soft)]

    def segment_features(self, img_BHWC: jax.Array):
        """(image [B, E], final groups [B, O, E], soft maps [B, tokens, groups] per stage),
        embeddings normalised: what zero-shot segmentation reads, from one forward pass."""
        tokens_BOD, soft, _ = self.visual(img_BHWC)
        img_BE = self.visual_projector(jnp.mean(tokens_BOD.astype(jnp.float32), axis=1))
        groups_BOE = self.visual_projector(tokens_BOD)
        return _normalize(img_BE), _normalize(groups_BOE), [m.swapaxes(1, 2) for m in soft]

    def __call__(self, img_BHWC: jax.Array, tokens_BL: jax.Array):
        """Normalised image and text embeddings and both logit scales (every parameter)."""
        return (self.encode_image(img_BHWC, normalize=True),
                self.encode_text(tokens_BL, normalize=True), self.logit_scale,
                self.multi_label_logit_scale)


def clamped_scale(log_scale: jax.Array) -> jax.Array:
    return jnp.minimum(jnp.exp(log_scale), MAX_SCALE)


# --- Losses --------------------------------------------------------------------------


def multi_label_loss(img_BE: jax.Array, prompts_BKE: jax.Array, scale, *, mesh=None):
    """GroupViT's multi-label loss: each image against all B x K prompts with targets 1/K
    on its own K, each prompt against all images with its own as target; both averaged."""
    b, k, e = prompts_BKE.shape
    labels_B = jnp.arange(b)
    return losses.multi_positive_loss(img_BE, prompts_BKE.reshape(b * k, e), scale,
                                      img_labels_B=labels_B, txt_labels_C=jnp.repeat(labels_B, k),
                                      mesh=mesh)


# --- Zero-shot segmentation ---------------------------------------------------------


def segment_scores(maps: Sequence[jax.Array], img_BE: jax.Array, groups_BOE: jax.Array,
                   class_CE: jax.Array, scale, grid_hw: tuple[int, int],
                   size_hw: tuple[int, int], *, bg_thresh=0.95, top_k: int = 5) -> jax.Array:
    """GroupViT's zero-shot segmentation scores [B, H, W, 1 + C], background first.

    Patches' soft maps multiplied through the stages give each patch a distribution over
    the final groups; bilinear to the image size, each pixel takes its arg-max group and
    that group's affinity: softmax of scale x cosine over the image's `top_k` classes
    (by whole-image similarity; the others get 0) times the unmasked softmax. Background
    is 1 where the pixel's best affinity is below min(bg_thresh, the image's best group
    affinity), else 0, so the arg-max over channels is the reference's prediction (and
    averaging sliding windows averages the same scores it does).
    """
    m_BNG = maps[0]
    for m in maps[1:]:
        m_BNG = jnp.einsum("bng,bgh->bnh", m_BNG, m)
    b, _, g = m_BNG.shape
    (gh, gw), (h, w) = grid_hw, size_hw
    m_BHWG = jax.image.resize(m_BNG.reshape(b, gh, gw, g), (b, h, w, g), "linear",
                              antialias=False)
    group_BP = jnp.argmax(m_BHWG, axis=-1).reshape(b, h * w)

    logits_BOC = scale * jnp.einsum("boe,ce->boc", groups_BOE, class_CE)
    whole_BC = scale * img_BE @ class_CE.T
    c = class_CE.shape[0]
    _, top_BK = jax.lax.top_k(whole_BC, min(top_k, c))
    keep_BC = jnp.zeros((b, c), bool).at[jnp.arange(b)[:, None], top_BK].set(True)
    masked_BOC = jnp.where(keep_BC[:, None, :], logits_BOC, -jnp.inf)
    aff_BOC = jax.nn.softmax(masked_BOC, axis=-1) * jax.nn.softmax(logits_BOC, axis=-1)

    pixel_BPC = jnp.take_along_axis(aff_BOC, group_BP[..., None], axis=1)
    thresh_B = jnp.minimum(bg_thresh, jnp.max(aff_BOC, axis=(1, 2)))
    bg_BP = (jnp.max(pixel_BPC, axis=-1) < thresh_B[:, None]).astype(jnp.float32)
    scores_BPC = jnp.concatenate([bg_BP[..., None], pixel_BPC], axis=-1)
    return scores_BPC.reshape(b, h, w, c + 1)


def segmenter(model: GroupViT, params, class_text_CE, *, bg_thresh: float = 0.95,
              top_k: int = 5):
    """fn(images [B, H, W, 3] uint8 (or normalised float)) -> scores [B, H, W, 1 + C]:
    channel 0 background, then the classes of `class_text_CE` (class_embeddings);
    arg-max over channels is GroupViT's prediction. 0.95 for VOC and COCO, 0.35 Context."""
    run = _segment_fn(model.clone(train=False), int(top_k))
    class_CE = jnp.asarray(class_text_CE, jnp.float32)
    thresh = jnp.float32(bg_thresh)
    return lambda images_BHWC: run(params, class_CE, jnp.asarray(images_BHWC), thresh)


@functools.cache
def _segment_fn(model: GroupViT, top_k: int):
    from clipjax.train import device_images

    p = model.config.vision.patch_size

    @jax.jit
    def run(params, class_CE, images_BHWC, bg_thresh):
        img = device_images(images_BHWC)
        img_BE, groups_BOE, maps = model.apply({"params": params}, img,
                                               method="segment_features")
        h, w = img.shape[1:3]
        scale = clamped_scale(params["logit_scale"])
        return segment_scores(maps, img_BE, groups_BOE, class_CE, scale, (h // p, w // p),
                              (h, w), bg_thresh=bg_thresh, top_k=top_k)

    return run


def class_embeddings(model: GroupViT, params, classnames, templates: Sequence[str] = (
        "a photo of a {}.",), context_length: int | None = None,
                     batch_size: int = 256) -> jax.Array:
    """[C, E]: each class's prompts encoded, averaged unnormalised, then normalised (a
    class may be a list of synonyms, all of whose prompts are averaged)."""
    from clipjax import tokenizer
    from clipjax.evals import prompts

    length = context_length or model.config.text.context_length
    texts, owner = [], []
    for i, name in enumerate(classnames):
        for text in prompts.prompts_for(name, templates):
            texts.append(text)
            owner.append(i)
    encode = jax.jit(lambda p, t: model.apply({"params": p}, t, method="encode_text"))
    tokens = tokenizer.tokenize(texts, length)
    n = len(texts)
    batch = min(batch_size, n)
    tokens = np.concatenate([tokens, np.zeros((-n % batch, length), tokens.dtype)])
    out = np.concatenate([np.asarray(encode(params, tokens[i:i + batch]))
                          for i in range(0, len(tokens), batch)])[:n]
    counts = np.bincount(owner, minlength=len(classnames))[:, None]
    sums = np.zeros((len(classnames), out.shape[-1]), np.float32)
    np.add.at(sums, np.asarray(owner), out)
    return _normalize(jnp.asarray(sums / counts))


# --- The task ----------------------------------------------------------------------

DEFAULTS = {
    "multi_label": 3,  # prompts per caption (configs: data.text_aug.multi_label); 0: none
    "multi_label_weight": 1.0,
    "gumbel": True,  # Gumbel noise in training: batches then carry per-row seeds, "rng"
    "bg_thresh": 0.95,  # zero-shot segmentation: 0.95 VOC and COCO, 0.35 Context
    "top_k": 5,
    # Scoring real images (clipjax.heads.dense.predict_options): short side resized to
    # this (0: as is), then windows of eval_crop (0: the training size) at eval_stride (0:
    # half the window, as the paper's 448 / 224).
    "short_side": 0,
    "eval_mode": "slide",
    "eval_crop": 0,
    "eval_stride": 0,
}
BATCH_NDIM = {"image": 4, "text": 2, "prompts": 3, "rng": 1}
SEG_TEMPLATES = ("a photo of a {}.",)  # the reference's "simple" template for segmentation


def templates() -> list[str]:
    """The multi-label prompt templates: GroupViT's full set, OpenAI's 80 ImageNet ones."""
    from clipjax.evals import prompts

    return prompts.openai_imagenet_templates()


def settings(config) -> dict:
    from clipjax.heads import video

    s = video.head_settings(config, DEFAULTS, "groupvit")
    if not str(config.get("model", "")).startswith("GroupViT-"):
        raise ValueError(f"model={config.get('model')!r} is not a GroupViT variant; set "
                         f"model to one of {', '.join(VARIANTS)}.")
    if config.get("model_overrides") and config.model_overrides.to_dict():
        raise ValueError("model_overrides do not apply to GroupViT; pick a variant with "
                         f"model= ({', '.join(VARIANTS)}).")
    get_variant(config.model)
    if int(s["multi_label"]) < 0:
        raise ValueError(f"head.multi_label={s['multi_label']}; give 0 (off) or a prompt count.")
    return s


def build_models(config):
    """(train model, eval model): the same GroupViT, Gumbel noise on in the first."""
    settings(config)  # refuses a non-GroupViT model or an unknown head setting
    remat = config.get("remat", "none")
    if remat not in layers.REMAT_POLICIES:
        raise ValueError(f"Unknown remat policy {remat!r}; choose one of "
                         f"{', '.join(layers.REMAT_POLICIES)}.")
    model = GroupViT(get_variant(config.model), dtype=jnp.dtype(config.get("dtype", "float32")),
                     scan=bool(config.get("scan", False)), remat=remat)
    return model.clone(train=True), model


def encode(model: GroupViT):
    """fn(params, batch) -> (img_BE, txt_BE, prompts_BKE or None), all normalised.

    The Gumbel noise of row b comes from batch["rng"][b] (int seeds, [B]) alone, so the
    gradient-cached re-encoding sees the same noise; without "rng", no noise.
    """
    from clipjax.train import device_images

    def fn(params, batch):
        img_BE = model.apply({"params": params}, device_images(batch["image"]), True,
                             batch.get("rng"), method="encode_image")
        text_BL, prompts_BKL = batch["text"], batch.get("prompts")
        if prompts_BKL is None:
            return img_BE, model.apply({"params": params}, text_BL, True,
                                       method="encode_text"), None
        # One pass of the text tower for captions and prompts, as GroupViT packs them.
        b, k, length = prompts_BKL.shape
        all_BXL = jnp.concatenate([text_BL[:, None], prompts_BKL], axis=1)
        out = model.apply({"params": params}, all_BXL.reshape(b * (k + 1), length), True,
                          method="encode_text").reshape(b, k + 1, -1)
        return img_BE, out[:, 0], out[:, 1:]

    return fn


def loss(model: GroupViT, config, mesh):
    """CLIP's contrastive loss (softmax or tiled) + multi_label_weight x the multi-label
    loss, each with its own logit scale, exp clamped at 100."""
    s = settings(config)
    name = config.get("loss", "softmax")
    if name not in ("softmax", "tiled"):
        raise ValueError(f"loss={name!r}: GroupViT trains with the softmax contrastive loss; "
                         "set loss='softmax' or 'tiled'.")
    options = {"tile": config.get("loss_tile", 512)} if name == "tiled" else {}
    contrastive = losses.get_loss(name)

    def fn(params, outputs, batch):
        img_BE, txt_BE, prompts_BKE = outputs
        value, metrics = contrastive(img_BE, txt_BE, clamped_scale(params["logit_scale"]),
                                     None, mesh=mesh, **options)
        metrics = dict(metrics, contrastive_loss=jax.lax.stop_gradient(value))
        if prompts_BKE is not None and s["multi_label"]:
            ml_scale = clamped_scale(params["multi_label_logit_scale"])
            ml, ml_metrics = multi_label_loss(img_BE, prompts_BKE, ml_scale, mesh=mesh)
            value = value + s["multi_label_weight"] * ml
            metrics.update({f"multi_label/{k}": v for k, v in ml_metrics.items()
                            if k.endswith("accuracy")})
            metrics.update(multi_label_loss=jax.lax.stop_gradient(ml),
                           multi_label_logit_scale=jax.lax.stop_gradient(ml_scale))
        return value, metrics

    return fn


def batch_keys(config) -> tuple[str, ...]:
    s = settings(config)
    return (("image", "text") + (("prompts",) if s["multi_label"] else ())
            + (("rng",) if s["gumbel"] else ()))


# --- The glue to clipjax.heads.dense (data, evaluation, `clipjax segment`) --------------

FROZEN = ()
EXAMPLE_SOURCE = "wds:/data/cc12m/{00000..01242}.tar"


def synthetic_options(config) -> dict:
    s = settings(config)
    from clipjax.heads import nouns

    # The captions' words through the same offline tagger as real captions.
    return {"fields": ("image", "text"), "prompts": int(s["multi_label"]),
            "nouns_fn": nouns.tagged_words}


def real_data(config):
    """Image-caption pairs from any clipjax source, with the multi-label prompts."""
    from clipjax.data import pipeline

    s = settings(config)
    return pipeline.make_iterator(
        config.data.source, global_batch_size=config.global_batch,
        image_size=config.data.image_size, train=True, seed=config.seed,
        context_length=config.data.context_length, num_workers=config.data.num_workers or None,
        image_dtype="uint8", prompts=int(s["multi_label"]))


def output_names(labels: list[str]) -> list[str]:
    """GroupViT names each group with a label or leaves it background (channel 0)."""
    return ["background", *labels]


def label_options(config) -> dict:
    return {"bg_thresh": float(settings(config)["bg_thresh"])}


def scorer(model: GroupViT, top_k: int | None = None):
    """(embed_labels(params, names with background first, bg_thresh) -> {"classes": [C - 1,
    E], "bg_thresh"}, scores(params, uint8 images, labels) -> [B, H, W, C]) as
    clipjax.heads.dense expects."""
    model = model.clone(train=False)
    k = DEFAULTS["top_k"] if top_k is None else top_k

    def embed_labels(params, names, bg_thresh: float | None = None):
        if not names or names[0] not in ("background", "other"):
            raise ValueError(f"GroupViT segments a class list whose first class is the "
                             f"background (VOC, Context, COCO-Object); this one starts with "
                             f"{names[0] if names else 'nothing'!r}.")
        thresh = DEFAULTS["bg_thresh"] if bg_thresh is None else bg_thresh
        return {"classes": class_embeddings(model, params, list(names[1:]), SEG_TEMPLATES),
                "bg_thresh": jnp.float32(thresh)}

    def scores(params, img_BHWC, labels):
        from clipjax.train import device_images

        p = model.config.vision.patch_size
        img = device_images(img_BHWC)
        img_BE, groups_BOE, maps = model.apply({"params": params}, img,
                                               method="segment_features")
        h, w = img.shape[1:3]
        return segment_scores(maps, img_BE, groups_BOE, labels["classes"],
                              clamped_scale(params["logit_scale"]), (h // p, w // p), (h, w),
                              bg_thresh=labels["bg_thresh"], top_k=k)

    return embed_labels, scores


# The words GroupViT's evaluation prompts use where a dataset's class names differ
# (its segmentation/configs/_base_/datasets: VOC's "table", Context's "airplane", ...).
PROMPT_WORDS = {
    "voc": {"diningtable": "table", "pottedplant": "plant", "tvmonitor": "monitor"},
    "context": {"aeroplane": "airplane", "pottedplant": "plant", "tvmonitor": "monitor"},
}


def prompt_names(spec: str, names) -> list[str]:
    """The class names of the dataset `spec` as GroupViT's evaluation words them."""
    from clipjax.heads import dense

    if dense.is_synthetic(spec):
        from clipjax.data import synthetic_seg

        return list(synthetic_seg.label_words("caption"))  # the words its captions use
    words = PROMPT_WORDS.get(spec.split(":", 1)[0].strip(), {})
    return [words.get(n, n) for n in names]


def evaluators(config, dataset, spec: str, options: dict) -> dict:
    from clipjax.heads import dense

    names = prompt_names(spec, dataset.classnames)
    return {"seg": dense.evaluator(dataset, names, "seg", options, label_options(config))}


def next_command(config, workdir: str) -> str:
    data = config.eval.get("segmentation") or "voc:/data/VOCdevkit/VOC2012?split=val"
    return f"clipjax eval segmentation --checkpoint {workdir} --dataset {data}"
