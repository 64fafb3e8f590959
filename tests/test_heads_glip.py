"""GLIP: the fusion against a NumPy transcription of the reference, its pre-LN quirk and
padding mask, the deformable convolution against lax.conv, DyHead's attentions and layer
against NumPy, class-order equivariance of the whole model, padding invariance, anchors,
the loss and its gradient, and the ResNet's any-size maps."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clipjax.heads import boxes, glip, grounding
from clipjax.models import dyhead, fusion, resnet
from clipjax.models.clip import create_model

S = 64  # RN-tiny at 64 px: five levels of 8x8, 4x4, 2x2, 1x1, 1x1 locations
L = 16


def _config(model="RN-tiny", **head):
    return ml_collections.ConfigDict(dict(
        model=model, dtype="float32", scan=False, remat="none", task="glip", seed=0,
        global_batch=2, model_overrides=ml_collections.ConfigDict({"text": {"layers": 2}}),
        data=ml_collections.ConfigDict(dict(source="synthetic", image_size=S, context_length=L)),
        eval=ml_collections.ConfigDict({}),
        head=ml_collections.ConfigDict(dict(fpn_channels=16, fusion_layers=1, joint_dim=32,
                                            fusion_heads=2, **head))))


def _fill(shapes, seed=0):
    """Random parameters without compiling the init: the reference's constants where they
    matter (norms, bias0, layer scales), fan-in scaled normals elsewhere."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        keys = [str(getattr(k, "key", k)) for k in path]
        name = keys[-1]
        if name in ("scale", "var", "scales") or name.startswith("gamma_"):
            return np.ones(s.shape, np.float32)
        if name in ("mean", "log_scale") or (name == "bias" and "offset" not in keys):
            return np.zeros(s.shape, np.float32)
        if name == "bias0":
            return np.full(s.shape, -np.log(99.0), np.float32)
        if name == "logit_scale":
            return np.full(s.shape, np.log(1 / 0.07), np.float32)
        std = 0.1 if len(s.shape) < 2 or name.endswith("embedding") else (
            1 / np.sqrt(np.prod(s.shape[:-1])))
        return (std * rng.normal(size=s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def _model_and_params():
    model = glip.build_models(_config())[1]
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *model.example_inputs(2)))
    return model, _fill(shapes["params"])


@functools.cache
def _forward():
    model, _ = _model_and_params()
    return jax.jit(glip.predict(model))


def _images(b=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, S, S, 3), dtype=np.uint8)


# --- fusion ----------------------------------------------------------------------------------


def _np_ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_bi_attention_block(p, v, l, mask, heads):
    """The reference's BiAttentionBlockForCheckpoint.single_attention_call, in NumPy, with
    torch's (batch x heads) layout."""
    v, l = _np_ln(v, p["layer_norm_v"]), _np_ln(l, p["layer_norm_l"])
    a = p["attn"]
    lin = lambda x, q: x @ q["kernel"] + q["bias"]  # noqa: E731
    b, n, _ = v.shape
    e = a["v_proj"]["kernel"].shape[1]
    k = e // heads

    def split(x):  # [B, T, E] -> [B*H, T, K]
        return x.reshape(b, -1, heads, k).transpose(0, 2, 1, 3).reshape(b * heads, -1, k)

    q, key = split(lin(v, a["v_proj"]) * k**-0.5), split(lin(l, a["l_proj"]))
    vv, vl = split(lin(v, a["values_v_proj"])), split(lin(l, a["values_l_proj"]))
    w = np.clip(q @ key.transpose(0, 2, 1), -50000, 50000)
    wt = w.transpose(0, 2, 1)
    wl = _np_softmax(np.clip(wt - wt.max(-1, keepdims=True), -50000, 50000))
    add = np.where(mask, 0.0, -9e15)[:, None, None, :]
    wv = _np_softmax((w.reshape(b, heads, n, -1) + add).reshape(b * heads, n, -1))

    def merge(x):
        return x.reshape(b, heads, -1, k).transpose(0, 2, 1, 3).reshape(b, -1, e)

    dv, dl = lin(merge(wv @ vl), a["out_v_proj"]), lin(merge(wl @ vv), a["out_l_proj"])
    return v + p["gamma_v"] * dv, l + p["gamma_l"] * dl, wv.reshape(b, heads, n, -1)


