"""`clipjax eval segmentation` and `clipjax segment`, for LSeg and GroupViT checkpoints.

    clipjax eval segmentation --checkpoint clipjax-lseg_synthetic --dataset synthetic
    clipjax eval segmentation --checkpoint RUN --dataset 'voc:/data/VOCdevkit/VOC2012?split=val'
    clipjax segment photo.jpg --checkpoint RUN --labels "dog, grass, other" --out-dir seg/

A LSeg checkpoint scores every pixel against the labels as given; a GroupViT checkpoint
groups the pixels and names each group (background below its threshold).
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from clipjax.evals import cli as evals_cli


def _mesh():
    from clipjax import sharding

    return sharding.create_mesh()


def _options(module, config, spec: str, args) -> dict:
    from clipjax.heads import dense

    scales = None
    if getattr(args, "scales", None):
        try:
            scales = tuple(float(s) for s in args.scales.split(","))
        except ValueError:
            raise ValueError(f"--scales {args.scales!r}: give numbers separated by commas, "
                             "e.g. 0.75,1,1.25.") from None
    return dense.predict_options(module, config, spec, mode=args.mode, crop=args.crop,
                                 stride=args.stride, scales=scales,
                                 flip=True if args.flip else None)


def _label_options(module, config, args) -> dict:
    options = module.label_options(config) if hasattr(module, "label_options") else {}
    if args.bg_thresh is not None:
        if not hasattr(module, "label_options"):
            raise ValueError("--bg-thresh applies to GroupViT checkpoints; LSeg scores every "
                             "label, background included, as given.")
        options["bg_thresh"] = args.bg_thresh
    return options


def _labels(text: str | None, file: str | None) -> list[str]:
    if file:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"--labels-file {file} does not exist; give a text file "
                                    "with one label a line.")
        names = [line.strip() for line in Path(file).read_text().splitlines()]
    else:
        names = [n.strip() for n in (text or "").split(",")]
    names = [n for n in names if n]
    if not names:
        raise ValueError('No labels given: pass --labels "dog, grass, other" or --labels-file.')
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"The label {dup!r} is given twice; give each label once.")
    return names


def _eval_segmentation(args) -> None:
    from clipjax.evals import segmentation as seg_evals
    from clipjax.heads import dense

    module, model, params, config = dense.load(args.checkpoint)
    dataset = dense.eval_set(args.dataset, config, args.num_examples)
    names = list(dataset.classnames)
    if args.labels:
        given = _labels(args.labels, None)
        if len(given) != len(names):
            raise ValueError(f"--labels gives {len(given)} names for the {len(names)} classes of "
                             f"{args.dataset} ({', '.join(names)}); give one name a class, in "
                             "order.")
        names = given
    elif config.task == "groupvit":  # the words its evaluation prompts use
        names = module.prompt_names(args.dataset, names)
    elif dense.is_synthetic(args.dataset):
        from clipjax.data import synthetic_seg

        names = list(synthetic_seg.label_words("canonical"))  # the words LSeg trained with
    options = _options(module, config, args.dataset, args)
    encoders = dense.make_encoders(module, model, _mesh(), args.batch_size)
    labels = encoders.embed_labels(params, names, **_label_options(module, config, args))
    out = seg_evals.evaluate(encoders.logits_fn(params, labels), dataset, len(names), **options)
    if evals_cli._is_main():
        title = f"{config.task} {args.checkpoint} on {args.dataset} ({options['mode']})"
        print(seg_evals.report(out, names, title))
        payload = {"checkpoint": str(args.checkpoint), "dataset": args.dataset, "task": config.task,
                   "labels": names, "options": {k: list(v) if isinstance(v, tuple) else v
                                                for k, v in options.items()},
                   "miou": float(out["miou"]), "miou_zeros": float(out["miou_zeros"]),
                   "pixel_accuracy": float(out["pixel_accuracy"]),
                   "iou": {n: (None if np.isnan(v) else float(v))
                           for n, v in zip(names, np.asarray(out["iou"], float))},
                   "examples": int(out.get("examples", 0)),
                   "conventions": {"miou": "absent classes skipped (mmseg, GroupViT)",
                                   "miou_zeros": "absent classes count 0 (PyTorch-Encoding, "
                                                 "LSeg)"}}
        evals_cli._write_json(args.out, payload)
        print(f"wrote {args.out}")


# --- clipjax segment ---------------------------------------------------------------------


def palette(n: int) -> np.ndarray:
    """[n, 3] uint8 colours, PASCAL VOC's bit-interleaved palette (background black)."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def overlay(image_HWC: np.ndarray, pred_HW: np.ndarray, names: list[str], areas: np.ndarray):
    """The image blended half-and-half with the class colours, a legend on the right."""
    from PIL import Image, ImageDraw

    colours = palette(len(names))
    blend = (0.5 * image_HWC + 0.5 * colours[pred_HW]).astype(np.uint8)
    h, w = pred_HW.shape
    shown = [i for i in np.argsort(-areas) if areas[i] > 0]
    row = 16
    legend_w = 14 + max((len(names[i]) for i in shown), default=4) * 7 + 60
    canvas = Image.new("RGB", (w + legend_w, max(h, row * len(shown) + 8)), (255, 255, 255))
    canvas.paste(Image.fromarray(blend), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, i in enumerate(shown):
        y = 4 + k * row
        draw.rectangle([w + 6, y, w + 18, y + 12], fill=tuple(int(v) for v in colours[i]),
                       outline=(0, 0, 0))
        draw.text((w + 24, y), f"{names[i]} {100 * areas[i]:.1f}%", fill=(0, 0, 0))
    return canvas


def _read_image(path: str) -> np.ndarray:
    from clipjax.data import sources

    try:
        with open(path, "rb") as f:
            image = sources.open_image(f.read())
        return np.asarray(sources.load_pixels(image).convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist; give image files.") from None
    except Exception as e:  # PIL's errors name no file
        raise ValueError(f"cannot read {path} as an image ({type(e).__name__}: {e}); give a "
                         "JPEG, PNG or other image PIL opens.") from None


def _segment(args) -> None:
    from PIL import Image

    from clipjax.evals import segmentation as seg_evals
    from clipjax.heads import dense

    names = _labels(args.labels, args.labels_file)
    module, model, params, config = dense.load(args.checkpoint)
    names_out = module.output_names(names)  # GroupViT adds background
    options = _options(module, config, "image", args)
    encoders = dense.make_encoders(module, model, _mesh(), args.batch_size)
    labels = encoders.embed_labels(params, names_out, **_label_options(module, config, args))
    logits_fn = encoders.logits_fn(params, labels)
    os.makedirs(args.out_dir, exist_ok=True)
    failed, results = [], {}
    for path in args.images:
        try:
            image = _read_image(path)
        except (ValueError, FileNotFoundError) as e:
            print(f"clipjax segment: {e} Segmenting the others.", file=sys.stderr, flush=True)
            failed.append(path)
            continue
        probs_HWC = seg_evals.predict(logits_fn, image, **options)
        pred_HW = np.argmax(probs_HWC, -1).astype(np.int32)
        areas = np.bincount(pred_HW.reshape(-1), minlength=len(names_out)) / pred_HW.size
        stem = Path(path).stem
        label_png = Path(args.out_dir) / f"{stem}_labels.png"
        mask = Image.fromarray(pred_HW.astype(np.uint8), mode="P") if len(names_out) <= 256 \
            else Image.fromarray(pred_HW.astype(np.int32), mode="I")
        if mask.mode == "P":
            mask.putpalette(palette(256).reshape(-1).tolist())
        mask.save(label_png)
        overlay_png = Path(args.out_dir) / f"{stem}_overlay.png"
        overlay(image, pred_HW, names_out, areas).save(overlay_png)
        results[path] = {"labels_png": str(label_png), "overlay_png": str(overlay_png),
                         "areas": {n: float(a) for n, a in zip(names_out, areas)}}
        if evals_cli._is_main():
            print(f"# {path} -> {label_png}, {overlay_png}")
            for i in np.argsort(-areas, kind="stable"):
                if areas[i] > 0:
                    print(f"{100 * areas[i]:6.2f}%  {i:>3}  {names_out[i]}")
    if evals_cli._is_main() and results:
        evals_cli._write_json(str(Path(args.out_dir) / "areas.json"),
                              {"checkpoint": str(args.checkpoint), "labels": names_out,
                               "images": results})
    if failed:
        raise ValueError(f"{len(failed)} of {len(args.images)} images could not be read: "
                         f"{', '.join(failed)}.")


# --- the parsers --------------------------------------------------------------------------


def _inference(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="an LSeg or GroupViT training workdir, one step folder of it, or its "
                   "model.safetensors")
    p.add_argument("--mode", choices=("whole", "slide"), default=None,
                   help="score the whole image at once or in sliding windows of the training "
                   "crop (default: whole for the built-in images, slide otherwise)")
    p.add_argument("--crop", type=int, default=None, help="sliding window size (default: the "
                   "training crop)")
    p.add_argument("--stride", type=int, default=None, help="sliding window stride (default: 2/3 "
                   "of the crop)")
    p.add_argument("--scales", default=None, help="comma-separated image scales whose "
                   "probabilities are averaged, e.g. 0.5,0.75,1,1.25,1.5,1.75 (default 1)")
    p.add_argument("--flip", action="store_true", help="also average the flipped image")
    p.add_argument("--batch-size", type=int, default=16, help="windows per model call")
    p.add_argument("--bg-thresh", type=float, default=None, help="GroupViT: background where a "
                   "pixel's best class affinity is below this (default: the run's head.bg_thresh; "
                   "the paper uses 0.95 for VOC and COCO, 0.35 for Context)")


def register_eval(tasks) -> None:
    e = tasks.add_parser("segmentation", help="semantic segmentation mIoU (LSeg, GroupViT)",
                         description="mIoU and pixel accuracy from one confusion matrix over the "
                         "split, reported both ways: absent classes skipped (mmseg, GroupViT's "
                         "numbers) and counted as 0 (PyTorch-Encoding, LSeg's numbers).")
    _inference(e)
    e.add_argument("--dataset", required=True, help="synthetic[:N] (the built-in held-out "
                   "shapes), ade20k:DIR?split=validation, voc:DIR?split=val, context:DIR?split=val, "
                   "coco_object:DIR?split=val2017 or segfolder:DIR")
    e.add_argument("--labels", default=None, help="comma-separated words to score the classes "
                   "with, one a class in order (default: the dataset's class names)")
    e.add_argument("--num-examples", type=int, default=0, help="evaluate the first N (0: all)")
    e.add_argument("--out", default="segmentation.json", help="results JSON")
    e.set_defaults(fn=_eval_segmentation)


def register(sub) -> None:
    s = sub.add_parser("segment", help="segment images with any label list (LSeg, GroupViT)",
                       description="Label every pixel of each image with one of the labels; "
                       "writes IMAGE_labels.png (class indices, VOC palette), "
                       "IMAGE_overlay.png (colours and a legend) and areas.json, and prints each "
                       "label's share of the image.")
    s.add_argument("images", nargs="+", metavar="IMAGE")
    labels = s.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help='comma-separated labels, e.g. "dog, grass, other"')
    labels.add_argument("--labels-file", metavar="FILE", help="one label a line")
    _inference(s)
    s.add_argument("--out-dir", default=".", help="where the PNGs and areas.json go")
    s.set_defaults(fn=_segment)
