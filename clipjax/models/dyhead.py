"""Feature pyramids and DyHead (Dai et al., 2021), the vision path of GLIP's fused head.

A DyHead layer mixes every pyramid level with its neighbours: a spatial-aware modulated
deformable 3x3 convolution on the level itself, on the finer level (stride 2) and on the
coarser one (upsampled with aligned corners); a scale-aware attention weighs the three;
a task-aware dynamic ReLU (DyReLU-B) activates the mean. The deformable convolution is
bilinear sampling in plain JAX (no custom kernel).

Pyramids: a ResNet's C3-C5 through an FPN (nearest top-down, 1x1 laterals, 3x3 outputs)
and a ViT's last tokens through a ViTDet-style simple pyramid; both add P6/P7 from P5
(RetinaNet's LastLevelP6P7, as GLIP/ATSS).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.models import layers
from clipjax.models.layers import CONV_IN, CONV_OUT, CONV_SPATIAL, Dtype

KAIMING_A1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform",
                                              in_axis=(0, 1, 2), out_axis=3)  # a=1
DYHEAD_INIT = nn.initializers.normal(0.01)  # DyConv's convolutions and scale attention
TORCH_LINEAR = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # nn.Linear's
# ModulatedDeformConv's own U(+-1/sqrt(fan_in)): DyConv's normal(0.01) reaches nn.Conv2d only.
DCN_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=(0, 1, 2),
                                            out_axis=3)


def Conv(features: int, kernel_size: int = 3, stride: int = 1, *, kernel_init=None, **kw):
    """layers.Conv with a bias and DyHead's default init (torch's kaiming_uniform, a=1)."""
    return layers.Conv(features, kernel_size, stride, kernel_init=kernel_init or KAIMING_A1, **kw)


class GroupNorm(nn.Module):
    """torch's GroupNorm in float32; `groups` shrinks to a divisor of tiny channel counts."""

    groups: int = 32
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x_BYXC: jax.Array) -> jax.Array:
        b, y, x, c = x_BYXC.shape
        g = math.gcd(self.groups, c)
        scale = layers.param_with_axes(self, "scale", nn.initializers.ones, (c,), (CONV_OUT,))
        bias = layers.param_with_axes(self, "bias", nn.initializers.zeros, (c,), (CONV_OUT,))
        x32 = x_BYXC.astype(jnp.float32).reshape(b, y, x, g, c // g)
        mean = x32.mean((1, 2, 4), keepdims=True)
        var = jnp.square(x32 - mean).mean((1, 2, 4), keepdims=True)
        out = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, y, x, c)
        return (out * scale + bias).astype(x_BYXC.dtype)


def h_sigmoid(x: jax.Array) -> jax.Array:
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def deform_conv3x3(x_BYXC: jax.Array, kernel_33CF: jax.Array, offset_BYX92: jax.Array,
                   mask_BYX9: jax.Array, stride: int = 1, dtype: Dtype = jnp.float32) -> jax.Array:
    """Modulated deformable 3x3 convolution (DCNv2), padding 1, without bias.

    Output pixel (y, x) samples kernel point k = 3 i + j at (y s - 1 + i + dy_k, x s - 1 +
    j + dx_k) bilinearly (zero outside the map) and weighs it by mask_k. offset_BYX92 holds
    (dy, dx) per kernel point, the reference's channel order (2k, 2k + 1).
    """
    b, h, w, c = x_BYXC.shape
    yo, xo = offset_BYX92.shape[1:3]
    i_9, j_9 = jnp.divmod(jnp.arange(9), 3)
    base_y = (jnp.arange(yo) * stride - 1)[:, None, None] + i_9  # [Yo, 1, 9]
    base_x = (jnp.arange(xo) * stride - 1)[None, :, None] + j_9  # [1, Xo, 9]
    py = base_y[None] + offset_BYX92[..., 0].astype(jnp.float32)  # [B, Yo, Xo, 9]
    px = base_x[None] + offset_BYX92[..., 1].astype(jnp.float32)
    # The four corners of every sample in one gather: [B, Yo, Xo, 9, 4].
    yy = jnp.floor(py)[..., None] + jnp.array([0.0, 0.0, 1.0, 1.0])
    xx = jnp.floor(px)[..., None] + jnp.array([0.0, 1.0, 0.0, 1.0])
    weight = (1 - jnp.abs(py[..., None] - yy)) * (1 - jnp.abs(px[..., None] - xx))
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    weight = jnp.where(inside, weight, 0.0) * mask_BYX9[..., None].astype(jnp.float32)
    index = (jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)).astype(jnp.int32)
    corners = jnp.take_along_axis(x_BYXC.reshape(b, h * w, c), index.reshape(b, -1, 1), axis=1)
    sampled = jnp.einsum("byxkqc,byxkq->byxkc", corners.reshape(b, yo, xo, 9, 4, c)
                         .astype(jnp.float32), weight)
    return layers.einsum("byxkc,kcf->byxf", sampled, kernel_33CF.reshape(9, c, -1), dtype)


