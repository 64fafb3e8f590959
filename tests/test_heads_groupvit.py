"""GroupViT: the straight-through Gumbel assignment, the grouping tower's token counts,
the multi-label loss against a NumPy transcription of the reference, zero-shot
segmentation's rule, and the offline caption tagging."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from clipjax import losses
from clipjax.heads import groupvit, nouns
from clipjax.models import grouping

TINY = groupvit.get_variant("GroupViT-tiny")


@functools.cache
def _model_and_params():
    """The tiny model with random parameters, made without compiling its init (~10 s)."""
    model = groupvit.GroupViT(TINY)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                          *model.example_inputs(2))["params"])
    rng = np.random.default_rng(0)

    def fill(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(s.shape, np.float32)
        if name.endswith("bias"):
            return np.zeros(s.shape, np.float32)
        if name.endswith("logit_scale"):
            return np.full(s.shape, np.log(1 / 0.07), np.float32)
        return (0.1 * rng.normal(size=s.shape)).astype(np.float32)

    return model, jax.tree_util.tree_map_with_path(fill, shapes)


def _images(b=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, 32, 32, 3), dtype=np.uint8)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --- The assignment -------------------------------------------------------------------


def test_hard_assignment_is_one_hot_over_groups_with_the_soft_gradient():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 7))  # [B, groups, tokens]
    noise = jax.random.gumbel(jax.random.key(1), logits.shape)
    y = np.asarray(grouping.hard_assign(logits, noise))
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-6)  # every token, one group
    assert np.all(np.isclose(y, 0.0, atol=1e-6) | np.isclose(y, 1.0, atol=1e-6))
    np.testing.assert_array_equal(y.argmax(1), np.asarray(logits + noise).argmax(1))

    w = jax.random.normal(jax.random.key(2), logits.shape)
    g_hard = jax.grad(lambda l: jnp.sum(w * grouping.hard_assign(l, noise)))(logits)
    g_soft = jax.grad(lambda l: jnp.sum(w * jax.nn.softmax(l + noise, axis=1)))(logits)
    np.testing.assert_allclose(g_hard, g_soft, atol=1e-6)
    assert np.abs(np.asarray(g_hard)).max() > 1e-3  # a real gradient, not zero


def test_training_assigns_every_token_to_one_group_with_gumbel_noise():
    model, params = _model_and_params()
    img = jnp.asarray(_images(), jnp.float32) / 255.0
    train = model.clone(train=True)

    @jax.jit
    def maps(params, key):
        v = {"params": params}
        return (train.apply(v, img, True, method="assignments", rngs={"gumbel": key}),
                train.apply(v, img, True, method="assignments"),  # no rng
                model.apply(v, img, True, method="assignments"),
                model.apply(v, img, method="assignments"))

    noisy, quiet, evaluated, soft = maps(params, jax.random.key(3))
    changed = 0
    for n, q, e, s in zip(noisy, quiet, evaluated, soft):
        n, s = np.asarray(n), np.asarray(s)
        np.testing.assert_allclose(n.sum(-1), 1.0, atol=1e-6)  # [B, tokens, groups]
        assert np.all(np.isclose(n, 0.0, atol=1e-6) | np.isclose(n, 1.0, atol=1e-6))
        np.testing.assert_allclose(s.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(q), np.asarray(e))  # no rng: no noise
        np.testing.assert_array_equal(np.asarray(e).argmax(-1), s.argmax(-1))
        changed += int(np.sum(n.argmax(-1) != s.argmax(-1)))
    assert changed > 0  # the noise moved some tokens


def test_row_noise_depends_only_on_its_row_seed_and_the_stage():
    seeds = jnp.asarray([7, 11, 7, 3], jnp.int32)
    full = np.asarray(grouping.row_gumbel(seeds, 0, (3, 4)))
    np.testing.assert_array_equal(full[1:3], np.asarray(grouping.row_gumbel(seeds[1:3], 0, (3, 4))))
    np.testing.assert_array_equal(full[0], full[2])
    assert not np.allclose(full[0], np.asarray(grouping.row_gumbel(seeds, 1, (3, 4)))[0])


@pytest.mark.parametrize("name", ["GroupViT-tiny", "GroupViT-S/16"])
def test_each_stage_leaves_as_many_tokens_as_its_output_groups(name):
    v = groupvit.get_variant(name).vision
    tower = grouping.GroupViTVision(v.image_size, v.patch_size, v.width, v.heads, v.depths,
                                    v.group_tokens, v.output_groups)
    x = jax.ShapeDtypeStruct((2, v.image_size, v.image_size, 3), jnp.float32)
    tokens, soft, hard = jax.eval_shape(
        lambda x: tower.init_with_output(jax.random.key(0), x)[0], x)
    assert tokens.shape == (2, v.output_groups[-1], v.width)
    inputs = [v.grid ** 2, *v.output_groups[:-1]]
    for m, n, g in zip(soft, inputs, v.output_groups, strict=True):
        assert m.shape == (2, g, n)  # [B, groups, input tokens]
    assert [m.shape for m in hard] == [m.shape for m in soft]


# --- Losses ------------------------------------------------------------------------


def _groupvit_multi_label_numpy(img_BE, prompts_BKE, scale):
    """models/multi_label_contrastive.py's multi_label_loss on one device, in NumPy."""
    b, k, e = prompts_BKE.shape
    txt = prompts_BKE.reshape(b * k, e)

    def soft_ce(logits, targets):
        logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(
            1, keepdims=True)) - logits.max(1, keepdims=True)
        return np.mean(np.sum(-targets * logp, axis=1))

    per_img = np.zeros((b, b * k))
    for i in range(b):
        per_img[i, i * k:(i + 1) * k] = 1.0 / k  # 1 / L2
    per_txt = np.zeros((b * k, b))
    per_txt[np.arange(b * k), np.arange(b * k) // k] = 1.0  # 1 / L1, L1 = 1
    return 0.5 * (soft_ce(scale * img_BE @ txt.T, per_img)
                  + soft_ce(scale * txt @ img_BE.T, per_txt))


def _infonce_numpy(img, txt, scale):
    logits = scale * img @ txt.T
    lse = lambda z: np.log(np.exp(z).sum(1))
    d = np.diag(logits)
    return 0.5 * (np.mean(lse(logits) - d) + np.mean(lse(logits.T) - d))


def test_with_one_prompt_per_image_the_multi_label_loss_is_infonce():
    rng = np.random.default_rng(0)
    img, txt = _unit(rng.normal(size=(8, 16))), _unit(rng.normal(size=(8, 16)))
    ml, _ = groupvit.multi_label_loss(jnp.asarray(img, jnp.float32),
                                      jnp.asarray(txt[:, None], jnp.float32), 20.0)
    info, _ = losses.softmax_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32),
                                  20.0)
    np.testing.assert_allclose(float(ml), float(info), rtol=1e-6, atol=1e-6)


