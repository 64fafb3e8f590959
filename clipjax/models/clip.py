"""The two-tower CLIP model: encode_image, encode_text, logit_scale (and optional bias)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clipjax.models import layers
from clipjax.models.layers import Dtype
from clipjax.models.resnet import ModifiedResNet
from clipjax.models.text import TextTransformer
from clipjax.models.variants import ClipConfig, get_config, with_overrides
from clipjax.models.vit import VisionTransformer


def _normalize(x_BE: jax.Array) -> jax.Array:
    x32 = x_BE.astype(jnp.float32)
    return x32 / jnp.linalg.norm(x32, axis=-1, keepdims=True)


class CLIP(nn.Module):
    """Image tower under `visual/`, text tower under `text/`, scalars at the top."""

    config: ClipConfig
    dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    train: bool = False  # only BatchNorm (ResNet towers) behaves differently
    unroll: bool = False  # scanned layers traced one after another (layers.Transformer)

    def setup(self):
        c, v, t = self.config, self.config.vision, self.config.text
        if v.is_resnet:
            if self.video_options():
                raise ValueError(f"{', '.join(self.video_options())} need a ViT image tower; "
                                 "choose a ViT model or turn them off.")
            self.visual = ModifiedResNet(v.image_size, tuple(v.layers), v.width, v.heads,
                                         c.embed_dim, self.dtype, **self.resnet_options())
        else:
            self.visual = VisionTransformer(v.image_size, v.patch_size, v.width, v.layers, v.heads,
                                            v.mlp_dim, c.embed_dim, c.activation, self.dtype,
                                            self.scan, self.remat, self.unroll,
                                            **self.video_options())
        self.text = TextTransformer(t.context_length, t.vocab_size, t.width, t.layers, t.heads,
                                    c.embed_dim, c.activation, self.dtype, self.scan, self.remat,
                                    self.unroll)
        self.logit_scale = layers.param_with_axes(
            self, "logit_scale", nn.initializers.constant(c.init_logit_scale), (), ())
        if c.init_logit_bias is not None:
            self.logit_bias = layers.param_with_axes(
                self, "logit_bias", nn.initializers.constant(c.init_logit_bias), (), ())

    def video_options(self) -> dict:
        """VisionTransformer video fields (frames, shift, patch_3d, joint); heads override."""
        return {}

    def resnet_options(self) -> dict:
        """ModifiedResNet fields beyond the architecture (train, any_size); heads override."""
        return {"train": self.train}

    def example_inputs(self, batch: int = 1) -> tuple:
        """Inputs of __call__ that touch every parameter (init, shapes, FLOP counts)."""
        v, t = self.config.vision, self.config.text
        return (jnp.zeros((batch, v.image_size, v.image_size, 3), jnp.float32),
                jnp.zeros((batch, t.context_length), jnp.int32))

    def encode_image(self, img_BHWC: jax.Array, normalize: bool = False) -> jax.Array:
        out_BE = self.visual(img_BHWC)
        return _normalize(out_BE) if normalize else out_BE

    def encode_text(self, tokens_BL: jax.Array, normalize: bool = False) -> jax.Array:
        out_BE = self.text(tokens_BL)
        return _normalize(out_BE) if normalize else out_BE

    def image_features(self, img_BHWC: jax.Array):
        """(embedding, {"blocks"/"tokens"} for a ViT or {"stem", "layer1".."layer4"} for a ResNet)."""
        return self.visual(img_BHWC, return_features=True)

    def image_attention(self, img_BHWC: jax.Array) -> jax.Array:
        """Every ViT block's attention probabilities [layers, B, H, N, N] (CLIPasso's saliency)."""
        if self.config.vision.is_resnet:
            raise ValueError("image_attention needs a ViT image tower; choose a ViT model "
                             "(CLIPasso uses ViT-B-32).")
        return self.visual(img_BHWC, return_attention=True)[1]["attention"]

    def text_features(self, tokens_BL: jax.Array):
        """(embedding, {"blocks": [layers, B, L, D], "tokens": [B, L, D] after ln_final})."""
        return self.text(tokens_BL, return_features=True)

    def __call__(self, img_BHWC: jax.Array, tokens_BL: jax.Array):
        """Normalised image and text embeddings and the logit scale (and bias, if any)."""
        bias = self.logit_bias if self.config.init_logit_bias is not None else None
        return (self.encode_image(img_BHWC, normalize=True),
                self.encode_text(tokens_BL, normalize=True), self.logit_scale, bias)


def create_model(name: "str | ClipConfig", dtype: Dtype = jnp.float32, scan: bool = False,
                 remat: str = "none", **overrides) -> CLIP:
    """A CLIP module by architecture name ("ViT-B-32", "RN50-quickgelu", "ViT-tiny", ...) or
    from a ClipConfig.

    `dtype` is the compute dtype of matmuls and convolutions (parameters stay float32;
    softmax and layer norms run in float32); `overrides` replace ClipConfig fields, nested
    ones as dicts or dotted: `embed_dim=64`, `vision={"width": 128}`.
    """
    if remat not in layers.REMAT_POLICIES:
        raise ValueError(f"Unknown remat policy {remat!r}; choose one of "
                         f"{', '.join(layers.REMAT_POLICIES)}.")
    config = name if isinstance(name, ClipConfig) else get_config(name)
    if overrides:
        config = with_overrides(config, overrides)
    return CLIP(config, dtype=jnp.dtype(dtype), scan=scan, remat=remat)


def dummy_inputs(model: CLIP, batch: int = 1) -> tuple:
    return model.example_inputs(batch)


def init_params(model: CLIP, rng: jax.Array):
    """Plain (unboxed) float32 parameters for `model`."""
    return nn.meta.unbox(jax.jit(model.init)(rng, *dummy_inputs(model))["params"])


def _boxed_shapes(model: CLIP):
    """Parameter shapes with their logical-axis boxes, from jax.eval_shape (no allocation)."""
    # Only the architecture and the layer layout decide them (a head's fields too); dtype,
    # remat and BatchNorm's mode do not. Tracing a model's init takes a fraction of a
    # second and a run asks often.
    return _shapes(model.clone(dtype=jnp.float32, remat="none", train=False, unroll=False,
                               parent=None))


@functools.lru_cache(maxsize=32)
def _shapes(model: CLIP):
    return jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(model))["params"]


def abstract_params(model: CLIP):
    """Parameter shapes and dtypes without allocating anything."""
    return nn.meta.unbox(_boxed_shapes(model))


def train_flops(model: CLIP, batch: int) -> float:
    """Model FLOPs of one training step on `batch` pairs: 3 x the forward, plus the logits.

    The forward is counted by XLA's cost analysis of one unscanned, unrematerialised pair
    (a scanned model's loop body would be counted once, not once per layer); recomputation
    under remat is not model FLOPs, so MFU stays comparable across remat policies.
    """
    plain = model.clone(scan=False, remat="none", train=False)
    inputs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in dummy_inputs(plain)]
    cost = jax.jit(lambda p, *xs: plain.apply({"params": p}, *xs)).lower(
        abstract_params(plain), *inputs).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    logits = 2 * batch * batch * model.config.embed_dim  # the N x N logits, shared by both directions
    return 3 * (float(cost["flops"]) * batch + logits)


def count_params(params, prefix: str = "") -> int:
    """Trainable parameters under `prefix` ("visual", "text" or all), as torch counts them.

    BatchNorm running statistics live in the params tree (see resnet.BatchNorm) but are
    buffers in torch, so they are left out.
    """
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [getattr(k, "key", str(k)) for k in path]
        # Only BatchNorm has leaves named mean/var.
        if keys[0].startswith(prefix) and keys[-1] not in ("mean", "var"):
            total += int(np.prod(leaf.shape))
    return total


def logical_axes(model: CLIP):
    """The logical axis names of every parameter, as a pytree of PartitionSpecs."""
    return nn.get_partition_spec(_boxed_shapes(model))
