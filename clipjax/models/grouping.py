"""GroupViT's grouping image tower (Xu et al. 2022): stages of self-attention over
[image tokens; group tokens], each ending in a grouping block that assigns every token to
one group by a hard, straight-through Gumbel-softmax over the groups (clipjax.heads.groupvit
assembles the model, its losses and zero-shot segmentation)."""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.models import layers
from clipjax.models.layers import CONV_IN, CONV_SPATIAL, EMBED, HEADS, KV, MLP, POSITIONS, Dtype

_TRUNC = nn.initializers.truncated_normal(0.02)  # GroupViT's init of its own linear layers


# --- The grouping image tower ------------------------------------------------------


def hard_assign(logits_BGN: jax.Array, noise_BGN: jax.Array | None = None,
                tau: float = 1.0) -> jax.Array:
    """One-hot over the groups (axis 1) of softmax((logits + noise) / tau), with that
    softmax's gradient (straight-through). Without noise: the evaluation arg-max."""
    y_BGN = logits_BGN if noise_BGN is None else logits_BGN + noise_BGN
    soft_BGN = jax.nn.softmax(y_BGN / tau, axis=1)
    hard_BGN = jax.nn.one_hot(jnp.argmax(soft_BGN, axis=1), y_BGN.shape[1], axis=1,
                              dtype=soft_BGN.dtype)
    return hard_BGN - jax.lax.stop_gradient(soft_BGN) + soft_BGN


def row_gumbel(seed_B: jax.Array, salt: int, shape: Sequence[int]) -> jax.Array:
    """Gumbel noise [B, *shape], row b drawn from (seed_B[b], salt) alone: the same for a
    row whatever the batch around it, its sharding or its micro-batch."""
    base = jax.random.key(0)
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(base, s), salt))(seed_B)
    return jax.vmap(lambda k: jax.random.gumbel(k, tuple(shape), jnp.float32))(keys)


class TokenMlp(nn.Module):
    """fc1 -> GELU -> fc2 over the token axis: GroupViT's token mixing, N -> out_tokens."""

    hidden: int
    out_tokens: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BND: jax.Array) -> jax.Array:
        x_BDN = x_BND.swapaxes(1, 2)
        h_BDF = layers.Dense(self.hidden, (POSITIONS, MLP), dtype=self.dtype, kernel_init=_TRUNC,
                             activation=layers.exact_gelu, name="fc1")(x_BDN)
        y_BDM = layers.Dense(self.out_tokens, (MLP, POSITIONS), dtype=self.dtype,
                             kernel_init=_TRUNC, name="fc2")(h_BDF)
        return y_BDM.swapaxes(1, 2)


class ChannelMlp(nn.Module):
    """fc1 -> GELU -> fc2 over the channels (timm's Mlp, GroupViT's initialisation)."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BND: jax.Array) -> jax.Array:
        h = layers.Dense(self.hidden, (EMBED, MLP), dtype=self.dtype, kernel_init=_TRUNC,
                         activation=layers.exact_gelu, name="fc1")(x_BND)
        return layers.Dense(x_BND.shape[-1], (MLP, EMBED), dtype=self.dtype, kernel_init=_TRUNC,
                            name="fc2")(h)


class CrossAttention(nn.Module):
    """Multi-head attention of queries [B, Q, D] over other tokens [B, N, D]."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q_BQD: jax.Array, kv_BND: jax.Array) -> jax.Array:
        d = q_BQD.shape[-1]
        h, k = self.num_heads, d // self.num_heads

        def project(name, x_BND):
            w_DHK = layers.param_with_axes(self, f"{name}_kernel", _TRUNC, (d, h, k),
                                           (EMBED, HEADS, KV))
            b_HK = layers.param_with_axes(self, f"{name}_bias", nn.initializers.zeros, (h, k),
                                          (HEADS, KV))
            return layers.einsum("bnd,dhk->bnhk", x_BND, w_DHK, self.dtype, b_HK)

        o_BQHK = jax.nn.dot_product_attention(project("q", q_BQD), project("k", kv_BND),
                                              project("v", kv_BND))
        w_HKD = layers.param_with_axes(self, "out_kernel", _TRUNC, (h, k, d), (HEADS, KV, EMBED))
        b_D = layers.param_with_axes(self, "out_bias", nn.initializers.zeros, (d,), (EMBED,))
        return layers.einsum("bqhk,hkd->bqd", o_BQHK, w_HKD, self.dtype, b_D)


