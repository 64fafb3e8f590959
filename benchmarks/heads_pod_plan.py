"""Pod plans for the segmentation and detection heads from TPU ahead-of-time compiles (no
TPU needed).

    pip install "clipjax[tpu]"
    python benchmarks/heads_pod_plan.py                  # every row below, ~5 min a compile
    python benchmarks/heads_pod_plan.py --rows 4,5       # some of them (4-7: GLIP)

Each row is `clipjax compile --config lseg_ade20k|groupvit_gcc_yfcc|glip_coco[:b16]
--topology T global_batch=B` with the recipe as it stands: LSeg ViT-L/16 at 480 px (bf16,
remat full, no scan: the taps read every block; data parallel over every chip),
GroupViT-S/16 at 224 px (bf16, scanned and rematerialised blocks, the tiled contrastive
loss, fsdp over every chip), GLIP-T-sized (RN50 or ViT-B/16 towers, 6 fusion layers, 256
text tokens, 800 px, bf16, remat full, data parallel). Reported: XLA's per-chip memory at
the recipe's global batch (16 crops for LSeg, 4096 pairs for GroupViT, 64 images for
GLIP), whether that fits HBM, then the largest global batch that fits in one step
without gradient caching (accum_steps=1). That one is found from the compiles at the recipe
batch and twice it (memory grows linearly with the local batch), rounded down to a multiple
of the chips, then compiled to confirm (and stepped down until it fits). Where the recipe
batch does not fit in one step, the smallest accum_steps in 2, 4, 8 at which it does is
compiled and reported next to it.

LSeg's loss embeds the training label list (ADE20K's 150 classes); without the dataset on
this machine its built-in class names stand in (their count, not their words, shapes the
step), as for `clipjax compile`.
"""

import argparse
import math
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from clipjax import aot, config as config_lib  # noqa: E402

ROWS = [("lseg_ade20k", "v5e-16"), ("lseg_ade20k", "v5p-16"),
        ("groupvit_gcc_yfcc", "v5e-16"), ("groupvit_gcc_yfcc", "v5p-16"),
        ("glip_coco", "v5e-16"), ("glip_coco", "v5p-16"),
        ("glip_coco:b16", "v5e-16"), ("glip_coco:b16", "v5p-16")]
NAMES = {"lseg_ade20k": "LSeg ViT-L/16 480px", "groupvit_gcc_yfcc": "GroupViT-S/16 224px",
         "glip_coco": "GLIP RN50 800px", "glip_coco:b16": "GLIP ViT-B/16 800px"}
ACCUM = (2, 4, 8)

def compile_row(config_name: str, topology: str, batch: int, accum: int = 1) -> dict:
    config = config_lib.load_config(config_name, [f"global_batch={batch}",
                                                  f"accum_steps={accum}"])
    start = time.perf_counter()
    r = aot.compile_train_step(config, topology)
    r["seconds"] = time.perf_counter() - start
    print(f"  compiled {config_name} {topology} global_batch={batch} accum_steps={accum}: "
          f"{r['total_gib']:.2f} GiB/chip, {'fits' if r['fits'] else 'DOES NOT FIT'} "
          f"({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return r


def largest_batch(config_name, topology, at1: dict, at2: dict) -> tuple[int, dict]:
    """From the compiles at the recipe batch B and 2B: the largest fitting multiple of the
    chips, confirmed by a compile."""
    chips, hbm, b = at1["chips"], at1["hbm_gib"], at1["global_batch"]
    per_example = (at2["total_gib"] - at1["total_gib"]) / b
    if per_example > 0:  # NaN when XLA's refusal named no figure: halve until it fits
        guess = b + (hbm - at1["total_gib"]) / per_example
    else:
        guess = b if at1["fits"] else b / 2
    batch = max(chips, int(guess * 0.97) // chips * chips)
    while batch > chips:
        r = compile_row(config_name, topology, batch)
        if r["fits"]:
            return batch, r
        batch = int(batch * (0.9 if per_example > 0 else 0.5)) // chips * chips
    return chips, compile_row(config_name, topology, chips)


def smallest_accum(config_name, topology, batch: int) -> tuple[int, dict] | None:
    for accum in ACCUM:
        r = compile_row(config_name, topology, batch, accum)
        if r["fits"]:
            return accum, r
    return None


def gib(r: dict) -> str:
    if "error" in r:  # XLA refused it; its message gives one figure, not the split
        return f"> {r['total_gib']:.2f} (refused)" if not math.isnan(r["total_gib"]) else "refused"
    return f"{r['total_gib']:.2f} ({r['arguments_gib']:.2f} + {r['temporaries_gib']:.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="", help="comma-separated row numbers (default all)")
    args = parser.parse_args()
    keep = {int(i) for i in args.rows.split(",")} if args.rows else set(range(len(ROWS)))
    print("| model | topology | GiB/chip at the recipe batch (args + temps) | HBM | fits "
          "| largest global batch (GiB/chip) | TFLOPs/step at the recipe batch |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for i, (name, topo) in enumerate(ROWS):
        if i not in keep:
            continue
        recipe = config_lib.load_config(name).global_batch
        at1 = compile_row(name, topo, recipe)
        at2 = compile_row(name, topo, 2 * recipe)
        best, r = largest_batch(name, topo, at1, at2)
        fits = "yes" if at1["fits"] else "NO"
        if not at1["fits"]:
            accum = smallest_accum(name, topo, recipe)
            fits += (f"; with accum_steps={accum[0]}: {accum[1]['total_gib']:.2f}" if accum
                     else f"; not with accum_steps up to {ACCUM[-1]}")
        print(
            f"| {NAMES[name]}, global batch {recipe:,} | {at1['topology']} ({at1['chips']} "
            f"chips) | {gib(at1)} | {at1['hbm_gib']} | {fits} | "
            f"{best:,}{'' if r['fits'] else ' (does not fit)'} ({r['total_gib']:.2f}) | "
            f"{at1['tflops_per_step']:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