def test_the_multi_label_loss_matches_groupvits():
    rng = np.random.default_rng(1)
    img, prompts = _unit(rng.normal(size=(6, 16))), _unit(rng.normal(size=(6, 3, 16)))
    got, metrics = groupvit.multi_label_loss(jnp.asarray(img, jnp.float32),
                                             jnp.asarray(prompts, jnp.float32), 14.0)
    np.testing.assert_allclose(float(got), _groupvit_multi_label_numpy(img, prompts, 14.0),
                               rtol=1e-5)
    assert 0.0 <= float(metrics["i2t_accuracy"]) <= 1.0


def test_the_head_loss_adds_both_terms_with_scales_clamped_at_100():
    rng = np.random.default_rng(2)
    img, txt = _unit(rng.normal(size=(4, 16))), _unit(rng.normal(size=(4, 16)))
    prompts = _unit(rng.normal(size=(4, 3, 16)))
    config = ml_collections.ConfigDict({"loss": "softmax", "model": "GroupViT-tiny",
                                        "head": {"multi_label_weight": 0.5}})
    model = groupvit.build_models(config)[0]
    params = {"logit_scale": jnp.log(200.0), "multi_label_logit_scale": jnp.log(30.0)}
    outputs = tuple(jnp.asarray(x, jnp.float32) for x in (img, txt, prompts))
    value, metrics = groupvit.loss(model, config, None)(params, outputs, {})
    want = _infonce_numpy(img, txt, 100.0) + 0.5 * _groupvit_multi_label_numpy(img, prompts, 30.0)
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["contrastive_loss"]), _infonce_numpy(img, txt, 100.0),
                               rtol=1e-5)
    assert groupvit.batch_keys(config) == ("image", "text", "prompts", "rng")


