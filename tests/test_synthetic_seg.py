"""The built-in segmentation data: masks that match the drawn shapes, determinism, resume,
captions whose shape words are nouns, GroupViT prompts, the evaluation set and its files."""

import json

import numpy as np
import pytest

from clipjax import tokenize
from clipjax.data import synthetic, synthetic_seg as ss


def _sdf_BSHW(ex, s):
    """Each slot's signed distance, recomputed in float64 from the recorded geometry."""
    b, n = ex.shapes_BS.shape
    out = np.full((b, n, s, s), np.inf)
    grid = np.arange(s) + 0.5
    for i in range(b):
        for k in range(ex.count_B[i]):
            (cx, cy), r, a = ex.centre_BS2[i, k], ex.radius_BS[i, k], ex.angle_BS[i, k]
            x, y = grid[None, :] - cx, grid[:, None] - cy
            dx, dy = np.cos(a) * x + np.sin(a) * y, -np.sin(a) * x + np.cos(a) * y
            out[i, k] = synthetic._sdf(synthetic.SHAPES[ex.shapes_BS[i, k]], dx, dy, r)
    return out


def test_masks_match_the_drawn_shapes():
    s = 32
    ex = ss.render(0, "train", np.arange(24), s)
    assert ex.image_BHWC.dtype == np.uint8 and ex.image_BHWC.shape == (24, s, s, 3)
    assert ex.mask_BHW.dtype == np.int32 and ex.mask_BHW.shape == (24, s, s)
    assert set(ex.count_B) == {1, 2, 3}
    assert np.all((ex.shapes_BS >= 0) == (np.arange(3)[None] < ex.count_B[:, None]))
    sdf = _sdf_BSHW(ex, s)
    # The last slot whose shape covers the pixel (sdf <= 0) names it, else the background.
    expected = np.zeros_like(ex.mask_BHW)
    for k in range(3):
        expected = np.where(sdf[:, k] <= 0, ex.shapes_BS[:, k, None, None] + 1, expected)
    sure = np.all(np.abs(sdf) > 1e-3, axis=1)  # float32 vs float64 can disagree on the edge
    np.testing.assert_array_equal(ex.mask_BHW[sure], expected[sure])
    assert np.mean(ex.mask_BHW > 0) > 0.05
    # Deep inside the topmost shape a pixel is exactly that shape's colour, not background.
    palette = np.asarray(list(synthetic.COLOURS.values()))
    for i in range(24):
        for k in range(ex.count_B[i]):
            inner = (sdf[i, k] < -1) & np.all(sdf[i, k + 1:] > 1, axis=0)
            if inner.any():
                pixels = ex.image_BHWC[i][inner].astype(float) / 255
                assert np.ptp(pixels, axis=0).max() < 0.01
                assert np.abs(pixels[0] - palette[ex.colours_BS[i, k]]).max() <= 0.09


def test_examples_are_pure_functions_of_the_index_and_splits_differ():
    a = ss.render(3, "train", np.arange(10), 32)
    b = ss.render(3, "train", np.arange(4, 7), 32)
    np.testing.assert_array_equal(a.image_BHWC[4:7], b.image_BHWC)
    np.testing.assert_array_equal(a.mask_BHW[4:7], b.mask_BHW)
    assert (ss.captions(3, "train", a, np.arange(10))[4:7]
            == ss.captions(3, "train", b, np.arange(4, 7)))
    held = ss.render(3, "held_out", np.arange(10), 32)
    assert not any(np.array_equal(x, y) for x in a.image_BHWC for y in held.image_BHWC)
    with pytest.raises(ValueError, match="choose one of train, held_out"):
        ss.render(0, "test", np.arange(2), 32)


def test_iterator_batching_resume_and_hosts():
    it = ss.SyntheticSegIterator(4, image_size=32, seed=1)
    first, second = next(it), next(it)
    whole = next(ss.SyntheticSegIterator(8, image_size=32, seed=1))
    assert set(whole) == {"image", "mask", "text"}
    assert whole["image"].dtype == np.uint8 and whole["mask"].dtype == np.int32
    assert whole["text"].dtype == np.int32 and whole["text"].shape == (8, 16)
    for k in whole:
        np.testing.assert_array_equal(np.concatenate([first[k], second[k]]), whole[k])
    parts = [next(ss.SyntheticSegIterator(8, image_size=32, seed=1, process_index=p,
                                          process_count=2)) for p in range(2)]
    for k in whole:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])

    it = ss.SyntheticSegIterator(4, image_size=32, seed=1, prompts=2)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = next(it)
    resumed = ss.SyntheticSegIterator(4, image_size=32, seed=1, prompts=2)
    resumed.set_state(state)
    got = next(resumed)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])
    with pytest.raises(ValueError, match="written with seed=1, this run has seed=2"):
        ss.SyntheticSegIterator(4, image_size=32, seed=2).set_state(state)
    masks = list(ss.SyntheticSegIterator(4, image_size=32, split="held_out", num_examples=6,
                                         fields=("mask",)))
    assert [sorted(m) for m in masks] == [["mask"]] * 2 and len(masks[1]["mask"]) == 2


