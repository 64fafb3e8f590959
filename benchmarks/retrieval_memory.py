"""Peak memory and time of chunked recall@K at COCO-like scale and beyond.

python benchmarks/retrieval_memory.py [--images 25000] [--captions-per-image 5] [--dim 512]
                                      [--chunk 512]

Random unit embeddings (captions near their image), ranks in both directions through
clipjax.evals.retrieval.ranks. Reports the process's peak resident memory against what
the full images x captions score matrix alone would need.
"""

import argparse
import os
import resource
import time

# A CPU measurement; with libtpu installed (test extra) JAX would first try, noisily, a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from clipjax.evals import retrieval  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=25_000)
    ap.add_argument("--captions-per-image", type=int, default=5)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=512)
    args = ap.parse_args()

    n, t = args.images, args.images * args.captions_per_image
    rng = np.random.default_rng(0)
    img = rng.standard_normal((n, args.dim), np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    img_of = np.repeat(np.arange(n, dtype=np.int32), args.captions_per_image)
    txt = img[img_of] + 0.2 * rng.standard_normal((t, args.dim), np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    before = peak_rss_gb()
    start = time.perf_counter()
    i2t, t2i = retrieval.ranks(img, txt, img_of, chunk=args.chunk)
    seconds = time.perf_counter() - start
    res = retrieval.Result(i2t, t2i).metrics()
    print(f"{n} images x {t} captions, E={args.dim}, chunk {args.chunk}: {seconds:.1f} s")
    print(f"peak RSS {peak_rss_gb():.2f} GB (inputs and interpreter: {before:.2f} GB); "
          f"the full score matrix alone would be {n * t * 4 / 2**30:.1f} GB")
    print({k: round(v, 4) for k, v in res.items()})


if __name__ == "__main__":
    main()
