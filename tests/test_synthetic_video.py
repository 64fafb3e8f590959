"""The built-in synthetic videos: purity, the time-reversal mirror that hides direction from a
mean over frames, captions that name the motion, resume, host split, the held-out set."""

import json

import numpy as np
import pytest

from clipjax import tokenize
from clipjax.data import synthetic_video as sv

# Words only one motion's captions use (up's "upwards" and down's "downwards" included).
_KEYWORDS = (("left",), ("right",), ("up", "rise", "rising", "climb"),
             ("down", "fall", "sink"), ("grow", "bigger", "expand", "swell"),
             ("shrink", "smaller", "contract", "dwindl"))


def test_classes_templates_and_mirror():
    assert sv.CLASSNAMES == ("moving left", "moving right", "moving up", "moving down",
                             "growing", "shrinking")
    assert len(sv.ACTION_TEMPLATES) == len(set(sv.ACTION_TEMPLATES)) == 16
    assert all(t.count("{}") == 1 for t in sv.ACTION_TEMPLATES)
    np.testing.assert_array_equal(sv.MIRROR[sv.MIRROR], np.arange(6))  # an involution
    assert all(sv.MIRROR != np.arange(6))


def test_videos_are_pure_functions_of_seed_split_and_index():
    idx = np.array([5, 0, 17, 3, 99, 42])
    whole = sv.render(7, "train", idx, 6, 24)
    again = sv.render(7, "train", idx, 6, 24)
    np.testing.assert_array_equal(whole.frames_BTHWC, again.frames_BTHWC)
    for k in range(len(idx)):  # each video alone, as in any other batch
        one = sv.render(7, "train", idx[k:k + 1], 6, 24)
        np.testing.assert_array_equal(one.frames_BTHWC[0], whole.frames_BTHWC[k])
        assert one.motion_B[0] == whole.motion_B[k] and one.shape_B[0] == whole.shape_B[k]
    assert whole.frames.shape == (6, 6, 24, 24, 3) and whole.frames.dtype == np.uint8
    assert whole.motion.dtype == np.int32
    # Other seeds and the test split are other videos; frames change over time.
    assert not np.array_equal(sv.render(8, "train", idx, 6, 24).frames, whole.frames)
    assert not np.array_equal(sv.render(7, "test", idx, 6, 24).frames, whole.frames)
    assert all(not np.array_equal(v[0], v[-1]) for v in whole.frames)
    with pytest.raises(ValueError, match="choose train or test"):
        sv.render(0, "val", idx, 6, 24)


def test_time_reversed_video_is_the_mirror_motion():
    idx = np.arange(64)
    for m in range(6):
        video = sv.render(3, "train", idx, 5, 16, motion_B=m).frames
        mirror = sv.render(3, "train", idx, 5, 16, motion_B=sv.MIRROR[m]).frames
        np.testing.assert_array_equal(video, mirror[:, ::-1])
    drawn = sv.render(3, "train", idx, 5, 16)
    np.testing.assert_array_equal(sv.render(3, "train", idx, 5, 16, drawn.motion_B).frames,
                                  drawn.frames)


def _nearest_centroid_accuracy(x_BF, y_B):
    """Fit class means on the first half, score the second half."""
    h = len(y_B) // 2
    c0, c1 = x_BF[:h][~y_B[:h]].mean(0), x_BF[:h][y_B[:h]].mean(0)
    pred = ((x_BF[h:] - c1) ** 2).sum(1) < ((x_BF[h:] - c0) ** 2).sum(1)
    return (pred == y_B[h:]).mean()


def test_frame_mean_cannot_tell_direction_but_frame_difference_can():
    n = 6000  # about 2000 videos per mirror pair, their motions as drawn
    videos = [sv.render(1, "train", np.arange(lo, lo + 500), 4, 16) for lo in range(0, n, 500)]
    motion_B = np.concatenate([v.motion_B for v in videos])
    frames = np.concatenate([v.frames_BTHWC for v in videos]).astype(np.float32) / 255
    for a, b in ((0, 1), (2, 3), (4, 5)):
        keep = (motion_B == a) | (motion_B == b)
        y_B, f = motion_B[keep] == b, frames[keep]
        assert len(y_B) > 1800
        mean_acc = _nearest_centroid_accuracy(f.mean(1).reshape(len(f), -1), y_B)
        diff_acc = _nearest_centroid_accuracy((f[:, -1] - f[:, 0]).reshape(len(f), -1), y_B)
        assert mean_acc < 0.56, (sv.MOTIONS[a], sv.MOTIONS[b], mean_acc)
        assert diff_acc > 0.95, (sv.MOTIONS[a], sv.MOTIONS[b], diff_acc)


def test_captions_name_colour_shape_and_motion():
    idx = np.arange(600)
    videos = sv.render(2, "train", idx, 2, 8)
    variants = [sv.captions(2, "train", videos, idx, variant=v) for v in range(3)]
    assert variants[0] == sv.captions(2, "train", videos, idx)  # deterministic
    assert sum(a != b for a, b in zip(variants[0], variants[1])) > 500  # other wordings
    colour_words = {c: w for c, w in zip(range(6), sv._COLOUR_WORDS.values())}
    for caps in variants:
        for i, cap in enumerate(caps):
            m = videos.motion_B[i]
            assert any(k in cap for k in _KEYWORDS[m]), cap
            assert not any(k in cap for j in range(6) if j != m for k in _KEYWORDS[j]), cap
            assert any(w in cap for w in colour_words[videos.colour_B[i]]), cap
            shape = sv.SHAPES[videos.shape_B[i]]
            assert any(w in cap for w in sv._SHAPE_WORDS_V[shape]), cap
    # The motion survives the default 16-token context (no caption is cut).
    ids = tokenize([c for caps in variants for c in caps], 32)
    assert (ids != 0).sum(1).max() <= 16
    assert len({c for caps in variants for c in caps}) > 1000


