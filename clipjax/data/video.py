"""Video for the CLIP heads: PyAV decoding, CLIP4Clip's and TSN's frame sampling, multi-view
testing, and the video datasets through the one grain pipeline.

    frames_THWC, mask_T = read_frames("v.mp4")   # CLIP4Clip: 1 fps, at most 12, 224 px
    it = make_video_iterator("msrvtt:/data/msrvtt?split=train", global_batch_size=128,
                             num_frames=12, image_size=224, train=True, seed=0)
    batch = next(it)   # {"video": uint8 [b, 12, 224, 224, 3], "frame_mask": bool [b, 12],
                       #  "text": int32 [b, 77]}
    state = it.get_state()   # as pipeline.DataIterator: resumable, host-split, skip counts

Frame i is the i-th frame of the video in presentation order (0-based); frame folders hold
it as tmpl.format(i + 1) (img_00001.jpg is frame 0, ActionCLIP's index_bias 1). Frames are
resized with the shorter side to `size` (PIL bicubic) and centre-cropped: CLIP's
preprocessing, before normalisation. A video shorter than the frames asked for is padded
with zero frames that `frame_mask` marks False.

Decoding reads the packet index first (no decoding) to learn the frame count and the
keyframes, then decodes only from the keyframe before each wanted frame, seeking when that
keyframe lies ahead; with one keyframe per file it decodes straight through, converting
only the frames it keeps. A file without usable timestamps is decoded in order. One decoding
thread per video: the pipeline's read threads and worker processes give the parallelism.
"""

import bisect
import dataclasses
import functools
import os
from collections.abc import Callable, Sequence

import grain
import numpy as np
from PIL import Image

from clipjax.data import pipeline, stages, transforms
from clipjax.data import sources as sources_lib
from clipjax.data.sources import BadSample
from clipjax.data.video_sources import VideoSource
from clipjax.tokenizer import CONTEXT_LENGTH, default_tokenizer

SAMPLINGS = ("clip4clip", "tsn")
FRAME_TMPL = "img_{:05d}.jpg"


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("Reading videos needs PyAV: install clipjax[video] "
                          "(pip install 'clipjax[video]').") from None
    return av


# ---------------------------------------------------------------------------------------
# Which frames.


