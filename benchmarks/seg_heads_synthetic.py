"""The segmentation heads on the built-in shapes: held-out mIoU, and a picture.

    clipjax train                                    # the default CLIP run, LSeg's towers
    python benchmarks/seg_heads_synthetic.py --init clipjax-default --workdir /tmp/seg-heads

Trains, each with `clipjax train` in its own workdir:
- LSeg (lseg_synthetic) from the default run's CLIP, with masks and the label words
  "other", "circle", "square", ...; scored on 256 held-out images with those words and
  with synonyms it never trained with ("background", "disc", "box", "wedge", ...);
- LSeg with two classes held out of training (their words left out, their pixels
  ignored), scored on all seven: LSeg's zero-shot setting;
- GroupViT (groupvit_synthetic) on image-caption pairs only, never a mask (its text
  tower started from the default run's), segmenting held-out images zero-shot from class
  prompts.
Prints held-out mIoU in both conventions (absent classes skipped / counted as 0; they
agree here, where every class is present), pixel accuracy and wall time, and draws a few
held-out images with their masks and both heads' predictions into --figure.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HELD_OUT = ("diamond", "ring")
RUNS = [  # (name, workdir, config, overrides, from the CLIP run, in the figure)
    ("LSeg", "lseg", "lseg_synthetic", [], True, True),
    ("LSeg, diamond+ring held out", "lseg_held_out", "lseg_synthetic",
     [f"head.held_out_classes=({', '.join(repr(c) for c in HELD_OUT)},)"], True, False),
    ("GroupViT (captions only)", "groupvit", "groupvit_synthetic", [], True, True),
]


def last_eval(workdir: Path) -> dict:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "seg/miou" in r][-1]


def predictions(workdir: Path, images: np.ndarray) -> np.ndarray:
    from clipjax.data import synthetic_seg
    from clipjax.evals import segmentation as seg_evals
    from clipjax.heads import dense

    module, model, params, config = dense.load(str(workdir))
    encoders = dense.make_encoders(module, model, None)
    kind = "canonical" if config.task == "lseg" else "caption"
    names = list(synthetic_seg.label_words(kind))
    labels = encoders.embed_labels(params, names, **(module.label_options(config) if hasattr(
        module, "label_options") else {}))
    fn = encoders.logits_fn(params, labels)
    return np.stack([np.argmax(seg_evals.predict(fn, im, mode="whole"), -1) for im in images])


def figure(path: Path, runs: dict[str, Path], count: int = 6) -> None:
    """For each run, `count` of its held-out images: image, true mask, prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipjax.data import synthetic_seg
    from clipjax.heads import segment_cli

    colours = segment_cli.palette(len(synthetic_seg.CLASSES)) / 255.0
    fig, axes = plt.subplots(count, 3 * len(runs), figsize=(6 * len(runs), 2 * count))
    for r, (name, workdir) in enumerate(runs.items()):
        data = json.loads((workdir / "config.json").read_text())["data"]
        ex = synthetic_seg.render(0, "held_out", np.arange(count), data["image_size"],
                                  data.get("max_shapes") or 3,
                                  tuple(data.get("shape_size") or (0.11, 0.22)))
        pred = predictions(workdir, ex.image_BHWC)
        for i in range(count):
            panels = (ex.image_BHWC[i], colours[ex.mask_BHW[i]], colours[pred[i]])
            for j, (panel, title) in enumerate(zip(panels, ("image", "mask", name))):
                ax = axes[i, 3 * r + j]
                ax.imshow(panel, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(title, fontsize=9)
    handles = [matplotlib.patches.Patch(color=colours[k], label=c)
               for k, c in enumerate(synthetic_seg.CLASSES)]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="seg-heads-synthetic")
    parser.add_argument("--init", required=True, help="the default run's CLIP workdir (LSeg's "
                        "towers, GroupViT's text tower)")
    parser.add_argument("--figure", default="benchmarks/figures/seg_synthetic.png")
    parser.add_argument("--only", default="", help="comma-separated runs to keep: lseg, "
                        "lseg_held_out, groupvit")
    args = parser.parse_args()
    root = Path(args.workdir)
    rows, done = [], {}
    for name, slug, config, overrides, from_clip, drawn in RUNS:
        if args.only and slug not in args.only.split(","):
            continue
        workdir = root / slug
        extra = [f"init_checkpoint={args.init}"] if from_clip else []
        command = [sys.executable, "-m", "clipjax.cli", "train", "--config", config,
                   "--workdir", str(workdir), *overrides, *extra]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        rows.append((name, last_eval(workdir), seconds))
        if drawn:
            done[name.split(" ")[0]] = workdir
        print(f"{name}: done in {seconds:.0f} s", file=sys.stderr, flush=True)
    print(f"{'run':<30} {'mIoU':>6} {'mIoU (0s)':>9} {'pixel acc':>9} {'synonyms':>8} "
          f"{'seen':>6} {'unseen':>6} {'wall':>6}")
    for name, m, seconds in rows:
        def pct(key):
            return f"{100 * m[key]:.1f}" if key in m else "-"

        print(f"{name:<30} {pct('seg/miou'):>6} {pct('seg/miou_zeros'):>9} "
              f"{pct('seg/pixel_accuracy'):>9} {pct('seg_synonyms/miou'):>8} "
              f"{pct('seg/miou_seen'):>6} {pct('seg/miou_unseen'):>6} {seconds:>5.0f}s")
    from clipjax.data import synthetic_seg

    for name, slug, *_ in RUNS:  # the floor: every pixel called background
        if (root / slug / "config.json").is_file():
            data = json.loads((root / slug / "config.json").read_text())["data"]
            ex = synthetic_seg.render(0, "held_out", np.arange(256), data["image_size"],
                                      data.get("max_shapes") or 3,
                                      tuple(data.get("shape_size") or (0.11, 0.22)))
            share = float(np.mean(ex.mask_BHW == 0))
            print(f"{name}: all-background mIoU {100 * share / len(synthetic_seg.CLASSES):.1f}")
    if done:
        figure(Path(args.figure), done)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
