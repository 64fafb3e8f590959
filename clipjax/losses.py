"""Contrastive losses over the global batch.

Every loss takes embeddings of the whole global batch (`img_BE`, `txt_BE`: jax Arrays
whose rows are split over the mesh's batch axes), the logit scale as a multiplier
(`scale = exp(params["logit_scale"])`) and the logit bias (or None), and returns
`(loss, metrics)`: the scalar loss and a dict of global-batch metrics.

- `softmax`: symmetric InfoNCE written as if on one device; jit keeps the logits split by
  rows (b x N per device) and all-gathers the text columns.
- `tiled`: the same loss as a ring over the mesh. Text blocks travel device to device;
  each device keeps only per-row log-sum-exps and recomputes every tile in the backward
  pass, so its memory is O(b x tile) whatever N is.
- `sigmoid`: SigLIP's pairwise sigmoid loss; `sigmoid_ring` is its ring form, with the
  same recompute-in-backward structure.
- `multi_positive`: InfoNCE with soft targets spread over every pair that shares a label.
- `kl_multi_positive`: ActionCLIP's KL form of it, targets softmax(10 x same-label),
  which leaves a little weight (about e^-10) on every negative.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipjax import sharding

Metrics = dict[str, jax.Array]


def _row_sharded(x, mesh: Mesh | None):
    if mesh is None:
        return x
    spec = P(sharding.BATCH_AXES, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _logits(img_BE, txt_CE, scale, bias, mesh):
    logits_BC = scale * (img_BE.astype(jnp.float32) @ txt_CE.astype(jnp.float32).T)
    if bias is not None:
        logits_BC = logits_BC + bias
    return _row_sharded(logits_BC, mesh)


def logit_metrics(logits_BB: jax.Array) -> Metrics:
    """Retrieval accuracy both ways over the global batch, mean positive and negative logit."""
    n = logits_BB.shape[0]
    target_B = jnp.arange(n)
    diag_B = jnp.diagonal(logits_BB)
    return {
        "i2t_accuracy": jnp.mean(jnp.argmax(logits_BB, axis=1) == target_B),
        "t2i_accuracy": jnp.mean(jnp.argmax(logits_BB, axis=0) == target_B),
        "positive_logit": jnp.mean(diag_B),
        "negative_logit": (jnp.sum(logits_BB) - jnp.sum(diag_B)) / float(max(n * n - n, 1)),
    }


def softmax_loss(img_BE, txt_BE, scale, bias=None, *, mesh: Mesh | None = None):
    """Symmetric InfoNCE over the global batch (CLIP). `bias` cancels in a softmax."""
    logits_BB = _logits(img_BE, txt_BE, scale, None, mesh)
    diag_B = jnp.diagonal(logits_BB)
    i2t = jax.nn.logsumexp(logits_BB, axis=1) - diag_B
    t2i = jax.nn.logsumexp(logits_BB, axis=0) - diag_B
    loss = (jnp.mean(i2t) + jnp.mean(t2i)) / 2
    return loss, jax.lax.stop_gradient(logit_metrics(logits_BB))


def sigmoid_loss(img_BE, txt_BE, scale, bias, *, mesh: Mesh | None = None):
    """SigLIP: every pair is a binary problem; summed over texts, averaged over images."""
    logits_BB = _logits(img_BE, txt_BE, scale, bias, mesh)
    n = logits_BB.shape[0]
    sign_BB = 2 * jnp.eye(n, dtype=logits_BB.dtype) - 1
    loss = -jnp.sum(jax.nn.log_sigmoid(sign_BB * logits_BB)) / n
    return loss, jax.lax.stop_gradient(logit_metrics(logits_BB))


def multi_positive_loss(img_BE, txt_CE, scale, bias=None, *, img_labels_B, txt_labels_C=None,
                        mesh: Mesh | None = None):
    """InfoNCE whose targets spread evenly over every pair with equal labels.

    Image i's target distribution is uniform over the texts sharing its label, and text
    j's over the images sharing its label (ActionCLIP's same-class pairs; GroupViT's
    several prompts per image). Rows without any positive are left out of the mean.
    """
    txt_labels_C = img_labels_B if txt_labels_C is None else txt_labels_C
    logits_BC = _logits(img_BE, txt_CE, scale, None, mesh)
    pos_BC = (img_labels_B[:, None] == txt_labels_C[None, :]).astype(jnp.float32)

    def soft_ce(axis):
        logp = logits_BC - jax.nn.logsumexp(logits_BC, axis=axis, keepdims=True)
        count = jnp.sum(pos_BC, axis=axis)
        ce = -jnp.sum(pos_BC * logp, axis=axis) / jnp.maximum(count, 1)
        return jnp.sum(ce) / jnp.maximum(jnp.sum(count > 0), 1)

    loss = (soft_ce(1) + soft_ce(0)) / 2
    i2t_hit = jnp.take_along_axis(pos_BC, jnp.argmax(logits_BC, 1)[:, None], 1)[:, 0]
    t2i_hit = jnp.take_along_axis(pos_BC, jnp.argmax(logits_BC, 0)[None, :], 0)[0]
    metrics = {
        "i2t_accuracy": jnp.mean(i2t_hit),
        "t2i_accuracy": jnp.mean(t2i_hit),
        "positive_logit": jnp.sum(pos_BC * logits_BC) / jnp.maximum(jnp.sum(pos_BC), 1),
        "negative_logit": (jnp.sum((1 - pos_BC) * logits_BC)
                           / jnp.maximum(jnp.sum(1 - pos_BC), 1)),
    }
    return loss, jax.lax.stop_gradient(metrics)


def kl_multi_positive_loss(img_BE, txt_CE, scale, bias=None, *, img_labels_B,
                           txt_labels_C=None, mesh: Mesh | None = None, sharpen: float = 10.0):
    """ActionCLIP's loss (its utils/KLLoss.py on both logit directions, averaged).

    Targets are softmax(sharpen x [label_i == label_j]) per row; each direction is
    KL(target || softmax(logits)) summed over the row and averaged over rows (torch's
    KLDivLoss with mean reduction over all B x C entries, times B).
    """
    txt_labels_C = img_labels_B if txt_labels_C is None else txt_labels_C
    logits_BC = _logits(img_BE, txt_CE, scale, None, mesh)
    pos_BC = (img_labels_B[:, None] == txt_labels_C[None, :]).astype(jnp.float32)

    def kl(axis):
        logt = jax.nn.log_softmax(sharpen * pos_BC, axis=axis)
        logq = jax.nn.log_softmax(logits_BC, axis=axis)
        return jnp.sum(jnp.exp(logt) * (logt - logq)) / logits_BC.shape[1 - axis]

    loss = (kl(1) + kl(0)) / 2
    return loss, multi_positive_loss(img_BE, txt_CE, scale, img_labels_B=img_labels_B,
                                     txt_labels_C=txt_labels_C, mesh=mesh)[1]


# --- The ring -----------------------------------------------------------------------
#
# Inside shard_map, device d holds its b image rows and b text rows. Text blocks move one
# device along the ring per step: at step s device d works on the block of device
# (d - s) % n, and adds to that block's per-column accumulators, which follow it. After
# n - 1 hops every device has seen all N columns; one more hop, of the accumulators alone,
# takes them home. Local rows are processed in tiles of t rows, so the largest live array
# is t x b.

_NEG_INF = -jnp.inf


def _ring_scan(body, local, block, acc, axis, n: int, *, big_acc: bool):
    """Runs `body(local, block, acc, step) -> (local, acc)` on every device's block in turn.

    Returns the final `local` and, on each block's home device, its acc. A step starts
    sending its block on before computing on it, so the transfer runs under the tile loop
    (double buffering); the acc, which the tiles update, is sent after them. Blocks make
    n - 1 hops, accs n: the last step has no block to send, only the accs to take home.
    """
    if n == 1:
        return body(local, block, acc, 0)
    perm = [(i, (i + 1) % n) for i in range(n)]
    hop = functools.partial(jax.lax.ppermute, axis_name=axis, perm=perm)

    def step(carry, s):
        local, block, acc = carry
        next_block = hop(block)
        local, acc = body(local, block, acc, s)
        if big_acc:
            # An acc as large as the block (the text gradients) leaves only once the next
            # block is in: else XLA's scheduler counts the block's transfer as hidden behind
            # the acc's and starts both after the tile loop. The forward ring's accs are
            # b-vectors: holding them back gains nothing and, on v5e 2x4, cost sigmoid_ring
            # a text block of HBM.
            acc, next_block = jax.lax.optimization_barrier((acc, next_block))
        return (local, next_block, hop(acc)), None

    (local, block, acc), _ = jax.lax.scan(step, (local, block, acc), jnp.arange(n - 1))
    local, acc = body(local, block, acc, n - 1)
    return local, hop(acc)


def _tiles(x_bE, t: int):
    """Rows padded to a multiple of t and split into tiles: [T, t, E] plus a [T, t] mask."""
    b = x_bE.shape[0]
    tiles = -(-b // t)
    pad = tiles * t - b
    x = jnp.pad(x_bE, ((0, pad), (0, 0))).reshape(tiles, t, -1)
    valid = (jnp.arange(tiles * t) < b).reshape(tiles, t)
    return x, valid


def _untile(x_Tt, b: int):
    return x_Tt.reshape(-1, *x_Tt.shape[2:])[:b]


def _best(a, b):
    """Combines (max, index) pairs, keeping the first index on ties (as argmax does)."""
    (ma, ia), (mb, ib) = a, b
    take_b = (mb > ma) | ((mb == ma) & (ib < ia))
    return jnp.where(take_b, mb, ma), jnp.where(take_b, ib, ia)


def _tile_max(z_tb, valid_t, row0, col0):
    """Per-row and per-column (max, global index) of one tile; padded rows excluded."""
    z_rows = jnp.where(valid_t[:, None], z_tb, _NEG_INF)
    row = (jnp.max(z_tb, 1), col0 + jnp.argmax(z_tb, 1))
    col = (jnp.max(z_rows, 0), row0 + jnp.argmax(z_rows, 0))
    return row, col


def _ring_forward(img_bE, txt_bE, scale, bias, *, axis, n: int, t: int, lse: bool):
    """One forward ring: per-row/column statistics and the sum of all logits.

    With `lse`, also each image row's and (on its home device) each text column's
    log-sum-exp; otherwise the summed -log sigmoid(±z) of every pair (SigLIP).
    """
    b = img_bE.shape[0]
    d = jax.lax.axis_index(axis)
    img_TtE, valid_Tt = _tiles(img_bE, t)
    row_idx_Tt = d * b + jnp.arange(img_TtE.shape[0] * t).reshape(-1, t)

    def body(local, txt, col, s):
        src = (d - s) % n  # the device this text block belongs to
        col_idx_b = src * b + jnp.arange(b)

        def tile(carry, xs):
            col_best, col_lse, total, sig = carry
            img_tE, valid_t, rows_t = xs
            z_tb = scale * (img_tE @ txt.T) + bias
            row_best, tile_col_best = _tile_max(z_tb, valid_t, rows_t[0], src * b)
            col_best = _best(col_best, tile_col_best)
            total = total + jnp.sum(jnp.where(valid_t[:, None], z_tb, 0.0))
            if lse:
                z_valid = jnp.where(valid_t[:, None], z_tb, _NEG_INF)
                col_lse = jnp.logaddexp(col_lse, jax.nn.logsumexp(z_valid, 0))
                row_lse_t = jax.nn.logsumexp(z_tb, 1)
            else:
                sign = jnp.where(rows_t[:, None] == col_idx_b[None, :], 1.0, -1.0)
                pair = -jax.nn.log_sigmoid(sign * z_tb)
                sig = sig + jnp.sum(jnp.where(valid_t[:, None], pair, 0.0))
                row_lse_t = jnp.zeros(z_tb.shape[:1])
            return (col_best, col_lse, total, sig), (row_lse_t, row_best)

        row_lse, row_best, total, sig = local
        (col_best, col_lse, total, sig), (tile_lse, tile_best) = jax.lax.scan(
            tile, (*col, total, sig), (img_TtE, valid_Tt, row_idx_Tt))
        row_lse = jnp.logaddexp(row_lse, tile_lse)
        row_best = _best(row_best, tile_best)
        return (row_lse, row_best, total, sig), (col_best, col_lse)

    neg_Tt = jnp.full(valid_Tt.shape, _NEG_INF)
    idx_Tt = jnp.zeros(valid_Tt.shape, jnp.int32)
    zero = jnp.zeros((), jnp.float32)
    local = (neg_Tt, (neg_Tt, idx_Tt), zero, zero)
    neg_b = jnp.full((b,), _NEG_INF)
    col = ((neg_b, jnp.zeros((b,), jnp.int32)), neg_b if lse else None)
    (row_lse, row_best, total, sig), (col_best, col_lse) = _ring_scan(
        body, local, txt_bE, col, axis, n, big_acc=False)
    row_lse, row_arg = _untile(row_lse, b), _untile(row_best[1], b)
    diag_b = scale * jnp.sum(img_bE * txt_bE, 1) + bias
    home_b = d * b + jnp.arange(b)
    psum = functools.partial(jax.lax.psum, axis_name=axis)
    N = n * b
    sum_diag = psum(jnp.sum(diag_b))
    metrics = {
        "i2t_accuracy": psum(jnp.sum(row_arg == home_b)) / N,
        "t2i_accuracy": psum(jnp.sum(col_best[1] == home_b)) / N,
        "positive_logit": sum_diag / N,
        "negative_logit": (psum(total) - sum_diag) / float(max(N * N - N, 1)),
    }
    if lse:
        loss = psum(jnp.sum(row_lse - diag_b) + jnp.sum(col_lse - diag_b)) / (2 * N)
    else:
        loss = psum(sig) / N
    return loss, metrics, (row_lse, col_lse)


def _ring_backward(img_bE, txt_bE, scale, bias, row_lse_b, col_lse_b, g, *, axis, n, t,
                   lse: bool):
    """Gradients of the ring loss for the local rows, recomputing every tile.

    The text block travels with its columns' log-sum-exps (softmax only); its gradient is
    the acc that goes home.
    """
    b = img_bE.shape[0]
    N = n * b
    d = jax.lax.axis_index(axis)
    img_TtE, valid_Tt = _tiles(img_bE, t)
    row_lse_Tt = _tiles(row_lse_b[:, None], t)[0][..., 0] if lse else None
    row_idx_Tt = d * b + jnp.arange(img_TtE.shape[0] * t).reshape(-1, t)

    def body(local, block, gtxt, s):
        src = (d - s) % n
        txt, col_lse = block
        col_idx_b = src * b + jnp.arange(b)

        def tile(acc, xs):
            gimg_TtE, gtxt, gscale, gbias = acc
            k, img_tE, valid_t, rows_t, row_lse_t = xs
            dots_tb = img_tE @ txt.T
            z_tb = scale * dots_tb + bias
            if lse:  # d loss / d z = (softmax over the row + softmax over the column) / 2N
                dz_tb = (jnp.exp(z_tb - row_lse_t[:, None])
                         + jnp.exp(z_tb - col_lse[None, :])) / (2 * N)
            else:  # d/dz of -log sigmoid(sign z) / N
                sign = jnp.where(rows_t[:, None] == col_idx_b[None, :], 1.0, -1.0)
                dz_tb = -sign * jax.nn.sigmoid(-sign * z_tb) / N
            dz_tb = jnp.where(valid_t[:, None], dz_tb, 0.0)
            # Updated in place: stacking per-tile outputs would hold another b x E buffer.
            gimg_tE = gimg_TtE[k] + scale * (dz_tb @ txt)
            gimg_TtE = jax.lax.dynamic_update_index_in_dim(gimg_TtE, gimg_tE, k, 0)
            gtxt = gtxt + scale * (dz_tb.T @ img_tE)
            return (gimg_TtE, gtxt, gscale + jnp.sum(dz_tb * dots_tb),
                    gbias + jnp.sum(dz_tb)), None

        xs = (jnp.arange(img_TtE.shape[0]), img_TtE, valid_Tt, row_idx_Tt,
              row_lse_Tt if lse else jnp.zeros(valid_Tt.shape))
        gimg_TtE, gscale, gbias = local
        gimg_TtE, gtxt, gscale, gbias = jax.lax.scan(
            tile, (gimg_TtE, gtxt, gscale, gbias), xs)[0]
        return (gimg_TtE, gscale, gbias), gtxt

    zero = jnp.zeros((), jnp.float32)
    local = (jnp.zeros_like(img_TtE), zero, zero)
    block = (txt_bE, col_lse_b if lse else None)
    (gimg_TtE, gscale, gbias), gtxt_bE = _ring_scan(
        body, local, block, jnp.zeros_like(txt_bE), axis, n, big_acc=True)
    gimg_bE = _untile(gimg_TtE, b)
    if lse:  # the positives' -z_ii, once in each direction
        gimg_bE = gimg_bE - scale * txt_bE / N
        gtxt_bE = gtxt_bE - scale * img_bE / N
        gscale = gscale - jnp.sum(img_bE * txt_bE) / N
    return g * gimg_bE, g * gtxt_bE, g * gscale, g * gbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _ring_loss(img_bE, txt_bE, scale_1, bias_1, axis, n, t, lse):
    loss, metrics, _ = _ring_forward(img_bE, txt_bE, scale_1[0], bias_1[0], axis=axis, n=n,
                                     t=t, lse=lse)
    return loss[None], jax.tree.map(lambda m: m[None], metrics)


def _ring_loss_fwd(img_bE, txt_bE, scale_1, bias_1, axis, n, t, lse):
    loss, metrics, (row_lse, col_lse) = _ring_forward(
        img_bE, txt_bE, scale_1[0], bias_1[0], axis=axis, n=n, t=t, lse=lse)
    out = (loss[None], jax.tree.map(lambda m: m[None], metrics))
    # The backward ring starts only once the forward one is done. Otherwise XLA interleaves
    # them (SigLIP's share no data) and their buffers coexist: on v5e 2x4, +22% (tiled)
    # and +97% (sigmoid_ring) HBM per chip.
    return jax.lax.optimization_barrier(
        (out, (img_bE, txt_bE, scale_1, bias_1, row_lse, col_lse)))


def _ring_loss_bwd(axis, n, t, lse, res, cts):
    img_bE, txt_bE, scale_1, bias_1, row_lse, col_lse = res
    # Every device returns the same total loss, so the total's cotangent is their sum.
    g = jax.lax.psum(cts[0][0], axis)
    gimg, gtxt, gscale, gbias = _ring_backward(
        img_bE, txt_bE, scale_1[0], bias_1[0], row_lse, col_lse, g, axis=axis, n=n, t=t,
        lse=lse)
    return gimg, gtxt, gscale[None], gbias[None]


_ring_loss.defvjp(_ring_loss_fwd, _ring_loss_bwd)


def _ring(img_BE, txt_BE, scale, bias, mesh: Mesh | None, tile: int, lse: bool):
    if mesh is None:
        mesh = sharding.create_mesh(devices=jax.devices()[:1])
    axis = sharding.BATCH_AXES
    n = sharding.batch_size(mesh)
    sharding.check_global_batch(img_BE.shape[0], mesh)
    b = img_BE.shape[0] // n
    t = max(1, min(tile, b))
    # Scale and bias enter once per device (shape [n]); the broadcast's transpose then
    # sums the per-device partial gradients.
    per_device = lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.float32), (n,))
    rows = P(axis, None)
    fn = jax.shard_map(
        functools.partial(_ring_loss, axis=axis, n=n, t=t, lse=lse), mesh=mesh,
        in_specs=(rows, rows, P(axis), P(axis)), out_specs=(P(axis), P(axis)),
        check_vma=False)
    loss_n, metrics_n = fn(img_BE.astype(jnp.float32), txt_BE.astype(jnp.float32),
                           per_device(scale), per_device(0.0 if bias is None else bias))
    # Each device holds the same total: take the mean so each entry's cotangent is g / n.
    return jnp.mean(loss_n), jax.tree.map(lambda m: jax.lax.stop_gradient(m[0]), metrics_n)


def tiled_loss(img_BE, txt_BE, scale, bias=None, *, mesh: Mesh | None = None,
               tile: int = 512):
    """`softmax_loss` as a ring with O(b x tile) memory per device (the bias cancels)."""
    return _ring(img_BE, txt_BE, scale, None, mesh, tile, lse=True)


def sigmoid_ring_loss(img_BE, txt_BE, scale, bias, *, mesh: Mesh | None = None,
                      tile: int = 512):
    """`sigmoid_loss` as a ring whose tiles are recomputed in the backward pass."""
    return _ring(img_BE, txt_BE, scale, bias, mesh, tile, lse=False)


LOSSES: dict[str, Callable] = {
    "softmax": softmax_loss,
    "tiled": tiled_loss,
    "sigmoid": sigmoid_loss,
    "sigmoid_ring": sigmoid_ring_loss,
    "multi_positive": multi_positive_loss,
    "kl_multi_positive": kl_multi_positive_loss,
}


def get_loss(name: str) -> Callable:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}.")
    return LOSSES[name]