BLOCK = fusion.BiAttentionBlock(embed_dim=8, num_heads=2, init_scale=0.5)


@functools.cache
def _block_apply():
    return jax.jit(BLOCK.apply)


def _fusion_case(seed=0, dv=8, dl=6, n=5, length=4):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(2, n, dv)).astype(np.float32)
    l = rng.normal(size=(2, length, dl)).astype(np.float32)
    mask = np.array([[True] * length, [True, True] + [False] * (length - 2)])
    shapes = nn.meta.unbox(jax.eval_shape(BLOCK.init, jax.random.key(0), v, l, mask)["params"])
    params = jax.tree.map(lambda x: (1.0 if x.ndim == 1 else 0.0) + rng.normal(
        size=x.shape).astype(np.float32) / np.sqrt(x.shape[0]), shapes)
    return _block_apply(), params, v, l, mask


def test_bi_attention_matches_numpy_reference_and_clamps():
    block, params, v, l, mask = _fusion_case()
    for gain in (1.0, 3e3):  # 3e3: logits far past +-50000, so both clamps act
        p = jax.tree.map(np.copy, params)
        p["attn"]["v_proj"]["kernel"] = p["attn"]["v_proj"]["kernel"] * gain
        p["attn"]["l_proj"]["kernel"] = p["attn"]["l_proj"]["kernel"] * gain
        out_v, out_l = block({"params": p}, v, l, mask)
        ref_v, ref_l, _ = _np_bi_attention_block(jax.tree.map(np.float64, p), v, l, mask, 2)
        np.testing.assert_allclose(out_v, ref_v, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out_l, ref_l, rtol=1e-4, atol=1e-4)


def test_fusion_with_zero_layer_scale_returns_layer_norms():
    block, params, v, l, mask = _fusion_case(1)
    params["gamma_v"] = np.zeros_like(params["gamma_v"])
    params["gamma_l"] = np.zeros_like(params["gamma_l"])
    out_v, out_l = block({"params": params}, v, l, mask)
    p64 = jax.tree.map(np.float64, params)
    np.testing.assert_allclose(out_v, _np_ln(v, p64["layer_norm_v"]), atol=1e-5)
    np.testing.assert_allclose(out_l, _np_ln(l, p64["layer_norm_l"]), atol=1e-5)
    assert not np.allclose(out_v, v, atol=0.1)  # the quirk: not the identity


def test_padded_tokens_get_no_attention_and_change_nothing():
    block, params, v, l, mask = _fusion_case(2)
    q = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 2, 4)), jnp.float32)
    k = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 2, 4)), jnp.float32)
    probs_v, probs_l = fusion.bi_attention_probs(q, k, jnp.asarray(mask))
    assert np.all(np.asarray(probs_v)[1, :, :, 2:] == 0.0)
    np.testing.assert_allclose(np.asarray(probs_v).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(probs_l).sum(-1), 1.0, rtol=1e-6)
    out_v, out_l = block({"params": params}, v, l, mask)
    l2 = l.copy()
    l2[1, 2:] = 100.0 * np.random.default_rng(3).normal(size=l2[1, 2:].shape)
    out_v2, out_l2 = block({"params": params}, v, l2, mask)
    np.testing.assert_allclose(out_v2, out_v, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out_l2)[1, :2], np.asarray(out_l)[1, :2], atol=1e-6)
    out_v3, _ = block({"params": params}, v, l2, np.ones_like(mask))  # unmasked: it does
    assert not np.allclose(out_v3, out_v, atol=1e-3)


# --- DyHead --------------------------------------------------------------------------------


