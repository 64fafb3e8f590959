"""Max error of every loss against the float64 NumPy reference, by device count.

    python benchmarks/loss_parity.py [--batch 24] [--embed 8]

Uses the reference of tests/test_losses.py on 8 simulated CPU devices; each row is one loss
on one mesh: the largest absolute difference over the loss value, the gradients w.r.t.
both embedding matrices, and the gradients w.r.t. log(scale) and the bias.
"""

import argparse
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + \
    " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import test_losses as t  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=t.N, help="global batch (multiple of 8)")
    parser.add_argument("--embed", type=int, default=t.E)
    args = parser.parse_args()
    t.E = args.embed
    labels = (np.arange(args.batch) % 5).astype(np.int32)
    print(f"global batch {args.batch}, embedding {args.embed}, float32 vs float64 NumPy")
    print("| loss | devices | loss | d img | d txt | d log scale | d bias |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("softmax", "tiled", "sigmoid", "sigmoid_ring", "multi_positive"):
        for mesh_name in ("1", "2", "4", "8"):
            img, txt = t._inputs(0, args.batch)
            log_s, b = np.float32(np.log(10.0)), np.float32(-2.0)
            ids = labels if kind == "multi_positive" else np.arange(args.batch, dtype=np.int32)
            fn, _ = t._grad_fn(kind, mesh_name, 4)
            (loss, _), grads = fn(img, txt, log_s, b, ids, ids)
            ref = t.reference(kind, img, txt, np.exp(np.float64(log_s)), np.float64(b), ids, ids)
            errors = [abs(float(loss) - ref[0]),
                      np.max(np.abs(np.asarray(grads[0]) - ref[1])),
                      np.max(np.abs(np.asarray(grads[1]) - ref[2])),
                      abs(float(grads[2]) - ref[3] * np.exp(np.float64(log_s))),
                      abs(float(grads[3]) - ref[4])]
            print(f"| {kind} | {mesh_name} | " + " | ".join(f"{e:.1e}" for e in errors) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
