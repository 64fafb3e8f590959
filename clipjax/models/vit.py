"""CLIP's ViT image tower: patchify, class token, pre-LN transformer, class-token projection."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.models import layers
from clipjax.models.layers import CONV_IN, CONV_SPATIAL, EMBED, JOINT, POSITIONS, Dtype


class VisionTransformer(nn.Module):
    """Images [B, H, W, 3] -> embeddings [B, E]; optionally every block's tokens."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    embed_dim: int
    activation: str = "gelu"
    dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    unroll: bool = False  # a scan's layers traced one after another (see layers.Transformer)

    @nn.compact
    def __call__(self, img_BHWC: jax.Array, return_features: bool = False):
        b, h, w, c = img_BHWC.shape
        p, d = self.patch_size, self.width
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"This ViT takes {self.image_size}x{self.image_size} images but got "
                             f"{h}x{w}; resize with clipjax.data.transforms.preprocess(..., "
                             f"size={self.image_size}).")
        scale = d**-0.5
        normal = nn.initializers.normal(scale)
        kernel = layers.param_with_axes(self, "conv1_kernel", nn.initializers.lecun_normal(
            in_axis=(0, 1, 2), out_axis=3), (p, p, c, d), (CONV_SPATIAL, CONV_SPATIAL, CONV_IN, EMBED))
        # A stride-p convolution with a p x p kernel is a matmul over non-overlapping patches.
        patches_BNP = img_BHWC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches_BNP = patches_BNP.reshape(b, (h // p) * (w // p), p * p * c)
        x_BND = layers.einsum("bnp,pd->bnd", patches_BNP, kernel.reshape(p * p * c, d), self.dtype)

        cls_D = layers.param_with_axes(self, "class_embedding", normal, (d,), (EMBED,))
        pos_ND = layers.param_with_axes(self, "positional_embedding", normal,
                                        ((h // p) * (w // p) + 1, d), (POSITIONS, EMBED))
        cls_B1D = jnp.broadcast_to(cls_D.astype(self.dtype), (b, 1, d))
        x_BND = jnp.concatenate([cls_B1D, x_BND], axis=1) + pos_ND.astype(self.dtype)
        x_BND = layers.LayerNorm(name="ln_pre")(x_BND)

        # Only the class token is projected; the features ask for every token.
        x_BND, blocks_LBND = layers.Transformer(
            self.layers, self.heads, self.mlp_dim, self.activation, causal=False, dtype=self.dtype,
            scan=self.scan, remat=self.remat, unroll=self.unroll, name="transformer")(
                x_BND, return_all=return_features, pool=None if return_features else 0)
        x_BND = layers.LayerNorm(name="ln_post")(x_BND)
        proj_DE = layers.param_with_axes(self, "proj", normal, (d, self.embed_dim), (EMBED, JOINT))
        out_BE = layers.einsum("bd,de->be", x_BND[:, 0], proj_DE, self.dtype)
        if not return_features:
            return out_BE
        return out_BE, {"blocks": blocks_LBND, "tokens": x_BND}
