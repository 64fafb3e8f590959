"""CLIPasso's stroke initialisation: ViT attention weights, bicubic, XDoG, saliency, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.transform

import clipjax
from clipjax import convert
from clipjax.heads import saliency
from clipjax.models.clip import CLIP


@pytest.fixture(scope="module")
def vit():
    model = clipjax.create_model("ViT-tiny")  # 32 px, patch 8: 16 patches + class, 2 layers
    params = clipjax.init_params(model, jax.random.key(0))
    img = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    out = jax.jit(lambda p, x: model.apply({"params": p}, x, method=lambda m, x: m.visual(
        x, return_attention=True)))(params, img)
    return model, params, img, out


def _ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _numpy_attention(params, img, blocks):
    """softmax(q kᵀ/√K) of every layer, [L, B, H, N, N], from each block's own input."""
    v = jax.tree.map(np.asarray, params["visual"])
    b, p = img.shape[0], 8
    patches = np.asarray(img).reshape(b, 4, p, 4, p, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, 16, -1)
    x = patches @ v["conv1_kernel"].reshape(-1, v["conv1_kernel"].shape[-1])
    x = np.concatenate([np.broadcast_to(v["class_embedding"], (b, 1, x.shape[-1])), x], 1)
    inputs = [_ln(x + v["positional_embedding"], v["ln_pre"])] + list(np.asarray(blocks[:-1]))
    out = []
    for i, x in enumerate(inputs):
        blk = v["transformer"][f"resblocks_{i}"]
        y = _ln(x, blk["ln_1"])
        qkv = np.einsum("bnd,dthk->tbhnk", y, blk["attn"]["in_proj_kernel"]) + \
            blk["attn"]["in_proj_bias"][:, None, :, None]
        logits = qkv[0] @ qkv[1].swapaxes(-1, -2) / np.sqrt(qkv.shape[-1])
        e = np.exp(logits - logits.max(-1, keepdims=True))
        out.append(e / e.sum(-1, keepdims=True))
    return np.stack(out)


def test_attention_weights_are_softmax_of_the_blocks_queries_and_keys(vit):
    model, params, img, (emb, feats) = vit
    attn = np.asarray(feats["attention"])
    assert attn.shape == (2, 2, 4, 17, 17)  # layers, B, heads, tokens, tokens
    np.testing.assert_allclose(attn, _numpy_attention(params, img, feats["blocks"]), atol=1e-5)
    # The embedding and block outputs are the features path's, bit for bit.
    plain = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIP.image_features))
    plain_emb, plain_feats = plain(params, img)
    np.testing.assert_array_equal(emb, plain_emb)
    np.testing.assert_array_equal(feats["blocks"], plain_feats["blocks"])


def test_scanned_tower_returns_the_same_attention(vit):
    model, params, img, (_, feats) = vit
    scanned = clipjax.create_model("ViT-tiny", scan=True, remat="full")
    stacked = convert._unflatten(convert.stack_layers(convert._flatten(params)))
    attn = jax.jit(lambda p, x: scanned.apply({"params": p}, x, method=CLIP.image_attention))(
        stacked, img)
    np.testing.assert_allclose(attn, feats["attention"], atol=1e-6)


def test_image_attention_needs_a_vit():
    rn = clipjax.create_model("RN-tiny")
    with pytest.raises(ValueError, match="needs a ViT"):
        jax.eval_shape(lambda: rn.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                       method=CLIP.image_attention))


