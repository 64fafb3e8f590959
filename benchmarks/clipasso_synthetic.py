"""CLIPasso with a tiny CLIP on the built-in shapes: are the sketches recognisable, do the
strokes lie on the shape? And scikit-image's horse, drawn by the same tiny tower.

    clipjax train --workdir /tmp/upath/clipjax-rn-tiny model=RN-tiny data.image_size=64
    clipjax train --workdir /tmp/upath/clipjax-default          # ViT-tiny: the saliency map
    python benchmarks/clipasso_synthetic.py --rn /tmp/upath/clipjax-rn-tiny \\
        --vit /tmp/upath/clipjax-default

Sketches `--per-shape` held-out images of each of the 6 shapes (seeds x images rows of one
vmapped batch), then classifies the sketches zero-shot with the same CLIP (the synthetic
class names and templates). A sketch is black strokes on white, so the colour half of a
"red circle" class is lost: besides the 36-way top-1 (chance 1/36) it reports the shape
alone (class probabilities summed over the 6 colours, chance 1/6), for the photos, the
initial strokes and the final sketches. The strokes' placement is the mean distance from
points sampled along them to the shape's outline (one-sided Chamfer, pixels), at the
start and at the end. Draws benchmarks/figures/clipasso_synthetic.png and
clipasso_horse.png.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

FIGURES = Path(__file__).parent / "figures"


def held_out(per_shape: int, size: int, seed: int = 0):
    """`per_shape` held-out examples of each shape: (images [N, S, S, 3] in [0, 1], labels)."""
    from clipjax.data import synthetic

    ex = synthetic.render(seed, "held_out", np.arange(2000), size)
    pick = np.concatenate([np.flatnonzero(ex.shape_B == k)[:per_shape]
                           for k in range(len(synthetic.SHAPES))])
    return ex.image_BHWC[pick].astype(np.float32) / 255.0, ex.label_B[pick]


def object_mask(photo_HWC: np.ndarray) -> np.ndarray:
    """1 on the shape: the shapes are saturated colours on a grey background."""
    return (photo_HWC.max(-1) - photo_HWC.min(-1) > 0.3).astype(np.float32)


def outline(photo_HWC: np.ndarray) -> np.ndarray:
    """Points [P, 2] (x, y, pixel centres at i + 0.5) on the shape's boundary."""
    from skimage.measure import find_contours

    pts = np.concatenate(find_contours(object_mask(photo_HWC), 0.5))  # (row, col)
    return pts[:, ::-1] + 0.5


def chamfer_to(points_S42: np.ndarray, outline_P2: np.ndarray) -> float:
    """Mean distance (px) from 32 points along each stroke to the nearest outline point."""
    from clipjax.heads import raster

    s_Q2 = np.asarray(raster.sample_curves(jnp.asarray(points_S42), 32)).reshape(-1, 2)
    d_QP = np.linalg.norm(s_Q2[:, None] - outline_P2[None], axis=-1)
    return float(d_QP.min(1).mean())


def draw(points_S42, width: float, canvas: int, scale: int = 1,
         inverted: bool = False) -> np.ndarray:
    """RGB [canvas*scale]^2 in [0, 1]: the strokes, drawn larger for pictures (they are vectors)."""
    from clipjax.heads import raster

    grey = np.asarray(raster.render(jnp.asarray(points_S42) * scale,
                                    jnp.full(len(points_S42), width * scale), None, canvas * scale))
    return np.repeat((1.0 - grey if inverted else grey)[..., None], 3, -1)