class Conv3x3Norm(nn.Module):
    """GLIP's Conv3x3Norm: a 3x3 convolution (deformable when given offsets) and GroupNorm."""

    features: int
    stride: int = 1
    groups: int = 32
    deformable: bool = False  # only picks the initialisation, as the reference's classes do
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BYXC: jax.Array, offset_BYX92: jax.Array | None = None,
                 mask_BYX9: jax.Array | None = None) -> jax.Array:
        c, f = x_BYXC.shape[-1], self.features
        kernel = layers.param_with_axes(self, "kernel", DCN_INIT if self.deformable else
                                        DYHEAD_INIT, (3, 3, c, f),
                                        (CONV_SPATIAL, CONV_SPATIAL, CONV_IN, CONV_OUT))
        bias = layers.param_with_axes(self, "bias", nn.initializers.zeros, (f,), (CONV_OUT,))
        if offset_BYX92 is None:
            y = jax.lax.conv_general_dilated(
                x_BYXC.astype(self.dtype), kernel.astype(self.dtype), (self.stride,) * 2,
                [(1, 1)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                preferred_element_type=jnp.float32)
        else:
            y = deform_conv3x3(x_BYXC, kernel, offset_BYX92, mask_BYX9, self.stride, self.dtype)
        return GroupNorm(self.groups, name="gn")((y + bias).astype(self.dtype))


class ScaleAttention(nn.Module):
    """DyHead's scale-aware attention: hard_sigmoid(relu(1x1 conv(global mean))), [B, 1, 1, 1]."""

    @nn.compact
    def __call__(self, x_BYXC: jax.Array) -> jax.Array:
        c = x_BYXC.shape[-1]
        kernel = layers.param_with_axes(self, "kernel", DYHEAD_INIT, (c, 1), (CONV_IN, None))
        bias = layers.param_with_axes(self, "bias", nn.initializers.zeros, (1,), (None,))
        pooled_BC = x_BYXC.astype(jnp.float32).mean((1, 2))
        return h_sigmoid(nn.relu(pooled_BC @ kernel + bias))[:, None, None, :]


class DyReLU(nn.Module):
    """DyReLU-B (task-aware): max(a1 x + b1, a2 x + b2) with per-image, per-channel
    coefficients from the global mean (a1 around 1, a2 around 0, b around 0)."""

    reduction: int = 4

    @nn.compact
    def __call__(self, x_BYXC: jax.Array) -> jax.Array:
        c = x_BYXC.shape[-1]
        pooled_BC = x_BYXC.astype(jnp.float32).mean((1, 2))
        hid = layers.Dense(max(c // self.reduction, 1), (CONV_IN, CONV_OUT), name="fc1",
                           kernel_init=TORCH_LINEAR, activation=nn.relu)(pooled_BC)
        coef = h_sigmoid(layers.Dense(4 * c, (CONV_IN, CONV_OUT), kernel_init=TORCH_LINEAR,
                                      name="fc2")(hid))
        a1, b1, a2, b2 = (t[:, None, None, :] for t in jnp.split(coef, 4, axis=-1))
        x32 = x_BYXC.astype(jnp.float32)
        out = jnp.maximum(x32 * ((a1 - 0.5) * 2.0 + 1.0) + (b1 - 0.5),
                          x32 * ((a2 - 0.5) * 2.0) + (b2 - 0.5))
        return out.astype(x_BYXC.dtype)


class DyConv(nn.Module):
    """One DyHead layer over every pyramid level (GLIP's DyConv with dyfuse and dyrelu).

    The offsets and masks come from the level itself and serve its three convolutions; the
    coarser level's convolution reads them at every other position (its output grid), where
    the reference hands it the level's full-size offset map. The offset conv starts at zero
    (plain sampling, masks 1/2), as DCNv2's ModulatedDeformConvPack and mmdet's DyHead; GLIP's
    DyConv leaves it at torch's default initialisation.
    """

    features: int
    deformable: bool = True
    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, maps: list[jax.Array]) -> list[jax.Array]:
        conv = [Conv3x3Norm(self.features, s, self.groups, self.deformable, self.dtype,
                            name=f"DyConv_{i}")
                for i, s in enumerate((1, 1, 2))]  # coarser level, same level, finer level
        attn, act = ScaleAttention(name="AttnConv"), DyReLU(name="relu")
        offset = Conv(27, 3, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="offset")
        out = []
        for level, x in enumerate(maps):
            off = mask = None
            if self.deformable:
                om = offset(x).astype(jnp.float32)
                off = om[..., :18].reshape(*om.shape[:3], 9, 2)
                mask = jax.nn.sigmoid(om[..., 18:])
            parts = [conv[1](x, off, mask)]
            if level > 0:
                parts.append(conv[2](maps[level - 1], off, mask))
            if level < len(maps) - 1:
                sub = (off[:, ::2, ::2], mask[:, ::2, ::2]) if self.deformable else (None, None)
                coarse = conv[0](maps[level + 1], *sub)
                parts.append(layers.resize_aligned(coarse, x.shape[1:3]))
            mixed = sum(p.astype(jnp.float32) * attn(p) for p in parts) / len(parts)
            out.append(act(mixed.astype(self.dtype)))
        return out


class LastLevelP6P7(nn.Module):
    """P6 = conv3x3/2(P5), P7 = conv3x3/2(relu(P6)) (RetinaNet; from P5 as GLIP)."""

    features: int
    count: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, p5_BYXC: jax.Array) -> list[jax.Array]:
        out, x = [], p5_BYXC
        for i in range(self.count):
            x = Conv(self.features, 3, 2, dtype=self.dtype, name=f"p{6 + i}")(
                nn.relu(x) if i else x)
            out.append(x)
        return out


