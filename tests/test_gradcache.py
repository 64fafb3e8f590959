"""Gradient caching gives the exact full-batch gradient, logit scale and bias included."""

import math

import jax
import numpy as np
import pytest

import clipjax
from clipjax import sharding, train

B = 32


@pytest.fixture(scope="module")
def setup():
    mesh = sharding.create_mesh()
    model = clipjax.create_model("ViT-tiny", init_logit_bias=-10.0)
    params = sharding.init_params(model, jax.random.key(0), mesh)
    params["logit_scale"] = params["logit_scale"] * 0 + math.log(10.0)  # SigLIP's init
    rng = np.random.default_rng(0)
    batch = sharding.shard_batch({
        "image": rng.normal(size=(B, 32, 32, 3)).astype(np.float32),
        "text": np.concatenate([rng.integers(1, 4000, size=(B, 9)),
                                np.full((B, 1), clipjax.tokenizer.EOT_ID),
                                np.zeros((B, 6))], 1).astype(np.int32),
    }, mesh)
    return mesh, model, params, batch


def _grads(setup, loss, accum_steps, **options):
    mesh, model, params, batch = setup
    step = jax.jit(lambda p, b: train.loss_and_grads(
        p, b, train.clip_encode(model), train.clip_loss(loss, mesh, **options), accum_steps,
        mesh))
    return step(params, batch)


def _assert_same(out_k, out_1):
    (loss_k, metrics_k), grads_k = out_k
    (loss_1, metrics_1), grads_1 = out_1
    np.testing.assert_allclose(loss_k, loss_1, rtol=1e-6)
    for name in metrics_1:
        np.testing.assert_allclose(metrics_k[name], metrics_1[name], rtol=1e-5, atol=1e-6)
    flat_k = dict(jax.tree_util.tree_leaves_with_path(grads_k))
    for path, g1 in jax.tree_util.tree_leaves_with_path(grads_1):
        scale = float(np.max(np.abs(g1))) or 1.0
        np.testing.assert_allclose(np.asarray(flat_k[path]) / scale, np.asarray(g1) / scale,
                                   atol=1e-5, err_msg=jax.tree_util.keystr(path))
    # The temperature gets a real, non-zero gradient.
    assert abs(float(grads_1["logit_scale"])) > 1e-4


def test_gradient_caching_equals_the_full_batch_gradient_of_clip(setup):
    _assert_same(_grads(setup, "softmax", 4), _grads(setup, "softmax", 1))


def _mlp_encode(params, batch):
    """A small two-tower encoder: gradient caching does not depend on the towers."""
    def tower(w, x):
        h = jax.numpy.tanh(x @ w["a"])
        out = h @ w["b"]
        return out / jax.numpy.linalg.norm(out, axis=-1, keepdims=True)
    return tower(params["img"], batch["x"]), tower(params["txt"], batch["y"])


@pytest.mark.parametrize("loss, accum_steps, options", [
    ("tiled", 4, {"tile": 3}),
    ("sigmoid", 2, {}),
    ("sigmoid_ring", 4, {"tile": 2}),
])
def test_gradient_caching_is_exact_for_every_loss(loss, accum_steps, options):
    mesh = sharding.create_mesh()
    rng = np.random.default_rng(1)
    w = lambda *s: rng.normal(size=s).astype(np.float32) / np.sqrt(s[0])
    params = {"img": {"a": w(12, 16), "b": w(16, 8)}, "txt": {"a": w(10, 16), "b": w(16, 8)},
              "logit_scale": np.float32(math.log(10.0)), "logit_bias": np.float32(-3.0)}
    batch = sharding.shard_batch({"x": rng.normal(size=(64, 12)).astype(np.float32),
                                  "y": rng.normal(size=(64, 10)).astype(np.float32)}, mesh)
    plain = "softmax" if loss == "tiled" else "sigmoid"

    def run(name, k, **opts):
        fn = jax.jit(lambda p, b: train.loss_and_grads(
            p, b, _mlp_encode, train.clip_loss(name, mesh, **opts), k, mesh))
        return fn(params, batch)

    out_k, out_1 = run(loss, accum_steps, **options), run(plain, 1)
    _assert_same(out_k, out_1)
    if loss.startswith("sigmoid"):
        assert abs(float(out_1[1]["logit_bias"])) > 1e-4


def test_micro_batches_must_divide_the_mesh(setup):
    with pytest.raises(ValueError, match="micro-batches of 4 rows do not divide over the 8"):
        _grads(setup, "softmax", 8)
