"""Training-pipeline throughput: clipjax (grain) vs OpenCLIP's WebDataset loader, same shards.

    python benchmarks/data_throughput.py                      # 3,072 images, 2 workers
    python benchmarks/data_throughput.py --images 6144 --workers 4 --batch 256
    python benchmarks/data_throughput.py --accelerator-rate 8800   # images/s one chip trains

Writes 256-px JPEG WebDataset shards (procedural pictures and captions, nothing
downloaded) to a temporary folder, then runs both training pipelines over them: decode,
random resized crop to 224 (scale 0.9-1, bicubic), CLIP normalisation, tokenisation,
batching, with the same number of worker processes. CPU time is summed over the main
process and every worker (psutil), so "images per CPU-second" is the per-core rate
whatever else runs on the machine; wall-clock images/s is printed too. The two pipelines
take turns for `--rounds` rounds and the median of each is reported.

Cores to feed one accelerator = its training rate / images per CPU-second. The default
rate, about 2,760 images/s, is ViT-B/32 on one A100 at 40% of its 312 bf16 TFLOP/s: forward
8.95 + 6.10 GFLOPs per pair (every token of every block), times 3 for forward and backward.

OpenCLIP's side is `open_clip_train.data.get_wds_dataset` (PyTorch DataLoader, CPU build),
which needs the bench extra, `pip install -e ".[bench]"` (webdataset 0.2.x, braceexpand,
pandas); torchvision's compiled operators need not load.
"""

import argparse
import gc
import io
import os
import statistics
import sys
import tarfile
import tempfile
import time

import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

WORDS = ("a photo of the red green blue small large old new dog cat car house tree river "
         "mountain city street beach person woman man child bird flower sunset night in on "
         "with near under over").split()


