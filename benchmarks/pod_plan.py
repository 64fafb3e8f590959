"""Pod plans from TPU ahead-of-time compiles of the real train step (no TPU needed).

    pip install "clipjax[tpu]"
    python benchmarks/pod_plan.py            # the README table
    python benchmarks/pod_plan.py --search   # + the largest ViT-B-16 batch on a v5p-16 slice

Each row is `clipjax compile --config clip_vit_XXX --topology T` with the paper recipe
(bf16, scanned and rematerialised blocks, tiled loss, FSDP over every chip).
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from clipjax import aot, config as config_lib  # noqa: E402

ROWS = [("clip_vit_b16", "v5e-256"), ("clip_vit_b16", "v5p-128"),
        ("clip_vit_l14", "v5e-256"), ("clip_vit_l14", "v5p-128")]


def report(config_name, topology, overrides=()):
    config = config_lib.load_config(config_name, list(overrides))
    return aot.compile_train_step(config, topology)


def row(r):
    return (f"| {r['model']} | {r['topology']} ({r['chips']} chips) | {r['global_batch']:,} | "
            f"{r['accum_steps']} | {r['arguments_gib']:.2f} | {r['temporaries_gib']:.2f} | "
            f"{r['total_gib']:.2f} / {r['hbm_gib']} | {'yes' if r['fits'] else 'NO'} | "
            f"{r['tflops_per_step']:,.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--search", action="store_true")
    parser.add_argument("--skip-table", action="store_true")
    parser.add_argument("--search-topology", default="v5p-16")
    parser.add_argument("--micro-per-chip", type=int, default=256,
                        help="gradient-caching micro-batch rows per chip in the search")
    args = parser.parse_args()
    print("| model | topology | global batch | accum | args GiB | temps GiB | total / HBM GiB "
          "| fits | TFLOPs/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    if not args.skip_table:
        for name, topo in ROWS:
            print(row(report(name, topo, ["global_batch=32768"])), flush=True)
    if args.search:
        chips = len(aot.topology_devices(args.search_topology))
        micro = args.micro_per_chip * chips

        def attempt(batch):
            r = report("clip_vit_b16", args.search_topology,
                       [f"global_batch={batch}", f"accum_steps={batch // micro}"])
            print(row(r), flush=True)
            return r["fits"]

        lo, hi = micro * 64, micro * 128
        while attempt(hi):
            lo, hi = hi, hi * 2
        while hi - lo > micro * 16:
            mid = (lo + hi) // 2 // micro * micro
            lo, hi = (mid, hi) if attempt(mid) else (lo, mid)
        print(f"\nlargest ViT-B-16 global batch on {args.search_topology} found: {lo:,} "
              f"(micro-batches of {micro} rows, tiled loss)")


if __name__ == "__main__":
    main()
