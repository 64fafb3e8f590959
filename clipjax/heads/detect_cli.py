"""`clipjax eval detection` and `clipjax detect`, for GLIP checkpoints.

    clipjax eval detection --checkpoint clipjax-glip_synthetic --dataset synthetic
    clipjax eval detection --checkpoint RUN --coco /data/coco --split val2017
    clipjax eval detection --checkpoint RUN --lvis /data/lvis        # minival, 40 classes a prompt
    clipjax detect photo.jpg --checkpoint RUN --prompt "person. dog. frisbee" --out-dir det/
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from clipjax.evals import cli as evals_cli


def _mesh():
    from clipjax import sharding

    return sharding.create_mesh()


def dataset_spec(args) -> str:
    """The one evaluation split --dataset, --coco, --lvis or --flickr names."""
    given = [(k, v) for k, v in (("dataset", args.dataset), ("coco", args.coco),
                                 ("lvis", args.lvis), ("flickr", args.flickr)) if v]
    if len(given) != 1:
        raise ValueError("Name one evaluation split: --dataset synthetic, --coco DIR --split "
                         "val2017, --lvis DIR or --flickr DIR --split val.")
    kind, value = given[0]
    if kind == "dataset":
        return value
    if kind == "lvis":
        return f"lvis:{value}"
    split = args.split or {"coco": "val2017", "flickr": "val"}[kind]
    return f"{kind}:{value}?split={split}"


def _eval_detection(args) -> None:
    from tqdm import tqdm

    from clipjax.evals import detection as det_evals
    from clipjax.heads import detection

    spec = dataset_spec(args)
    head, model, params, config = detection.load(args.checkpoint)
    dataset = detection.eval_set(spec, config, args.num_examples)
    names = list(dataset.classnames)
    per_prompt = args.per_prompt if args.per_prompt is not None else (
        int(head.settings(config)["per_prompt"]) if dataset.kind == "lvis" else 0)
    post = {"max_detections": args.max_dets or (300 if dataset.kind == "lvis" else 100)}
    encoders = detection.make_encoders(head, model, _mesh(), args.batch_size, **post)
    bar = tqdm(total=len(dataset), desc="detect", unit="img", disable=not evals_cli._is_main())
    out = detection.evaluate(encoders, params, dataset, names, per_prompt, bar.update)
    bar.close()
    if not evals_cli._is_main():
        return
    metrics = out["metrics"]
    title = f"GLIP {args.checkpoint} on {spec} ({len(dataset)} images)"
    print(title)
    for group, m in metrics.items():
        print(f"\n[{group}]" if group != "all" else "")
        print(det_evals.format_table(m))
    os.makedirs(Path(args.out).parent if Path(args.out).parent != Path("") else ".",
                exist_ok=True)
    stem = Path(args.out).with_suffix("")
    results_path = f"{stem}_results.json"
    Path(results_path).write_text(json.dumps(out["results"]))
    curve = f"{stem}_pr.png" if "precision" in metrics["all"] else None  # not for recall@k
    if curve:
        det_evals.pr_curve_png(metrics["all"]["precision"], curve,
                               f"GLIP {Path(args.checkpoint).name}, {dataset.kind}, "
                               f"{len(dataset)} images")
    payload = {"checkpoint": str(args.checkpoint), "dataset": spec, "images": len(dataset),
               "per_prompt": per_prompt, "max_detections": post["max_detections"],
               "metrics": {g: {k: float(v) for k, v in m.items()
                               if isinstance(v, (int, float, np.number))}
                           for g, m in metrics.items()},
               "ap_per_category": {names[list(dataset.category_ids).index(int(c))]: float(v)
                                   for c, v in metrics["all"].get("AP_per_category", {}).items()},
               "results": results_path, "pr_curve": curve}
    evals_cli._write_json(args.out, payload)
    kind = "COCO results format" if curve else "ranked boxes a phrase"
    print(f"wrote {args.out}, {results_path} ({kind})" + (f" and {curve}" if curve else ""))


# --- clipjax detect ----------------------------------------------------------------------


def draw(image_HWC: np.ndarray, boxes_N4, scores_N, labels_N, names: list[str]):
    """The image with each box outlined in its phrase's colour and labelled "name 0.87"."""
    from PIL import Image, ImageDraw

    from clipjax.heads.segment_cli import palette

    colours = palette(len(names) + 1)[1:]
    canvas = Image.fromarray(np.asarray(image_HWC, np.uint8)).convert("RGB")
    pen = ImageDraw.Draw(canvas)
    width = max(1, round(max(canvas.size) / 250))
    for (x0, y0, x1, y1), s, k in zip(boxes_N4, scores_N, labels_N):
        colour = tuple(int(v) for v in colours[k])
        pen.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        text = f"{names[k]} {s:.2f}"
        tx, ty = x0, max(0, y0 - 11)
        pen.rectangle([tx, ty, tx + 6 * len(text) + 4, ty + 11], fill=colour)
        pen.text((tx + 2, ty), text, fill=(0, 0, 0) if sum(colour) > 380 else (255, 255, 255))
    return canvas