def test_encode_gives_normalised_captions_prompts_and_images():
    model, params = _model_and_params()
    rng = np.random.default_rng(3)
    batch = {"image": jnp.asarray(_images()), "rng": jnp.asarray([5, 6], jnp.int32),
             "text": jnp.asarray(rng.integers(1, 400, (2, 16)), jnp.int32),
             "prompts": jnp.asarray(rng.integers(1, 400, (2, 3, 16)), jnp.int32)}
    encode = jax.jit(groupvit.encode(model.clone(train=True)))
    img, txt, prompts = encode(params, batch)
    assert img.shape == txt.shape == (2, TINY.embed_dim)
    assert prompts.shape == (2, 3, TINY.embed_dim)
    for x in (img, txt, prompts):
        np.testing.assert_allclose(np.linalg.norm(np.asarray(x), axis=-1), 1.0, rtol=1e-5)
    # The row seeds draw the training noise: other seeds, another image embedding.
    other, _, _ = encode(params, dict(batch, rng=jnp.asarray([8, 9], jnp.int32)))
    assert np.abs(np.asarray(other) - np.asarray(img)).max() > 1e-4
    # The caption and the prompts share one text pass: equal tokens, equal embeddings.
    same = dict(batch, prompts=jnp.repeat(batch["text"][:, None], 3, axis=1))
    _, txt2, prompts2 = encode(params, same)
    np.testing.assert_allclose(np.asarray(prompts2), np.repeat(np.asarray(txt2)[:, None], 3, 1),
                               atol=1e-5)


# --- Zero-shot segmentation ---------------------------------------------------------


def _two_halves():
    """2x2 patches -> 2 groups -> 2 final groups: left half group 0, right half group 1."""
    first = np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]])[None]  # [1, 4, 2]
    second = np.array([[0.8, 0.2], [0.2, 0.8]])[None]
    return [jnp.asarray(first, jnp.float32), jnp.asarray(second, jnp.float32)]


def test_segmentation_keeps_the_images_top_5_classes_and_backgrounds_weak_groups():
    eye = np.eye(7, 8)
    img = _unit(np.array([[5, 4, 3, 2, 1, 0, 0, 0.0]]))  # top 5: classes 0..4
    groups = _unit(np.stack([eye[6] + 0.3 * eye[1], eye[2]]))[None]  # group 0 is class 6
    args = (_two_halves(), jnp.asarray(img, jnp.float32), jnp.asarray(groups, jnp.float32),
            jnp.asarray(eye, jnp.float32), 100.0, (2, 2), (8, 8))
    scores = np.asarray(groupvit.segment_scores(*args, bg_thresh=0.0))
    labels = scores.argmax(-1)
    # Class 6 is not among the image's top 5: group 0 takes its best allowed class, 1.
    assert np.all(labels[:, :, :4] == 1 + 1) and np.all(labels[:, :, 4:] == 2 + 1)
    assert np.all(scores[..., 1 + 5:] == 0.0)
    # Its affinity is that masked softmax times the unmasked one, where class 6 wins:
    # tiny, so at 0.95 it becomes background; group 1's class 2 stays.
    labels = np.asarray(groupvit.segment_scores(*args, bg_thresh=0.95)).argmax(-1)
    assert np.all(labels[:, :, :4] == 0) and np.all(labels[:, :, 4:] == 2 + 1)
    # Without the mask (all 7 classes allowed) group 0 would be class 6.
    labels = np.asarray(groupvit.segment_scores(*args, bg_thresh=0.0, top_k=7)).argmax(-1)
    assert np.all(labels[:, :, :4] == 6 + 1)


