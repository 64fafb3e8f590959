"""GLIP's deep vision-language fusion: bidirectional cross-attention between image and text.

Image tokens (every pyramid level flattened) attend to text tokens and text tokens to image
tokens through one shared logit matrix (GLIP's BiMultiHeadAttention): the text-to-image
side reuses the transposed logits, less their maximum over the image tokens. Padded text
tokens are masked on the image side only (image tokens are never padding); logits are
clamped to +-50000 as in the reference's fp16-safe setting.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.models import layers
from clipjax.models.layers import EMBED, MLP, Dtype

CLAMP = 50000.0  # GLIP's CLAMP_MIN_FOR_UNDERFLOW / CLAMP_MAX_FOR_OVERFLOW bound
MASKED = -9e15  # what the reference adds to a padded token's logit: exp underflows to 0


def bi_attention_probs(q_BNHK: jax.Array, k_BLHK: jax.Array, mask_BL: jax.Array | None,
                       clamp: float = CLAMP) -> tuple[jax.Array, jax.Array]:
    """(image->text probabilities [B, H, N, L], text->image probabilities [B, H, L, N]).

    `q_BNHK` is already scaled by 1/sqrt(K). Both directions share one logit matrix; the
    text side subtracts its per-token maximum before the clamp (the reference's order).
    """
    logits_BHNL = jnp.einsum("bnhk,blhk->bhnl", q_BNHK.astype(jnp.float32),
                             k_BLHK.astype(jnp.float32))
    logits_BHNL = jnp.clip(logits_BHNL, -clamp, clamp)
    t_BHLN = jnp.swapaxes(logits_BHNL, 2, 3)
    t_BHLN = jnp.clip(t_BHLN - jnp.max(t_BHLN, axis=-1, keepdims=True), -clamp, clamp)
    probs_l_BHLN = jax.nn.softmax(t_BHLN, axis=-1)
    if mask_BL is not None:
        logits_BHNL = logits_BHNL + jnp.where(mask_BL[:, None, None, :], 0.0, MASKED)
    return jax.nn.softmax(logits_BHNL, axis=-1), probs_l_BHLN


class BiMultiHeadAttention(nn.Module):
    """Image [B, N, Dv] and text [B, L, Dl] -> their updates, through `embed_dim` wide heads."""

    embed_dim: int = 2048
    num_heads: int = 8
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, v_BND: jax.Array, l_BLD: jax.Array,
                 mask_BL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        e, h = self.embed_dim, self.num_heads
        if e % h:
            raise ValueError(f"head.joint_dim={e} is not a multiple of head.fusion_heads={h}; "
                             "choose a joint width the heads divide.")
        k = e // h
        init = nn.initializers.xavier_uniform()  # as the reference's _reset_parameters

        def dense(features, axes, name):
            return layers.Dense(features, axes, dtype=self.dtype, kernel_init=init, name=name)

        b, n, dv = v_BND.shape
        length, dl = l_BLD.shape[1:]
        q_BNHK = (dense(e, (EMBED, MLP), "v_proj")(v_BND) * k**-0.5).reshape(b, n, h, k)
        k_BLHK = dense(e, (EMBED, MLP), "l_proj")(l_BLD).reshape(b, length, h, k)
        vv_BNHK = dense(e, (EMBED, MLP), "values_v_proj")(v_BND).reshape(b, n, h, k)
        vl_BLHK = dense(e, (EMBED, MLP), "values_l_proj")(l_BLD).reshape(b, length, h, k)
        probs_v, probs_l = bi_attention_probs(q_BNHK, k_BLHK, mask_BL)
        out_v_BNE = jnp.einsum("bhnl,blhk->bnhk", probs_v.astype(self.dtype),
                               vl_BLHK).reshape(b, n, e)
        out_l_BLE = jnp.einsum("bhln,bnhk->blhk", probs_l.astype(self.dtype),
                               vv_BNHK).reshape(b, length, e)
        return (dense(dv, (MLP, EMBED), "out_v_proj")(out_v_BNE),
                dense(dl, (MLP, EMBED), "out_l_proj")(out_l_BLE))


class BiAttentionBlock(nn.Module):
    """GLIP's VLFuse block: v = LN(v) + gamma_v * dv and l = LN(l) + gamma_l * dl.

    The residual adds to the normalised inputs, not the inputs (the reference's quirk), so
    with gamma = 0 the block returns (LN(v), LN(l)), not (v, l). The layer scales start at
    `init_scale` (1 / the number of fusion layers in GLIP). Dropout (0.1 in the reference)
    is left out.
    """

    embed_dim: int = 2048
    num_heads: int = 8
    init_scale: float = 1.0 / 6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, v_BND: jax.Array, l_BLD: jax.Array,
                 mask_BL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        v_BND = layers.LayerNorm(name="layer_norm_v")(v_BND)
        l_BLD = layers.LayerNorm(name="layer_norm_l")(l_BLD)
        dv, dl = BiMultiHeadAttention(self.embed_dim, self.num_heads, self.dtype, name="attn")(
            v_BND, l_BLD, mask_BL)
        scale = nn.initializers.constant(self.init_scale)
        gamma_v = layers.param_with_axes(self, "gamma_v", scale, (v_BND.shape[-1],), (EMBED,))
        gamma_l = layers.param_with_axes(self, "gamma_l", scale, (l_BLD.shape[-1],), (EMBED,))
        return (v_BND + (gamma_v * dv.astype(jnp.float32)).astype(v_BND.dtype),
                l_BLD + (gamma_l * dl.astype(jnp.float32)).astype(l_BLD.dtype))
