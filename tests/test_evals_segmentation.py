"""Segmentation metrics against scikit-learn and hand-computed conventions; inference modes
(whole, slide, flip, scales) against each other with scoring functions whose answer is known."""

import numpy as np
import pytest

from clipjax.evals import segmentation as seg


def _onehot_fn(num_classes, calls=None, scale=8.0):
    """Per-pixel scores from the pixel alone (translation and flip equivariant)."""
    def fn(images):
        if calls is not None:
            calls.append(images.shape)
        c = (images[..., 0].astype(np.int64) * 7 + images[..., 1]) % num_classes
        return scale * np.eye(num_classes, dtype=np.float32)[c]
    return fn


def test_iou_matches_scikit_learn():
    from sklearn.metrics import confusion_matrix, jaccard_score

    rng = np.random.default_rng(0)
    c = 5
    target = rng.integers(0, c, (2, 20, 24))
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, c, target.shape))
    target[0, :3] = seg.IGNORE
    conf = sum(seg.confusion_matrix(p, t, c) for p, t in zip(pred, target))
    keep = target != seg.IGNORE
    y_true, y_pred = target[keep], pred[keep]
    np.testing.assert_array_equal(conf, confusion_matrix(y_true, y_pred, labels=range(c)))
    out = seg.scores(conf)
    np.testing.assert_allclose(out["iou"], jaccard_score(y_true, y_pred, labels=range(c),
                                                         average=None))
    np.testing.assert_allclose(out["miou"], jaccard_score(y_true, y_pred, labels=range(c),
                                                          average="macro"))
    np.testing.assert_allclose(out["miou_zeros"], out["miou"])  # every class present
    np.testing.assert_allclose(out["pixel_accuracy"], np.mean(y_true == y_pred))
    assert seg.IGNORE == -1


def test_the_two_miou_conventions_differ_on_absent_classes():
    # Class 2 is in neither target nor prediction: IoU 1/2 and 2/3, then nothing.
    conf = seg.confusion_matrix(np.array([[0, 1, 1, 1]]), np.array([[0, 0, 1, 1]]), 3)
    np.testing.assert_array_equal(conf, [[1, 1, 0], [0, 2, 0], [0, 0, 0]])
    out = seg.scores(conf)
    assert out["pixel_accuracy"] == 0.75
    np.testing.assert_allclose(out["iou"][:2], [1 / 2, 2 / 3])
    assert np.isnan(out["iou"][2])
    np.testing.assert_allclose(out["miou"], (1 / 2 + 2 / 3) / 2)  # mmseg: skipped
    np.testing.assert_allclose(out["miou_zeros"], (1 / 2 + 2 / 3) / 3)  # LSeg: counts 0
    text = seg.report(out, ["other", "circle", "square"], "toy")
    assert "58.33" in text and "38.89" in text and "mmseg" in text and "LSeg" in text


def test_ignored_pixels_count_nowhere_and_bad_classes_are_refused():
    target = np.array([[0, 1, -1, -1]])
    conf = seg.confusion_matrix(np.array([[0, 1, 1, 0]]), target, 2)
    np.testing.assert_array_equal(conf, np.eye(2))
    assert seg.scores(conf)["miou"] == 1.0
    with pytest.raises(ValueError, match="outside 0..1"):
        seg.confusion_matrix(np.array([[0, 1]]), np.array([[0, 255]]), 2)
    with pytest.raises(ValueError, match="mask's size"):
        seg.confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 2)


def test_resize_matches_jax_linear_without_antialiasing():
    import jax

    x = np.random.default_rng(1).random((1, 7, 10, 2)).astype(np.float32)
    for size in [(15, 23), (4, 5), (7, 10)]:
        want = jax.image.resize(x, (1, *size, 2), "linear", antialias=False)
        np.testing.assert_allclose(seg.resize(x, size), want, atol=1e-5)