def _picture(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth colour field with a few shapes and sensor-like noise: photo-sized JPEGs."""
    y_HW, x_HW = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1, c2 = rng.uniform(0, 255, (3, 3))
    img_HWC = (c0 * (1 - x_HW[..., None]) + c1 * x_HW[..., None]) * 0.5 + c2 * y_HW[..., None] * 0.5
    for _ in range(rng.integers(3, 8)):
        cy, cx, r = rng.uniform(0, 1, 3) * [1, 1, 0.3]
        mask_HW = (y_HW - cy) ** 2 + (x_HW - cx) ** 2 < r * r
        img_HWC[mask_HW] = rng.uniform(0, 255, 3)
    img_HWC += rng.normal(0, 6, img_HWC.shape)
    return Image.fromarray(np.clip(img_HWC, 0, 255).astype(np.uint8))


def write_shards(folder: str, images: int, per_shard: int, size: int = 256) -> str:
    """img2dataset's layout: key.jpg + key.txt + key.json per sample; returns the brace pattern."""
    rng = np.random.default_rng(0)
    shards = -(-images // per_shard)
    total_bytes = 0
    for s in range(shards):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for i in range(s * per_shard, min(images, (s + 1) * per_shard)):
                buf = io.BytesIO()
                _picture(rng, size).save(buf, "JPEG", quality=90)
                caption = " ".join(rng.choice(WORDS, rng.integers(5, 20)))
                key = f"{i:09d}"
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()),
                                  ("json", b'{"key": "%s"}' % key.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                total_bytes += buf.tell()
    print(f"wrote {images} {size}-px JPEGs (mean {total_bytes / images / 1024:.1f} KiB) in "
          f"{shards} shards to {folder}")
    return os.path.join(folder, f"{{00000..{shards - 1:05d}}}.tar")


def _cpu_seconds(root: psutil.Process) -> float:
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(batches, batch_size: int, warmup: int, timed: int) -> tuple[float, float]:
    """(images/s wall, images per CPU-second over all processes) after `warmup` batches."""
    me = psutil.Process()
    for _ in range(warmup):
        next(batches)
    cpu0, t0 = _cpu_seconds(me), time.perf_counter()
    for _ in range(timed):
        next(batches)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds(me) - cpu0
    return timed * batch_size / wall, timed * batch_size / cpu


def clipjax_batches(pattern: str, args):
    from clipjax.data import pipeline
    it = pipeline.make_iterator(f"wds:{pattern}", global_batch_size=args.batch, image_size=224,
                                train=True, seed=0, process_index=0, process_count=1,
                                num_workers=args.workers)
    return it


def _open_clip_train_data():
    """OpenCLIP's training data module, or one error naming the install that fixes it."""
    from importlib import metadata

    from reference import open_clip
    open_clip()  # registers torchvision without its compiled operators first
    try:
        import open_clip_train.data as ocd
    except ImportError as e:
        raise SystemExit(f"OpenCLIP's WebDataset loader needs {e.name}: "
                         'pip install -e ".[bench]"') from None
    if int(metadata.version("webdataset").split(".")[0]) >= 1:  # KeyError 'fname' mid-epoch
        raise SystemExit(f"open_clip_train.data needs webdataset 0.2.x, not "
                         f"{metadata.version('webdataset')}: pip install -e \".[bench]\"")
    return ocd


def openclip_batches(pattern: str, args, images: int):
    import argparse as ap

    from reference import open_clip
    oc = open_clip()
    ocd = _open_clip_train_data()
    preprocess = oc.image_transform(224, is_train=True)
    tokenizer = oc.get_tokenizer("ViT-B-32")
    ns = ap.Namespace(train_data=pattern, val_data=None, train_num_samples=images,
                      batch_size=args.batch, workers=args.workers, seed=0, world_size=1, rank=0,
                      dataset_resampled=False, train_data_upsampling_factors=None)
    info = ocd.get_wds_dataset(ns, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)

    def forever():
        while True:
            yield from info.dataloader
    return forever()


def vit_b32_a100_rate(mfu: float = 0.4) -> float:
    """Images/s for ViT-B/32 training on one A100 at `mfu` of its bf16 peak."""
    return mfu * 312e12 / (3 * (8.95e9 + 6.10e9))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3072)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timed", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--accelerator-rate", type=float, default=vit_b32_a100_rate(),
                        help="images/s one accelerator trains (default: ViT-B/32 on an A100 "
                        "at 40%% MFU)")
    parser.add_argument("--dir", help="reuse or keep shards here instead of a temporary folder")
    args = parser.parse_args()
    _open_clip_train_data()  # a missing or wrong dependency fails now, not after a round

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or tmp
        os.makedirs(folder, exist_ok=True)
        shards = -(-args.images // args.per_shard)
        pattern = os.path.join(folder, f"{{00000..{shards - 1:05d}}}.tar")
        if not os.path.exists(os.path.join(folder, f"{shards - 1:05d}.tar")):
            pattern = write_shards(folder, args.images, args.per_shard)
        print(f"{os.cpu_count()} CPU cores; {args.workers} workers; batch {args.batch}; "
              f"{args.warmup} warm-up + {args.timed} timed batches")

        results = {"clipjax": [], "OpenCLIP": []}
        for r in range(args.rounds):
            it = clipjax_batches(pattern, args)
            results["clipjax"].append(measure(it, args.batch, args.warmup, args.timed))
            it.close()
            batches = openclip_batches(pattern, args, args.images)
            results["OpenCLIP"].append(measure(batches, args.batch, args.warmup, args.timed))
            batches.close()  # shuts its DataLoader workers down before the next round
            del batches
            gc.collect()
            for name, runs in results.items():
                wall, per_cpu = runs[-1]
                print(f"round {r + 1} {name:9}: {wall:7.1f} images/s wall, {per_cpu:6.1f} "
                      "images per CPU-second")
        ours, theirs = ([statistics.median(x[i] for x in results[k]) for i in (0, 1)]
                        for k in ("clipjax", "OpenCLIP"))
        print(f"median clipjax  : {ours[0]:7.1f} images/s wall, {ours[1]:6.1f} per CPU-second")
        print(f"median OpenCLIP : {theirs[0]:7.1f} images/s wall, {theirs[1]:6.1f} per CPU-second")
        print(f"ratio clipjax/OpenCLIP: {ours[0] / theirs[0]:.2f}x wall, "
              f"{ours[1] / theirs[1]:.2f}x per core")
        print(f"cores to feed one accelerator at {args.accelerator_rate:.0f} images/s: "
              f"clipjax {args.accelerator_rate / ours[1]:.1f}, "
              f"OpenCLIP {args.accelerator_rate / theirs[1]:.1f}")


if __name__ == "__main__":
    main()