def test_bicubic_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).random((2, 7, 5)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.tensor(x)[:, None], size=(224, 96),
                                          mode="bicubic", align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(saliency.resize_bicubic(jnp.asarray(x), (224, 96)), ref, atol=1e-5)
    # jax.image.resize's Keys a = -0.5 kernel is materially different (why we do not use it).
    keys = jax.image.resize(jnp.asarray(x), (2, 224, 96), "cubic")
    assert np.abs(np.asarray(keys) - ref).max() > 0.01


def test_attention_map_averages_the_class_row_over_layers_and_heads(vit):
    torch = pytest.importorskip("torch")
    model, params, img, (_, feats) = vit
    # One image: the same compiled program as initial_strokes below.
    grid = np.asarray(feats["attention"])[:, :1, :, 0, 1:].mean((0, 2)).reshape(1, 1, 4, 4)
    ref = torch.nn.functional.interpolate(torch.tensor(grid), size=32, mode="bicubic",
                                          align_corners=False)[:, 0].numpy()
    lo, hi = ref.min((1, 2), keepdims=True), ref.max((1, 2), keepdims=True)
    got = saliency.attention_map(model, params, img[:1], 32)
    np.testing.assert_allclose(got, (ref - lo) / (hi - lo), atol=1e-4)
    assert got.shape == (1, 32, 32) and float(got.min()) == 0 and float(got.max()) == 1


def test_xdog_draws_lines_at_edges():
    line = np.ones((48, 64))
    line[:, 30:32] = 0  # a dark 2 px line on white
    ink_cols = np.nonzero((saliency.xdog(line) == 0).any(0))[0]
    assert 30 in ink_cols and 31 in ink_cols and ink_cols.min() >= 28 and ink_cols.max() <= 33
    step = np.full((48, 64), 0.4)
    step[:, 32:] = 0.6
    drawing = saliency.xdog(step)
    assert set(np.unique(drawing)) == {0.0, 1.0}
    ink_cols = np.nonzero((drawing == 0).any(0))[0]
    # Ink on the dark side of the edge, within the wide Gaussian's reach (2 sigma k = 16 px).
    assert ink_cols.max() == 31 and ink_cols.min() >= 32 - 16
    assert (drawing[:, :8] == 1).all() and (drawing[:, 32:] == 1).all()
    # RGB goes through luminance first.
    rgb = np.stack([step * 1.1, step, step * 0.5], -1)
    lum = rgb @ np.array([0.2125, 0.7154, 0.0721])
    np.testing.assert_array_equal(saliency.xdog(rgb), saliency.xdog(lum))


def test_saliency_is_a_softmax_over_positive_pixels():
    rng = np.random.default_rng(0)
    attn = rng.random((16, 16))
    attn[0, 0] = 0.0
    drawing = (rng.random((16, 16)) > 0.5).astype(np.float32)
    mask = np.zeros((16, 16))
    mask[:, :10] = 1
    prob = saliency.saliency(attn, drawing, mask, temperature=0.3)
    v = attn * (1 - drawing) * mask
    want = np.where(v > 0, np.exp(v / 0.3), 0.0)
    np.testing.assert_allclose(prob, want / want.sum(), rtol=1e-12)
    assert (prob[:, 10:] == 0).all() and prob[0, 0] == 0
    with pytest.raises(ValueError, match="positive"):
        saliency.saliency(attn, np.ones((16, 16)))
    with pytest.raises(ValueError, match="mask"):
        saliency.saliency(attn, drawing, mask[:8])


def test_sampling_is_reproducible_distinct_and_only_on_positive_pixels():
    prob = np.random.default_rng(0).random((16, 16))
    prob[:, :8] = 0  # the left half can never start a stroke
    prob /= prob.sum()
    a = np.asarray(saliency.sample_starts(jax.random.key(0), prob, 100))
    assert a.shape == (100, 2) and (a[:, 0] >= 8).all()
    assert (prob[a[:, 1], a[:, 0]] > 0).all()
    assert len({tuple(xy) for xy in a}) == 100  # without replacement
    np.testing.assert_array_equal(a, saliency.sample_starts(jax.random.key(0), prob, 100))
    assert not np.array_equal(a, saliency.sample_starts(jax.random.key(1), prob, 100))
    with pytest.raises(ValueError, match="fewer strokes"):
        saliency.sample_starts(jax.random.key(0), prob, 129)


def test_sampling_follows_the_probabilities():
    prob = np.zeros((4, 4))
    prob[1, 2], prob[3, 0] = 0.8, 0.2
    draw = jax.vmap(lambda k: saliency.sample_starts(k, prob, 1)[0])
    xy = np.asarray(draw(jax.random.split(jax.random.key(0), 4000)))
    assert set(map(tuple, xy)) == {(2, 1), (0, 3)}
    assert abs((xy[:, 0] == 2).mean() - 0.8) < 0.03  # 4.7 binomial sigmas


def test_random_walk_stays_within_its_radius():
    starts = jnp.asarray(np.random.default_rng(0).integers(0, 224, (2000, 2)))
    pts = np.asarray(saliency.init_strokes(jax.random.key(0), starts, 224, radius=0.05))
    assert pts.shape == (2000, 4, 2)
    np.testing.assert_array_equal(pts[:, 0], starts)
    half_step = 0.05 / 2 * 224  # 5.6 px per coordinate per step
    steps = np.diff(pts, axis=1)
    assert np.abs(steps).max() <= half_step + 1e-4
    assert np.abs(steps).max() > 0.99 * half_step and abs(steps.mean()) < 0.1  # uniform, centred
    reach = np.abs(pts - pts[:, :1]).max((0, 2))
    assert (reach <= np.arange(4) * half_step + 1e-4).all()
    np.testing.assert_array_equal(pts, saliency.init_strokes(jax.random.key(0), starts, 224))


def test_initial_strokes_start_inside_the_mask(vit):
    model, params, _, _ = vit
    cat = skimage.transform.resize(skimage.data.chelsea(), (32, 32), anti_aliasing=True)
    img = (cat - [0.48145466, 0.4578275, 0.40821073]) / [0.26862954, 0.26130258, 0.27577711]
    mask = np.mgrid[:32, :32][1] < 16
    pts, prob = saliency.initial_strokes(jax.random.key(0), model, params, img, 8, mask_HW=mask)
    assert pts.shape == (8, 4, 2) and prob.shape == (32, 32)
    starts = np.asarray(pts[:, 0]).astype(int)
    assert (starts[:, 0] < 16).all() and (prob[starts[:, 1], starts[:, 0]] > 0).all()
    assert (prob[~mask] == 0).all() and abs(prob.sum() - 1) < 1e-9
