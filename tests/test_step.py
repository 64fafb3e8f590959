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
    """The paper recipe's path (scanned blocks, the tiled ring loss over several tiles; the
    recipes' remat is run by tests/test_recipes.py) on one device, on data 2 x fsdp 4 and
    on data 2 x fsdp 2 x tensor 2.
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
    model = clipjax.create_model("ViT-tiny", dtype=jnp.dtype(dtype), scan=True)
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


def test_resnet_batchnorm_under_gradient_caching_matches_pytorch(resnet):
    """One RN-tiny step with accum_steps=2 (SGD with lr 1: the parameter change is the
    gradient) against OpenCLIP's model in PyTorch doing the same by hand: each micro-batch
    (rows m, m+2, ...) embedded in training mode, so normalised with its own statistics;
    the symmetric InfoNCE over all the embeddings; backward. That is the gradient caching
    gives: exact for those embeddings, not what one full-batch BatchNorm would give. The
    running averages fold the micro-batches' mean statistics with torch's momentum (0.1)
    and its unbiased variance."""
    reference, params, pixels, floats = resnet
    model = clipjax.create_model("RN-tiny").clone(train=True)
    k = 2
    mesh = sharding.create_mesh(data=4, devices=jax.devices()[:4])
    new, metrics = _step(model, optax.sgd(1.0), params, pixels, mesh, accum_steps=k)

    torch_model = copy.deepcopy(reference).train()
    bns = [m for m in torch_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    running = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    for bn in bns:
        bn.momentum = 1.0  # the running statistics become each forward's batch statistics
    image = torch.from_numpy(floats["image"]).permute(0, 3, 1, 2)
    parts, stats = [], []
    for m in range(k):
        parts.append(torch_model.encode_image(image[m::k], normalize=True))
        stats.append([(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns])
    img = torch.stack(parts, 1).reshape(len(image), -1)  # rows back in batch order
    txt = torch_model.encode_text(torch.from_numpy(np.asarray(floats["text"])).long(),
                                  normalize=True)
    logits = torch_model.logit_scale.exp() * img @ txt.T
    target = torch.arange(len(image))
    loss = (torch.nn.functional.cross_entropy(logits, target)
            + torch.nn.functional.cross_entropy(logits.T, target)) / 2
    loss.backward()
    np.testing.assert_allclose(metrics["loss"], loss.item(), rtol=1e-5)

    for i, bn in enumerate(bns):  # what the step should have folded, in torch's state dict
        mean = sum(s[i][0] for s in stats) / k
        var = sum(s[i][1] for s in stats) / k
        bn.running_mean.copy_(0.9 * running[i][0] + 0.1 * mean)
        bn.running_var.copy_(0.9 * running[i][1] + 0.1 * var)
    state = {name: (p.grad if p.grad is not None else torch.zeros_like(p))
             for name, p in torch_model.named_parameters()}
    state.update({name: b for name, b in torch_model.named_buffers()})
    want = convert._flatten(convert.from_torch(state, "RN-tiny"))
    got, before = convert._flatten(new), convert._flatten(params)
    grads = {p: before[p] - got[p] for p in got if not p.endswith(("/mean", "/var"))}
    # Relative to the largest gradient of all: some leaves' exact gradient is zero (a bias
    # added to every key of the attention pool cancels in its softmax), leaving only noise.
    scale = max(np.abs(want[p]).max() for p in grads)
    assert len(grads) > 40 and len(got) - len(grads) > 20
    for path, x in got.items():
        if path.endswith(("/mean", "/var")):
            np.testing.assert_allclose(x, want[path], rtol=1e-4, atol=1e-5, err_msg=path)
        else:
            np.testing.assert_allclose(grads[path] / scale, want[path] / scale, atol=1e-5,
                                       err_msg=path)
