"""Shared building blocks: attention, MLP, pre-LN residual block, transformer stack."""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

Dtype = Any

# Logical axis names carried by every parameter; sharding.py maps them to mesh axes.
EMBED = "embed"  # D: residual width
MLP = "mlp"  # F: MLP hidden width
HEADS = "heads"  # H
KV = "kv"  # K: head dim
QKV = "qkv"  # the 3 of a fused query/key/value projection
VOCAB = "vocab"
JOINT = "joint"  # E: joint embedding width
POSITIONS = "positions"
LAYERS = "layers"  # the stacked axis of a scanned transformer
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
CONV_SPATIAL = "conv_spatial"


BATCH_AXES = ("data", "fsdp")  # mesh axes the batch is split over (see sharding.py)


def shard_rows(x: jax.Array) -> jax.Array:
    """Keeps activations split by rows over the batch axes of the mesh in context, if any.

    Without it, XLA may follow the FSDP-sharded weights and split activations along their
    width instead, replicating the batch on every chip.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    spec = jax.sharding.PartitionSpec(BATCH_AXES, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, spec)


def pick_token(x_BND: jax.Array, index: int | jax.Array) -> jax.Array:
    """x_BND's token at `index` (one position for all rows, or one per row [B]) as [B, 1, D]."""
    if isinstance(index, int):
        return x_BND[:, index:index + 1]
    index = jnp.asarray(index)
    if index.ndim == 0:  # an int that jax.checkpoint (remat) turned into an array
        return jax.lax.dynamic_slice_in_dim(x_BND, index, 1, axis=1)
    return jnp.take_along_axis(x_BND, index[:, None, None], axis=1)


def param_with_axes(module: nn.Module, name: str, init: Callable, shape: Sequence[int],
                    axes: Sequence[str | None], dtype: Dtype = jnp.float32) -> jax.Array:
    """A parameter annotated with logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
    """The sigmoid approximation of GELU that OpenAI's released CLIP weights were trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)  # torch.nn.GELU's default is the erf form


ACTIVATIONS = {"gelu": exact_gelu, "quick_gelu": quick_gelu}


MATMUL = "matmul"  # checkpoint name of every layers.einsum result (see REMAT_POLICIES)


def einsum(spec: str, x: jax.Array, w: jax.Array, dtype: Dtype, bias: jax.Array | None = None,
           activation: Callable | None = None) -> jax.Array:
    """activation(x ⋅ w + bias) in `dtype`: `dtype` operands, float32 accumulation and activation.

    In float32 it is a plain einsum. In a lower precision the backward matmuls take their
    cotangent in that precision too (as torch.autocast does): XLA:CPU rewrites a dot with a
    float32 operand or a bfloat16 result into a float32 dot, at a third of bf16's speed.
    """
    if jnp.dtype(dtype) == jnp.float32:
        y = jnp.einsum(spec, x.astype(dtype), w.astype(dtype))
    else:
        y = _low_precision_einsum(spec, (jnp.dtype(dtype), x.dtype, w.dtype), x, w)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    y = checkpoint_name(y.astype(dtype), MATMUL)
    # One rounding per activation: XLA rounds a bf16 expression after every operation.
    return y if activation is None else activation(y.astype(jnp.float32)).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _low_precision_einsum(spec: str, dtypes: tuple, x: jax.Array, w: jax.Array) -> jax.Array:
    """float32 einsum of x and w cast to dtypes[0]; dtypes[1:] are x's and w's own dtypes."""
    return _low_precision_einsum_fwd(spec, dtypes, x, w)[0]


def _low_precision_einsum_fwd(spec, dtypes, x, w):
    x_low, w_low = x.astype(dtypes[0]), w.astype(dtypes[0])
    return jnp.einsum(spec, x_low, w_low, preferred_element_type=jnp.float32), (x_low, w_low)


def _low_precision_einsum_bwd(spec, dtypes, residuals, g):
    x_low, w_low = residuals
    (x_idx, w_idx), y_idx = spec.split("->")[0].split(","), spec.split("->")[1]
    g_low = g.astype(dtypes[0])
    gx = jnp.einsum(f"{y_idx},{w_idx}->{x_idx}", g_low, w_low, preferred_element_type=jnp.float32)
    gw = jnp.einsum(f"{x_idx},{y_idx}->{w_idx}", x_low, g_low, preferred_element_type=jnp.float32)
    return gx.astype(dtypes[1]), gw.astype(dtypes[2])


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the compute dtype, cast back afterwards."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones, (d,), (EMBED,))
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (d,), (EMBED,))
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(x.dtype)