def test_background_grows_with_the_threshold_and_the_best_group_stays():
    rng = np.random.default_rng(4)
    maps = [jnp.asarray(0.9 * np.eye(6)[None] + 0.1 / 6, jnp.float32)]  # 6 patches, 6 groups
    groups = jnp.asarray(_unit(rng.normal(size=(1, 6, 8))), jnp.float32)
    classes = jnp.asarray(_unit(rng.normal(size=(5, 8))), jnp.float32)
    img = jnp.asarray(_unit(rng.normal(size=(1, 8))), jnp.float32)
    fn = jax.jit(lambda t: groupvit.segment_scores(maps, img, groups, classes, 10.0, (1, 6),
                                                   (4, 24), bg_thresh=t))
    areas = [float(np.mean(np.asarray(fn(t)).argmax(-1) == 0)) for t in np.linspace(0, 1, 11)]
    assert areas[0] == 0.0 and areas[-1] < 1.0
    assert all(a <= b for a, b in zip(areas, areas[1:])) and areas[-1] > 0.0


def test_the_segmenter_labels_at_most_one_class_per_final_group_plus_background():
    model, params = _model_and_params()
    classes = _unit(np.random.default_rng(5).normal(size=(6, TINY.embed_dim)))
    areas = []
    for t in (0.0, 0.3, 0.95, 1.0):
        scores = np.asarray(groupvit.segmenter(model, params, classes, bg_thresh=t)(_images()))
        assert scores.shape == (2, 32, 32, 7)
        assert set(np.unique(scores[..., 0])) <= {0.0, 1.0}
        labels = scores.argmax(-1)
        for image in labels:
            assert len(np.unique(image)) <= TINY.vision.output_groups[-1] + 1
        areas.append(float(np.mean(labels == 0)))
    assert areas[0] == 0.0 and all(a <= b for a, b in zip(areas, areas[1:]))


# --- Caption words -------------------------------------------------------------------

CAPTION = "a man riding a horse with two dogs"


def test_nouns_are_tagged_offline_like_groupvits_words():
    assert nouns.tagged_words(CAPTION, nouns.NOUN_TAGS) == ["man", "horse", "dogs"]
    # GroupViT's word_type "noun" keeps every VB* form too.
    assert nouns.tagged_words(CAPTION) == ["man", "riding", "horse", "dogs"]
    assert nouns.nouns(CAPTION) == ["man", "riding", "horse"]
    drawn = nouns.nouns(CAPTION, 3, np.random.default_rng(0))
    assert len(set(drawn)) == 3 and set(drawn) <= {"man", "riding", "horse", "dogs"}
    assert drawn == nouns.nouns(CAPTION, 3, np.random.default_rng(0))
    assert nouns.nouns("", 3, np.random.default_rng(0)) == []


def test_prompts_fill_with_words_in_templates_then_the_caption():
    templates = ("a photo of a {}.", "art of the {}.")
    prompts = nouns.multi_label_prompts(CAPTION, 3, np.random.default_rng(1), templates)
    assert len(prompts) == 3
    for p in prompts:
        assert any(p in {t.format(w) for t in templates}
                   for w in ("man", "riding", "horse", "dogs"))
    one = nouns.multi_label_prompts("a dog", 3, np.random.default_rng(1), templates)
    assert one[0] in {t.format("dog") for t in templates} and one[1:] == ["a dog", "a dog"]
    assert nouns.multi_label_prompts("hello", 2, np.random.default_rng(1), templates) == [
        "hello", "hello"]
