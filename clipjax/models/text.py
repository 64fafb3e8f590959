"""CLIP's causal text transformer, pooled at the end-of-text token."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.models import layers
from clipjax.models.layers import EMBED, JOINT, POSITIONS, VOCAB, Dtype


class TextTransformer(nn.Module):
    """Token ids [B, L] -> embeddings [B, E]; optionally per-token and per-block features."""

    context_length: int
    vocab_size: int
    width: int
    layers: int
    heads: int
    embed_dim: int
    activation: str = "gelu"
    dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    unroll: bool = False  # a scan's layers traced one after another (see layers.Transformer)

    @nn.compact
    def __call__(self, tokens_BL: jax.Array, return_features: bool = False):
        b, length = tokens_BL.shape
        d = self.width
        if length > self.context_length:
            raise ValueError(f"Got {length} tokens per caption but the context length is "
                             f"{self.context_length}; tokenize with context_length="
                             f"{self.context_length}.")
        table_VD = layers.param_with_axes(self, "token_embedding", nn.initializers.normal(0.02),
                                          (self.vocab_size, d), (VOCAB, EMBED))
        pos_LD = layers.param_with_axes(self, "positional_embedding", nn.initializers.normal(0.01),
                                        (self.context_length, d), (POSITIONS, EMBED))
        x_BLD = (jnp.take(table_VD, tokens_BL, axis=0) + pos_LD[:length]).astype(self.dtype)
        # End-of-text has the largest id in CLIP's vocabulary, so argmax finds it. Only its
        # token is projected; the features ask for every token.
        eot_B = jnp.argmax(tokens_BL, axis=-1)
        x_BLD, blocks_LBLD = layers.Transformer(
            self.layers, self.heads, 4 * d, self.activation, causal=True, dtype=self.dtype,
            scan=self.scan, remat=self.remat, unroll=self.unroll, name="transformer")(
                x_BLD, return_all=return_features, pool=None if return_features else eot_B)
        x_BLD = layers.LayerNorm(name="ln_final")(x_BLD)
        pooled_BD = (layers.pick_token(x_BLD, eot_B) if return_features else x_BLD)[:, 0]
        proj_DE = layers.param_with_axes(self, "text_projection", nn.initializers.normal(d**-0.5),
                                         (d, self.embed_dim), (EMBED, JOINT))
        out_BE = layers.einsum("bd,de->be", pooled_BD, proj_DE, self.dtype)
        if not return_features:
            return out_BE
        return out_BE, {"blocks": blocks_LBLD, "tokens": x_BLD}
