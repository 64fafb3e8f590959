"""CLIP's ViT image tower: patchify, class token, pre-LN transformer, class-token projection."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.models import layers
from clipjax.models.layers import CONV_IN, CONV_SPATIAL, EMBED, JOINT, POSITIONS, Dtype


def resize_positions(pos_ND: jax.Array, grid: int, new: tuple[int, int]) -> jax.Array:
    """Class position + the grid x grid positions resized bilinearly (half-pixel centres,
    no antialiasing: torch's interpolate(mode="bilinear"), as DPT) to `new` (Y, X)."""
    grid_YXD = pos_ND[1:].reshape(grid, grid, -1).astype(jnp.float32)
    out_YXD = jax.image.resize(grid_YXD, (*new, grid_YXD.shape[-1]), "bilinear", antialias=False)
    return jnp.concatenate([pos_ND[:1], out_YXD.reshape(new[0] * new[1], -1).astype(pos_ND.dtype)])


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
    # Video (rows are clips of `frames` consecutive frames; 0 = still images):
    frames: int = 0
    shift: bool = False  # ActionCLIP's temporal shift (TSM) before every block
    patch_3d: bool = False  # CLIP4Clip's 3D linear patch: a (3, p, p) kernel over time
    joint: bool = False  # ActionCLIP's "joint": one sequence of every frame's patches
    # Dense heads (LSeg): any size the patch divides; the position grid is resized
    # bilinearly to it, as DPT does, so CLIP's weights load unchanged.
    any_size: bool = False

    @nn.compact
    def __call__(self, img_BHWC: jax.Array, return_features: bool = False,
                 return_attention: bool = False):
        """[B, E]; with `return_features`, (embedding, {"blocks", "tokens"}); `return_attention`
        implies it and adds "attention": every block's softmax(q kᵀ/√K), [layers, B, H, N, N]
        in float32 (N = 1 + patches, the class token first), the embedding unchanged."""
        return_features = return_features or return_attention
        b, h, w, c = img_BHWC.shape
        p, d = self.patch_size, self.width
        if self.any_size and (h % self.patch_size or w % self.patch_size):
            raise ValueError(f"Image size {h}x{w} is not a multiple of the patch size "
                             f"{self.patch_size}; crop or pad to a multiple of it.")
        if (h, w) != (self.image_size, self.image_size) and not self.any_size:
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
        if self.patch_3d:
            x_BND = self._patch_3d(patches_BNP, d, c)

        cls_D = layers.param_with_axes(self, "class_embedding", normal, (d,), (EMBED,))
        g = self.image_size // p
        pos_ND = layers.param_with_axes(self, "positional_embedding", normal,
                                        (g * g + 1, d), (POSITIONS, EMBED))
        if (h // p, w // p) != (g, g):
            pos_ND = resize_positions(pos_ND, g, (h // p, w // p))
        cls_B1D = jnp.broadcast_to(cls_D.astype(self.dtype), (b, 1, d))
        x_BND = jnp.concatenate([cls_B1D, x_BND], axis=1) + pos_ND.astype(self.dtype)
        if self.joint:
            x_BND = self._joint(x_BND, d)
        x_BND = layers.LayerNorm(name="ln_pre")(x_BND)

        # Only the class token is projected; the features ask for every token.
        x_BND, blocks_LBND, *attn = layers.Transformer(
            self.layers, self.heads, self.mlp_dim, self.activation, causal=False, dtype=self.dtype,
            scan=self.scan, remat=self.remat, unroll=self.unroll,
            shift_frames=self.frames if self.shift else 0, name="transformer")(
                x_BND, return_all=return_features, pool=None if return_features else 0,
                return_attention=return_attention)
        x_BND = layers.LayerNorm(name="ln_post")(x_BND)
        proj_DE = layers.param_with_axes(self, "proj", normal, (d, self.embed_dim), (EMBED, JOINT))
        out_BE = layers.einsum("bd,de->be", x_BND[:, 0], proj_DE, self.dtype)
        if not return_features:
            return out_BE
        features = {"blocks": blocks_LBND, "tokens": x_BND}
        if return_attention:
            features["attention"] = attn[0]
        return out_BE, features

    def _patch_3d(self, patches_BNP: jax.Array, d: int, c: int) -> jax.Array:
        """Conv3d with kernel (3, p, p), stride (1, p, p) and one frame of zero padding in
        time. CLIP4Clip starts it from conv1 in the centre slice (heads.video.derive)."""
        b, n, pp = patches_BNP.shape
        t, p = self.frames, self.patch_size
        kernel = layers.param_with_axes(
            self, "conv2_kernel", nn.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=4),
            (3, p, p, c, d), (None, CONV_SPATIAL, CONV_SPATIAL, CONV_IN, EMBED))
        x_VTNP = patches_BNP.reshape(b // t, t, n, pp)
        zero = jnp.zeros_like(x_VTNP[:, :1])
        padded = jnp.concatenate([zero, x_VTNP, zero], axis=1)
        x_VTND = sum(layers.einsum("vtnp,pd->vtnd", padded[:, k:k + t], kernel[k].reshape(pp, d),
                                   self.dtype) for k in range(3))
        return x_VTND.reshape(b, n, d)

    def _joint(self, x_BND: jax.Array, d: int) -> jax.Array:
        """Clips as one sequence: the class token, then every frame's patches with a learned
        time embedding; rows go from clips x frames to clips."""
        b, n, _ = x_BND.shape
        t = self.frames
        time_TD = layers.param_with_axes(self, "time_embedding", nn.initializers.zeros, (t, d),
                                         (None, EMBED))
        x_VTND = x_BND.reshape(b // t, t, n, d)
        tok_VTND = x_VTND[:, :, 1:] + time_TD[None, :, None].astype(x_BND.dtype)
        return jnp.concatenate([x_VTND[:, 0, :1], tok_VTND.reshape(b // t, t * (n - 1), d)], 1)