def test_every_shape_word_in_the_captions_is_a_noun():
    from textblob.en.taggers import PatternTagger

    tagger = PatternTagger()
    index = np.arange(150)
    ex = ss.render(0, "train", index, 32)
    texts, nouns = ss._captions(0, "train", ex, index)
    colour_names = list(synthetic.COLOURS)
    for text, words, i in zip(texts, nouns, index):
        tags = tagger.tag(text)
        for word in words:  # the head (last) word of each shape word is NN or NNS
            assert any(w == word.split()[-1] and t in ("NN", "NNS") for w, t in tags), (text, tags)
        # No colour word is mistaken for a noun, so noun extraction finds shapes only.
        found = {w for w, t in tags if t in ("NN", "NNS")} - {"photo", "picture"}
        assert found == {w.split()[-1] for w in words}, (text, tags)
        # Every shape is named with its colour.
        for k in range(ex.count_B[i]):
            shape, colour = synthetic.SHAPES[ex.shapes_BS[i, k]], colour_names[ex.colours_BS[i, k]]
            assert any(f"{c} {s}" in text for c in ss._CAPTION_COLOURS[colour]
                       for s in ss._CAPTION_SHAPES[shape]), text
    assert len(set(texts)) > 100


def test_label_words():
    assert ss.label_words() == ("other",) + synthetic.SHAPES
    assert ss.label_words("synonym") == ("background", "disc", "box", "wedge", "rhombus",
                                         "plus sign", "hoop")
    assert ss.CLASSES[0] == "background" and len(ss.CLASSES) == 7
    with pytest.raises(ValueError, match="canonical"):
        ss.label_words("fancy")


def test_prompts_take_distinct_nouns_then_the_caption():
    ctx = 16
    it = ss.SyntheticSegIterator(16, image_size=32, context_length=ctx, prompts=3)
    b = next(it)
    assert b["prompts"].shape == (16, 3, ctx) and b["prompts"].dtype == np.int32
    ex = ss.render(0, "train", np.arange(16), 32)
    texts, nouns = ss._captions(0, "train", ex, np.arange(16))
    p = ss.prompts(0, "train", np.arange(16), texts, nouns, 3)
    np.testing.assert_array_equal(tokenize([t for row in p for t in row], ctx).reshape(16, 3, ctx),
                                  b["prompts"])
    for row, text, words in zip(p, texts, nouns):
        distinct = list(dict.fromkeys(words))
        assert row[len(distinct):] == [text] * (3 - len(distinct))
        assert all(any(w in t for t in row[:len(distinct)]) for w in distinct)
        assert all(t != text for t in row[:len(distinct)])
    # A given noun function decides the nouns; slots past its nouns hold the caption.
    b = next(ss.SyntheticSegIterator(4, image_size=32, context_length=ctx, prompts=2,
                                     nouns_fn=lambda t: ["thing", "thing"]))
    caption_ids = next(ss.SyntheticSegIterator(4, image_size=32, context_length=ctx))["text"]
    np.testing.assert_array_equal(b["prompts"][:, 1], caption_ids)
    assert not np.array_equal(b["prompts"][:, 0], caption_ids)


def test_eval_set_and_segfolder(tmp_path):
    from PIL import Image

    data = ss.SyntheticSegSet(5, image_size=32)
    items = list(data)
    assert len(data) == len(items) == 5 and data.classnames == ss.CLASSES
    ex = ss.render(0, "held_out", np.arange(5), 32)
    key, image, mask = items[3]
    assert key == "00003"
    np.testing.assert_array_equal(image, ex.image_BHWC[3])
    np.testing.assert_array_equal(mask, ex.mask_BHW[3])
    folder = ss.write_dataset(tmp_path / "seg", 3, image_size=32)
    assert (tmp_path / "seg" / "classes.txt").read_text().split("\n")[:7] == list(ss.CLASSES)
    saved = Image.open(tmp_path / "seg" / "masks" / "00002.png")
    assert saved.mode == "L"
    np.testing.assert_array_equal(np.asarray(saved), ex.mask_BHW[2])
    np.testing.assert_array_equal(np.asarray(Image.open(f"{folder}/images/00002.png")),
                                  ex.image_BHWC[2])