def _conv(x, kernel, stride=1, pad=((1, 1), (1, 1))):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pad,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_deform_conv_matches_conv_for_zero_integer_and_half_pixel_offsets():
    deform = jax.jit(dyhead.deform_conv3x3, static_argnums=4)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    ones = jnp.ones((2, 7, 6, 9))
    for stride in (1, 2):
        yo, xo = -(-7 // stride), -(-6 // stride)
        zero = jnp.zeros((2, yo, xo, 9, 2))
        got = deform(x, kernel, zero, ones[:, :yo, :xo], stride)
        np.testing.assert_allclose(got, _conv(x, kernel, stride), atol=1e-5)
    # dx = +1 everywhere moves the window one column right (the padding with it); dy = -0.5
    # averages the window and the window one row up; masks scale each kernel point.
    off = jnp.zeros((2, 7, 6, 9, 2))
    np.testing.assert_allclose(deform(x, kernel, off.at[..., 1].set(1.0), ones),
                               _conv(x, kernel, pad=((1, 1), (0, 2))), atol=1e-5)
    np.testing.assert_allclose(deform(x, kernel, off.at[..., 0].set(-0.5), ones),
                               0.5 * (_conv(x, kernel) + _conv(x, kernel, pad=((2, 0), (1, 1)))),
                               atol=1e-5)
    mask = jnp.asarray(rng.uniform(size=9), jnp.float32)
    np.testing.assert_allclose(deform(x, kernel, off, ones * mask),
                               _conv(x, kernel * mask.reshape(3, 3, 1, 1)), atol=1e-5)


def _hsig(x):
    return np.clip(x + 3, 0, 6) / 6


def _np_scale_attention(p, x):
    return _hsig(np.maximum(x.mean((1, 2)) @ p["kernel"] + p["bias"], 0))[:, None, None, :]


def _np_dyrelu(p, x):
    hid = np.maximum(x.mean((1, 2)) @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
    a1, b1, a2, b2 = (t[:, None, None, :] for t in np.split(
        _hsig(hid @ p["fc2"]["kernel"] + p["fc2"]["bias"]), 4, axis=-1))
    return np.maximum(x * ((a1 - 0.5) * 2 + 1) + (b1 - 0.5), x * ((a2 - 0.5) * 2) + (b2 - 0.5))


def test_dyrelu_and_scale_attention_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 5, 8)).astype(np.float32)
    noisy = lambda t: rng.normal(size=t.shape).astype(np.float32)  # noqa: E731
    act, attn = dyhead.DyReLU(), dyhead.ScaleAttention()
    p = jax.tree.map(noisy, nn.meta.unbox(jax.eval_shape(act.init, jax.random.key(0), x)))
    q = jax.tree.map(noisy, nn.meta.unbox(jax.eval_shape(attn.init, jax.random.key(0), x)))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(jax.jit(act.apply)(p, x), _np_dyrelu(p["params"], x64),
                               rtol=1e-5, atol=1e-5)
    ref = _np_scale_attention(q["params"], x64)
    np.testing.assert_allclose(jax.jit(attn.apply)(q, x), ref, rtol=1e-6)
    assert 0.5 <= ref.min() and ref.max() <= 1.0  # hard sigmoid of a ReLU


