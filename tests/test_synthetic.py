"""The built-in synthetic data: determinism, resume, host sharding, labels that match pixels
and words, distinct splits."""

import json

import numpy as np
import pytest

from clipjax import tokenize
from clipjax.data import synthetic
from clipjax.data.transforms import CLIP_MEAN, CLIP_STD


def test_classes_and_chance():
    assert len(synthetic.CLASSNAMES) == len(set(synthetic.CLASSNAMES)) == 36  # chance 2.8%
    assert all("{}" in t for t in synthetic.TEMPLATES)


def test_batch_contract_and_normalisation():
    it = synthetic.SyntheticIterator(16, image_size=32, context_length=16, seed=3)
    b = next(it)
    assert b["image"].dtype == np.float32 and b["image"].shape == (16, 32, 32, 3)
    assert b["text"].dtype == np.int32 and b["text"].shape == (16, 16)
    assert b["label"].dtype == np.int32 and b["label"].shape == (16,)
    # Undoing CLIP's mean/std gives back the uint8 rendering exactly.
    ex = synthetic.render(3, "train", np.arange(16), 32)
    pixels = b["image"] * np.float32(CLIP_STD) + np.float32(CLIP_MEAN)
    np.testing.assert_allclose(pixels * 255, ex.image_BHWC, atol=1e-3)
    np.testing.assert_array_equal(b["label"], ex.label_B)


def test_examples_do_not_depend_on_batching_and_resume_is_exact():
    a = synthetic.SyntheticIterator(8, seed=1)
    first, second = next(a), next(a)
    whole = next(synthetic.SyntheticIterator(16, seed=1))
    for k in ("image", "text", "label"):
        np.testing.assert_array_equal(np.concatenate([first[k], second[k]]), whole[k])

    it = synthetic.SyntheticIterator(8, seed=1)
    next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
    expected = next(it)
    resumed = synthetic.SyntheticIterator(8, seed=1)
    resumed.set_state(state)
    got = next(resumed)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])
    with pytest.raises(ValueError, match="written with seed=1, this run has seed=2"):
        synthetic.SyntheticIterator(8, seed=2).set_state(state)
    assert not np.array_equal(next(synthetic.SyntheticIterator(8, seed=2))["image"], first["image"])


def test_hosts_split_the_global_batch():
    whole = next(synthetic.SyntheticIterator(12, seed=0))
    parts = [next(synthetic.SyntheticIterator(12, seed=0, process_index=p, process_count=3))
             for p in range(3)]
    for k in whole:
        assert all(len(p[k]) == 4 for p in parts)
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
    with pytest.raises(ValueError, match="multiple of 5"):
        synthetic.SyntheticIterator(12, process_count=5)


def test_finite_split_ends_with_a_short_batch():
    it = synthetic.SyntheticIterator(40, split="held_out", num_examples=100)
    assert [len(b["label"]) for b in it] == [40, 40, 20]


def test_held_out_images_are_not_training_images():
    train = synthetic.render(0, "train", np.arange(1024), 32).image_BHWC.reshape(1024, -1)
    held = synthetic.render(0, "held_out", np.arange(512), 32).image_BHWC.reshape(512, -1)
    seen = {row.tobytes() for row in train}
    assert not any(row.tobytes() in seen for row in held)


def test_labels_match_pixels_and_captions():
    n = 360
    ex = synthetic.render(5, "train", np.arange(n), 32)
    # The shape's colour: mean of the pixels far from the grey background.
    img = ex.image_BHWC.astype(float) / 255
    sat = img.max(-1) - img.min(-1)
    palette = np.asarray(list(synthetic.COLOURS.values()))
    for i in range(n):
        mean = img[i][sat[i] > 0.4].mean(0)
        assert np.argmin(((palette - mean) ** 2).sum(1)) == ex.colour_B[i]
    assert np.array_equal(ex.label_B, ex.shape_B * 6 + ex.colour_B)
    np.testing.assert_array_equal(np.bincount(ex.label_B, minlength=36) > 0, True)

    caps = synthetic.captions(5, "train", ex, np.arange(n))
    colours = list(synthetic.COLOURS)
    for i, cap in enumerate(caps):
        words = f" {cap} ".replace(",", " ")
        shape = synthetic.SHAPES[ex.shape_B[i]]
        assert any(f" {w} " in words for w in synthetic._SHAPE_WORDS[shape]), cap
        assert any(f" {w} " in words for w in synthetic._COLOUR_WORDS[colours[ex.colour_B[i]]]), cap
    assert len(set(caps)) > n // 3  # varied wording


def _all_captions() -> list[str]:
    """Every caption the generator can write."""
    s = synthetic
    return sorted({template.format(s=sw, c=cw, z=zw, p=p, q=q, b="grey")
                   for template in s._CAPTIONS for shape in s.SHAPES for colour in s.COLOURS
                   for size in s.SIZES for (p, q) in s._POSITION_WORDS
                   for sw in s._SHAPE_WORDS[shape] for cw in s._COLOUR_WORDS[colour]
                   for zw in s._SIZE_WORDS[size]})


def test_every_caption_fits_the_tiny_context():
    caps = _all_captions()
    ids = tokenize(caps, 32)
    assert (ids != 0).sum(1).max() <= 16  # ViT-tiny's text context, SOT and EOT included
