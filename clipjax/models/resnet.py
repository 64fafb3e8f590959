"""CLIP's ModifiedResNet: a 3-conv stem, anti-aliased strided bottlenecks, attention pooling."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.models import layers
from clipjax.models.layers import (CONV_IN, CONV_OUT, CONV_SPATIAL, EMBED, JOINT, MLP, POSITIONS,
                                   Dtype)
from clipjax.models.vit import resize_positions


class Conv(nn.Module):
    """A bias-free convolution padded by k // 2 on each side, as in the checkpoints."""

    features: int
    kernel_size: int = 1
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BYXC: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = layers.param_with_axes(
            self, "kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal",
                                                             in_axis=(0, 1, 2), out_axis=3),
            (k, k, x_BYXC.shape[-1], self.features), (CONV_SPATIAL, CONV_SPATIAL, CONV_IN, CONV_OUT))
        pad = k // 2
        y = jax.lax.conv_general_dilated(  # accumulated in float32, as layers.einsum
            x_BYXC.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride),
            [(pad, pad), (pad, pad)], dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32)
        return y.astype(self.dtype)


class BatchNorm(nn.Module):
    """BatchNorm whose running statistics live in `params` beside its scale and bias.

    Keeping `mean`/`var` in the one parameter tree makes `apply({"params": p})` work for
    every tower and conversion a rename. They are read through stop_gradient; in training
    mode the batch statistics are used and sown into the `batch_stats` collection (when
    it is mutable) for the train step to fold into the running averages (the variance
    unbiased, as in torch).
    """

    train: bool = False
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x_BYXC: jax.Array) -> jax.Array:
        c = x_BYXC.shape[-1]
        scale = layers.param_with_axes(self, "scale", nn.initializers.ones, (c,), (CONV_OUT,))
        bias = layers.param_with_axes(self, "bias", nn.initializers.zeros, (c,), (CONV_OUT,))
        mean = layers.param_with_axes(self, "mean", nn.initializers.zeros, (c,), (CONV_OUT,))
        var = layers.param_with_axes(self, "var", nn.initializers.ones, (c,), (CONV_OUT,))
        x32 = x_BYXC.astype(jnp.float32)
        if self.train:
            mean = x32.mean((0, 1, 2))
            var = jnp.square(x32 - mean).mean((0, 1, 2))
            if self.is_mutable_collection("batch_stats"):
                # The running variance takes the unbiased estimate, as torch's BatchNorm does.
                n = x32.size // c
                self.sow("batch_stats", "mean", mean)
                self.sow("batch_stats", "var", var * (n / max(n - 1, 1)))
        else:
            mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(x_BYXC.dtype)


