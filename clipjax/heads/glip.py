"""GLIP (Li et al., 2022): detection as phrase grounding with deep vision-language fusion.

The image tower gives a five-level pyramid (ResNet: FPN over C3-C5; ViT: a simple pyramid
from its last tokens; both P6/P7 from P5), the text tower per-token features of a prompt
of class names. `fusion_layers` blocks each fuse them (bidirectional cross-attention over
every pyramid location and every token), refine the text (a non-causal self-attention
block, GLIP's BERT layer) and the image (a DyHead layer). Every location is one anchor:
its token logits are a dot product with the projected text plus a token bias, its box
deltas come with a learned scale per level, and a centerness logit ranks them. Trained by
token focal loss, GIoU and centerness BCE on ATSS targets (clipjax.heads.boxes).

The reference uses Swin and BERT and no CLIP weights: on the clipjax towers GLIP is a
variant. CLIP's text tower is causal (a token sees only the tokens before it), where BERT
reads both ways; the fusion's text self-attention and cross-attention see the whole
prompt. A ResNet tower's BatchNorm stays in eval mode with frozen statistics (GLIP freezes
BN). Dropout (0.1 in the reference's fusion) is left out.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clipjax.heads import boxes
from clipjax.models import dyhead, layers
from clipjax.models.clip import CLIP
from clipjax.models.fusion import CLAMP, BiAttentionBlock
from clipjax.models.layers import CONV_OUT, EMBED

STRIDES = (8, 16, 32, 64, 128)
PRIOR = 0.01  # focal loss prior: bias0 = -log((1 - p) / p)
DEFAULTS = {"fpn_channels": 256, "fusion_layers": 6, "joint_dim": 2048, "fusion_heads": 8,
            "deformable": True, "fusion": True, "strides": STRIDES, "gn_groups": 32,
            "anchor_scale": 8.0, "topk": 9, "focal_alpha": 0.25, "focal_gamma": 2.0,
            "giou_weight": boxes.REG_WEIGHT, "max_boxes": 100, "max_negatives": 85,
            "per_prompt": 40}
# No gradient reaches CLIP's pooled embeddings; frozen, weight decay leaves them alone too.
FROZEN = ("^logit_scale$", "^text/text_projection$", "^visual/(attnpool/|proj$)")
BATCH_NDIM = {"image": 4, "tokens": 2, "boxes": 3, "box_mask": 2, "positive_map": 3}
BATCH_STATS = False


def text_mask(tokens_BL: jax.Array) -> jax.Array:
    """bool [B, L]: start-of-text up to end-of-text (the largest id); the padding after is off."""
    eot_B = jnp.argmax(tokens_BL, axis=-1)
    return jnp.arange(tokens_BL.shape[-1])[None, :] <= eot_B[:, None]


def _normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch's F.normalize: x / max(|x|, eps)."""
    x32 = x.astype(jnp.float32)
    return x32 / jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), eps)


