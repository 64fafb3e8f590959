"""The video heads: CLIP4Clip's similarity heads and 3D patch, ActionCLIP's shift, fusion
and loss, initialisation from CLIP, and the sharded video train step."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clipjax import losses, optim, sharding, train, weights
from clipjax.heads import actionclip, clip4clip, get_task, video
from clipjax.models import layers

T = 4
TINY = dict(model="ViT-tiny", dtype="float32", scan=False, remat="none")


def _config(task: str, **head):
    c = ml_collections.ConfigDict(dict(
        TINY, task=task, loss="softmax",
        model_overrides=ml_collections.ConfigDict({"vision": {"layers": 1},
                                                   "text": {"layers": 1}}),
        loss_tile=4, head=ml_collections.ConfigDict(dict(frames=T, **head))))
    return c


@functools.cache
def _model_and_params(task: str, **head):
    cfg = _config(task, **head)
    model = get_task(cfg).build_models(cfg)[0]
    params = jax.jit(model.init)(jax.random.key(0), *model.example_inputs(2))["params"]
    params = jax.tree.map(np.asarray, layers.nn.meta.unbox(params))
    return model, get_task(cfg).derive(model, params)


def _clips(b: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, 256, (b, T, 32, 32, 3), dtype=np.uint8))


# --- ActionCLIP's temporal shift -------------------------------------------------------


def _tsm_reference(x_BND, t, fold_div=8):
    """ActionCLIP's TemporalShift_VIT.shift, transcribed to NumPy ([B, N, D] rows)."""
    b, n, d = x_BND.shape
    cls, tok = x_BND[:, :1], x_BND[:, 1:].reshape(b // t, t, n - 1, d)
    out = np.zeros_like(tok)
    fold = d // fold_div
    out[:, :-1, :, :fold] = tok[:, 1:, :, :fold]
    out[:, 1:, :, fold:2 * fold] = tok[:, :-1, :, fold:2 * fold]
    out[:, :, :, 2 * fold:] = tok[:, :, :, 2 * fold:]
    return np.concatenate([cls, out.reshape(b, n - 1, d)], axis=1)


def test_temporal_shift_moves_two_eighths_keeps_the_class_token_and_zero_fills():
    x = np.random.default_rng(0).normal(size=(2 * T, 5, 16)).astype(np.float32)
    y = np.asarray(layers.temporal_shift(jnp.asarray(x), T))
    np.testing.assert_array_equal(y, _tsm_reference(x, T))
    np.testing.assert_array_equal(y[:, 0], x[:, 0])  # class token untouched
    np.testing.assert_array_equal(y[..., 4:], x[..., 4:])  # 6/8 of the channels stay
    changed = np.any(y != x, axis=(0, 1))
    assert changed.sum() == 4 and changed[:4].all()  # exactly 2/8 of 16 channels move
    v = y.reshape(2, T, 5, 16)
    assert not v[:, -1, 1:, :2].any() and not v[:, 0, 1:, 2:4].any()  # zero-filled ends


def test_tsm_makes_a_frame_see_its_neighbours():
    model, params = _model_and_params("actionclip", fusion="meanP", tsm=True)
    plain, _ = _model_and_params("actionclip", fusion="meanP")
    clips = _clips()
    other = clips.at[:, 2].set(255 - clips[:, 2])  # change frame 2 only
    for m, moves in ((model, True), (plain, False)):
        a = m.apply({"params": params}, clips, method="encode_frames")
        b = m.apply({"params": params}, other, method="encode_frames")
        for neighbour in (1, 3):  # without the shift, frames are encoded independently
            assert (np.abs(a[:, neighbour] - b[:, neighbour]).max() > 1e-3) == moves


# --- CLIP4Clip -------------------------------------------------------------------------


def test_3d_patch_at_initialisation_equals_the_2d_patch():
    m3, p3 = _model_and_params("clip4clip", linear_patch="3d")
    m2, _ = _model_and_params("clip4clip")
    k = p3["visual"]["conv2_kernel"]
    np.testing.assert_array_equal(k[1], p3["visual"]["conv1_kernel"])
    assert not k[0].any() and not k[2].any()
    clips = _clips()
    np.testing.assert_allclose(m3.apply({"params": p3}, clips, method="encode_frames"),
                               m2.apply({"params": p3}, clips, method="encode_frames"),
                               atol=1e-5)


@pytest.mark.parametrize("header,target,pos", [
    ("seqTransf", "temporal", "frame_position_embeddings"),
    ("tightTransf", "cross", "position_embeddings")])
def test_temporal_blocks_start_as_copies_of_the_text_blocks(header, target, pos):
    _, params = _model_and_params("clip4clip", sim_header=header, cross_layers=1)
    np.testing.assert_array_equal(params[target][pos], params["text"]["positional_embedding"])
    _, scaled = _model_and_params("clip4clip", sim_header=header, cross_layers=1,
                                  position_scale=3.0)
    np.testing.assert_allclose(scaled[target][pos], 3 * scaled["text"]["positional_embedding"])
    for i in range(1):
        got, want = params[target]["transformer"][f"resblocks_{i}"], \
            params["text"]["transformer"][f"resblocks_{i}"]
        jax.tree.map(np.testing.assert_array_equal, got, want)


def test_scanned_copies_match_the_unscanned_ones():
    cfg = _config("clip4clip", sim_header="seqTransf", cross_layers=2)
    cfg.scan = True
    cfg.model_overrides.text.layers = 2
    model = get_task(cfg).build_models(cfg)[0]
    params = layers.nn.meta.unbox(
        jax.jit(model.init)(jax.random.key(1), *model.example_inputs(1))["params"])
    params = get_task(cfg).derive(model, params)
    jax.tree.map(np.testing.assert_array_equal, params["temporal"]["transformer"]["resblocks"],
                 params["text"]["transformer"]["resblocks"])


def test_mean_pooling_is_the_normalised_masked_mean_and_ignores_padded_frames():
    model, params = _model_and_params("clip4clip")
    clips = _clips()
    mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    frames = np.asarray(model.apply({"params": params}, clips, method="encode_frames"))
    unit = frames / np.linalg.norm(frames, axis=-1, keepdims=True)
    m = np.asarray(mask, np.float32)[..., None]
    want = (unit * m).sum(1) / m.sum(1)
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    got = model.apply({"params": params}, clips, mask, method="encode_video")
    np.testing.assert_allclose(got, want, atol=1e-6)
    for header in ("meanP", "seqTransf", "seqLSTM"):
        m_, p_ = _model_and_params("clip4clip", sim_header=header)
        noisy = clips.at[0, 3].set(0).at[1, 2:].set(255)  # only padded frames change
        enc = jax.jit(functools.partial(m_.apply, method="encode_video"))
        a, b = enc({"params": p_}, clips, mask), enc({"params": p_}, noisy, mask)
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=header)