class Dense(nn.Module):
    """y = x @ kernel + bias over the last axis, with logical axes and a compute dtype."""

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    activation: Callable | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = param_with_axes(self, "kernel", self.kernel_init, (x.shape[-1], self.features),
                                 self.axes)
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (self.features,),
                               self.axes[1:]) if self.use_bias else None
        return einsum("...d,df->...f", x, kernel, self.dtype, bias, self.activation)


def _key_mask(key_mask_BN: jax.Array | None) -> jax.Array | None:
    """[B, N] key validity -> the [B, 1, 1, N] mask dot_product_attention broadcasts."""
    return None if key_mask_BN is None else key_mask_BN.astype(bool)[:, None, None, :]


def temporal_shift(x_BND: jax.Array, frames: int, fold_div: int = 8) -> jax.Array:
    """TSM on the tokens of `frames`-frame clips stacked as rows (B = clips x frames).

    1/fold_div of the channels of every token but the first (the class token) take the
    next frame's values (they move to t-1), the next 1/fold_div the previous frame's
    (they move to t+1); the ends are zero-filled and the other channels stay.
    """
    b, n, d = x_BND.shape
    fold = d // fold_div
    x_VTND = x_BND.reshape(b // frames, frames, n, d)
    cls_VT1D, tok_VTND = x_VTND[:, :, :1], x_VTND[:, :, 1:]
    zero = jnp.zeros_like(tok_VTND[:, :1, :, :fold])
    back = jnp.concatenate([tok_VTND[:, 1:, :, :fold], zero], axis=1)  # frame t gets t+1
    fwd = jnp.concatenate([zero, tok_VTND[:, :-1, :, fold:2 * fold]], axis=1)  # t gets t-1
    tok_VTND = jnp.concatenate([back, fwd, tok_VTND[..., 2 * fold:]], axis=-1)
    return jnp.concatenate([cls_VT1D, tok_VTND], axis=2).reshape(b, n, d)


def attention_weights(q_BNHK: jax.Array, k_BNHK: jax.Array, causal: bool = False,
                      key_mask_BN: jax.Array | None = None) -> jax.Array:
    """softmax(q kᵀ / √K) in float32, [B, H, N, N]: what dot_product_attention weighs v by."""
    logits_BHNN = jnp.einsum("bqhk,bshk->bhqs", q_BNHK, k_BNHK,
                             preferred_element_type=jnp.float32) * q_BNHK.shape[-1] ** -0.5
    n = q_BNHK.shape[1]
    keep = jnp.ones((1, 1, n, n), bool)
    if causal:
        keep = jnp.tril(keep)
    if key_mask_BN is not None:
        keep = keep & _key_mask(key_mask_BN)
    # A finite fill, as dot_product_attention's: a row with every key hidden stays finite.
    logits_BHNN = jnp.where(keep, logits_BHNN, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits_BHNN, axis=-1)


class MultiHeadAttention(nn.Module):
    """Self-attention with a fused [D, 3, H, K] projection (torch's in_proj, reshaped)."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BND: jax.Array, causal: bool = False,
                 query: int | jax.Array | None = None,
                 key_mask_BN: jax.Array | None = None, return_weights: bool = False):
        """[B, N, D] -> [B, N, D]; with `query` (see pick_token) only that token's output, [B, 1, D].

        `key_mask_BN` (bool) hides the keys where it is False (padded frames or tokens).
        `return_weights` also returns the attention probabilities [B, H, N, N] (float32),
        computed beside the fused attention so the output stays the normal path's bit for bit.
        """
        if return_weights and query is not None:
            raise ValueError("Attention weights need every query; call without `query`.")
        d = x_BND.shape[-1]
        h = self.num_heads
        k = d // h
        init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2, 3))
        w_DTHK = param_with_axes(self, "in_proj_kernel", init, (d, 3, h, k), (EMBED, QKV, HEADS, KV))
        b_THK = param_with_axes(self, "in_proj_bias", nn.initializers.zeros, (3, h, k),
                                (QKV, HEADS, KV))
        if query is None:
            qkv_BNTHK = einsum("bnd,dthk->bnthk", x_BND, w_DTHK, self.dtype, b_THK)
            # split, not indexing: its transpose is one concatenate, not three pads and two adds.
            q_BNHK, k_BNHK, v_BNHK = (t.squeeze(2) for t in jnp.split(qkv_BNTHK, 3, axis=2))
            o_BNHK = jax.nn.dot_product_attention(q_BNHK, k_BNHK, v_BNHK, is_causal=causal,
                                                  mask=_key_mask(key_mask_BN))
            if return_weights:
                weights_BHNN = attention_weights(q_BNHK, k_BNHK, causal, key_mask_BN)
        else:  # one query; keys and values of every token
            q_BNHK = einsum("bnd,dhk->bnhk", pick_token(x_BND, query), w_DTHK[:, 0], self.dtype,
                            b_THK[0])
            kv_BNTHK = einsum("bnd,dthk->bnthk", x_BND, w_DTHK[:, 1:], self.dtype, b_THK[1:])
            k_BNHK, v_BNHK = (t.squeeze(2) for t in jnp.split(kv_BNTHK, 2, axis=2))
            # A causal query sees the keys up to its own position.
            seen_B = (jnp.broadcast_to(jnp.asarray(query, jnp.int32), x_BND.shape[:1]) + 1
                      if causal else None)
            o_BNHK = jax.nn.dot_product_attention(q_BNHK, k_BNHK, v_BNHK,
                                                  key_value_seq_lengths=seen_B,
                                                  mask=_key_mask(key_mask_BN))
        out_init = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        w_HKD = param_with_axes(self, "out_proj_kernel", out_init, (h, k, d), (HEADS, KV, EMBED))
        b_D = param_with_axes(self, "out_proj_bias", nn.initializers.zeros, (d,), (EMBED,))
        out_BND = einsum("bnhk,hkd->bnd", o_BNHK, w_HKD, self.dtype, b_D)
        return (out_BND, weights_BHNN) if return_weights else out_BND


class Mlp(nn.Module):
    """c_fc -> activation -> c_proj, named as in the CLIP checkpoints."""

    hidden: int
    activation: str = "gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BND: jax.Array) -> jax.Array:
        d = x_BND.shape[-1]
        h_BNF = Dense(self.hidden, (EMBED, MLP), dtype=self.dtype,
                      activation=ACTIVATIONS[self.activation], name="c_fc")(x_BND)
        return Dense(d, (MLP, EMBED), dtype=self.dtype, name="c_proj")(h_BNF)


class ResidualBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    causal: bool = False
    dtype: Dtype = jnp.float32
    emit_features: bool = False
    # The second output becomes (features or None, attention [B, H, N, N]): stacked over
    # layers like the features, so it works under nn.scan.
    emit_attention: bool = False
    shift_frames: int = 0  # > 0: temporal_shift of the input over clips of this many frames
    ln_eps: float = 1e-5

    @nn.compact
    def __call__(self, x_BND: jax.Array, key_mask_BN: jax.Array | None = None,
                 only: int | jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        """With `only` (see pick_token), computes and returns just that token, [B, 1, D]."""
        x_BND = shard_rows(x_BND)
        if self.shift_frames:
            x_BND = temporal_shift(x_BND, self.shift_frames)
        y = LayerNorm(self.ln_eps, name="ln_1")(x_BND)
        attn = MultiHeadAttention(self.num_heads, self.dtype, name="attn")(
            y, self.causal, only, key_mask_BN, return_weights=self.emit_attention)
        if self.emit_attention:
            attn, weights_BHNN = attn
        x_BND = (x_BND if only is None else pick_token(x_BND, only)) + attn
        y = LayerNorm(self.ln_eps, name="ln_2")(shard_rows(x_BND))
        x_BND = shard_rows(x_BND + Mlp(self.mlp_dim, self.activation, self.dtype, name="mlp")(y))
        # A scan body: the second output is stacked over layers, so emit it only on request.
        feature_BND = x_BND if self.emit_features else None
        return x_BND, ((feature_BND, weights_BHNN) if self.emit_attention else feature_BND)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # layers.einsum results carry a name: a low-precision one is a custom_vjp, not a dot.
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(MATMUL)),
}


class Transformer(nn.Module):
    """A stack of residual blocks, optionally scanned over layers and rematerialised.

    Returns the final tokens and, when `return_all`, every block's output stacked as
    [layers, B, N, D] (the features later heads read). Given `pool` (see pick_token), it
    returns only that token, [B, 1, D]: the last block then computes just that one (its
    keys and values still come from every token), 1/12 less work for a 12-layer tower.
    `return_attention` adds a third output, every block's attention probabilities
    [layers, B, H, N, N] in float32 (CLIPasso's saliency), and computes every token throughout.
    """

    layers: int
    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    causal: bool = False
    dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    # With `scan`, unroll the loop (the parameters stay stacked on the layers axis): the
    # train step asks for it on multi-device CPU meshes, where XLA:CPU runs the two towers'
    # loops concurrently and the collectives inside them can meet in different orders on
    # different devices and deadlock.
    unroll: bool = False
    shift_frames: int = 0  # see ResidualBlock (ActionCLIP's TSM before every block)
    ln_eps: float = 1e-5

    @nn.compact
    def __call__(self, x_BND: jax.Array, return_all: bool = False,
                 pool: int | jax.Array | None = None, key_mask_BN: jax.Array | None = None,
                 return_attention: bool = False):
        block = ResidualBlock
        if self.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
        kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, activation=self.activation,
                      causal=self.causal, dtype=self.dtype, emit_features=return_all,
                      emit_attention=return_attention, shift_frames=self.shift_frames,
                      ln_eps=self.ln_eps)
        if self.scan:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=nn.broadcast, length=self.layers,
                            unroll=self.layers if self.unroll else 1,
                            metadata_params={nn.PARTITION_NAME: LAYERS})
            x_BND, out = stack(**kwargs, name="resblocks")(x_BND, key_mask_BN)
            if pool is not None:  # the scanned stack computes every token of every layer
                x_BND = pick_token(x_BND, pool)
            all_LBND, attn_LBHNN = out if return_attention else (out, None)
        else:
            features, weights = [], []
            every_token = return_all or return_attention
            for i in range(self.layers):
                only = pool if i == self.layers - 1 and not every_token else None
                x_BND, out = block(**kwargs, name=f"resblocks_{i}")(x_BND, key_mask_BN, only)
                feature_BND, weights_BHNN = out if return_attention else (out, None)
                features.append(feature_BND)
                weights.append(weights_BHNN)
            if pool is not None and every_token:
                x_BND = pick_token(x_BND, pool)
            all_LBND = jnp.stack(features) if return_all else None
            attn_LBHNN = jnp.stack(weights) if return_attention else None
        return (x_BND, all_LBND, attn_LBHNN) if return_attention else (x_BND, all_LBND)


def _aligned_matrix(n: int, m: int) -> np.ndarray:
    """[m, n] bilinear interpolation weights from n to m samples with aligned corners."""
    pos = np.arange(m) * ((n - 1) / max(m - 1, 1))
    lo = np.clip(np.floor(pos).astype(int), 0, n - 1)
    hi = np.minimum(lo + 1, n - 1)
    w = np.zeros((m, n), np.float32)
    np.add.at(w, (np.arange(m), lo), 1 - (pos - lo))
    np.add.at(w, (np.arange(m), hi), pos - lo)
    return w


def resize_aligned(x_BYXC: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch's interpolate(mode="bilinear", align_corners=True) as two small matmuls."""
    wy = jnp.asarray(_aligned_matrix(x_BYXC.shape[1], size[0]))
    wx = jnp.asarray(_aligned_matrix(x_BYXC.shape[2], size[1]))
    out = jnp.einsum("Yy,byxc->bYxc", wy, x_BYXC.astype(jnp.float32))
    return jnp.einsum("Xx,byxc->byXc", wx, out).astype(x_BYXC.dtype)


class Conv(nn.Module):
    """A 2D convolution with padding k // 2 (stride 1 or 2) and an optional bias; a 1x1
    convolution is a plain einsum."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BYXC: jax.Array) -> jax.Array:
        k, c = self.kernel_size, x_BYXC.shape[-1]
        kernel = param_with_axes(self, "kernel", self.kernel_init, (k, k, c, self.features),
                                 (CONV_SPATIAL, CONV_SPATIAL, CONV_IN, CONV_OUT))
        if k == 1 and self.stride == 1:
            y = einsum("byxc,cf->byxf", x_BYXC, kernel[0, 0], self.dtype)
        else:
            pad = k // 2
            y = jax.lax.conv_general_dilated(
                x_BYXC.astype(self.dtype), kernel.astype(self.dtype), (self.stride,) * 2,
                [(pad, pad), (pad, pad)], dimension_numbers=("NHWC", "HWIO", "NHWC"),
                preferred_element_type=jnp.float32).astype(self.dtype)
        if self.use_bias:
            y = y + param_with_axes(self, "bias", nn.initializers.zeros, (self.features,),
                                    (CONV_OUT,)).astype(y.dtype)
        return y