def _np_conv(x, kernel, stride):
    """3x3, padding 1, by shifted sums (no lax)."""
    b, h, w, _ = x.shape
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ho, wo = -(-h // stride), -(-w // stride)
    return sum(pad[:, i:i + stride * ho:stride, j:j + stride * wo:stride] @ kernel[i, j]
               for i in range(3) for j in range(3))


def _np_gn(y, groups=4, eps=1e-5):
    b, h, w, c = y.shape
    g = y.reshape(b, h, w, groups, c // groups)
    mu, var = g.mean((1, 2, 4), keepdims=True), g.var((1, 2, 4), keepdims=True)
    return ((g - mu) / np.sqrt(var + eps)).reshape(y.shape)


def _np_resize_aligned(y, size):
    def matrix(n, m):
        pos = np.arange(m) * ((n - 1) / max(m - 1, 1))
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        w = np.zeros((m, n))
        w[np.arange(m), lo] += 1 - (pos - lo)
        w[np.arange(m), hi] += pos - lo
        return w
    wy, wx = matrix(y.shape[1], size[0]), matrix(y.shape[2], size[1])
    return np.einsum("Yy,Xx,byxc->bYXc", wy, wx, y)


def test_dyconv_layer_matches_numpy_and_zero_offsets_halve_the_kernels():
    rng = np.random.default_rng(0)
    maps = [rng.normal(size=(2, s, s, 8)).astype(np.float32) for s in (6, 3, 2)]
    plain = dyhead.DyConv(8, deformable=False, groups=4)
    p = nn.meta.unbox(jax.eval_shape(plain.init, jax.random.key(0), maps)["params"])
    p = jax.tree.map(lambda t: 0.3 * rng.normal(size=t.shape).astype(np.float32) + (
        1.0 if t.ndim == 1 else 0.0), p)
    p64 = jax.tree.map(np.float64, p)

    def conv_gn(i, x, stride):
        q = p64[f"DyConv_{i}"]
        y = _np_conv(x, q["kernel"], stride) + q["bias"]
        return _np_gn(y) * q["gn"]["scale"] + q["gn"]["bias"]

    apply_plain = jax.jit(plain.apply)
    got = apply_plain({"params": p}, maps)
    for level, x in enumerate(maps):
        parts = [conv_gn(1, x, 1)]
        if level > 0:
            parts.append(conv_gn(2, maps[level - 1], 2))
        if level < 2:
            parts.append(_np_resize_aligned(conv_gn(0, maps[level + 1], 1), x.shape[1:3]))
        mixed = sum(t * _np_scale_attention(p64["AttnConv"], t) for t in parts) / len(parts)
        np.testing.assert_allclose(got[level], _np_dyrelu(p64["relu"], mixed), rtol=1e-4,
                                   atol=1e-4)
    # The deformable layer starts with zero offsets and masks sigmoid(0) = 1/2.
    deform = dyhead.DyConv(8, deformable=True, groups=4)
    pd = nn.meta.unbox(jax.jit(deform.init)(jax.random.key(1), maps)["params"])
    assert not np.any(pd["offset"]["kernel"]) and not np.any(pd["offset"]["bias"])
    half = {k: dict(v, kernel=v["kernel"] / 2) if k.startswith("DyConv") else v
            for k, v in p.items()}
    out = jax.jit(deform.apply)({"params": {**p, "offset": pd["offset"]}}, maps)
    for a, b in zip(out, apply_plain({"params": half}, maps)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# --- the model -------------------------------------------------------------------------------


def test_outputs_cover_every_anchor_of_both_towers():
    model, params = _model_and_params()
    anchors_A4, levels = boxes.anchors((S, S), model.strides)
    out = jax.eval_shape(functools.partial(model.apply, method="detect"), {"params": params},
                         *model.example_inputs(2))
    assert out["logits"].shape == (2, len(anchors_A4), L) and levels == (64, 16, 4, 1, 1)
    assert out["deltas"].shape == (2, len(anchors_A4), 4)
    assert out["centerness"].shape == (2, len(anchors_A4))
    vit = glip.build_models(_config("ViT-tiny", strides=(8, 16, 32)))[1]
    shapes = nn.meta.unbox(jax.eval_shape(vit.init, jax.random.key(0), *vit.example_inputs(1)))
    out = jax.eval_shape(functools.partial(vit.apply, method="detect"), shapes,
                         *vit.example_inputs(1))
    assert out["logits"].shape == (1, len(boxes.anchors((S, S), (8, 16, 32))[0]), L)
    with pytest.raises(ValueError, match="head.strides"):
        bad = glip.build_models(_config(strides=(16, 32)))[1]
        jax.eval_shape(bad.init, jax.random.key(0), *bad.example_inputs())
    with pytest.raises(ValueError, match="not a glip setting"):
        glip.settings(_config(fpn=3))


def _prompt(names):
    caption, spans = grounding.build_prompt(names)
    tokens, map_CL = grounding.prompt_tokens(caption, spans, L)
    return np.stack([tokens] * 2), map_CL


def test_class_order_permutes_scores_with_a_context_free_text():
    model, params = _model_and_params()
    p = jax.tree.map(np.copy, params)
    text = p["text"]
    for i in range(2):  # identity blocks and no positions: a bag of tokens
        block = text["transformer"][f"resblocks_{i}"]
        for leaf in ("out_proj_kernel", "out_proj_bias"):
            block["attn"][leaf] = np.zeros_like(block["attn"][leaf])
        block["mlp"]["c_proj"] = jax.tree.map(np.zeros_like, block["mlp"]["c_proj"])
    text["positional_embedding"] = np.zeros_like(text["positional_embedding"])
    images = _images()
    tok_ab, map_ab = _prompt(["red square", "blue circle"])
    tok_ba, map_ba = _prompt(["blue circle", "red square"])
    assert not np.array_equal(tok_ab, tok_ba)
    fwd = _forward()
    probs_ab, deltas_ab, _ = fwd(p, images, tok_ab)
    probs_ba, deltas_ba, _ = fwd(p, images, tok_ba)
    s_ab = grounding.class_scores(np.asarray(probs_ab), map_ab)
    s_ba = grounding.class_scores(np.asarray(probs_ba), map_ba)
    np.testing.assert_allclose(s_ab, s_ba[..., ::-1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(deltas_ab, deltas_ba, rtol=1e-4, atol=1e-5)  # fusion saw the bag
    assert np.abs(s_ab[..., 0] - s_ab[..., 1]).max() > 1e-4  # the classes differ
    # CLIP's causal text tower with positions breaks it (the test can fail).
    s_ab = grounding.class_scores(np.asarray(fwd(params, images, tok_ab)[0]), map_ab)
    s_ba = grounding.class_scores(np.asarray(fwd(params, images, tok_ba)[0]), map_ba)
    assert np.abs(s_ab - s_ba[..., ::-1]).max() > 1e-4


def test_padding_after_end_of_text_changes_nothing():
    model, params = _model_and_params()
    tokens, _ = _prompt(["red square"])
    n = int(np.argmax(tokens[0])) + 1
    noisy = tokens.copy()
    noisy[:, n:] = np.random.default_rng(0).integers(1, 49000, (2, L - n))
    fwd, images = _forward(), _images(seed=1)
    probs, deltas, ctr = (np.asarray(x) for x in fwd(params, images, tokens))
    probs2, deltas2, ctr2 = (np.asarray(x) for x in fwd(params, images, noisy))
    np.testing.assert_allclose(probs2[..., :n], probs[..., :n], atol=1e-6)
    np.testing.assert_allclose(deltas2, deltas, atol=1e-6)
    np.testing.assert_allclose(ctr2, ctr, atol=1e-6)
    np.testing.assert_array_equal(glip.text_mask(jnp.asarray(noisy)),
                                  np.broadcast_to(np.arange(L) < n, (2, L)))


def test_loss_and_gradient_are_finite_and_reach_the_head_not_the_frozen():
    # Two levels at 32 px (a third of the compile time), anchors 2 x stride to fit the image.
    cfg = _config(strides=(8, 16), anchor_scale=2.0)
    cfg.data.image_size = 32
    model = glip.build_models(cfg)[1]
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *model.example_inputs(2)))
    params = _fill(shapes["params"], seed=1)
    tokens, map_CL = _prompt(["red square", "blue circle"])
    boxes_BM4 = np.array([[[4, 4, 20, 20], [0, 0, 0, 0]], [[10, 2, 30, 15], [1, 15, 15, 31]]],
                         np.float32)
    box_mask = np.array([[True, False], [True, True]])
    labels = np.array([[0, 0], [1, 0]])
    batch = {"image": _images(seed=2)[:, :32, :32], "tokens": tokens, "boxes": boxes_BM4,
             "box_mask": box_mask, "positive_map": map_CL[labels] * box_mask[..., None]}
    encode, loss_fn = glip.encode(model), glip.loss(model, cfg, None)

    def total(p):
        return loss_fn(p, encode(p, batch), batch)

    (value, metrics), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params)
    assert np.isfinite(float(value)) and float(value) > 0
    assert float(metrics["positives"]) > 0
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    for path in (("bias0",), ("vlfuse_0", "gamma_v"), ("dyconv_0", "DyConv_1", "kernel"),
                 ("text_layers_0", "ln_1", "scale"), ("fpn", "fpn_inner1", "kernel")):
        g = functools.reduce(lambda t, k: t[k], path, grads)
        assert np.abs(g).max() > 0, path
    for path in (("visual", "attnpool", "c_proj", "kernel"), ("text", "text_projection")):
        assert not np.any(functools.reduce(lambda t, k: t[k], path, grads)), path


def test_resnet_any_size_maps_and_longer_text_positions():
    rn = create_model("RN-tiny").config.vision
    tower = resnet.ModifiedResNet(rn.image_size, tuple(rn.layers), rn.width, rn.heads, 32,
                                  any_size=True)
    x = jnp.zeros((1, 96, 128, 3))
    shapes = jax.eval_shape(tower.init, jax.random.key(0), x)
    out, feats = jax.eval_shape(functools.partial(tower.apply, return_features=True), shapes, x)
    assert feats["layer4"].shape[1:3] == (3, 4) and out.shape == (1, 32)
    pos = shapes["params"]["attnpool"]["positional_embedding"].value.shape
    assert pos[0] == (64 // 32) ** 2 + 1  # CLIP's table, loadable as it is
    with pytest.raises(ValueError, match="multiple of 32"):
        tower.init(jax.random.key(0), jnp.zeros((1, 80, 64, 3)))
    fixed = resnet.ModifiedResNet(rn.image_size, tuple(rn.layers), rn.width, rn.heads, 32)
    with pytest.raises(ValueError, match="takes 64x64"):
        fixed.init(jax.random.key(0), x)
    # A CLIP checkpoint's shorter text positions fill the first rows (weights.load_init).
    from clipjax import weights

    table = np.arange(12, dtype=np.float32).reshape(6, 2)
    flat = {"text/positional_embedding": -np.ones((4, 2), np.float32), "other": 1}
    out = weights._longer_text_context(flat, {"text/positional_embedding": table})
    np.testing.assert_array_equal(out["text/positional_embedding"],
                                  np.concatenate([-np.ones((4, 2)), table[4:]]))
    assert out["other"] == 1
    same = {"text/positional_embedding": table}
    assert weights._longer_text_context(same, same) is same

# --- the train step ----------------------------------------------------------------------


def _step_batch(b: int = 8):
    """b images at 32 px, each with one or two boxes of "red square" / "blue circle"."""
    tokens, map_CL = _prompt(["red square", "blue circle"])
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 14, (b, 2, 2))
    boxes_BM4 = np.concatenate([xy, xy + rng.uniform(8, 18, (b, 2, 2))], -1).astype(np.float32)
    box_mask = np.stack([np.ones(b, bool), np.arange(b) % 2 == 0], 1)
    labels = rng.integers(0, 2, (b, 2))
    return {"image": _images(b, seed=4)[:, :32, :32],
            "tokens": np.broadcast_to(tokens[:1], (b, tokens.shape[1])).copy(),
            "boxes": boxes_BM4, "box_mask": box_mask,
            "positive_map": (map_CL[labels] * box_mask[..., None]).astype(np.float32)}


def _one_step(cfg, mesh):
    from clipjax import optim, sharding, train
    from clipjax.heads import get_task

    task = get_task(cfg)
    model = task.build_models(cfg)[0]
    opt = optim.create_optimizer(train.optimizer_config(ml_collections.ConfigDict(dict(
        # SGD: its update is linear in the gradient (Adam's first step is about lr x sign,
        # which float noise flips where a gradient is near zero).
        optimizer=dict(name="sgd", lr=0.1, warmup_steps=0, weight_decay=1e-4,
                       grad_clip_norm=1.0, lr_multipliers={"^text/": 0.1}, schedule="steps",
                       steps_at=(0.5,)))),
        task, 10), train.clip.abstract_params(model))
    shardings = train.state_shardings(model, opt, mesh)
    state = train.create_train_state(model, opt, jax.random.key(0), mesh)
    before = jax.tree.map(np.asarray, state.params)
    step = train.make_train_step(model, opt, mesh, shardings, batch_keys=task.batch_keys(cfg),
                                 task=task, config=cfg)
    state, metrics = step(state, sharding.shard_batch(_step_batch(), mesh))
    return metrics, before, jax.tree.map(np.asarray, state.params)


def test_detection_step_on_8_devices_equals_one_device():
    from clipjax import sharding

    # Four channels a GroupNorm group: with one, every channel's spatial mean is zero and
    # DyHead's attentions (ReLU of the pooled map) sit on their kink, where float noise of
    # either run flips whole gradient terms.
    cfg = _config(strides=(8, 16), anchor_scale=2.0, gn_groups=4)
    cfg.data.image_size = 32
    m1, before, params1 = _one_step(cfg, sharding.create_mesh(devices=jax.devices()[:1]))
    m8, _, params8 = _one_step(cfg, sharding.create_mesh(data=4, fsdp=2))
    assert float(m1["positives"]) > 0 and np.isfinite(float(m1["loss"]))
    # float32 sums over every anchor and token, added up in another order on 8 devices
    for key in ("loss", "loss_token", "loss_giou", "loss_centerness", "positives"):
        np.testing.assert_allclose(float(m8[key]), float(m1[key]), rtol=5e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params8, params1)
    # The frozen pooled projections did not move; the head did.
    np.testing.assert_array_equal(params1["text"]["text_projection"],
                                  before["text"]["text_projection"])
    assert np.abs(params1["bias_lang"] - before["bias_lang"]).max() > 0