class GLIP(CLIP):
    """CLIP's towers with a feature pyramid, deep fusion (VLDyHead) and GLIP's head."""

    crop: int = 800
    fpn_channels: int = 256
    fusion_layers: int = 6
    joint_dim: int = 2048
    fusion_heads: int = 8
    deformable: bool = True
    fusion: bool = True
    strides: tuple[int, ...] = STRIDES
    gn_groups: int = 32
    anchor_scale: float = 8.0  # anchors are anchor_scale x stride wide (boxes.anchors)

    # Both towers read any size their stride divides (GLIP trains at several sizes); a
    # ResNet's BatchNorm stays in eval mode whatever self.train: frozen statistics.
    def video_options(self) -> dict:
        return {} if self.config.vision.is_resnet else {"any_size": True}

    def resnet_options(self) -> dict:
        return {"train": False, "any_size": True}

    def setup(self):
        c, v, t = self.config, self.config.vision, self.config.text
        n = len(self.strides)
        if not 1 <= n <= 5 or tuple(self.strides) != STRIDES[:n]:
            raise ValueError(f"head.strides={tuple(self.strides)}: give the first levels of "
                             f"{STRIDES}, e.g. (8, 16) or all five.")
        if not v.is_resnet and v.patch_size not in (8, 16, 32):
            raise ValueError(f"GLIP's pyramid needs a ViT patch of 8, 16 or 32 pixels, not "
                             f"{v.patch_size}; choose a /8, /16 or /32 model.")
        super().setup()

        f, tower = self.fpn_channels, min(n, 3)
        if v.is_resnet:
            self.fpn = dyhead.FPN(f, n - tower, self.dtype)
        else:
            self.fpn = dyhead.SimplePyramid(f, v.patch_size, tower, n - tower, self.dtype)
        block = nn.remat(BiAttentionBlock) if self.remat != "none" else BiAttentionBlock
        x = self.fusion_layers
        self.vlfuse = [block(self.joint_dim, self.fusion_heads, 1.0 / x, self.dtype)
                       for _ in range(x if self.fusion else 0)]
        self.text_layers = [layers.ResidualBlock(t.heads, 4 * t.width, c.activation,
                                                 causal=False, dtype=self.dtype)
                            for _ in range(x)]
        self.dyconv = [dyhead.DyConv(f, self.deformable, self.gn_groups, self.dtype)
                       for _ in range(x)]
        small = nn.initializers.normal(0.01)
        self.bbox_pred = dyhead.Conv(4, 1, kernel_init=small, dtype=self.dtype)
        self.centerness = dyhead.Conv(1, 1, kernel_init=small, dtype=self.dtype)
        self.scales = layers.param_with_axes(self, "scales", nn.initializers.ones, (n,), (None,))
        self.dot_product_projection_text = layers.Dense(
            f, (EMBED, CONV_OUT), dtype=self.dtype, kernel_init=dyhead.TORCH_LINEAR)
        self.log_scale = layers.param_with_axes(self, "log_scale", nn.initializers.zeros, (), ())
        self.bias_lang = layers.param_with_axes(self, "bias_lang", nn.initializers.zeros,
                                                (t.width,), (EMBED,))
        self.bias0 = layers.param_with_axes(
            self, "bias0", nn.initializers.constant(-math.log((1 - PRIOR) / PRIOR)), (), ())

    def pyramid(self, img_BHWC: jax.Array) -> list[jax.Array]:
        """Maps [B, Y, X, fpn_channels] at `strides`, finest first."""
        _, feats = self.visual(img_BHWC, return_features=True)
        if self.config.vision.is_resnet:
            return self.fpn([feats[f"layer{i}"] for i in (2, 3, 4)][:min(len(self.strides), 3)])
        p = self.config.vision.patch_size
        b, h, w = img_BHWC.shape[:3]
        tokens_BND = feats["tokens"][:, 1:]  # after ln_post, less the class token
        return self.fpn(tokens_BND.reshape(b, h // p, w // p, tokens_BND.shape[-1]))

    def fuse(self, maps: list[jax.Array], l_BLD: jax.Array,
             mask_BL: jax.Array) -> tuple[list[jax.Array], jax.Array]:
        """VLDyHead's tower: fusion_layers x (VLFuse, text self-attention, DyHead layer)."""
        shapes = [m.shape for m in maps]
        for i in range(self.fusion_layers):
            if self.fusion:
                v_BND = jnp.concatenate([m.reshape(m.shape[0], -1, m.shape[-1]) for m in maps], 1)
                v_BND, l_BLD = self.vlfuse[i](v_BND, l_BLD, mask_BL)
                splits = np.cumsum([s[1] * s[2] for s in shapes])[:-1]
                maps = [part.reshape(s) for part, s in zip(jnp.split(v_BND, splits, 1), shapes)]
            l_BLD, _ = self.text_layers[i](l_BLD, mask_BL)
            maps = self.dyconv[i](maps)
        return maps, l_BLD

    def detect(self, img_BHWC: jax.Array, tokens_BL: jax.Array) -> dict:
        """{"logits": [B, A, L], "deltas": [B, A, 4], "centerness": [B, A]} (float32), anchors
        level by level, rows then columns (boxes.anchors' order)."""
        if img_BHWC.shape[1] % 32 or img_BHWC.shape[2] % 32:
            raise ValueError(f"Image size {img_BHWC.shape[1]}x{img_BHWC.shape[2]} is not a "
                             "multiple of 32; crop or pad to a multiple of it.")
        mask_BL = text_mask(tokens_BL)
        _, text = self.text(tokens_BL, return_features=True)
        maps, l_BLD = self.fuse(self.pyramid(img_BHWC), text["tokens"], mask_BL)
        b = img_BHWC.shape[0]
        flat = lambda x: x.reshape(b, -1, x.shape[-1]).astype(jnp.float32)  # noqa: E731
        deltas = [flat(self.bbox_pred(m)) * self.scales[i] for i, m in enumerate(maps)]
        centerness = [flat(self.centerness(m))[..., 0] for m in maps]
        img_BAC = jnp.concatenate([flat(m) for m in maps], 1)
        # GLIP's dot-product token head: the image side unnormalised, the text normalised.
        emb_BLD = _normalize(l_BLD)
        proj_BLC = self.dot_product_projection_text(emb_BLD / 2.0).astype(jnp.float32)
        bias_BL = emb_BLD @ self.bias_lang + self.bias0
        logits = jnp.einsum("bac,blc->bal", img_BAC, proj_BLC) / jnp.exp(self.log_scale)
        logits = jnp.clip(logits + bias_BL[:, None, :], -CLAMP, CLAMP)
        return {"logits": logits, "deltas": jnp.concatenate(deltas, 1),
                "centerness": jnp.concatenate(centerness, 1)}

    def __call__(self, img_BHWC: jax.Array, tokens_BL: jax.Array) -> dict:
        return self.detect(img_BHWC, tokens_BL)

    def example_inputs(self, batch: int = 1) -> tuple:
        return (jnp.zeros((batch, self.crop, self.crop, 3), jnp.float32),
                jnp.zeros((batch, self.config.text.context_length), jnp.int32))


# --- The task --------------------------------------------------------------------------


def settings(config) -> dict:
    from clipjax.heads import video

    return video.head_settings(config, DEFAULTS, "glip")


def _base(config):
    from clipjax.models import clip

    return clip.create_model(config.model, dtype=jnp.dtype(config.get("dtype", "float32")),
                             scan=bool(config.get("scan", False)),
                             remat=config.get("remat", "none"),
                             **config.model_overrides.to_dict())


def context_length(config) -> int:
    """Tokens per prompt: the text tower's context (GLIP's 256 with text.context_length)."""
    return _base(config).config.text.context_length


def build_models(config):
    """(train model, eval model): the same GLIP (no dropout; BatchNorm always frozen)."""
    s = settings(config)
    if config.data.image_size % 32:
        raise ValueError(f"data.image_size={config.data.image_size} is not a multiple of 32; "
                         "GLIP's pyramid needs one (e.g. 800 or 1024).")
    base = _base(config)
    model = GLIP(base.config, dtype=base.dtype, scan=base.scan, remat=base.remat,
                 crop=int(config.data.image_size), fpn_channels=int(s["fpn_channels"]),
                 fusion_layers=int(s["fusion_layers"]), joint_dim=int(s["joint_dim"]),
                 fusion_heads=int(s["fusion_heads"]), deformable=bool(s["deformable"]),
                 fusion=bool(s["fusion"]), strides=tuple(int(x) for x in s["strides"]),
                 gn_groups=int(s["gn_groups"]), anchor_scale=float(s["anchor_scale"]))
    return model.clone(train=True), model


def batch_keys(config) -> tuple[str, ...]:
    return ("image", "tokens", "boxes", "box_mask", "positive_map")


def encode(model: GLIP):
    """fn(params, batch) -> GLIP.detect's outputs for {"image", "tokens"}."""
    from clipjax.train import device_images

    def fn(params, batch):
        return model.apply({"params": params}, device_images(batch["image"]), batch["tokens"],
                           method="detect")

    return fn


def loss(model: GLIP, config, mesh):
    """fn(params, outputs, batch) -> (loss, metrics): ATSS token focal + GIoU + centerness,
    each normalised over the global batch (boxes.normalize_losses)."""
    s = settings(config)
    size = int(config.data.image_size)
    anchors_A4, levels = boxes.anchors((size, size), model.strides, model.anchor_scale)
    anchors_A4 = jnp.asarray(anchors_A4)

    def per_image(logits_AL, deltas_A4, ctr_A, gt_M4, valid_M, map_ML, mask_L):
        return boxes.detection_loss(logits_AL, deltas_A4, ctr_A, anchors_A4, levels, gt_M4,
                                    valid_M, map_ML, mask_L, topk=int(s["topk"]),
                                    alpha=float(s["focal_alpha"]), gamma=float(s["focal_gamma"]))

    def fn(params, outputs, batch):
        if outputs["logits"].shape[1] != anchors_A4.shape[0]:
            raise ValueError(f"The model scores {outputs['logits'].shape[1]} anchors but a "
                             f"{size}px image has {anchors_A4.shape[0]}; feed images of "
                             "data.image_size.")
        terms = jax.vmap(per_image)(outputs["logits"], outputs["deltas"], outputs["centerness"],
                                    batch["boxes"].astype(jnp.float32), batch["box_mask"],
                                    batch["positive_map"].astype(jnp.float32),
                                    text_mask(batch["tokens"]))
        parts = boxes.normalize_losses(terms, float(s["giou_weight"]))
        metrics = {f"loss_{k}": v for k, v in parts.items()}
        metrics["positives"] = jnp.sum(terms["num_pos"]) / outputs["logits"].shape[0]
        return parts["token"] + parts["giou"] + parts["centerness"], metrics

    return fn


def predict(model: GLIP):
    """fn(params, uint8 images [B, S, S, 3], tokens [B, L]) -> (token probabilities [B, A, L],
    box deltas [B, A, 4], centerness logits [B, A]: boxes.postprocess applies the sigmoid)."""
    from clipjax.train import device_images

    def fn(params, img_BHWC, tokens_BL):
        out = model.apply({"params": params}, device_images(img_BHWC), tokens_BL,
                          method="detect")
        return jax.nn.sigmoid(out["logits"]), out["deltas"], out["centerness"]

    return fn


def next_command(config, workdir: str) -> str:
    data = config.eval.get("detection") or "synthetic"
    return f"clipjax eval detection --checkpoint {workdir} --dataset {data}"
