"""The pipeline: disjoint host shares, exact resume (also after SIGKILL), mixtures, transforms."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from clipjax.data import pipeline, sources, stages, transforms
from reference import torchvision_transforms
from test_data_sources import (caption, captions_of, jpeg_bytes, write_caption_folder, write_tar,
                               write_wds)


def _iterator(spec, host=0, hosts=1, batch=4, workers=0, **kw):
    return pipeline.make_iterator(spec, global_batch_size=batch * hosts, image_size=16,
                                  train=kw.pop("train", True), seed=kw.pop("seed", 0),
                                  process_index=host, process_count=hosts, num_workers=workers,
                                  **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])


# ---------------------------------------------------------------------------------------
# Host shares and determinism.


@pytest.mark.parametrize("kind", ["folder", "wds"])
def test_hosts_read_disjoint_shares_covering_each_epoch_once(tmp_path, kind):
    # 24 samples, 3 hosts, 4 per host batch: an epoch is 2 batches on every host.
    if kind == "folder":
        spec = write_caption_folder(tmp_path / "d", 24)
        kw = {}
    else:
        spec = write_wds(tmp_path / "d", shards=6, per_shard=4)
        kw = {"shuffle_window": 4, "open_shards": 2}
    epochs = [[], []]
    for host in range(3):
        batches = _take(_iterator(spec, host, 3, **kw), 4)
        for e in range(2):
            epochs[e] += [c for b in batches[2 * e:2 * e + 2] for c in captions_of(b)]
        # The same seed gives the same batches; another seed another order.
        _assert_same_batches(_take(_iterator(spec, host, 3, **kw), 4), batches)
    for e in range(2):
        assert sorted(epochs[e]) == sorted(caption(i) for i in range(24))
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    other = captions_of(next(_iterator(spec, 0, 3, seed=1, **kw)))
    assert other != epochs[0][:4]


def test_evaluation_pass_reads_each_record_once(tmp_path):
    spec = write_caption_folder(tmp_path / "d", 10)
    seen = []
    for host in range(4):  # 10 records over 4 hosts: shares of 3, 3, 2, 2, in order
        it = _iterator(spec, host, 4, batch=2, train=False)
        share = [c for b in it for c in captions_of(b)]
        assert share == [caption(i) for i in range(host, 10, 4)]
        seen += share
    assert sorted(seen) == sorted(caption(i) for i in range(10))


def test_mixture_follows_the_weights(tmp_path):
    a = write_caption_folder(tmp_path / "a", 8)
    b = write_wds(tmp_path / "b", shards=2, per_shard=4, start=100)
    it = _iterator(f"{a}?weight=3; {b}", batch=16, shuffle_window=8)  # as a config writes it
    names = [c for batch in _take(it, 4) for c in captions_of(batch)]
    from_b = sum(int(c.split()[1]) >= 100 for c in names)
    assert (len(names) - from_b, from_b) == (48, 16)
    (tmp_path / "c" / "x").mkdir(parents=True)
    (tmp_path / "c" / "x" / "0.jpg").write_bytes(jpeg_bytes(0))
    with pytest.raises(ValueError, match="different fields"):
        _iterator([a, f"imagefolder:{tmp_path}/c"])


# ---------------------------------------------------------------------------------------
# Resume: exactly the batches an uninterrupted run reads next.


def _resume_data(tmp_path, kind) -> tuple[list[str], dict]:
    if kind == "folder":
        spec = write_caption_folder(tmp_path / "f", 11)
        for i in (2, 7):
            os.remove(tmp_path / "f" / f"{i:04d}.txt")  # skipped: missing caption
        return [spec], {}
    spec = write_wds(tmp_path / "w", shards=5, per_shard=3)
    write_tar(tmp_path / "w" / "00005.tar",
              [("bad.jpg", b"junk"), ("bad.txt", b"x"), ("g.jpg", jpeg_bytes(99)),
               ("g.txt", caption(99).encode())])
    spec = spec.replace("00004", "00005")
    if kind == "wds":
        return [spec], {"shuffle_window": 5, "open_shards": 2}
    return [spec + "?weight=2", _resume_data(tmp_path, "folder")[0][0]], {"shuffle_window": 5}


@pytest.mark.parametrize("kind", ["folder", "wds", "mixture"])
def test_resume_reads_exactly_what_an_uninterrupted_run_reads(tmp_path, monkeypatch, kind):
    # Workers report every skip in its own short batch, so resumes also land mid-batch.
    monkeypatch.setattr(stages, "MAX_SKIPS_PER_BATCH", 1)
    specs, kw = _resume_data(tmp_path, kind)
    hosts, steps = 2, 9  # several epochs of data per host
    for host in range(hosts):
        it = _iterator(specs, host, hosts, batch=3, **kw)
        want = _take(it, steps)
        for k in (1, 4, 7):
            first = _iterator(specs, host, hosts, batch=3, **kw)
            head = _take(first, k)
            state = json.loads(json.dumps(first.get_state()))
            resumed = _iterator(specs, host, hosts, batch=3, **kw)
            resumed.set_state(state)
            _assert_same_batches(head + _take(resumed, steps - k), want)
            assert resumed.stats() == it.stats()
        assert sum(it.stats().values()) > 0


def test_uint8_batches_are_the_float_batches_before_normalisation(tmp_path):
    spec = write_caption_folder(tmp_path / "d", 6)
    floats = next(_iterator(spec, batch=6))
    pixels = next(_iterator(spec, batch=6, image_dtype="uint8"))
    assert pixels["image"].dtype == np.uint8 and floats["image"].dtype == np.float32
    np.testing.assert_array_equal(transforms.normalize(pixels["image"]), floats["image"])
    np.testing.assert_array_equal(pixels["text"], floats["text"])


def test_set_state_rejects_other_settings(tmp_path):
    spec = write_caption_folder(tmp_path / "d", 4)
    state = _iterator(spec, 0, 2).get_state()
    with pytest.raises(ValueError, match="written with process_count=2, this iterator has "
                                         "process_count=1"):
        _iterator(spec, 0, 1, batch=8).set_state(state)
    with pytest.raises(ValueError, match="Not a clipjax data-iterator state"):
        _iterator(spec).set_state({"next_index": 3})


_CHILD = textwrap.dedent("""
    import hashlib, json, sys
    from clipjax.data import pipeline
    it = pipeline.make_iterator(sys.argv[1], global_batch_size=6, image_size=16, train=True,
                                seed=3, process_index=1, process_count=2, num_workers=2,
                                shuffle_window=4, open_shards=2)
    i = 0
    while True:
        batch = next(it)
        i += 1
        digest = hashlib.sha256(batch["image"].tobytes() + batch["text"].tobytes()).hexdigest()
        print(json.dumps({"batch": i, "digest": digest, "state": it.get_state()}), flush=True)
