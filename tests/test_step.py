"""The train step itself: the same step on any mesh, uint8 images normalised on the device,
and ResNet BatchNorm (statistics folded as PyTorch folds them, and under gradient caching)."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import clipjax
from clipjax import convert, sharding, train
from clipjax.data import synthetic
from test_convert import openclip_model


def _state(model, optimizer, params, mesh):
    shardings = train.state_shardings(model, optimizer, mesh)
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=optimizer.init(params))
    return jax.device_put(state, shardings), shardings


def _step(model, optimizer, params, batch, mesh, **kwargs):
    state, shardings = _state(model, optimizer, params, mesh)
    step = train.make_train_step(model, optimizer, mesh, shardings, **kwargs)
    state, metrics = step(state, sharding.shard_batch(batch, mesh))
    return jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, metrics)


def _synthetic_batch(n: int, size: int, context: int) -> tuple[dict, dict]:
    """The same pairs as uint8 pixels and as float32 normalised on the host."""
    index = np.arange(n)
    ex = synthetic.render(3, "train", index, size)
    tokens = clipjax.tokenize(synthetic.captions(3, "train", ex, index), context)
    return ({"image": ex.image_BHWC, "text": tokens},
            {"image": synthetic.normalize(ex.image_BHWC), "text": tokens})


def test_uint8_images_are_normalised_on_the_device_as_on_the_host():
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    np.testing.assert_allclose(np.asarray(jax.jit(train.device_images)(pixels)),
                               synthetic.normalize(pixels), rtol=1e-6, atol=1e-6)
    floats = synthetic.normalize(pixels)
    assert train.device_images(floats) is floats  # already normalised: untouched


def _grads(params, stepped) -> dict:
    """The parameter change of an SGD(lr 1) step: the gradient, leaf by leaf."""
    new = dict(jax.tree_util.tree_leaves_with_path(stepped))
    return {jax.tree_util.keystr(p): np.asarray(x) - new[p]
            for p, x in jax.tree_util.tree_leaves_with_path(params)}


def _assert_close(got, want, loss_rtol: float, grad_atol: float, what: str):
    np.testing.assert_allclose(got[0]["loss"], want[0]["loss"], rtol=loss_rtol, err_msg=what)
    for path, g in want[1].items():
        scale = np.abs(g).max() or 1.0
        np.testing.assert_allclose(got[1][path] / scale, g / scale, atol=grad_atol,
                                   err_msg=f"{what} {path}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_step_is_the_same_unsharded_and_on_fsdp_and_2x2x2_meshes(dtype):
    """The paper recipe's path (scanned, rematerialised blocks, the tiled ring loss over
    several tiles) on one device, on data 2 x fsdp 4 and on data 2 x fsdp 2 x tensor 2.
    SGD with lr 1, so the parameter change is the gradient itself. Images enter the sharded
    steps as uint8 (normalised in the step) and the unsharded one as host-normalised floats.

    float32: equal up to the order of sums, 1e-5 of each leaf's largest gradient.
    bfloat16: matmul operands keep 8 significant bits, and XLA places the roundings
    differently in a one-device program than in a partitioned one (every multi-device mesh
    gives the same loss to the last bit; one device another). The difference is bf16's own
    error: each step differs from the float32 step by as much (measured: loss 1-2.5e-3
    relative, gradients 3.5-5% of each leaf's largest), so the bound is 2^-4 of the
    largest gradient and 5e-3 of the loss.
    """
    model = clipjax.create_model("ViT-tiny", dtype=jnp.dtype(dtype), scan=True, remat="full")
    params = jax.tree.map(np.asarray, clipjax.init_params(model, jax.random.key(0)))
    pixels, floats = _synthetic_batch(16, 32, 16)
    kw = dict(loss="tiled", loss_options={"tile": 2})  # 2 rows a tile: several tiles a device

    def run(batch, mesh):
        stepped, metrics = _step(model, optax.sgd(1.0), params, batch, mesh, **kw)
        return metrics, _grads(params, stepped)

    one = run(floats, sharding.create_mesh(devices=jax.devices()[:1]))
    meshes = [(2, 2, 2)] if dtype == "float32" else [(2, 4, 1), (2, 2, 2)]
    tol = dict(loss_rtol=1e-5, grad_atol=1e-5) if dtype == "float32" else dict(
        loss_rtol=5e-3, grad_atol=2**-4)
    for sizes in meshes:
        _assert_close(run(pixels, sharding.create_mesh(*sizes)), one, what=f"{sizes}", **tol)


@pytest.fixture(scope="module")
def resnet():
    """RN-tiny with OpenCLIP's weights (perturbed, with real BatchNorm statistics)."""
    reference = copy.deepcopy(openclip_model("RN-tiny"))
    params = convert.from_torch(reference.state_dict(), "RN-tiny")
    pixels, floats = _synthetic_batch(8, 64, 16)
    return reference, params, pixels, floats


def _bn_leaves(params) -> dict:
    return {k: v for k, v in convert._flatten(params).items() if k.endswith(("/mean", "/var"))}


def test_batchnorm_statistics_fold_as_pytorch_folds_them(resnet):
    reference, params, pixels, floats = resnet
    model = clipjax.create_model("RN-tiny").clone(train=True)
    mesh = sharding.create_mesh()
    new, _ = _step(model, optax.sgd(0.0), params, pixels, mesh)
    reference.train()
    with torch.no_grad():
        reference.encode_image(torch.from_numpy(floats["image"]).permute(0, 3, 1, 2))
    want = convert.from_torch(reference.state_dict(), "RN-tiny")
    got, expect = _bn_leaves(new), _bn_leaves(want)
    assert len(got) > 20
    for k in got:
        np.testing.assert_allclose(got[k], expect[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_batchnorm_under_gradient_caching_uses_micro_batch_statistics(resnet):
    """With accum_steps=k each micro-batch (rows m, m+k, ...) is normalised with its own
    statistics: the gradient is exactly that of the full-batch loss over embeddings computed
    micro-batch by micro-batch, and the running averages fold the micro-batches' mean."""
    _, params, pixels, floats = resnet
    model = clipjax.create_model("RN-tiny").clone(train=True)
    mesh = sharding.create_mesh(data=4, fsdp=1, devices=jax.devices()[:4])
    k = 2
    new, metrics = _step(model, optax.sgd(1.0), params, pixels, mesh, accum_steps=k)

    def reference(p):
        micro = [jax.tree.map(lambda x: x[m::k], floats) for m in range(k)]
        parts = [model.apply({"params": p}, mb["image"], normalize=True, method="encode_image",
                             mutable=["batch_stats"]) for mb in micro]
        img = jnp.stack([e for e, _ in parts], 1).reshape(len(floats["image"]), -1)  # rows back
        txt = model.apply({"params": p}, floats["text"], normalize=True, method="encode_text")
        loss, _ = train.clip_loss("softmax")(p, (img, txt), floats)
        stats = jax.tree.map(lambda *s: sum(s) / k, *[s["batch_stats"] for _, s in parts])
        return loss, stats

    (loss, stats), grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(params)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    folded = convert._flatten(train.fold_batch_stats(jax.tree.map(np.asarray, params), stats))
    new, grads = convert._flatten(new), convert._flatten(grads)
    # Relative to the largest gradient of all: some leaves' exact gradient is zero (a bias
    # added to every key of the attention pool cancels in its softmax), leaving only noise.
    scale = max(np.abs(g).max() for p, g in grads.items() if not p.endswith(("/mean", "/var")))
    for path, x in convert._flatten(params).items():
        if path.endswith(("/mean", "/var")):
            np.testing.assert_allclose(new[path], folded[path], rtol=1e-4, atol=1e-6,
                                       err_msg=path)
        else:
            np.testing.assert_allclose((np.asarray(x) - new[path]) / scale,
                                       np.asarray(grads[path]) / scale, atol=1e-5, err_msg=path)