def _detect(args) -> None:
    from clipjax.data import detection as det_data
    from clipjax.heads import detection
    from clipjax.heads.segment_cli import _read_image

    names = detection.parse_prompt(args.prompt)
    if not 0 <= args.threshold < 1:
        raise ValueError(f"--threshold {args.threshold}: give a score in [0, 1).")
    head, model, params, config = detection.load(args.checkpoint)
    encoders = detection.make_encoders(head, model, _mesh(), args.batch_size,
                                       max_detections=args.max_dets)
    prompt_list = detection.prompts(names, encoders.context_length)
    os.makedirs(args.out_dir, exist_ok=True)
    failed, found = [], {}
    for path in args.images:
        try:
            image = _read_image(path)
        except (ValueError, FileNotFoundError) as e:
            print(f"clipjax detect: {e} Detecting in the others.", file=sys.stderr, flush=True)
            failed.append(path)
            continue
        canvas, scale = det_data.letterbox(image, encoders.image_size)
        example = det_data.DetEvalExample(0, image, canvas, scale, np.zeros((0, 4)),
                                          np.zeros(0, np.int32))
        (bx, sc, lb), = encoders.detect(params, example.canvas[None], prompt_list, len(names))
        keep = sc >= args.threshold
        bx, sc, lb = detection.to_original(bx[keep], example), sc[keep], lb[keep]
        stem = Path(path).stem
        png = Path(args.out_dir) / f"{stem}_boxes.png"
        draw(image, bx, sc, lb, names).save(png)
        found[path] = {"png": str(png), "size": [int(image.shape[1]), int(image.shape[0])],
                       "boxes": [{"phrase": names[k], "score": round(float(s), 4),
                                  "box_xyxy": [round(float(v), 1) for v in b]}
                                 for b, s, k in zip(bx, sc, lb)]}
        if evals_cli._is_main():
            print(f"# {path} -> {png}: {len(sc)} boxes with score >= {args.threshold}")
            for b, s, k in zip(bx, sc, lb):
                print(f"{s:.3f}  {names[k]:<20} [{', '.join(f'{v:.0f}' for v in b)}]")
    if evals_cli._is_main() and found:
        out = Path(args.out_dir) / "boxes.json"
        evals_cli._write_json(str(out), {"checkpoint": str(args.checkpoint), "prompt": names,
                                         "threshold": args.threshold, "images": found})
        print(f"wrote {out}")
    if failed:
        raise ValueError(f"{len(failed)} of {len(args.images)} images could not be read: "
                         f"{', '.join(failed)}.")


# --- the parsers --------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a GLIP training workdir, one step folder of it, or its model.safetensors")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call")


def register_eval(tasks) -> None:
    e = tasks.add_parser("detection", help="detection AP (GLIP): COCO, LVIS, Flickr30k",
                         description="Detect every class of the split through prompts of its "
                         "names and score the boxes with pycocotools (LVIS: faster-coco-eval's "
                         "LVIS mode, 300 detections); writes OUT (metrics), OUT_results.json "
                         "(COCO results format) and OUT_pr.png (precision-recall curves).")
    _common(e)
    e.add_argument("--dataset", default=None, help="synthetic[:N] (the built-in held-out "
                   "shapes) or a spec: coco:DIR?split=val2017, lvis:DIR, flickr:DIR?split=val")
    e.add_argument("--coco", default=None, metavar="DIR", help="a COCO root (annotations/, "
                   "val2017/)")
    e.add_argument("--lvis", default=None, metavar="DIR", help="a root with "
                   "lvis_v1_minival_inserted_image_name.json and COCO's images")
    e.add_argument("--flickr", default=None, metavar="DIR", help="a Flickr30k Entities root "
                   "with MDETR's annotations")
    e.add_argument("--split", default=None, help="with --coco/--flickr (default val2017 / val)")
    e.add_argument("--per-prompt", type=int, default=None, help="classes a prompt (default: "
                   "all in one; 40 for LVIS)")
    e.add_argument("--max-dets", type=int, default=None, help="detections kept an image "
                   "(default 100; 300 for LVIS)")
    e.add_argument("--num-examples", type=int, default=0, help="evaluate the first N (0: all)")
    e.add_argument("--out", default="detection.json", help="metrics JSON")
    e.set_defaults(fn=_eval_detection)


def register(sub) -> None:
    d = sub.add_parser("detect", help="find the phrases of a prompt in images (GLIP)",
                       description="Detect every phrase of the prompt in each image; writes "
                       "IMAGE_boxes.png (labelled boxes) and boxes.json, and prints the boxes.")
    d.add_argument("images", nargs="+", metavar="IMAGE")
    d.add_argument("--prompt", required=True, help='phrases separated by ". ", e.g. '
                   '"person. dog. frisbee"')
    _common(d)
    d.add_argument("--threshold", type=float, default=0.3, help="lowest score drawn (default "
                   "0.3)")
    d.add_argument("--max-dets", type=int, default=100, help="detections kept an image")
    d.add_argument("--out-dir", default=".", help="where the PNGs and boxes.json go")
    d.set_defaults(fn=_detect)