def test_tight_transf_loss_is_cross_entropy_over_every_pair():
    model, params = _model_and_params("clip4clip", sim_header="tightTransf", cross_layers=1)
    clips, mask = _clips(3), jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], bool)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 400, (3, 16)), jnp.int32)
    frames = model.apply({"params": params}, clips, method="encode_frames")
    txt = model.apply({"params": params}, tokens, method="encode_text")
    logits = np.asarray(clip4clip.tight_logits(model, params, txt, frames, mask, chunk=2))
    q, v = np.divmod(np.arange(9), 3)  # every pair spelled out, scored in one call
    pairs = jax.jit(functools.partial(model.apply, method="tight_scores"))(
        {"params": params}, txt[q], frames[v], mask[v])
    np.testing.assert_allclose(np.asarray(pairs).reshape(3, 3), logits, atol=1e-5)
    lse = lambda x, a: np.log(np.exp(x).sum(a))  # noqa: E731
    want = (np.mean(lse(logits, 1) - np.diag(logits)) + np.mean(lse(logits, 0) - np.diag(logits))) / 2
    got, _ = clip4clip.cross_entropy_both_ways(jnp.asarray(logits))
    np.testing.assert_allclose(got, want, rtol=1e-5)


# --- ActionCLIP ------------------------------------------------------------------------


