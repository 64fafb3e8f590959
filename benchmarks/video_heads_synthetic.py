"""The video heads on the built-in moving-shapes clips: do the temporal heads beat meanP?

    python benchmarks/video_heads_synthetic.py --workdir /tmp/video-heads [--init clipjax-default]

Trains clip4clip_synthetic (meanP, seqTransf, tightTransf) and actionclip_synthetic
(meanP, Transf, Transf + TSM) with `clipjax train`, each in its own workdir, and prints
their held-out figures from the run's last evaluation: direction top-1 (the caption with
the right one of six motions wins) and mirror accuracy (the right motion beats its mirror
image; chance 50%), t2v R@1 for CLIP4Clip and action top-1 for ActionCLIP. A clip and its
mirror motion hold the same frames in reverse order, so a mean over frames cannot tell them
apart. With --init, every run starts from that CLIP workdir (e.g. the default run's).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RUNS = [
    ("CLIP4Clip meanP", "clip4clip_synthetic", ["head.sim_header=meanP"]),
    ("CLIP4Clip seqTransf", "clip4clip_synthetic", ["head.sim_header=seqTransf"]),
    ("CLIP4Clip tightTransf", "clip4clip_synthetic", ["head.sim_header=tightTransf"]),
    ("ActionCLIP meanP", "actionclip_synthetic", ["head.fusion=meanP"]),
    ("ActionCLIP Transf", "actionclip_synthetic", ["head.fusion=Transf"]),
    ("ActionCLIP Transf+TSM", "actionclip_synthetic", ["head.fusion=Transf", "head.tsm=True"]),
]


def last_eval(workdir: Path) -> dict:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if any(k.startswith("direction/") for k in r)][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="video-heads-synthetic")
    parser.add_argument("--init", default="", help="a CLIP training workdir to start from")
    parser.add_argument("--only", default="", help="comma-separated run names to keep")
    parser.add_argument("overrides", nargs="*", help="key=value for every run")
    args = parser.parse_args()
    root = Path(args.workdir)
    rows = []
    for name, config, overrides in RUNS:
        if args.only and name not in args.only.split(","):
            continue
        workdir = root / name.replace(" ", "_").replace("+", "_")
        extra = [f"init_checkpoint={args.init}"] if args.init else []
        command = [sys.executable, "-m", "clipjax.cli", "train", "--config", config,
                   "--workdir", str(workdir), *overrides, *extra, *args.overrides]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        m = last_eval(workdir)
        main_metric = (m.get("video_retrieval/t2v_R@1") if "clip4clip" in config
                       else m.get("action/top1"))
        rows.append((name, m["direction/top1"], m["direction/mirror"], main_metric, seconds))
        print(f"{name}: done in {seconds:.0f} s", file=sys.stderr, flush=True)
    print(f"{'run':<24} {'direction top-1':>15} {'mirror':>7} {'R@1 / action top-1':>19} "
          f"{'wall':>6}")
    for name, top1, mirror, main_metric, seconds in rows:
        print(f"{name:<24} {100 * top1:>14.1f}% {100 * mirror:>6.1f}% "
              f"{100 * main_metric:>18.1f}% {seconds:>5.0f}s")
    print("chance: direction top-1 16.7%, mirror 50%")


if __name__ == "__main__":
    main()
