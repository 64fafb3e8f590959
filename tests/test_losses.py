"""Every loss against a float64 NumPy reference, in value and gradient, on 1-8 devices."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params
from jax.sharding import NamedSharding, PartitionSpec as P

from clipjax import losses, sharding

N, E = 24, 8  # a global batch that is not a power of two: 24, 12, 6 and 3 rows per device


def _lse(z, axis):
    m = z.max(axis, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis, keepdims=True))).squeeze(axis)


def _softmax(z, axis):
    return np.exp(z - np.expand_dims(_lse(z, axis), axis))


def _metrics(z, pos):
    return {
        "i2t_accuracy": pos[np.arange(len(z)), z.argmax(1)].mean(),
        "t2i_accuracy": pos[z.argmax(0), np.arange(z.shape[1])].mean(),
        "positive_logit": (z * pos).sum() / pos.sum(),
        "negative_logit": (z * (1 - pos)).sum() / (1 - pos).sum(),
    }


def reference(kind, img, txt, s, b, img_labels=None, txt_labels=None):
    """(loss, d/dimg, d/dtxt, d/ds, d/db, metrics) in float64 NumPy, written out by hand."""
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    dots = img @ txt.T
    n = len(img)
    eye = np.eye(n)
    if kind in ("softmax", "tiled"):
        z = s * dots
        diag = np.diag(z)
        loss = ((_lse(z, 1) - diag).mean() + (_lse(z, 0) - diag).mean()) / 2
        dz = (_softmax(z, 1) - eye + _softmax(z, 0) - eye) / (2 * n)
        pos, db = eye, 0.0
    elif kind in ("sigmoid", "sigmoid_ring"):
        z = s * dots + b
        y = 2 * eye - 1
        loss = -np.log(1 / (1 + np.exp(-y * z))).sum() / n
        dz = -y / (1 + np.exp(y * z)) / n
        pos, db = eye, dz.sum()
    else:  # multi_positive
        z = s * dots
        pos = (img_labels[:, None] == txt_labels[None, :]).astype(np.float64)
        rows, cols = pos.sum(1) > 0, pos.sum(0) > 0
        t_row = pos / np.maximum(pos.sum(1, keepdims=True), 1)
        t_col = pos / np.maximum(pos.sum(0, keepdims=True), 1)
        ce_row = -(t_row * (z - _lse(z, 1)[:, None])).sum(1)
        ce_col = -(t_col * (z - _lse(z, 0)[None, :])).sum(0)
        loss = (ce_row[rows].mean() + ce_col[cols].mean()) / 2
        dz = ((_softmax(z, 1) - t_row) * rows[:, None] / rows.sum()
              + (_softmax(z, 0) - t_col) * cols[None, :] / cols.sum()) / 2
        db = 0.0
    return loss, s * dz @ txt, s * dz.T @ img, (dz * dots).sum(), db, _metrics(z, pos)


def _inputs(seed=0, n=N):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, E)).astype(np.float32)
    txt = (img + 0.8 * rng.normal(size=(n, E))).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt


MESHES = {  # (data, fsdp, tensor) over the first data*fsdp*tensor devices
    "1": (1, 1, 1), "2": (2, 1, 1), "4": (1, 4, 1), "8": (2, 4, 1), "2x2x2": (2, 2, 2),
}


def _mesh(name):
    data, fsdp, tensor = MESHES[name]
    return sharding.create_mesh(data, fsdp, tensor, devices=jax.devices()[:data * fsdp * tensor])


@functools.lru_cache(maxsize=None)
def _grad_fn(kind, mesh_name, tile):
    mesh = _mesh(mesh_name)
    loss_fn = losses.get_loss(kind)
    extra = {"tile": tile} if kind in ("tiled", "sigmoid_ring") else {}

    def f(img, txt, log_s, b, img_labels, txt_labels):
        if kind == "multi_positive":
            extra.update(img_labels_B=img_labels, txt_labels_C=txt_labels)
        return loss_fn(img, txt, jnp.exp(log_s), b, mesh=mesh, **extra)

    rows = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    rep = NamedSharding(mesh, P())
    labels = NamedSharding(mesh, P(sharding.BATCH_AXES))
    grad = jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)
    return jax.jit(grad, in_shardings=(rows, rows, rep, rep, labels, labels)), mesh


def _check(kind, mesh_name, tile=4, seed=0, img_labels=None, txt_labels=None, n=N):
    img, txt = _inputs(seed, n)
    log_s, b = np.float32(np.log(10.0)), np.float32(-2.0)
    if img_labels is None:
        img_labels = txt_labels = np.arange(n, dtype=np.int32)
    fn, mesh = _grad_fn(kind, mesh_name, tile)
    (loss, metrics), grads = fn(img, txt, log_s, b, img_labels, txt_labels)
    ref = reference(kind, img, txt, np.exp(np.float64(log_s)), np.float64(b),
                    img_labels, txt_labels)
    ref_loss, ref_gimg, ref_gtxt, ref_gs, ref_gb, ref_metrics = ref
    np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(grads[0], ref_gimg, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(grads[1], ref_gtxt, atol=1e-5, rtol=1e-5)
    # The gradient w.r.t. log(scale) is scale times the gradient w.r.t. scale.
    np.testing.assert_allclose(grads[2], ref_gs * np.exp(log_s), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(grads[3], ref_gb, atol=1e-5, rtol=1e-5)
    for name, value in ref_metrics.items():
        np.testing.assert_allclose(metrics[name], value, atol=1e-5, rtol=1e-5, err_msg=name)
    if mesh.size > 1:  # gradients come back row-sharded, like the embeddings
        assert grads[0].sharding.spec[0] == sharding.BATCH_AXES
    return float(np.max(np.abs(np.asarray(grads[0]) - ref_gimg)))


@pytest.mark.parametrize("mesh_name", ["1", "2", "4", "8", "2x2x2"])
@pytest.mark.parametrize("kind", ["softmax", "tiled", "sigmoid", "sigmoid_ring"])
def test_loss_matches_numpy(kind, mesh_name):
    _check(kind, mesh_name)


@pytest.mark.parametrize("mesh_name", ["1", "8"])
def test_multi_positive_matches_numpy(mesh_name):
    labels = np.array([0, 1, 2, 0, 3, 1] * 4, dtype=np.int32)
    _check("multi_positive", mesh_name, img_labels=labels, txt_labels=labels)
    # Texts whose labels differ from the images' (some rows without any positive).
    _check("multi_positive", mesh_name, img_labels=labels, txt_labels=(labels + 1) % 5)


def test_multi_positive_with_unique_labels_is_softmax():
    img, txt = _inputs(3)
    labels = np.arange(N)
    a, _ = losses.multi_positive_loss(img, txt, 7.0, img_labels_B=labels)
    b, _ = losses.softmax_loss(img, txt, 7.0)
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("tile", [1, 5, 64])
def test_tiled_any_tile_size(tile):
    """Tiles that split rows unevenly (padding) or exceed them give the same numbers."""
    _check("tiled", "4", tile=tile, seed=1)
    _check("sigmoid_ring", "4", tile=tile, seed=1)


def test_ring_metrics_break_ties_like_argmax():
    """Equal logits: accuracy counts the first maximum, as jnp.argmax does."""
    img = np.tile(np.eye(E, dtype=np.float32)[:3], (8, 1))  # rows repeat: many exact ties
    fn, _ = _grad_fn("tiled", "8", 2)
    (_, metrics), _ = fn(img, img, np.float32(0.0), np.float32(0.0),
                         np.arange(N, dtype=np.int32), np.arange(N, dtype=np.int32))
    ref = _metrics(img.astype(np.float64) @ img.T.astype(np.float64), np.eye(N))
    assert float(metrics["i2t_accuracy"]) == pytest.approx(ref["i2t_accuracy"]) == 3 / N
    assert float(metrics["t2i_accuracy"]) == pytest.approx(ref["t2i_accuracy"])


def _hops(jaxpr, runs=1, looped=False):
    """(operand shape, inside a scan?) -> how often a ppermute sends it, scans unrolled."""
    hops = collections.Counter()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "ppermute":
            hops.update({(tuple(v.aval.shape), looped): runs for v in eqn.invars})
        is_scan = eqn.primitive.name == "scan"
        for sub in jaxprs_in_params(eqn.params):
            hops += _hops(sub, runs * eqn.params["length"] if is_scan else runs,
                          looped or is_scan)
    return hops


@pytest.mark.parametrize("mesh_name", ["1", "2", "8"])
@pytest.mark.parametrize("kind", ["tiled", "sigmoid_ring"])
def test_ring_sends_no_text_block_home(kind, mesh_name):
    """Text blocks make n - 1 hops per ring; the last hop carries only accumulators.

    With n devices and b rows each, the b x E arrays sent in the loss and its gradient
    are the text block, n - 1 times in each ring, and the backward ring's text gradients,
    n times; outside the rings' loops, only those gradients go home.
    """
    fn, mesh = _grad_fn(kind, mesh_name, 4)
    n = mesh.size
    img, txt = _inputs()
    ids = np.arange(N, dtype=np.int32)
    jaxpr = jax.make_jaxpr(fn)(img, txt, np.float32(0.0), np.float32(0.0), ids, ids)
    hops = _hops(jaxpr.jaxpr)
    block = (N // n, E)
    assert hops[(block, True)] + hops[(block, False)] == (3 * n - 2 if n > 1 else 0)
    assert hops[(block, False)] == (1 if n > 1 else 0)  # the text gradients going home


def test_batch_that_does_not_divide_the_mesh_is_an_error():
    img, txt = _inputs(0, n=12)
    with pytest.raises(ValueError, match="does not divide over the 8 batch shards"):
        losses.tiled_loss(img[:10], txt[:10], 1.0, mesh=_mesh("8"))


def test_unknown_loss_names_the_choices():
    with pytest.raises(ValueError, match="softmax, tiled, sigmoid"):
        losses.get_loss("infonce")