class CrossAttnBlock(nn.Module):
    """Post-norm: x = q + attn(q, kv); x = x + mlp(norm2(x)); norm_post(x)."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q_BQD: jax.Array, kv_BND: jax.Array) -> jax.Array:
        x = q_BQD + CrossAttention(self.num_heads, self.dtype, name="attn")(q_BQD, kv_BND)
        d = x.shape[-1]
        x = x + ChannelMlp(4 * d, self.dtype, name="mlp")(layers.LayerNorm(name="norm2")(x))
        return layers.LayerNorm(name="norm_post")(x)


class AssignAttention(nn.Module):
    """One-head attention of groups over tokens whose weights are a hard assignment of
    every token to one group. Returns (groups [B, G, D], soft [B, G, N], hard [B, G, N])."""

    dtype: Dtype = jnp.float32
    assign_eps: float = 1.0

    @nn.compact
    def __call__(self, groups_BGD: jax.Array, x_BND: jax.Array,
                 noise_BGN: jax.Array | None = None):
        d = x_BND.shape[-1]
        dense = functools.partial(layers.Dense, d, dtype=self.dtype, kernel_init=_TRUNC)
        q_BGD = dense((EMBED, MLP), name="q_proj")(groups_BGD)
        k_BND = dense((EMBED, MLP), name="k_proj")(x_BND)
        v_BND = dense((EMBED, MLP), name="v_proj")(x_BND)
        # float32 logits: the arg-max decides the segmentation.
        logits_BGN = jnp.einsum("bgd,bnd->bgn", q_BGD, k_BND,
                                preferred_element_type=jnp.float32) * d**-0.5
        soft_BGN = jax.nn.softmax(logits_BGN, axis=1)  # over groups: what segmentation reads
        hard_BGN = hard_assign(logits_BGN, noise_BGN)
        # A group's output is the mean of its tokens, shrunk towards 0 when it has few.
        attn_BGN = hard_BGN / (jnp.sum(hard_BGN, axis=-1, keepdims=True) + self.assign_eps)
        out_BGD = layers.einsum("bgn,bnd->bgd", attn_BGN, v_BND, self.dtype)
        out_BGD = dense((MLP, EMBED), name="proj")(out_BGD)
        return out_BGD, soft_BGN, hard_BGN


class GroupingBlock(nn.Module):
    """Tokens [B, N, D] and group tokens [B, G, D] -> `out_groups` new tokens [B, O, D]."""

    num_heads: int
    out_groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BND: jax.Array, groups_BGD: jax.Array,
                 noise_BON: jax.Array | None = None):
        d = x_BND.shape[-1]
        groups_BGD = layers.LayerNorm(name="norm_tokens")(groups_BGD)
        x_BND = layers.LayerNorm(name="norm_x")(x_BND)
        proj_BOD = TokenMlp(d // 2, self.out_groups, self.dtype, name="mlp_inter")(groups_BGD)
        proj_BOD = layers.LayerNorm(name="norm_post_tokens")(proj_BOD)
        proj_BOD = CrossAttnBlock(self.num_heads, self.dtype, name="pre_assign_attn")(
            proj_BOD, x_BND)
        new_BOD, soft_BON, hard_BON = AssignAttention(self.dtype, name="assign")(
            proj_BOD, x_BND, noise_BON)
        new_BOD = new_BOD + proj_BOD
        # GroupViT's `reduction` is the identity when the width stays the same.
        new_BOD = new_BOD + ChannelMlp(4 * d, self.dtype, name="mlp_channels")(
            layers.LayerNorm(name="norm_new_x")(new_BOD))
        return new_BOD, soft_BON, hard_BON


class GroupingStage(nn.Module):
    """Group tokens (learned, plus the previous stage's mixed into their number),
    self-attention blocks over [tokens; groups], then the grouping block, if any."""

    depth: int
    num_heads: int
    mlp_dim: int
    group_tokens: int
    out_groups: int  # 0: the last stage, no grouping
    stage: int
    dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    unroll: bool = False
    train: bool = False

    @nn.compact
    def __call__(self, x_BND: jax.Array, prev_BPD: jax.Array | None,
                 seed_B: jax.Array | None = None):
        b, n, d = x_BND.shape
        groups_BGD = None
        if self.group_tokens:
            g = self.group_tokens
            init = nn.initializers.zeros if prev_BPD is not None else _TRUNC
            tok_GD = layers.param_with_axes(self, "group_token", init, (g, d), (POSITIONS, EMBED))
            groups_BGD = jnp.broadcast_to(tok_GD.astype(self.dtype), (b, g, d))
            if prev_BPD is not None:  # GroupViT's group_projector: LayerNorm + MixerMlp
                p_BPD = layers.LayerNorm(name="group_projector_norm")(prev_BPD)
                groups_BGD = groups_BGD + TokenMlp(d // 2, g, self.dtype,
                                                   name="group_projector")(p_BPD)
            x_BND = jnp.concatenate([x_BND, groups_BGD], axis=1)
        x_BND, _ = layers.Transformer(self.depth, self.num_heads, self.mlp_dim, "gelu",
                                      dtype=self.dtype, scan=self.scan, remat=self.remat,
                                      unroll=self.unroll, name="transformer")(x_BND)
        if self.group_tokens:
            x_BND, groups_BGD = x_BND[:, :n], x_BND[:, n:]
        if not self.out_groups:
            return x_BND, groups_BGD, None, None
        noise_BON = self._noise((b, self.out_groups, n), seed_B)
        x_BOD, soft, hard = GroupingBlock(self.num_heads, self.out_groups, self.dtype,
                                          name="grouping")(x_BND, groups_BGD, noise_BON)
        return x_BOD, groups_BGD, soft, hard

    def _noise(self, shape_BON, seed_B):
        """Gumbel noise in training: per row from the batch's seeds, else from the
        'gumbel' rng stream if given, else none (the evaluation arg-max)."""
        if not self.train:
            return None
        if seed_B is not None:
            return row_gumbel(seed_B, self.stage, shape_BON[1:])
        if self.has_rng("gumbel"):
            return jax.random.gumbel(self.make_rng("gumbel"), shape_BON, jnp.float32)
        return None


def resize_positions(pos_ND: jax.Array, grid: int, hw: tuple[int, int]) -> jax.Array:
    """Learned positions of a grid x grid patch grid resized (cubic) to hw."""
    if hw == (grid, grid):
        return pos_ND
    pos = pos_ND.reshape(grid, grid, -1)
    pos = jax.image.resize(pos, (*hw, pos.shape[-1]), "cubic", antialias=False)
    return pos.reshape(hw[0] * hw[1], -1)


class GroupViTVision(nn.Module):
    """Images [B, H, W, 3] -> (final group tokens [B, O, D] after the last LayerNorm,
    per grouping stage the soft and hard assignments [B, groups, tokens])."""

    image_size: int
    patch_size: int
    width: int
    heads: int
    depths: tuple[int, ...]
    group_tokens: tuple[int, ...]
    output_groups: tuple[int, ...]
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    scan: bool = False
    remat: str = "none"
    unroll: bool = False
    train: bool = False

    @nn.compact
    def __call__(self, img_BHWC: jax.Array, seed_B: jax.Array | None = None):
        stages = len(self.depths)
        if not (len(self.group_tokens) == stages == len(self.output_groups) + 1
                and all(self.group_tokens[:-1])):
            raise ValueError(f"GroupViT stages: depths {self.depths}, group_tokens "
                             f"{self.group_tokens}, output_groups {self.output_groups}; give one "
                             "output group count fewer than stages and group tokens in every "
                             "stage but the last.")
        b, h, w, c = img_BHWC.shape
        p, d = self.patch_size, self.width
        gh, gw = h // p, w // p  # a stride-p convolution drops what does not fill a patch
        kernel = layers.param_with_axes(self, "patch_kernel", nn.initializers.lecun_normal(
            in_axis=(0, 1, 2), out_axis=3), (p, p, c, d),
            (CONV_SPATIAL, CONV_SPATIAL, CONV_IN, EMBED))
        bias = layers.param_with_axes(self, "patch_bias", nn.initializers.zeros, (d,), (EMBED,))
        patches = img_BHWC[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c)
        patches_BNP = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)
        x_BND = layers.einsum("bnp,pd->bnd", patches_BNP, kernel.reshape(p * p * c, d),
                              self.dtype, bias)
        x_BND = layers.LayerNorm(name="patch_norm")(x_BND)
        grid = self.image_size // p
        pos_ND = layers.param_with_axes(self, "positional_embedding", _TRUNC, (grid * grid, d),
                                        (POSITIONS, EMBED))
        x_BND = x_BND + resize_positions(pos_ND, grid, (gh, gw)).astype(self.dtype)

        groups_BGD, soft, hard = None, [], []
        for i in range(stages):
            x_BND, groups_BGD, s, a = GroupingStage(
                self.depths[i], self.heads, int(d * self.mlp_ratio), self.group_tokens[i],
                self.output_groups[i] if i < stages - 1 else 0, i, self.dtype, self.scan,
                self.remat, self.unroll, self.train, name=f"stage_{i}")(x_BND, groups_BGD, seed_B)
            if s is not None:
                soft.append(s)
                hard.append(a)
        return layers.LayerNorm(name="norm")(x_BND), soft, hard