def avg_pool(x_BYXC: jax.Array, stride: int) -> jax.Array:
    return nn.avg_pool(x_BYXC, (stride, stride), strides=(stride, stride)) if stride > 1 else x_BYXC


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avg-pool when strided) -> 1x1 with a 4x expansion."""

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    train: bool = False

    @nn.compact
    def __call__(self, x_BYXC: jax.Array) -> jax.Array:
        conv = lambda f, k, name: Conv(f, k, dtype=self.dtype, name=name)  # noqa: E731
        bn = lambda name: BatchNorm(self.train, name=name)  # noqa: E731
        out = nn.relu(bn("bn1")(conv(self.planes, 1, "conv1")(x_BYXC)))
        out = nn.relu(bn("bn2")(conv(self.planes, 3, "conv2")(out)))
        out = bn("bn3")(conv(self.planes * 4, 1, "conv3")(avg_pool(out, self.stride)))
        identity = x_BYXC
        if self.stride > 1 or x_BYXC.shape[-1] != self.planes * 4:
            # torch names these downsample.0 (conv) and downsample.1 (norm).
            identity = conv(self.planes * 4, 1, "downsample_0")(avg_pool(x_BYXC, self.stride))
            identity = bn("downsample_1")(identity)
        return layers.shard_rows(nn.relu(out + identity.astype(out.dtype)))


class AttentionPool2d(nn.Module):
    """Multi-head attention of the mean token over the flattened map (plus itself)."""

    num_heads: int
    output_dim: int
    dtype: Dtype = jnp.float32
    grid: int = 0  # > 0: positions for a grid x grid map, resized to other maps (any_size)

    @nn.compact
    def __call__(self, x_BYXC: jax.Array) -> jax.Array:
        b, y, x, c = x_BYXC.shape
        h = self.num_heads
        x_BNC = x_BYXC.reshape(b, y * x, c)
        x_BNC = jnp.concatenate([x_BNC.mean(1, keepdims=True), x_BNC], axis=1)
        g = self.grid
        pos_NC = layers.param_with_axes(self, "positional_embedding", nn.initializers.normal(c**-0.5),
                                        (g * g + 1 if g else y * x + 1, c), (POSITIONS, EMBED))
        if g and (y, x) != (g, g):
            pos_NC = resize_positions(pos_NC, g, (y, x))
        x_BNC = x_BNC + pos_NC.astype(x_BNC.dtype)
        # Heads are the hidden width here, sharded like an MLP's, never twice like (embed, embed).
        dense = lambda f, name: layers.Dense(f, (EMBED, MLP), dtype=self.dtype, name=name)  # noqa
        q_B1HK = dense(c, "q_proj")(x_BNC[:, :1]).reshape(b, 1, h, c // h)
        k_BNHK = dense(c, "k_proj")(x_BNC).reshape(b, y * x + 1, h, c // h)
        v_BNHK = dense(c, "v_proj")(x_BNC).reshape(b, y * x + 1, h, c // h)
        o_B1HK = jax.nn.dot_product_attention(q_B1HK, k_BNHK, v_BNHK)
        out = layers.Dense(self.output_dim, (MLP, JOINT), dtype=self.dtype, name="c_proj")
        return out(o_B1HK.reshape(b, c))


class ModifiedResNet(nn.Module):
    """Images [B, H, W, 3] -> embeddings [B, E]; optionally the stem and every stage's map."""

    image_size: int
    layers: tuple[int, int, int, int]
    width: int
    heads: int
    embed_dim: int
    dtype: Dtype = jnp.float32
    train: bool = False
    # Detection heads (GLIP): any size 32 divides; the attention pool's position grid is
    # resized bilinearly to the map (as the ViT's), so CLIP's weights load unchanged.
    any_size: bool = False

    @nn.compact
    def __call__(self, img_BHWC: jax.Array, return_features: bool = False):
        h, w = img_BHWC.shape[1:3]
        if self.any_size and (h % 32 or w % 32):
            raise ValueError(f"Image size {h}x{w} is not a multiple of 32 (the ResNet's "
                             "stride); crop or pad to a multiple of it.")
        if (h, w) != (self.image_size, self.image_size) and not self.any_size:
            raise ValueError(f"This ResNet takes {self.image_size}x{self.image_size} images but got "
                             f"{img_BHWC.shape[1]}x{img_BHWC.shape[2]}; resize with "
                             f"clipjax.data.transforms.preprocess(..., size={self.image_size}).")
        w = self.width
        x = img_BHWC.astype(self.dtype)
        for i, (features, stride) in enumerate([(w // 2, 2), (w // 2, 1), (w, 1)], start=1):
            x = Conv(features, 3, stride, self.dtype, name=f"conv{i}")(x)
            x = nn.relu(BatchNorm(self.train, name=f"bn{i}")(x))
        x = avg_pool(x, 2)
        features = {"stem": x}
        for stage, (blocks, planes) in enumerate(zip(self.layers, (w, 2 * w, 4 * w, 8 * w)), 1):
            for j in range(blocks):
                stride = 2 if (stage > 1 and j == 0) else 1
                x = Bottleneck(planes, stride, self.dtype, self.train, name=f"layer{stage}_{j}")(x)
            features[f"layer{stage}"] = x
        grid = self.image_size // 32 if self.any_size else 0
        out_BE = AttentionPool2d(self.heads, self.embed_dim, self.dtype, grid, name="attnpool")(x)
        return (out_BE, features) if return_features else out_BE