""")


def _digest(batch) -> str:
    return hashlib.sha256(batch["image"].tobytes() + batch["text"].tobytes()).hexdigest()


def test_killed_run_resumes_exactly_with_worker_processes(tmp_path):
    """SIGKILL a training process and its 2 grain workers mid-epoch, then resume its state.

    The killed process read batches 1-4 without interruption. A fresh iterator resumed from
    its state after batch 2 must give its batches 3 and 4 and then run on; restored in place
    to the state the killed process saved last, it must repeat its own batches 5-8.
    """
    spec = write_wds(tmp_path / "w", shards=8, per_shard=5)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, spec], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    lines = []
    try:
        # Host 1 reads 20 samples an epoch, 3 a batch: batch 4 ends mid-epoch, and the
        # resumed run below crosses into the second epoch.
        while len(lines) < 4:
            line = child.stdout.readline()
            assert line, "the training process ended early"
            lines.append(json.loads(line))
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the child and every worker it started
        child.wait(timeout=60)
    resumed = pipeline.make_iterator(spec, global_batch_size=6, image_size=16, train=True,
                                     seed=3, process_index=1, process_count=2, num_workers=2,
                                     shuffle_window=4, open_shards=2)
    with resumed:
        resumed.set_state(lines[1]["state"])
        run = [_digest(b) for b in _take(resumed, 6)]
        assert run[:2] == [line["digest"] for line in lines[2:]]
        resumed.set_state(lines[3]["state"])
        assert [_digest(b) for b in _take(resumed, 4)] == run[2:]


# ---------------------------------------------------------------------------------------
# The training transform.


def _photo(width, height, seed=0) -> Image.Image:
    y_HW, x_HW = np.mgrid[0:height, 0:width] / max(width, height)
    rng = np.random.default_rng(seed)
    phases = rng.uniform(0, 3, 3)
    img_HWC = np.stack([np.sin(7 * x_HW + s) * np.cos(5 * y_HW - s) for s in phases], -1)
    return Image.fromarray(((img_HWC + 1) * 127.5).astype(np.uint8))


def test_training_crop_matches_torchvision_for_a_fixed_draw():
    """The pipeline's training sample is torchvision's resized_crop of the box drawn from the
    sample's own generator, normalised with CLIP's mean and std."""
    T = torchvision_transforms()
    image = _photo(300, 200)
    buf = io.BytesIO()
    image.save(buf, "PNG")  # lossless, and not a JPEG: no reduced-scale decoding
    prepare = stages.Prepare(image_size=224, train=True, context_length=77, has_text=False,
                             has_label=False, max_pixels=sources.DEFAULT_MAX_PIXELS)
    ours_HWC = prepare({"key": "k", "image": buf.getvalue(), "rng": [0, 0, 0, 5]})["image"]
    left, top, w, h = transforms.random_resized_crop_box(300, 200,
                                                         np.random.default_rng([0, 0, 0, 5]))
    assert (w, h) != (300, 200)  # a real crop
    tv = T.functional.resized_crop(image, top, left, h, w, [224, 224],
                                   T.InterpolationMode.BICUBIC)
    assert ours_HWC.dtype == np.uint8
    np.testing.assert_array_equal(ours_HWC, np.asarray(tv))
    # The batcher's table lookup normalises as the arithmetic does, bit for bit.
    mean_C, std_C = np.asarray(transforms.CLIP_MEAN), np.asarray(transforms.CLIP_STD)
    np.testing.assert_allclose(transforms.normalize_uint8(ours_HWC),
                               (ours_HWC / 255.0 - mean_C) / std_C, atol=1e-5)
    np.testing.assert_array_equal(transforms.normalize_uint8(ours_HWC),
                                  transforms.normalize(ours_HWC))


def test_training_crop_draws_stay_in_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(300):
        # Images whose own aspect ratio is in range (the fallback below covers the rest).
        width = int(rng.integers(50, 600))
        height = int(rng.integers(int(np.ceil(width * 3 / 4)), int(width * 4 / 3) + 1))
        left, top, w, h = transforms.random_resized_crop_box(width, height, rng)
        assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
        # int(round(.)) of each side moves area and ratio by at most half a pixel per side.
        assert 0.9 * width * height - (w + h) <= w * h <= width * height
        assert 3 / 4 - 1 / h <= w / h <= 4 / 3 + 1 / h
    # Too wide for any try: the largest central crop at the extreme ratio.
    assert transforms.random_resized_crop_box(1000, 10, rng) == (493, 0, 13, 10)


def test_large_jpegs_decode_at_reduced_scale(monkeypatch):
    """JPEG draft decoding gives the same crop, close in value, at a fraction of the work."""
    image = _photo(1200, 900, seed=1)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    drafts = []
    original = JpegImageFile.draft
    monkeypatch.setattr(JpegImageFile, "draft",
                        lambda self, *a: drafts.append(a) or original(self, *a))
    prepare = stages.Prepare(image_size=224, train=True, context_length=77, has_text=True,
                                has_label=False, max_pixels=sources.DEFAULT_MAX_PIXELS)
    record = {"key": "k", "image": buf.getvalue(), "text": "a photo", "label": None,
              "rng": [0, 0, 0, 7]}
    fast_HWC = prepare(dict(record))["image"]  # uint8; the batcher normalises
    assert drafts and drafts[0][1][0] < 1200  # libjpeg was asked for a smaller picture
    full = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    rng = np.random.default_rng([0, 0, 0, 7])
    box = transforms.random_resized_crop_box(1200, 900, rng)
    full_HWC = np.asarray(transforms.resized_crop(full, box, 224))
    diff = np.abs(fast_HWC.astype(int) - full_HWC)
    assert diff.mean() < 1.0 and np.percentile(diff, 99) < 4, (diff.mean(), diff.max())