def _kl_reference(logits, labels):
    """ActionCLIP's KLLoss on both directions: KLDivLoss(mean over B*B) * B, averaged."""
    gt = (labels[:, None] == labels[None, :]).astype(np.float64)

    def kl(x):
        b = x.shape[0]
        logq = x - np.log(np.exp(x).sum(1, keepdims=True))
        p = np.exp(10 * gt) / np.exp(10 * gt).sum(1, keepdims=True)
        return (p * (np.log(p) - logq)).mean() * b

    return (kl(logits) + kl(logits.T)) / 2


def test_actionclip_loss_equals_its_formula_and_is_not_the_multi_positive_loss():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(8, 6)), rng.normal(size=(8, 6))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    labels = np.array([0, 1, 0, 2, 1, 0, 3, 2])
    scale = 20.0
    got, metrics = losses.kl_multi_positive_loss(jnp.asarray(img), jnp.asarray(txt), scale,
                                                 img_labels_B=jnp.asarray(labels))
    np.testing.assert_allclose(got, _kl_reference(scale * img @ txt.T, labels), rtol=1e-5)
    other, _ = losses.multi_positive_loss(jnp.asarray(img), jnp.asarray(txt), scale,
                                          img_labels_B=jnp.asarray(labels))
    assert abs(float(other) - float(got)) > 1e-2  # the KL form is a different loss
    assert 0 <= metrics["i2t_accuracy"] <= 1


def test_zeroed_transf_fusion_is_twice_mean_pooling():
    model, params = _model_and_params("actionclip", fusion="Transf", fusion_layers=1)
    zeroed = jax.tree_util.tree_map_with_path(
        lambda p, x: np.zeros_like(x) if jax.tree_util.keystr(p).startswith("['temporal']")
        and ("proj" in jax.tree_util.keystr(p) or "position" in jax.tree_util.keystr(p))
        else x, params)
    mean_model, _ = _model_and_params("actionclip", fusion="meanP")
    clips, mask = _clips(), jnp.ones((2, T), bool)
    fused = model.apply({"params": zeroed}, clips, mask, method="encode_video")
    mean = mean_model.apply({"params": zeroed}, clips, mask, method="encode_video")
    np.testing.assert_allclose(fused, 2 * mean, rtol=1e-5, atol=1e-6)