def test_slide_equals_whole_for_a_translation_equivariant_fn():
    rng = np.random.default_rng(2)
    for shape in [(37, 53), (10, 12)]:  # overlapping windows; an image smaller than a crop
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        calls = []
        whole = seg.predict(_onehot_fn(4), image)
        slide = seg.predict(_onehot_fn(4, calls), image, mode="slide", crop=16, stride=11,
                            max_batch=64)
        assert whole.shape == (*shape, 4) and whole.dtype == np.float32
        np.testing.assert_allclose(slide, whole, atol=1e-6)
        assert len(calls) == 1 and calls[0][1:3] == (16, 16)  # all windows in one call
    assert calls[0][0] == 1
    calls = []
    seg.predict(_onehot_fn(4, calls), rng.integers(0, 256, (37, 53, 3), dtype=np.uint8),
                mode="slide", crop=16, stride=11, max_batch=5, flip=True)
    assert calls[0][0] == 5 and sum(s[0] for s in calls) == 2 * 3 * 5  # 3 x 5 windows, 2 views


def test_flip_averages_a_mirrored_view():
    image = np.random.default_rng(3).integers(0, 256, (9, 14, 3), dtype=np.uint8)
    plain = seg.predict(_onehot_fn(3), image)
    np.testing.assert_allclose(seg.predict(_onehot_fn(3), image, flip=True), plain, atol=1e-6)

    def ramp(images):  # class 0 grows to the right: not flip equivariant
        x = np.broadcast_to(np.arange(images.shape[2], dtype=np.float32), images.shape[:3])
        return np.stack([x / 4, np.zeros_like(x)], -1)

    p = seg.predict(ramp, image)
    both = seg.predict(ramp, image, flip=True)
    np.testing.assert_allclose(both, (p + p[:, ::-1]) / 2, atol=1e-6)
    assert not np.allclose(both, p)


def test_scales_short_side_and_fixed_size_models_return_the_original_size():
    image = np.random.default_rng(4).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    seen = []

    def coarse(images):  # a stride-4 model: scores at a quarter of the resolution
        seen.append(images.shape[1:3])
        b, h, w, _ = images.shape
        x = images[:, :h // 4 * 4, :w // 4 * 4].reshape(b, h // 4, 4, w // 4, 4, 3)
        return x.mean((2, 4)) / 64.0

    probs = seg.predict(coarse, image, scales=(0.5, 1.0, 1.5), flip=True, short_side=20)
    assert probs.shape == (30, 45, 3)
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
    assert seen == [(10, 15), (20, 30), (30, 45)]
    seen.clear()
    assert seg.predict(coarse, image, crop=32).shape == (30, 45, 3)
    assert seen == [(32, 32)]  # whole mode with crop: the fixed input size
    with pytest.raises(ValueError, match="crop"):
        seg.predict(coarse, image, mode="slide")


def _dataset(n, num_classes, seed=5, shape=(12, 16)):
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        mask = (image[..., 0].astype(np.int64) * 7 + image[..., 1]) % num_classes
        mask[0, 0] = seg.IGNORE
        yield f"{i}", image, mask


def test_evaluate_accumulates_one_confusion_matrix():
    calls = []
    out = seg.evaluate(_onehot_fn(4, calls), _dataset(5, 4), 4)
    assert out["miou"] == out["pixel_accuracy"] == 1.0 and out["examples"] == 5
    assert out["confusion"].sum() == 5 * (12 * 16 - 1) and len(calls) == 5
    calls.clear()
    batched = seg.evaluate(_onehot_fn(4, calls), _dataset(5, 4), 4, batch_size=2, flip=True,
                           max_examples=4)
    assert batched["examples"] == 4 and len(calls) == 2 and calls[0][0] == 4  # 2 images x 2
    np.testing.assert_array_equal(batched["confusion"],
                                  seg.evaluate(_onehot_fn(4), _dataset(4, 4), 4)["confusion"])

    def unsure_foreground(images):  # classes 1..3 scored; class 0 pixels get flat scores
        scores = _onehot_fn(4)(images)
        return scores[..., 1:]

    with_bg = seg.evaluate(unsure_foreground, _dataset(3, 4), 4, background=0.5)
    assert with_bg["miou"] == 1.0
    with pytest.raises(ValueError, match="needs 3"):
        seg.evaluate(_onehot_fn(4), _dataset(1, 4), 4, background=0.5)
