"""GLIP on the built-in shapes: AP on seen and held-out colour-shape pairs, and a picture.

    clipjax train                                    # the default CLIP run, GLIP's towers
    python benchmarks/glip_synthetic.py --init clipjax-default --workdir /tmp/glip-bench

Trains `clipjax train --config glip_synthetic` from the default run (training images and
prompts never show the six held-out pairs: "blue circle", "purple square", "red triangle",
"cyan diamond", "green cross", "yellow ring"), then detects all 36 classes on 256 held-out
images (every class equally often) through prompts of class names and scores the boxes
with pycocotools: AP and AP50 over all classes, the 30 seen and the 6 held-out pairs.

Two controls say whether the held-out AP comes from composing a colour word with a shape
word: the same detections with their predicted colour replaced by a random one (the
shape kept), and with their predicted shape replaced (the colour kept). A detector that
read only the shape (or only the colour) of a prompt would score like these.
Draws a few held-out images with their boxes into --figure.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def relabel(results: list[dict], keep: str, seed: int = 0) -> list[dict]:
    """The detections with their colour (keep="shape") or shape (keep="colour") redrawn at
    random; category ids are label + 1, label = shape x 6 + colour."""
    rng = np.random.default_rng(seed)
    out = []
    for r in results:
        shape, colour = divmod(r["category_id"] - 1, 6)
        if keep == "shape":
            colour = int(rng.integers(6))
        else:
            shape = int(rng.integers(6))
        out.append(dict(r, category_id=shape * 6 + colour + 1))
    return out


def scores(dataset, results: list[dict]) -> dict:
    from clipjax.evals import detection as det_evals
    from clipjax.heads import detection

    out = {"all": det_evals.coco_evaluate(dataset.coco_gt, results)}
    for group in ("seen", "unseen"):
        ids = set(getattr(dataset, f"{group}_category_ids"))
        out[group] = det_evals.coco_evaluate(detection.split_gt(dataset.coco_gt, ids),
                                             [r for r in results if r["category_id"] in ids])
    return out


def top_boxes(results: list[dict], image_id: int, count: int) -> list[dict]:
    """The image's `count` best detections, one a place (a box overlapping a better one
    by IoU > 0.5 is the same object under another name)."""
    from clipjax.heads import boxes

    mine = sorted((r for r in results if r["image_id"] == image_id), key=lambda r: -r["score"])
    chosen = []
    for r in mine:
        x, y, w, h = r["bbox"]
        b = np.array([[x, y, x + w, y + h]], np.float32)
        if all(boxes.pairwise_iou(b, np.array([c["xyxy"]], np.float32))[0, 0] <= 0.5
               for c in chosen):
            chosen.append(dict(r, xyxy=b[0]))
        if len(chosen) == count:
            break
    return chosen


def figure(path: Path, dataset, results: list[dict], names, count: int = 6) -> None:
    """Held-out images with the ground truth (white) and, for as many objects as the image
    holds, the best-scoring detections with their class names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    unseen = set(dataset.unseen_category_ids)
    held = [ex for ex in dataset if any(c + 1 in unseen for c in ex.classes)][:count // 2]
    seen = [ex for ex in dataset if all(c + 1 not in unseen for c in ex.classes)]
    examples = held + seen[:count - len(held)]  # half of them hold a held-out pair
    fig, axes = plt.subplots(1, count, figsize=(2.6 * count, 3.0))
    for ax, ex in zip(axes, examples):
        ax.imshow(ex.image)
        ax.set_axis_off()
        truth = [names[c] for c in ex.classes]
        ax.set_title("truth: " + ", ".join(truth), fontsize=7)
        for box in ex.boxes:
            ax.add_patch(Rectangle(box[:2], *(box[2:] - box[:2]), fill=False, ec="white", lw=1))
        for r in top_boxes(results, ex.image_id, len(ex.boxes)):
            x, y, w, h = r["bbox"]
            colour = "orange" if r["category_id"] in unseen else "lime"
            ax.add_patch(Rectangle((x, y), w, h, fill=False, ec=colour, lw=1.5, ls="--"))
            ax.text(x, y - 1.5, f"{names[r['category_id'] - 1]} {r['score']:.2f}",
                    color=colour, fontsize=7, weight="bold")
    fig.suptitle("GLIP on held-out images (white: truth; dashed: best detections, green a seen "
                 "pair, orange a held-out pair)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", default="clipjax-default", help="the default run's workdir")
    p.add_argument("--workdir", default="/tmp/glip-bench")
    p.add_argument("--images", type=int, default=256, help="held-out test images")
    p.add_argument("--figure", default=str(Path(__file__).parent / "figures" / "glip_synthetic.png"))
    p.add_argument("overrides", nargs="*", help="config overrides for the run, e.g. total_steps=500")
    args = p.parse_args()
    run = Path(args.workdir) / "glip"
    start = time.perf_counter()
    if not (run / "model.safetensors").is_file():
        cmd = ["clipjax", "train", "--config", "glip_synthetic", "--workdir", str(run),
               f"init_checkpoint={args.init}", *args.overrides]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start

    from clipjax.data import synthetic
    from clipjax.heads import detection

    head, model, params, config = detection.load(str(run))
    dataset = detection.eval_set(f"synthetic:{args.images}", config)
    encoders = detection.make_encoders(head, model, None)
    names = list(dataset.classnames)
    results = detection.detect_split(encoders, params, dataset, names)
    rows = [("GLIP", scores(dataset, results)),
            ("control: predicted colour redrawn", scores(dataset, relabel(results, "shape"))),
            ("control: predicted shape redrawn", scores(dataset, relabel(results, "colour")))]
    print(f"\nglip_synthetic from {args.init}: {args.images} held-out images, 36 classes "
          f"({len(synthetic.CLASSNAMES) - 6} seen, 6 held out); training wall {wall:.0f} s")
    print("| detections | AP | AP50 | seen AP | seen AP50 | held-out AP | held-out AP50 |")
    print("|---|---|---|---|---|---|---|")
    table = {}
    for name, s in rows:
        table[name] = {g: {k: float(s[g][k]) for k in ("AP", "AP50")} for g in s}
        print(f"| {name} | " + " | ".join(f"{100 * s[g][k]:.1f}%" for g in ("all", "seen", "unseen")
                                         for k in ("AP", "AP50")) + " |")
    (Path(args.workdir) / "glip_synthetic.json").write_text(json.dumps(
        {"init": args.init, "images": args.images, "wall_s": wall, "table": table}, indent=1))
    figure(Path(args.figure), dataset, results, names)


if __name__ == "__main__":
    sys.exit(main())