def clip4clip_indices(num_frames: int, src_fps: float, *, fps: int = 1, max_frames: int = 12,
                      slice_framepos: int = 2, clip: int = 0, clips: int = 1) -> np.ndarray:
    """CLIP4Clip's frames of a video (rawvideo_util.py, then _get_rawvideo's slicing).

    With r = int(src_fps): each second s gives frames s*r + k*(r // fps) for k < fps (fps 0:
    every frame), while they exist; more than `max_frames` are cut to the first
    (slice_framepos 0), the last (1) or linspace(0, n-1, max_frames) of them (2). Clip c of
    `clips` (multi-view testing) starts c/clips of a sampling interval later.
    """
    rate = max(int(src_fps), 1)
    interval = max(rate // fps, 1) if fps > 0 else 1
    offsets = np.arange(0, rate, interval)[:fps if fps > 0 else rate]
    offsets = offsets + clip * interval // clips
    seconds = (num_frames + rate - 1) // rate
    idx = (np.arange(seconds + 1)[:, None] * rate + offsets[None, :]).reshape(-1)
    idx = idx[idx < num_frames]  # the reference stops at the first frame that does not read
    if len(idx) > max_frames:
        if slice_framepos == 0:
            idx = idx[:max_frames]
        elif slice_framepos == 1:
            idx = idx[-max_frames:]
        else:
            idx = idx[np.linspace(0, len(idx) - 1, num=max_frames, dtype=int)]
    return idx.astype(np.int64)


def segment_indices(num_frames: int, num_segments: int, *, train: bool,
                    rng: np.random.Generator | None = None, clip: int = 0,
                    clips: int = 1) -> np.ndarray:
    """TSN's frames, as ActionCLIP's datasets.py (new_length 1, 0-based: add 1 for img_ files).

    Training (`_sample_indices`): T equal segments, a random frame in each (drawn from `rng`);
    a video of at most T frames gives every frame once and random repeats, sorted. Test
    (`_get_val_indices`): each segment's centre; one segment: the middle frame. Clip c of
    `clips` (multi-view testing) takes the points (c + 1/2)/clips through each segment.
    """
    n, t = int(num_frames), int(num_segments)
    if n < 1 or t < 1:
        raise ValueError(f"segment_indices needs frames and segments, got {n} and {t}.")
    if train:
        rng = np.random.default_rng() if rng is None else rng
        if n <= t:
            return np.sort(np.concatenate([np.arange(n), rng.integers(n, size=t - n)]))
        ticks = [i * n // t for i in range(t + 1)]
        return np.array([ticks[i] + int(rng.integers(ticks[i + 1] - ticks[i]))
                         for i in range(t)], np.int64)
    if clips > 1 and n > t:
        offset = max((clip + 0.5) * n / t / clips - 0.5, 0.0)
        return np.array([int(i * n / t + offset) for i in range(t)], np.int64)
    if t == 1:
        return np.array([n // 2], np.int64)
    if n <= t:
        return np.array([i * n // t for i in range(t)], np.int64)
    offset = (n / t - 1) / 2.0
    return np.array([int(i * n / t + offset) for i in range(t)], np.int64)


# ---------------------------------------------------------------------------------------
# Decoding.


class _Unindexed(Exception):
    """Packet timestamps do not name the decoded frames: decode in order instead."""


@dataclasses.dataclass(frozen=True)
class _Index:
    count: int  # frames: packets with data, less those an edit list discards
    rate: float  # frames per second, as the container states it
    pts: tuple[int, ...] | None  # presentation timestamps in order; None: decode in order
    keys: tuple[int, ...]  # positions (in that order) of the keyframes


def _open(path: str):
    av = _av()
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise BadSample("missing_video", f"{path} does not exist") from None
    except OSError as e:
        raise BadSample("unreadable_file", f"{type(e).__name__}: {e}") from None
    if size == 0:
        raise BadSample("empty_video", "zero bytes")
    try:
        container = av.open(path)
    except Exception as e:  # FFmpeg raises many types for bad files; none may stop a run
        raise BadSample("corrupt_video", f"{type(e).__name__}: {e}") from None
    if not container.streams.video:
        container.close()
        raise BadSample("empty_video", "no video stream")
    stream = container.streams.video[0]
    stream.codec_context.thread_count = 1
    return container, stream


def _probe(path: str) -> _Index:
    """The frame count, rate and keyframes from the packets alone (nothing is decoded)."""
    container, stream = _open(path)
    with container:
        rate = stream.average_rate or stream.base_rate or stream.guessed_rate
        pts, keys, timed = [], [], True
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:
                    continue
                timed = timed and packet.pts is not None
                pts.append(packet.pts)
                keys.append(packet.is_keyframe)
        except Exception:  # a damaged tail: the packets before it still count
            pass
    if not pts:
        raise BadSample("empty_video", "no frames")
    if not rate or rate <= 0:
        raise BadSample("corrupt_video", "the video states no frame rate")
    if not timed or len(set(pts)) != len(pts):
        return _Index(len(pts), float(rate), None, ())
    order = sorted(pts)
    position = {p: i for i, p in enumerate(order)}
    key_positions = sorted(position[p] for p, k in zip(pts, keys) if k)
    return _Index(len(pts), float(rate), tuple(order), tuple(key_positions))


def _frames(container, stream):
    """Decoded frames from the container's position on; a decoding error ends them."""
    try:
        for packet in container.demux(stream):
            yield from packet.decode()
    except Exception:  # FFmpeg's error types; what decoded before the damage is kept
        return


def _decode_at(path: str, wanted: list[int], index: _Index, convert: Callable):
    """({frame: convert(frame)} for the sorted `wanted` frames, frames in the video when
    decoding ran to its end early, else None)."""
    container, stream = _open(path)
    out, want = {}, set(wanted)
    with container:
        if index.pts is None:
            n = 0
            for n, frame in enumerate(_frames(container, stream), 1):
                if n - 1 in want:
                    out[n - 1] = convert(frame)
                if n > wanted[-1]:
                    return out, None
            return out, n
        position = {p: i for i, p in enumerate(index.pts)}
        frames, pos, ended = None, 0, False
        for w in wanted:
            if w in out:
                continue
            j = bisect.bisect_right(index.keys, w) - 1
            key = index.keys[j] if j >= 0 else 0
            if frames is None or key > pos:  # nothing wanted lies before that keyframe
                if key > 0:
                    container.seek(index.pts[key], stream=stream, backward=True,
                                   any_frame=False)
                frames, ended = _frames(container, stream), False
            while not ended:
                frame = next(frames, None)
                if frame is None:
                    ended = True
                    break
                i = position.get(frame.pts)
                if i is None:
                    raise _Unindexed
                pos = i + 1
                if i in want and i not in out:
                    out[i] = convert(frame)
                if i >= w:
                    break
        return out, pos if ended else None


def _decode(path: str, pick: Callable[[int, float], list[np.ndarray]], convert: Callable):
    """(pick(frame count, fps): one index array per clip, {frame: convert(frame)})."""
    index = _probe(path)
    count = index.count
    for _ in range(4):
        views = pick(count, index.rate)
        wanted = sorted({int(i) for v in views for i in v})
        try:
            out, end = _decode_at(path, wanted, index, convert)
        except _Unindexed:
            index = dataclasses.replace(index, pts=None)
            continue
        missing = [w for w in wanted if w not in out]
        if not missing:
            return views, out
        if end is not None and end < count and all(i < missing[0] for i in out):
            if end == 0:
                raise BadSample("corrupt_video", "no frame decodes")
            count = end  # the video ends early: sample again from the frames it has
        elif index.pts is not None:
            index = dataclasses.replace(index, pts=None)  # a seek missed: decode in order
        else:
            break
    raise BadSample("corrupt_video", f"frames {missing[:3]} of {count} do not decode")


def _resized(frame, size: int) -> Image.Image:
    return transforms.resize_shortest_side(frame.to_image(), size)


def _crops(image: Image.Image, size: int, crops: int) -> list[np.ndarray]:
    """`crops` squares of a shorter-side-resized frame, evenly along its long side (3: left,
    centre, right, or top, centre, bottom); one crop is CLIP's centre crop."""
    if crops == 1:
        return [transforms.rgb_array(transforms.center_crop(image, size))]
    pixels_HWC = transforms.rgb_array(image)
    height, width = pixels_HWC.shape[:2]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    out = []
    for p in np.linspace(0, max(width, height) - size, crops):
        if width >= height:
            left = int(round(p))
        else:
            top = int(round(p))
        out.append(pixels_HWC[top:top + size, left:left + size])
    return out


def _assemble(views: list[np.ndarray], images: dict, num_frames: int, size: int,
              crops: int) -> tuple[np.ndarray, np.ndarray]:
    """video uint8 [V, T, size, size, 3] and frame_mask bool [V, T] for V = clips x crops
    views, clip-major."""
    video_VTHWC = np.zeros((len(views) * crops, num_frames, size, size, 3), np.uint8)
    mask_VT = np.zeros((len(views) * crops, num_frames), bool)
    squares = {i: _crops(image, size, crops) for i, image in images.items()}
    for c, idx in enumerate(views):
        for t, i in enumerate(idx[:num_frames]):
            for k, square_HWC in enumerate(squares[int(i)]):
                video_VTHWC[c * crops + k, t] = square_HWC
            mask_VT[c * crops:(c + 1) * crops, t] = True
    return video_VTHWC, mask_VT


def read_frames(path: str | os.PathLike, *, fps: int = 1, max_frames: int = 12,
                slice_framepos: int = 2, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """(frames uint8 [max_frames, size, size, 3], mask bool [max_frames]) of a video file,
    sampled as CLIP4Clip does (clip4clip_indices); raises BadSample for a bad file."""
    views, images = _decode(
        os.fspath(path),
        lambda n, rate: [clip4clip_indices(n, rate, fps=fps, max_frames=max_frames,
                                           slice_framepos=slice_framepos)],
        functools.partial(_resized, size=size))
    video_VTHWC, mask_VT = _assemble(views, images, max_frames, size, 1)
    return video_VTHWC[0], mask_VT[0]


def _folder_images(folder: str, indices, tmpl: str, size: int) -> dict[int, Image.Image]:
    if not os.path.isdir(folder):
        raise BadSample("missing_video", f"frame folder {folder} does not exist")
    out = {}
    for i in sorted({int(i) for i in indices}):
        path = os.path.join(folder, tmpl.format(i + 1))
        try:
            data = sources_lib.read_bytes(path)
        except FileNotFoundError:
            raise BadSample("missing_image", f"{path} does not exist") from None
        except OSError as e:
            raise BadSample("unreadable_file", f"{type(e).__name__}: {e}") from None
        image = sources_lib.load_pixels(sources_lib.open_image(data))
        out[i] = transforms.resize_shortest_side(image.convert("RGB"), size)
    return out


def read_frame_folder(folder: str | os.PathLike, indices: Sequence[int], *, size: int = 224,
                      tmpl: str = FRAME_TMPL) -> np.ndarray:
    """uint8 [len(indices), size, size, 3]: frames `indices` (0-based) of a folder of extracted
    frames, frame i in file tmpl.format(i + 1) (img_00001.jpg is frame 0)."""
    images = _folder_images(os.fspath(folder), indices, tmpl, size)
    return np.stack([_crops(images[int(i)], size, 1)[0] for i in indices])


# ---------------------------------------------------------------------------------------
# The pipeline stage.


class VideoPrepare:
    """Raw video record -> {"video", "frame_mask", "text"?, "label"?, "index"?} (one row, or
    {"rows": [...]} for several views) or {"skip": (reason, detail), "key"}."""

    def __init__(self, source: VideoSource, *, num_frames: int, image_size: int, train: bool,
                 sampling: str, fps: int, slice_framepos: int, views: tuple[int, int],
                 context_length: int, text: bool, templates: Sequence[str] | None,
                 index: bool):
        self.num_frames, self.size, self.train = num_frames, image_size, train
        self.sampling, self.fps, self.slice_framepos = sampling, fps, slice_framepos
        self.clips, self.crops = views
        self.context_length, self.text, self.index = context_length, text, index
        self.templates = list(templates) if templates else None
        self.class_names = source.class_names
        self.has_label = source.has_label
        self.tmpl = getattr(source, "tmpl", FRAME_TMPL)
        self.folder_fps = getattr(source, "fps", None)

    def _pick(self, n: int, rate: float, rng) -> list[np.ndarray]:
        if self.sampling == "clip4clip":
            return [clip4clip_indices(n, rate, fps=self.fps, max_frames=self.num_frames,
                                      slice_framepos=self.slice_framepos, clip=c,
                                      clips=self.clips) for c in range(self.clips)]
        if self.train:
            return [segment_indices(n, self.num_frames, train=True, rng=rng)]
        return [segment_indices(n, self.num_frames, train=False, clip=c, clips=self.clips)
                for c in range(self.clips)]

    def _caption(self, record: dict, rng) -> str:
        if self.templates:
            template = (self.templates[int(rng.integers(len(self.templates)))] if rng is not None
                        else self.templates[0])
            return template.format(self.class_names[record["label"]])
        text = record["text"]
        if isinstance(text, (list, tuple)):  # the video's captions: one per visit
            if not text:
                raise BadSample("missing_caption", "no captions")
            text = text[int(rng.integers(len(text)))] if rng is not None else text[0]
        return sources_lib.caption_text(text)

    def __call__(self, record: dict) -> dict:
        if record.get("skip"):
            return {"skip": tuple(record["skip"]), "key": record["key"]}
        rng = np.random.default_rng(record["rng"]) if self.train else None
        try:
            out = {}
            if self.text:
                out["text"] = default_tokenizer()(self._caption(record, rng),
                                                  self.context_length)[0]
            if self.has_label:
                out["label"] = np.int32(record["label"])
            if self.index:
                out["index"] = np.int64(record["index"])
            pick = functools.partial(self._pick, rng=rng)
            if "num_frames" in record:  # a folder of frames
                n = int(record["num_frames"])
                if n < 1:
                    raise BadSample("empty_video", "the list gives it no frames")
                views = pick(n, self.folder_fps or 0.0)
                images = _folder_images(record["path"], np.concatenate(views), self.tmpl,
                                        self.size)
            else:
                views, images = _decode(record["path"], pick,
                                        functools.partial(_resized, size=self.size))
            video_VTHWC, mask_VT = _assemble(views, images, self.num_frames, self.size,
                                             self.crops)
        except BadSample as e:
            return {"skip": (e.reason, e.detail), "key": record["key"]}
        if len(video_VTHWC) == 1:
            return {**out, "video": video_VTHWC[0], "frame_mask": mask_VT[0]}
        return {"rows": [{**out, "video": v, "frame_mask": m}
                         for v, m in zip(video_VTHWC, mask_VT)]}


class _SplitViews(grain.experimental.FlatMapTransform):
    """One element per view, so that batches count rows and a video may straddle two."""

    def __init__(self, views: int):
        self.max_fan_out = views

    def flat_map(self, element):
        return element["rows"] if "rows" in element else [element]


# ---------------------------------------------------------------------------------------
# Iterators.


def open_video_source(data: "str | VideoSource") -> VideoSource:
    source = sources_lib.open_source(data)
    if not getattr(source, "is_video", False):
        raise ValueError(f"{source.spec!r} is not a video dataset: use one of "
                         f"{', '.join(sources_lib.VIDEO_KINDS)} (see clipjax.data.video_sources), "
                         "or clipjax.data.pipeline.make_iterator for images.")
    return source


def _video_iterator(source: VideoSource, *, global_batch_size: int, num_frames: int,
                    image_size: int, train: bool, seed: int, sampling: str, fps: int,
                    slice_framepos: int, context_length: int, templates, num_workers: int,
                    views: tuple[int, int], text: bool, process_index, process_count,
                    read_threads: int, max_consecutive_skips: int, on_skip):
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling={sampling!r} is not one of {', '.join(SAMPLINGS)}.")
    if slice_framepos not in (0, 1, 2):
        raise ValueError(f"slice_framepos={slice_framepos!r} must be 0 (head), 1 (tail) or 2 "
                         "(uniform).")
    views = tuple(int(v) for v in views)
    if len(views) != 2 or min(views) < 1:
        raise ValueError(f"views={views!r} must be (clips, crops), each at least 1.")
    if train and views != (1, 1):
        raise ValueError("Multi-view testing is for evaluation: pass views=(1, 1) with "
                         "train=True.")
    if sampling == "clip4clip" and source.num_frames is not None and not source.fps:
        raise ValueError(f"{source.spec!r} is a frame-folder list without a frame rate, which "
                         "CLIP4Clip's per-second sampling needs: add fps= to the spec, or use "
                         "sampling='tsn'.")
    if templates and (not source.has_label or not source.class_names):
        raise ValueError(f"templates need class names, and {source.spec!r} has none: give it "
                         "labels=labels.csv (id,name), or leave templates out.")
    if len(source) == 0:
        raise ValueError(f"{source.spec!r} holds no records.")
    if source.num_frames is None:
        _av()  # a missing PyAV is a setup error, not a bad sample
    text = text and (source.has_text or bool(templates))
    process_index, process_count, batch_size = pipeline.host_share(
        global_batch_size, process_index, process_count)
    with_index = not train
    prepare = VideoPrepare(source, num_frames=num_frames, image_size=image_size, train=train,
                           sampling=sampling, fps=fps, slice_framepos=slice_framepos,
                           views=views, context_length=context_length, text=text,
                           templates=templates, index=with_index)
    ds = stages.HostRecords(source, source_id=0, seed=seed, train=train,
                            process_index=process_index, process_count=process_count)
    ds = ds.map(prepare).to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads))
    if views != (1, 1):
        ds = grain.experimental.FlatMapIterDataset(ds, _SplitViews(views[0] * views[1]))
    empty = {"video": np.zeros((0, num_frames, image_size, image_size, 3), np.uint8),
             "frame_mask": np.zeros((0, num_frames), bool)}
    if text:
        empty["text"] = np.zeros((0, context_length), np.int32)
    if source.has_label:
        empty["label"] = np.zeros((0,), np.int32)
    if with_index:
        empty["index"] = np.zeros((0,), np.int64)
    ds = pipeline.in_workers(stages.Batch(ds, batch_size, empty, shared_memory=num_workers > 0),
                             num_workers)
    config = {"kind": "video", "sources": [source.spec], "seed": seed, "train": train,
              "global_batch_size": global_batch_size, "process_index": process_index,
              "process_count": process_count, "num_workers": num_workers,
              "num_frames": num_frames, "image_size": image_size, "sampling": sampling,
              "fps": fps, "slice_framepos": slice_framepos, "context_length": context_length,
              "templates": list(templates) if templates else None, "views": list(views),
              "text": text}
    return pipeline.DataIterator(ds, batch_size=batch_size, config=config,
                                 class_names=source.class_names,
                                 max_consecutive_skips=max_consecutive_skips, on_skip=on_skip)


def make_video_iterator(data: "str | VideoSource", *, global_batch_size: int, num_frames: int,
                        image_size: int, train: bool, seed: int = 0,
                        sampling: str = "clip4clip", fps: int = 1, slice_framepos: int = 2,
                        context_length: int = CONTEXT_LENGTH,
                        templates: Sequence[str] | None = None, num_workers: int = 0,
                        views: tuple[int, int] = (1, 1), process_index: int | None = None,
                        process_count: int | None = None, read_threads: int = 4,
                        max_consecutive_skips: int = 10_000,
                        on_skip: pipeline.SkipHandler | None = None) -> pipeline.DataIterator:
    """Host-local batches of a video dataset: a pipeline.DataIterator (get_state, set_state,
    stats, close) like make_iterator's.

    Batches: "video" uint8 [b, T, H, W, 3], "frame_mask" bool [b, T]; "text" int32 [b, L]
    for captioned datasets (one caption per video per visit, drawn from the sample's identity)
    and for labelled ones given `templates` (a template per sample, drawn the same way,
    filled with the class name; templates[0] when not training); "label" int32 [b] for
    labelled datasets. sampling="clip4clip" takes `fps` frames a second and `slice_framepos`
    as clip4clip_indices; "tsn" takes segment_indices (random offsets in training, centres
    otherwise). train=False reads every record once, in order, and adds "index" int64 [b];
    views=(clips, crops) there gives clips x crops rows per video, clip-major, with the same
    index. Training applies no augmentation beyond the sampling (as the references do).
    """
    source = open_video_source(data)
    return _video_iterator(source, global_batch_size=global_batch_size, num_frames=num_frames,
                           image_size=image_size, train=train, seed=seed, sampling=sampling,
                           fps=fps, slice_framepos=slice_framepos, context_length=context_length,
                           templates=templates, num_workers=num_workers, views=views, text=True,
                           process_index=process_index, process_count=process_count,
                           read_threads=read_threads,
                           max_consecutive_skips=max_consecutive_skips, on_skip=on_skip)


class VideoEvalSet:
    """Every video of a dataset once, for the evaluators (no captions in the batches)."""

    def __init__(self, source: VideoSource, settings: dict):
        self.source, self._settings = source.per_video(), settings
        self.num_videos = self.source.num_videos
        self.classnames = list(source.class_names) if source.class_names else None

    def captions(self) -> list[list[str]] | None:
        """Each video's captions, by record index; None for labelled datasets."""
        if self.source.captions is None:
            return None
        return [list(c) for c in self.source.captions]

    def batches(self, batch_size: int) -> pipeline.DataIterator:
        """One pass of host-local batches of `batch_size` rows (the last may be smaller):
        "video", "frame_mask", "index" (the video's record index; repeated over its views)
        and "label" for labelled datasets. Each host reads its 1/P share of the videos."""
        settings = dict(self._settings)
        if settings["process_count"] is None:
            import jax
            settings["process_count"] = jax.process_count()
        return _video_iterator(self.source,
                               global_batch_size=batch_size * settings["process_count"],
                               train=False, seed=0, context_length=CONTEXT_LENGTH,
                               templates=None, text=False, max_consecutive_skips=10_000,
                               **settings)


def eval_set(data: "str | VideoSource", *, num_frames: int, image_size: int,
             sampling: str = "clip4clip", views: tuple[int, int] = (1, 1), fps: int = 1,
             slice_framepos: int = 2, num_workers: int = 0, process_index: int | None = None,
             process_count: int | None = None, read_threads: int = 4,
             on_skip: pipeline.SkipHandler | None = None) -> VideoEvalSet:
    """The evaluation view of a video dataset: num_videos, classnames, captions(), batches()."""
    settings = dict(num_frames=num_frames, image_size=image_size, sampling=sampling,
                    views=tuple(views), fps=fps, slice_framepos=slice_framepos,
                    num_workers=num_workers, process_index=process_index,
                    process_count=process_count, read_threads=read_threads, on_skip=on_skip)
    return VideoEvalSet(open_video_source(data), settings)
