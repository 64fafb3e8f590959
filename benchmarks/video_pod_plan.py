"""Pod plans for the video heads from TPU ahead-of-time compiles (no TPU needed).

    pip install "clipjax[tpu]"
    python benchmarks/video_pod_plan.py                  # every row below, ~2 min a compile
    python benchmarks/video_pod_plan.py --rows 0,1       # some of them

Each row is `clipjax compile --config clip4clip_msrvtt|actionclip_k400 --topology T
model=ViT-B-16-quickgelu head.frames=F global_batch=B` (bf16, scanned and rematerialised
blocks, data parallel over every chip): XLA's per-chip memory at the recipe's batch of 128
clips, then the largest global batch that fits in one step without gradient caching. That
one is found from the compiles at 128 and 256 clips (memory grows linearly with the local
batch), rounded down to a multiple of the chips, then compiled to confirm (and stepped down
until it fits).
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from clipjax import aot, config as config_lib  # noqa: E402

MODEL = "ViT-B-16-quickgelu"
ROWS = [("clip4clip_msrvtt", 12, "v5e-16"), ("clip4clip_msrvtt", 12, "v5p-16"),
        ("actionclip_k400", 8, "v5e-16"), ("actionclip_k400", 8, "v5p-16"),
        ("actionclip_k400", 16, "v5e-16"), ("actionclip_k400", 16, "v5p-16"),
        ("actionclip_k400", 32, "v5e-16"), ("actionclip_k400", 32, "v5p-16")]


def compile_row(config_name: str, frames: int, topology: str, batch: int) -> dict:
    config = config_lib.load_config(config_name, [f"model={MODEL}", f"head.frames={frames}",
                                                  f"global_batch={batch}"])
    return aot.compile_train_step(config, topology)


def largest_batch(config_name, frames, topology, at128: dict, at256: dict) -> tuple[int, dict]:
    chips, hbm = at128["chips"], at128["hbm_gib"]
    per_clip = (at256["total_gib"] - at128["total_gib"]) / 128
    guess = 128 + (hbm - at128["total_gib"]) / per_clip if per_clip > 0 else 128
    batch = max(chips, int(guess * 0.97) // chips * chips)
    while batch > chips:
        r = compile_row(config_name, frames, topology, batch)
        if r["fits"]:
            return batch, r
        batch = int(batch * 0.9) // chips * chips
    return batch, compile_row(config_name, frames, topology, batch)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="", help="comma-separated row numbers (default all)")
    args = parser.parse_args()
    keep = {int(i) for i in args.rows.split(",")} if args.rows else set(range(len(ROWS)))
    print("| head | frames | topology | GiB/chip at 128 clips (args + temps) | HBM | fits "
          "| largest global batch (GiB/chip) | TFLOPs/step at 128 |")
    print("|---|---|---|---|---|---|---|---|")
    for i, (name, frames, topo) in enumerate(ROWS):
        if i not in keep:
            continue
        at128 = compile_row(name, frames, topo, 128)
        at256 = compile_row(name, frames, topo, 256)
        best, r = largest_batch(name, frames, topo, at128, at256)
        print(f"| {name.split('_')[0]} {MODEL} | {frames} | {at128['topology']} "
              f"({at128['chips']} chips) | {at128['total_gib']:.2f} "
              f"({at128['arguments_gib']:.2f} + {at128['temporaries_gib']:.2f}) | "
              f"{at128['hbm_gib']} | {'yes' if at128['fits'] else 'NO'} | "
              f"{best:,} ({r['total_gib']:.2f}) | {at128['tflops_per_step']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