class FPN(nn.Module):
    """ResNet stage maps (C3.., finest first) -> P maps of `features` channels, finest first,
    plus P6/P7 from P5 for strides 64/128 (`extra` of them)."""

    features: int
    extra: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, maps: list[jax.Array]) -> list[jax.Array]:
        f = self.features
        last = Conv(f, 1, dtype=self.dtype, name=f"fpn_inner{len(maps)}")(maps[-1])
        results = [Conv(f, 3, dtype=self.dtype, name=f"fpn_layer{len(maps)}")(last)]
        for i in range(len(maps) - 2, -1, -1):
            lateral = Conv(f, 1, dtype=self.dtype, name=f"fpn_inner{i + 1}")(maps[i])
            b, y, x, _ = lateral.shape
            up = jnp.repeat(jnp.repeat(last, y // last.shape[1], 1), x // last.shape[2], 2)
            last = lateral + up  # nearest x2 (the maps halve exactly: sizes divide by 32)
            results.insert(0, Conv(f, 3, dtype=self.dtype, name=f"fpn_layer{i + 1}")(last))
        if self.extra:
            results += LastLevelP6P7(f, self.extra, self.dtype, name="top_blocks")(results[-1])
        return results


class SimplePyramid(nn.Module):
    """ViTDet's simple pyramid from one stride-`patch` map: x2 transposed convolutions up,
    2x2 max-pools down, to strides 8, 16, 32 (as many as `levels`), each 1x1 conv + LN and
    3x3 conv + LN to `features`; then P6/P7 from P5 (`extra` of them)."""

    features: int
    patch: int
    levels: int = 3
    extra: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BYXC: jax.Array) -> list[jax.Array]:
        c = x_BYXC.shape[-1]
        out = []
        for level in range(self.levels):
            y, ratio, step = x_BYXC, 8 * 2**level, 0
            while ratio < self.patch:  # upsample by transposed 2x2 convolutions
                y = _ConvTranspose2(max(c // 2 ** (step + 1), 8), self.dtype,
                                    name=f"up{level}_{step}")(y)
                ratio, step = ratio * 2, step + 1
                if ratio < self.patch:
                    y = layers.exact_gelu(layers.LayerNorm(name=f"up{level}_ln{step}")(y))
            if ratio > self.patch:
                k = ratio // self.patch
                y = nn.max_pool(y, (k, k), strides=(k, k))
            y = layers.LayerNorm(name=f"ln{level}_0")(Conv(self.features, 1, dtype=self.dtype,
                                                          name=f"conv{level}_0")(y))
            y = layers.LayerNorm(name=f"ln{level}_1")(Conv(self.features, 3, dtype=self.dtype,
                                                          name=f"conv{level}_1")(y))
            out.append(y)
        if self.extra:
            out += LastLevelP6P7(self.features, self.extra, self.dtype, name="top_blocks")(out[-1])
        return out


class _ConvTranspose2(nn.Module):
    """A transposed 2x2 convolution with stride 2 (no overlap): each pixel -> a 2x2 block."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BYXC: jax.Array) -> jax.Array:
        b, y, x, c = x_BYXC.shape
        kernel = layers.param_with_axes(self, "kernel", KAIMING_A1, (2, 2, c, self.features),
                                        (CONV_SPATIAL, CONV_SPATIAL, CONV_IN, CONV_OUT))
        bias = layers.param_with_axes(self, "bias", nn.initializers.zeros, (self.features,),
                                      (CONV_OUT,))
        out = layers.einsum("byxc,ijcf->byixjf", x_BYXC, kernel, self.dtype)
        return out.reshape(b, 2 * y, 2 * x, self.features) + bias.astype(out.dtype)