def test_conv1d_fusion_starts_as_a_channel_shift():
    model, params = _model_and_params("actionclip", fusion="Conv_1D")
    k = np.asarray(params["temporal_kernel"])
    e = k.shape[1]
    want = np.zeros((3, e))
    want[0, :e // 4] = want[1, e // 4:e // 4 + e // 2] = want[2, e - e // 4:] = 1
    np.testing.assert_array_equal(k, want)


# --- The train step --------------------------------------------------------------------


def _video_batch(b: int, labels: bool):
    rng = np.random.default_rng(3)
    batch = {"video": rng.integers(0, 256, (b, T, 32, 32, 3), dtype=np.uint8),
             "frame_mask": np.concatenate([np.ones((b, T - 1), bool),
                                           rng.integers(0, 2, (b, 1)).astype(bool)], 1),
             "text": rng.integers(1, 400, (b, 16)).astype(np.int32)}
    if labels:
        batch["label"] = rng.integers(0, 3, b).astype(np.int32)
    return batch


def _one_step(cfg, mesh, accum: int = 1):
    task = get_task(cfg)
    model = task.build_models(cfg)[0]
    opt = optim.create_optimizer(dict(lr=1e-3, warmup_steps=0, total_steps=10),
                                 train.clip.abstract_params(model))
    shardings = train.state_shardings(model, opt, mesh)
    state = train.create_train_state(model, opt, jax.random.key(0), mesh)
    state = state.replace(params=jax.jit(functools.partial(task.derive, model),
                                         out_shardings=shardings.params)(state.params))
    keys = task.batch_keys(cfg)
    step = train.make_train_step(model, opt, mesh, shardings, batch_keys=keys, task=task,
                                 config=cfg, accum_steps=accum)
    batch = _video_batch(16, "label" in keys)
    state, metrics = step(state, sharding.shard_batch({k: batch[k] for k in keys}, mesh))
    return float(metrics["loss"]), jax.tree.map(np.asarray, state.params)


@pytest.mark.parametrize("task,head,loss", [
    ("clip4clip", dict(sim_header="tightTransf", cross_layers=1, linear_patch="3d"), "softmax"),
    ("actionclip", dict(fusion="Transf", fusion_layers=1, tsm=True), "kl_multi_positive")])
def test_video_step_sharded_over_8_devices_equals_one_device(task, head, loss):
    cfg = _config(task, **head)
    cfg.loss = loss
    one = sharding.create_mesh(devices=jax.devices()[:1])
    eight = sharding.create_mesh(data=4, fsdp=2)
    loss1, params1 = _one_step(cfg, one)
    loss8, params8 = _one_step(cfg, eight, accum=2)  # and gradient caching
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params8, params1)


def test_init_checkpoint_loads_clip_into_the_towers_and_the_copies_follow(tmp_path):
    from clipjax import weights
    from clipjax.models import clip

    cfg = _config("clip4clip", sim_header="seqTransf", cross_layers=1)
    task = get_task(cfg)
    model = task.build_models(cfg)[0]
    plain = clip.CLIP(model.config)
    clip_params = jax.tree.map(np.asarray, clip.init_params(plain, jax.random.key(7)))
    path = tmp_path / "clip.safetensors"
    weights.write(weights.from_params(clip_params, cfg, "test"), path)
    cfg.init_checkpoint = str(path)
    mesh = sharding.create_mesh(data=8)
    opt = optim.create_optimizer(dict(lr=1e-3, warmup_steps=0, total_steps=10),
                                 train.clip.abstract_params(model))
    state = train.create_train_state(model, opt, jax.random.key(0), mesh)
    state, loaded = weights.load_init(state, cfg, model)
    assert loaded == set(jax.tree.leaves(optim.param_paths(clip_params)))  # no head module
    params = jax.tree.map(np.asarray, task.derive(model, state.params, frozenset(loaded)))
    jax.tree.map(np.testing.assert_array_equal, params["visual"], clip_params["visual"])
    jax.tree.map(np.testing.assert_array_equal, params["temporal"]["transformer"]["resblocks_0"],
                 clip_params["text"]["transformer"]["resblocks_0"])
    np.testing.assert_array_equal(params["temporal"]["frame_position_embeddings"],
                                  clip_params["text"]["positional_embedding"])


def test_a_head_run_exports_to_clipjax_and_refuses_a_clip_layout(tmp_path):
    from clipjax import weights

    cfg = _config("clip4clip", sim_header="seqTransf", cross_layers=1)
    _, params = _model_and_params("clip4clip", sim_header="seqTransf", cross_layers=1)
    w = weights.from_params(params, cfg, "a clip4clip run")
    assert weights.write(w, tmp_path / "head.safetensors") == [tmp_path / "head.safetensors"]
    back = weights.load(tmp_path / "head.safetensors")
    np.testing.assert_array_equal(back.params["temporal"]["frame_position_embeddings"],
                                  params["temporal"]["frame_position_embeddings"])
    for to, name in (("openclip", "head.pt"), ("hf", "hf")):
        with pytest.raises(ValueError, match="clip4clip run.*--to clipjax"):
            weights.write(w, tmp_path / name, to=to)