def zero_shot(model, params, images_NHWC: np.ndarray):
    """Class probabilities [N, 36] with the synthetic class names and templates."""
    from clipjax.data import synthetic
    from clipjax.evals import encoders, zeroshot
    from clipjax.heads import clipasso

    enc = encoders.make_encoders(model, batch_size=8)
    w_CE = zeroshot.classifier(enc, params, synthetic.CLASSNAMES, synthetic.TEMPLATES)
    x = np.asarray(jax.vmap(clipasso.normalize)(jnp.asarray(images_NHWC, jnp.float32)))
    emb = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image",
                                           normalize=True))(params, x)
    logits = np.exp(float(params["logit_scale"])) * np.asarray(emb) @ w_CE.T
    logits -= logits.max(1, keepdims=True)
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def accuracy(probs_NC: np.ndarray, labels_N: np.ndarray) -> tuple[float, float]:
    """(36-way top-1, shape top-1 from the probabilities summed over colours).

    The label is shape * 6 + colour."""
    shape_N6 = probs_NC.reshape(len(probs_NC), 6, 6).sum(-1)
    return (float((probs_NC.argmax(1) == labels_N).mean()),
            float((shape_N6.argmax(1) == labels_N // 6).mean()))


def sketch_all(tower, params, vit, vit_params, photos, s, seeds_K, desc, masks=None):
    from tqdm import tqdm

    from clipjax.heads import clipasso

    masks = [None] * len(photos) if masks is None else masks
    starts = np.stack([clipasso.initial_points(p, s.strokes, seeds_K, vit, vit_params, m,
                                               s.inverted) for p, m in zip(photos, masks)])
    last = (s.iterations - 1) // s.eval_every * s.eval_every
    with tqdm(total=last, desc=desc, unit="it", file=sys.stderr) as bar:
        def progress(steps, loss):
            bar.update(steps)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

        return clipasso.optimise(tower, params["visual"], photos, starts, s, seeds_K=seeds_K,
                                 progress=progress)


def figure_shapes(path: Path, runs: dict, labels, canvas: int, width: float):
    """For one held-out image of each shape: per paper, the target, the initial strokes and
    the sketch with the shape the tiny CLIP reads in it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipjax.data import synthetic

    shown = [int(np.flatnonzero(labels // 6 == k)[0]) for k in range(6)]
    fig, axes = plt.subplots(3 * len(runs), len(shown),
                             figsize=(2.0 * len(shown), 2.1 * 3 * len(runs)))
    for block, (paper, run) in enumerate(runs.items()):
        inv = paper == "black"
        for j, i in enumerate(shown):
            shape_6 = run["probs"][i].reshape(6, 6).sum(-1)
            sk = run["sketches"][i]
            rows = [(run["targets"][i], f"{synthetic.CLASSNAMES[labels[i]]} ({paper} paper)"),
                    (draw(sk.start_points_S42, width, canvas, 4, inv), "initial strokes"),
                    (draw(sk.points_S42, width, canvas, 4, inv),
                     f"reads: {synthetic.SHAPES[shape_6.argmax()]} {shape_6.max():.0%}")]
            for r, (img, title) in enumerate(rows):
                ax = axes[3 * block + r, j]
                ax.imshow(img, interpolation="bilinear" if r else "nearest")
                ax.set_title(title, fontsize=8)
                ax.axis("off")
    strokes = len(next(iter(runs.values()))["sketches"][0].points_S42)
    fig.suptitle(f"CLIPasso with the tiny RN-tiny CLIP of the built-in shapes: held-out shapes, "
                 f"{strokes} strokes on a {canvas} px canvas (drawn 4x)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure_horse(path: Path, photo, runs: dict, canvas: int, width: float, iters: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + 2 * len(runs), figsize=(3 * (1 + 2 * len(runs)), 3.4))
    panels = [(photo, "skimage.data.horse(), squashed to the canvas")]
    for paper, h in runs.items():
        inv = paper == "black"
        panels += [(draw(h.start_points_S42, width, canvas, 4, inv), f"initial ({paper} paper)"),
                   (draw(h.points_S42, width, canvas, 4, inv),
                    f"sketch ({paper} paper), best at it. {h.best_iteration}")]
    for ax, (img, title) in zip(axes, panels):
        ax.imshow(img)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    strokes = len(next(iter(runs.values())).points_S42)
    fig.suptitle(f"The tiny tower: RN-tiny (1.3 M parameters, 64 px input, trained on coloured "
                 f"shapes only), {strokes} strokes, up to {iters} iterations", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def on_paper(photos, masks, paper: str):
    """The object on CLIPasso's white (its --mask_object) or on black."""
    ground = 1.0 if paper == "white" else 0.0
    return photos * masks[..., None] + ground * (1.0 - masks[..., None])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rn", default="/tmp/upath/clipjax-rn-tiny", help="RN-tiny CLIP workdir")
    p.add_argument("--vit", default="/tmp/upath/clipjax-default", help="ViT CLIP for saliency "
                   "('' for none: starts anywhere on the XDoG lines)")
    p.add_argument("--per-shape", type=int, default=2, help="held-out images of each shape")
    p.add_argument("--strokes", type=int, default=8)
    p.add_argument("--horse-strokes", type=int, default=16)
    p.add_argument("--iterations", type=int, default=301)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--width", type=float, default=1.0, help="CLIPasso --width (half-width) px")
    p.add_argument("--samples", type=int, default=16, help="rasteriser points a curve")
    p.add_argument("--lr", type=float, default=1.0, help="Adam's step on the points (px)")
    p.add_argument("--papers", default="white,black", help="black strokes on white "
                   "(CLIPasso), white strokes on black (the tiny CLIP's dark backgrounds)")
    p.add_argument("--skip-horse", action="store_true")
    p.add_argument("--skip-shapes", action="store_true")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()

    from clipjax import weights
    from clipjax.heads import clipasso, sketch_cli

    w = weights.load(args.rn)
    model, params = w.model(), jax.tree.map(jnp.asarray, w.params)
    tower = clipasso.tower_of(w.model_config)
    canvas = tower.image_size
    vit = vit_params = None
    if args.vit:
        vit, vit_params, _ = sketch_cli.load_saliency(args.vit)
    papers = [x.strip() for x in args.papers.split(",")]
    seeds_K = [1000 * k for k in range(args.seeds)]
    photos, labels = held_out(args.per_shape, canvas)
    masks = np.stack([object_mask(ph) for ph in photos])
    outlines = [outline(ph) for ph in photos]
    drawn = 2 * args.width
    print(f"{w.description} from {args.rn} ({canvas} px); saliency "
          f"{args.vit or 'none (XDoG lines only)'}; {len(photos)} held-out images x "
          f"{args.seeds} seeds, {args.strokes} strokes, up to {args.iterations} iterations, "
          f"lr {args.lr}; the exact object mask")
    report = {"model": w.description, "images": len(photos), "seeds": args.seeds,
              "strokes": args.strokes, "iterations": args.iterations, "papers": {}}
    runs = {}
    for paper in [] if args.skip_shapes else papers:
        s = clipasso.Settings(strokes=args.strokes, iterations=args.iterations,
                              width=args.width, samples=args.samples, lr=args.lr,
                              inverted=paper == "black")
        targets = on_paper(photos, masks, paper)
        t0 = time.time()
        sketches = sketch_all(tower, params, vit, vit_params, targets, s, seeds_K, paper, masks)
        wall = time.time() - t0
        inv = s.inverted
        starts = np.stack([draw(k.start_points_S42, drawn, canvas, 1, inv) for k in sketches])
        finals = np.stack([draw(k.points_S42, drawn, canvas, 1, inv) for k in sketches])
        results = {}
        for name, images in (("photos", photos), (f"shapes on {paper}", targets),
                             ("initial strokes", starts), ("sketches", finals)):
            probs = zero_shot(model, params, images)
            results[name] = accuracy(probs, labels)
        c_start = np.asarray([chamfer_to(k.start_points_S42, o)
                              for k, o in zip(sketches, outlines)])
        c_end = np.asarray([chamfer_to(k.points_S42, o) for k, o in zip(sketches, outlines)])
        runs[paper] = {"sketches": sketches, "targets": targets, "probs": probs}
        print(f"\n{paper} paper: {len(photos)} held-out shapes, {wall / 60:.1f} min, best "
              f"iteration median {int(np.median([k.best_iteration for k in sketches]))}")
        print(f"{'zero-shot top-1':<18}{'36 classes':>12}{'shape (6)':>12}")
        for name, (top1, shape) in results.items():
            print(f"{name:<18}{100 * top1:>11.1f}%{100 * shape:>11.1f}%")
        print(f"{'chance':<18}{100 / 36:>11.1f}%{100 / 6:>11.1f}%")
        from clipjax.data import synthetic

        read = probs.reshape(len(probs), 6, 6).sum(-1).argmax(1)
        colour = probs.reshape(len(probs), 6, 6).sum(1).argmax(1)
        print("sketches read as: " + ", ".join(
            f"{synthetic.SHAPES[lab // 6]}->{synthetic.SHAPES[r]}" for lab, r in zip(labels, read))
            + f"; colours read: {', '.join(sorted({list(synthetic.COLOURS)[c] for c in colour}))}")
        print(f"stroke points to the outline (one-sided Chamfer, px at {canvas} px): start "
              f"{c_start.mean():.2f}, end {c_end.mean():.2f}; fell for "
              f"{(c_end < c_start).sum()} of {len(c_end)} sketches")
        report["papers"][paper] = {
            "wall_s": wall, "chamfer_start_px": float(c_start.mean()),
            "chamfer_end_px": float(c_end.mean()),
            "zero_shot": {k: {"top1_36": a, "top1_shape": b} for k, (a, b) in results.items()}}
    FIGURES.mkdir(exist_ok=True)
    if runs:
        figure_shapes(FIGURES / "clipasso_synthetic.png", runs, labels, canvas, drawn)
        print(f"wrote {FIGURES / 'clipasso_synthetic.png'}")

    if not args.skip_horse:
        from PIL import Image
        from skimage.data import horse

        mask = ~horse()  # True on the horse
        rgb = np.where(mask[..., None], np.asarray([0.36, 0.22, 0.12]), 1.0)
        small = lambda a: np.asarray(Image.fromarray(np.uint8(a * 255)).resize(  # noqa: E731
            (canvas, canvas), Image.BICUBIC), np.float32) / 255.0
        photo, m = small(rgb), (small(mask.astype(np.float64)) > 0.5).astype(np.float32)
        horses = {}
        for paper in papers:
            hs = clipasso.Settings(strokes=args.horse_strokes, iterations=args.iterations,
                                   width=args.width, samples=args.samples, lr=args.lr,
                                   inverted=paper == "black")
            t0 = time.time()
            h = sketch_all(tower, params, vit, vit_params, on_paper(photo[None], m[None], paper),
                           hs, seeds_K, f"horse, {paper}", m[None])[0]
            horses[paper] = h
            print(f"horse on {paper}: {args.horse_strokes} strokes, loss {h.loss:.4f} (seed "
                  f"{h.seed}, best at iteration {h.best_iteration}), "
                  f"{(time.time() - t0) / 60:.1f} min")
            report.setdefault("horse", {})[paper] = {"loss": h.loss,
                                                     "best_iteration": h.best_iteration}
        square = np.asarray(Image.fromarray(np.uint8(rgb * 255)).resize(  # as the canvas
            (4 * canvas, 4 * canvas), Image.BICUBIC))
        figure_horse(FIGURES / "clipasso_horse.png", square, horses, canvas, drawn,
                     args.iterations)
        print(f"wrote {FIGURES / 'clipasso_horse.png'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
