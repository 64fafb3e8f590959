"""Contrastive-loss memory per chip at pod scale, from TPU ahead-of-time compiles.

    pip install libtpu   # no TPU needed: XLA compiles for a described topology
    python benchmarks/loss_memory.py                       # the README table
    python benchmarks/loss_memory.py --topology v5e:2x4 --embed 512 --batch 32768 --search

Each figure is XLA's own accounting for one chip of the compiled program that computes the
loss and its gradients w.r.t. both embedding matrices, the logit scale and the bias:
arguments (the chip's embedding rows) + outputs (their gradients) + temporaries. The
CPU backend's memory analysis ignores rematerialisation, hence a TPU target.
`--search` also finds the largest global batch whose loss fits a budget (1 GiB).
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host stays CPU; TPU is only a target
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from clipjax import losses, sharding  # noqa: E402

GIB = 2**30
KINDS = ("softmax", "tiled", "sigmoid", "sigmoid_ring")


def loss_bytes(mesh, kind: str, batch: int, embed: int, tile: int) -> int:
    """Per-chip bytes of the compiled loss-and-gradient program."""
    fn = losses.get_loss(kind)
    options = {"tile": tile} if kind in ("tiled", "sigmoid_ring") else {}

    def loss(img_BE, txt_BE, log_scale, bias):
        return fn(img_BE, txt_BE, jnp.exp(log_scale), bias, mesh=mesh, **options)

    rows = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    rep = NamedSharding(mesh, P())
    emb = jax.ShapeDtypeStruct((batch, embed), jnp.float32, sharding=rows)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    compiled = jax.jit(grad, out_shardings=((rep, rep), (rows, rows, rep, rep))).lower(
        emb, emb, scalar, scalar).compile()
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)


def largest_batch(mesh, kind: str, embed: int, tile: int, budget: float) -> int:
    """The largest global batch (a multiple of 64 rows per chip) whose loss fits `budget`."""
    chips = mesh.size
    fits = lambda rows: loss_bytes(mesh, kind, rows * chips, embed, tile) <= budget
    lo, hi = 64, 128
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > max(64, lo // 32):  # to about 3%
        mid = (lo + hi) // 2 // 64 * 64
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * chips


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", nargs="+", default=["v5e:2x4", "v5e:16x16"],
                        help="TPU topologies, e.g. v5e:2x4 (8 chips), v5e:16x16 (256 chips)")
    parser.add_argument("--embed", type=int, nargs="+", default=[512, 768])
    parser.add_argument("--batch", type=int, default=32768)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--search", action="store_true",
                        help="also find the largest global batch within --budget-gib per chip")
    parser.add_argument("--budget-gib", type=float, default=1.0)
    args = parser.parse_args()

    print(f"loss + gradients, global batch {args.batch}, tile {args.tile}; GiB per chip")
    print("| topology | chips | embed | " + " | ".join(args.kinds) + " |")
    print("|---|---|---|" + "---|" * len(args.kinds))
    meshes = {}
    for name in args.topology:
        topo = topologies.get_topology_desc(name, "tpu")
        meshes[name] = mesh = sharding.create_mesh(devices=topo.devices)
        for embed in args.embed:
            cells = [f"{loss_bytes(mesh, k, args.batch, embed, args.tile) / GIB:.3f}"
                     for k in args.kinds]
            print(f"| {name} | {mesh.size} | {embed} | " + " | ".join(cells) + " |", flush=True)
    if args.search:
        print(f"\nlargest global batch whose loss fits {args.budget_gib} GiB per chip")
        print("| topology | chips | embed | " + " | ".join(args.kinds) + " |")
        print("|---|---|---|" + "---|" * len(args.kinds))
        for name, mesh in meshes.items():
            for embed in args.embed:
                t = time.time()
                cells = [f"{largest_batch(mesh, k, embed, args.tile, args.budget_gib * GIB):,}"
                         for k in args.kinds]
                print(f"| {name} | {mesh.size} | {embed} | " + " | ".join(cells)
                      + f" |  ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