def test_batch_contract_and_template_text():
    it = sv.SyntheticVideoIterator(12, num_frames=4, image_size=16, seed=3)
    b = next(it)
    assert b["video"].dtype == np.uint8 and b["video"].shape == (12, 4, 16, 16, 3)
    assert b["frame_mask"].dtype == bool and b["frame_mask"].shape == (12, 4)
    assert b["frame_mask"].all()
    assert b["text"].dtype == np.int32 and b["text"].shape == (12, 16)
    assert b["label"].dtype == np.int32
    videos = sv.render(3, "train", np.arange(12), 4, 16)
    np.testing.assert_array_equal(b["video"], videos.frames)
    np.testing.assert_array_equal(b["label"], videos.motion)
    np.testing.assert_array_equal(
        b["text"], tokenize(sv.captions(3, "train", videos, np.arange(12)), 16))

    t = next(sv.SyntheticVideoIterator(240, num_frames=2, image_size=8, seed=3, text="template"))
    used = set()
    for ids, label in zip(t["text"], t["label"]):
        options = tokenize([x.format(sv.CLASSNAMES[label]) for x in sv.ACTION_TEMPLATES], 16)
        match = np.flatnonzero((options == ids).all(1))
        assert len(match) >= 1
        used.add(int(match[0]))
    assert len(used) == 16  # a template drawn per sample
    with pytest.raises(ValueError, match="caption or template"):
        sv.SyntheticVideoIterator(4, text="prompt")


def test_resume_equals_an_uninterrupted_run():
    kw = dict(num_frames=3, image_size=8, seed=1)
    it = sv.SyntheticVideoIterator(6, **kw)
    first, second = next(it), next(it)
    whole = next(sv.SyntheticVideoIterator(12, **kw))
    for k in whole:
        np.testing.assert_array_equal(np.concatenate([first[k], second[k]]), whole[k])

    it = sv.SyntheticVideoIterator(6, **kw)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it), next(it)]
    resumed = sv.SyntheticVideoIterator(6, **kw)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    for other, name in ((dict(batch_size=8), "global_batch=6"),
                        (dict(num_frames=4), "num_frames=3"), (dict(image_size=16), "image_size=8")):
        args = {"batch_size": 6, **kw, **other}
        with pytest.raises(ValueError, match=f"written with {name}, this run has"):
            sv.SyntheticVideoIterator(**args).set_state(state)


def test_hosts_split_the_global_batch_into_disjoint_rows():
    kw = dict(num_frames=2, image_size=8, seed=0)
    whole = sv.SyntheticVideoIterator(12, **kw)
    hosts = [sv.SyntheticVideoIterator(12, process_index=p, process_count=3, **kw)
             for p in range(3)]
    for _ in range(2):
        w, parts = next(whole), [next(h) for h in hosts]
        for k in w:
            assert all(len(p[k]) == 4 for p in parts)
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), w[k])
    with pytest.raises(ValueError, match="multiple of 5"):
        sv.SyntheticVideoIterator(12, process_count=5)


def test_eval_set_covers_every_video_once():
    ev = sv.SyntheticVideos(50, seed=2, num_frames=3, image_size=8, captions_per_video=2)
    assert len(ev) == ev.num_videos == 50 and ev.classnames == list(sv.CLASSNAMES)
    batches = list(ev.batches(16))
    assert [len(b["index"]) for b in batches] == [16, 16, 16, 2]
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(index, np.arange(50))
    assert index.dtype == np.int64
    test = sv.render(2, "test", np.arange(50), 3, 8)
    np.testing.assert_array_equal(np.concatenate([b["video"] for b in batches]), test.frames)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), test.motion)
    assert all(b["frame_mask"].all() and b["frame_mask"].shape == (len(b["index"]), 3)
               for b in batches)
    caps = ev.captions()
    assert len(caps) == 50 and all(len(c) == 2 for c in caps)
    assert [c[0] for c in caps] == sv.captions(2, "test", test, np.arange(50))
    # Hosts take every process_count-th video; together, each exactly once.
    shares = [np.concatenate([b["index"] for b in sv.SyntheticVideos(
        50, seed=2, num_frames=3, image_size=8, process_index=p, process_count=3).batches(8)])
        for p in range(3)]
    np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.arange(50))


def test_mirror_pairs_put_each_clip_beside_itself_played_backwards():
    it = sv.SyntheticVideoIterator(8, num_frames=4, image_size=16, mirror_pairs=True)
    b = next(it)
    np.testing.assert_array_equal(b["video"][1::2], b["video"][0::2, ::-1])
    np.testing.assert_array_equal(b["label"][1::2], sv.MIRROR[b["label"][0::2]])
    assert not np.array_equal(b["text"][0], b["text"][1])  # each has its own caption
    state = it.get_state()
    want = next(it)
    again = sv.SyntheticVideoIterator(8, num_frames=4, image_size=16, mirror_pairs=True)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["video"], want["video"])
    with pytest.raises(ValueError, match="mirror_pairs"):
        sv.SyntheticVideoIterator(8, num_frames=4, image_size=16).set_state(state)
