"""LSeg: DPT's pieces against PyTorch, label-list equivariance, the fixed scale, the loss
with ignored pixels, the frozen text tower, SGD + poly, and the sharded train step."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clipjax import optim, sharding, train
from clipjax.heads import get_task, lseg
from clipjax.models import layers, vit

torch = pytest.importorskip("torch")
S = 32  # image size of the tiny model (a 4 x 4 patch grid)


def _config(**head):
    return ml_collections.ConfigDict(dict(
        model="ViT-tiny", dtype="float32", scan=False, remat="none", task="lseg",
        loss="softmax", seed=0, loss_tile=4, global_batch=8,
        model_overrides=ml_collections.ConfigDict({"vision": {"layers": 1},
                                                   "text": {"layers": 1}}),
        data=ml_collections.ConfigDict(dict(source="synthetic", image_size=S,
                                            context_length=16)),
        head=ml_collections.ConfigDict(dict(features=8, readout_dims=(8, 8, 8, 8), **head))))


@functools.cache
def _model_and_params():
    cfg = _config()
    train_model, model = lseg.build_models(cfg)
    params = jax.jit(model.init)(jax.random.key(0), *model.example_inputs(2))["params"]
    return train_model, model, jax.tree.map(np.asarray, layers.nn.meta.unbox(params))


def _images(b: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, S, S, 3), dtype=np.uint8)


# --- DPT's pieces against PyTorch ------------------------------------------------------------


def test_aligned_resize_equals_torch_interpolate_with_aligned_corners():
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    for size in ((10, 14), (9, 4)):
        ours = np.asarray(layers.resize_aligned(jnp.asarray(x), size))
        ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size,
                                              mode="bilinear", align_corners=True)
        np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_position_grid_resize_equals_torch_bilinear_without_aligned_corners():
    pos = np.random.default_rng(1).normal(size=(1 + 4 * 4, 6)).astype(np.float32)
    ours = np.asarray(vit.resize_positions(jnp.asarray(pos), 4, (6, 10)))
    grid = torch.from_numpy(pos[1:]).reshape(1, 4, 4, 6).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(6, 10), mode="bilinear")
    np.testing.assert_array_equal(ours[0], pos[0])
    np.testing.assert_allclose(ours[1:], ref.permute(0, 2, 3, 1).reshape(60, 6).numpy(),
                               atol=1e-5)


@pytest.mark.parametrize("factor", [2, 4])
def test_transposed_convolution_equals_torch_conv_transpose(factor):
    rng = np.random.default_rng(factor)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    module = lseg.ConvTranspose(6, factor)
    params = layers.nn.meta.unbox(module.init(jax.random.key(0), jnp.asarray(x))["params"])
    params = {"kernel": rng.normal(size=params["kernel"].shape).astype(np.float32),
              "bias": rng.normal(size=6).astype(np.float32)}
    ours = np.asarray(module.apply({"params": params}, jnp.asarray(x)))
    conv = torch.nn.ConvTranspose2d(5, 6, factor, stride=factor)
    with torch.no_grad():  # torch's weight is [in, out, kH, kW]
        conv.weight.copy_(torch.from_numpy(params["kernel"].transpose(2, 3, 0, 1)))
        conv.bias.copy_(torch.from_numpy(params["bias"]))
        ref = conv(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_default_hooks_are_dpts():
    assert lseg.default_hooks(12) == (2, 5, 8, 11)
    assert lseg.default_hooks(24) == (5, 11, 17, 23)
    assert lseg.default_readout_dims(1024) == (256, 512, 1024, 1024)
    assert lseg.default_readout_dims(768) == (96, 192, 384, 768)


# --- the model ----------------------------------------------------------------------------------


def test_permuting_the_labels_permutes_the_output_channels_exactly():
    _, model, params = _model_and_params()
    embed_labels, scores = lseg.scorer(model)
    names = ["other", "circle", "square", "ring", "blue thing"]
    order = np.array([3, 0, 4, 1, 2])
    images = jnp.asarray(_images(2))
    out = np.asarray(scores(params, images, embed_labels(params, names)))
    permuted = np.asarray(scores(params, images, embed_labels(params, [names[i] for i in order])))
    assert out.shape == (2, S, S, 5)
    np.testing.assert_array_equal(permuted, out[..., order])
    assert np.abs(out).max() <= lseg.LOGIT_SCALE * (1 + 1e-6)  # a fixed 1/0.07 x cosine
    assert np.abs(out).max() > 0.05 * lseg.LOGIT_SCALE


def _torch_ce(logits, mask):
    t = torch.from_numpy(np.asarray(logits)).permute(0, 3, 1, 2)
    return float(torch.nn.functional.cross_entropy(t, torch.from_numpy(np.asarray(mask)).long(),
                                                   ignore_index=-1))


def test_the_loss_is_torch_cross_entropy_and_ignores_ignored_pixels():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 6, 6, 4)).astype(np.float32) * 3
    mask = rng.integers(0, 4, (2, 6, 6)).astype(np.int32)
    mask[0, :2] = lseg.IGNORE
    loss, _ = lseg.cross_entropy(jnp.asarray(logits), jnp.asarray(mask))
    np.testing.assert_allclose(float(loss), _torch_ce(logits, mask), rtol=1e-5)
    other = mask.copy()
    changed = rng.integers(0, 4, (2, 6))
    other[0, :2] = lseg.IGNORE  # ignored pixels keep ignoring whatever the image says
    logits2 = logits.copy()
    logits2[0, :2] = rng.normal(size=(2, 6, 4)) * 10  # and their logits do not matter
    loss2, _ = lseg.cross_entropy(jnp.asarray(logits2), jnp.asarray(other))
    assert float(loss2) == float(loss)
    unignored = mask.copy()
    unignored[0, :2] = changed
    assert abs(float(lseg.cross_entropy(jnp.asarray(logits), jnp.asarray(unignored))[0])
               - float(loss)) > 1e-3


# --- the optimizer -----------------------------------------------------------------------------


def test_sgd_with_poly_schedule_matches_torch():
    rng = np.random.default_rng(4)
    w0 = rng.normal(size=(3, 4)).astype(np.float32)
    grads = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(4)]
    c = dict(name="sgd", schedule="poly", power=0.9, lr=0.1, momentum=0.9, weight_decay=1e-2,
             warmup_steps=0, total_steps=6, grad_clip_norm=0.0)
    opt = optim.create_optimizer(c, {"w": w0})
    params, state = {"w": jnp.asarray(w0)}, opt.init({"w": jnp.asarray(w0)})
    tw = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    topt = torch.optim.SGD([tw], lr=0.1, momentum=0.9, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda s: (1 - s / 6) ** 0.9)
    for g in grads:
        updates, state = opt.update({"w": jnp.asarray(g)}, state, params)
        params = optim.apply_updates(params, updates)
        tw.grad = torch.from_numpy(g.copy())
        topt.step()
        sched.step()
    np.testing.assert_allclose(np.asarray(params["w"]), tw.detach().numpy(), rtol=1e-5, atol=1e-6)


# --- the train step -------------------------------------------------------------------------


def _batch(b: int):
    rng = np.random.default_rng(5)
    mask = rng.integers(0, 7, (b, S, S)).astype(np.int32)
    mask[:, :4] = lseg.IGNORE
    return {"image": _images(b, 6), "mask": mask}


def _one_step(cfg, mesh):
    task = get_task(cfg)
    model = task.build_models(cfg)[0]
    opt = optim.create_optimizer(train.optimizer_config(
        ml_collections.ConfigDict(dict(optimizer=dict(
            name="sgd", schedule="poly", lr=0.05, momentum=0.9, weight_decay=1e-4,
            warmup_steps=0, grad_clip_norm=0.0, lr_multipliers={"^scratch/": 10.0}))),
        task, 10), train.clip.abstract_params(model))
    shardings = train.state_shardings(model, opt, mesh)
    state = train.create_train_state(model, opt, jax.random.key(0), mesh)
    before = jax.tree.map(np.asarray, state.params)
    keys = task.batch_keys(cfg)
    step = train.make_train_step(model, opt, mesh, shardings, batch_keys=keys, task=task,
                                 config=cfg)
    state, metrics = step(state, sharding.shard_batch(_batch(8), mesh))
    return float(metrics["loss"]), before, jax.tree.map(np.asarray, state.params)


def test_lseg_step_on_8_devices_equals_one_device_and_keeps_the_text_tower():
    cfg = _config()
    loss1, before, params1 = _one_step(cfg, sharding.create_mesh(devices=jax.devices()[:1]))
    loss8, _, params8 = _one_step(cfg, sharding.create_mesh(data=4, fsdp=2))
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params8, params1)
    # The frozen text tower (and the unused class-token projection) stay bit-identical.
    jax.tree.map(np.testing.assert_array_equal, params1["text"], before["text"])
    np.testing.assert_array_equal(params1["visual"]["proj"], before["visual"]["proj"])
    # The decoder, the image tower and the BatchNorm running averages all moved.
    for path in (("scratch", "head1", "kernel"), ("visual", "conv1_kernel"),
                 ("scratch", "refinenet1_unit2", "bn1", "mean")):
        a, b = params1, before
        for k in path:
            a, b = a[k], b[k]
        assert np.abs(a - b).max() > 0, path
