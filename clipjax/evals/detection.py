"""Detection and grounding evaluation for GLIP: COCO AP through pycocotools (or
faster-coco-eval), LVIS APr/APc/APf through faster-coco-eval's LVIS mode, and Flickr30k
Entities recall@k following MDETR's evaluator (the one GLIP ships).

The libraries print progress on stdout or through a logger; it is captured into
`metrics["summary"]` so the CLI stays quiet and the usual summary is still at hand.

LVIS differs from COCO in three ways the LVIS API defines and this module keeps: at most
300 detections per image over all categories (cut by score before evaluation), detections
of a category neither present nor listed in `neg_category_ids` are not scored, and
unmatched detections of a `not_exhaustive_category_ids` category are not false positives.

Flickr30k recall is per phrase: a phrase is found at k when one of its first k boxes has
IoU >= 0.5 with one of its ground-truth boxes ("separate GT", GLIP's protocol) or with the
box enclosing all of them (`merge_boxes=True`, MDETR's "merged" protocol). Phrases without a
box (not visual, scene, no box) are not scored.
"""

import contextlib
import copy
import io
import json
import os
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# The summary rows of COCO evaluation: (key, AP?, IoU, area index, maxDets index).
_COCO_ROWS = (("AP", True, None, 0, 2), ("AP50", True, 0.5, 0, 2), ("AP75", True, 0.75, 0, 2),
              ("APs", True, None, 1, 2), ("APm", True, None, 2, 2), ("APl", True, None, 3, 2),
              ("AR@1", False, None, 0, 0), ("AR@10", False, None, 0, 1),
              ("AR@{}", False, None, 0, 2), ("ARs", False, None, 1, 2),
              ("ARm", False, None, 2, 2), ("ARl", False, None, 3, 2))
_LVIS_KEYS = {"AP_all": "AP", "AP_50": "AP50", "AP_75": "AP75", "AP_small": "APs",
              "AP_medium": "APm", "AP_large": "APl", "APr": "APr", "APc": "APc", "APf": "APf",
              "AR_all": "AR@{}", "AR_small": "ARs", "AR_medium": "ARm", "AR_large": "ARl"}
_TABLE_ORDER = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


# --- COCO results format -------------------------------------------------------------------

def results_json(image_ids: Sequence[int], boxes_xyxy: Sequence[np.ndarray],
                 scores: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                 category_ids: Sequence[int], path: str | os.PathLike | None = None) -> list[dict]:
    """Per-image detections (xyxy boxes, contiguous labels) as COCO results (xywh, dataset
    category ids), written to `path` as JSON when given."""
    if not len(image_ids) == len(boxes_xyxy) == len(scores) == len(labels):
        raise ValueError(f"Got {len(image_ids)} image ids but {len(boxes_xyxy)} box, "
                         f"{len(scores)} score and {len(labels)} label lists; give one of each "
                         "per image.")
    cat_C = np.asarray(category_ids)
    out = []
    for image_id, box_M4, score_M, label_M in zip(image_ids, boxes_xyxy, scores, labels):
        box_M4 = np.asarray(box_M4, np.float64).reshape(-1, 4)
        label_M = np.asarray(label_M, np.int64).reshape(-1)
        score_M = np.asarray(score_M, np.float64).reshape(-1)
        if not len(box_M4) == len(label_M) == len(score_M):
            raise ValueError(f"Image {image_id} has {len(box_M4)} boxes, {len(score_M)} scores "
                             f"and {len(label_M)} labels; give one score and label per box.")
        if label_M.size and (label_M.min() < 0 or label_M.max() >= len(cat_C)):
            raise ValueError(f"Image {image_id} has label {label_M.max()} outside "
                             f"0..{len(cat_C) - 1}; pass one category id per class.")
        wh_M2 = box_M4[:, 2:] - box_M4[:, :2]
        for (x0, y0), (w, h), s, c in zip(box_M4[:, :2], wh_M2, score_M, cat_C[label_M]):
            out.append({"image_id": int(image_id), "category_id": int(c),
                        "bbox": [float(x0), float(y0), float(w), float(h)], "score": float(s)})
    if path is not None:
        Path(path).write_text(json.dumps(out))
    return out


def _load_gt(gt: str | os.PathLike | dict) -> dict:
    """A ground-truth dataset dict from a path or a dict (copied: the libraries mutate it)."""
    if isinstance(gt, dict):
        return copy.deepcopy(gt)
    if not Path(gt).is_file():
        raise ValueError(f"Ground-truth file {gt} does not exist; pass the annotations JSON "
                         "(e.g. instances_val2017.json).")
    return json.loads(Path(gt).read_text())


def _mean_valid(x: np.ndarray) -> float:
    """The COCO API's average: entries of -1 (no ground truth) left out; NaN when none is left."""
    x = x[x > -1]
    return float(x.mean()) if x.size else float("nan")


def _summary(precision_TRKAM: np.ndarray, recall_TKAM: np.ndarray, iou_T: np.ndarray,
             max_dets: int) -> dict:
    """The twelve COCO summary numbers read off the accumulated arrays, at any maxDets."""
    out = {}
    for key, is_ap, thr, a, m in _COCO_ROWS:
        t = slice(None) if thr is None else np.flatnonzero(np.isclose(iou_T, thr))
        x = precision_TRKAM[t, :, :, a, m] if is_ap else recall_TKAM[t, :, a, m]
        out[key.format(max_dets)] = _mean_valid(x)
    return out


def coco_evaluate(gt: str | os.PathLike | dict, results: list[dict], *, iou_type: str = "bbox",
                  max_dets: int = 100, use_faster: bool = False) -> dict:
    """COCO AP/AR (NaN where no ground truth falls in an area range), AP per category id, and
    the accumulated `precision` array [IoU 10, recall 101, K, area 4, maxDets (1, 10,
    max_dets)] for curves."""
    data = _load_gt(gt)
    cat_ids = sorted(c["id"] for c in data.get("categories", []))
    if not results:
        shape = (10, 101, len(cat_ids), 4, 3)
        out = {k.format(max_dets): 0.0 for k, *_ in _COCO_ROWS}
        return {**out, "AP_per_category": {c: 0.0 for c in cat_ids},
                "precision": np.zeros(shape), "summary": "no detections"}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        if use_faster:
            from faster_coco_eval import COCO, COCOeval_faster
            coco_gt = COCO(data, print_function=print)
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
            ev = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, print_function=print)
        else:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
            coco_gt = COCO()
            coco_gt.dataset = data
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
            ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.params.maxDets = sorted({1, 10, max_dets})  # the libraries sort it anyway
        ev.evaluate()
        ev.accumulate()
        if max_dets == 100 or (use_faster and max_dets > 10):  # their summaries' assumptions
            ev.summarize()
    m = [ev.params.maxDets.index(d) for d in (1, 10, max_dets)]  # last axis: 1, 10, max_dets
    precision = np.asarray(ev.eval["precision"])[..., m]
    out = _summary(precision, np.asarray(ev.eval["recall"])[..., m],
                   np.asarray(ev.params.iouThrs), max_dets)
    per_cat = {int(c): _mean_valid(precision[:, :, k, 0, -1])
               for k, c in enumerate(ev.params.catIds)}
    return {**out, "AP_per_category": per_cat, "precision": precision,
            "summary": log.getvalue()}


def _limit_per_image(results: list[dict], max_dets: int) -> list[dict]:
    """The LVIS API's cut: each image keeps its `max_dets` best-scored detections."""
    by_image = defaultdict(list)
    for r in results:
        by_image[r["image_id"]].append(r)
    return [r for rs in by_image.values()
            for r in sorted(rs, key=lambda r: -r["score"])[:max_dets]]


def lvis_evaluate(gt: str | os.PathLike | dict, results: list[dict], max_dets: int = 300, *,
                  iou_type: str = "bbox") -> dict:
    """LVIS AP, APr/APc/APf and AR at `max_dets` detections per image, as the LVIS API
    computes them, through faster-coco-eval's `lvis_style` mode."""
    from faster_coco_eval import COCO, COCOeval_faster
    data = _load_gt(gt)
    if any("frequency" not in c for c in data.get("categories", [])):
        raise ValueError("LVIS evaluation needs a 'frequency' (r, c or f) on every category; "
                         "use the LVIS annotation file, not a COCO one.")
    if not results:
        keys = [v.format(max_dets) for v in _LVIS_KEYS.values()]
        return {**dict.fromkeys(keys, 0.0), "summary": "no detections"}
    lines = []
    coco_gt = COCO(data, print_function=lines.append)
    coco_dt = coco_gt.loadRes(copy.deepcopy(_limit_per_image(results, max_dets)))
    ev = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, lvis_style=True,
                         print_function=lines.append)
    ev.params.maxDets = [max_dets]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    stats = ev.stats_as_dict
    out = {v.format(max_dets): (float("nan") if stats[k] == -1 else stats[k])
           for k, v in _LVIS_KEYS.items()}
    return {**out, "precision": np.asarray(ev.eval["precision"]),
            "summary": "\n".join(map(str, lines))}


# --- Flickr30k Entities ----------------------------------------------------------------------

def parse_entities_xml(path: str | os.PathLike) -> dict:
    """One Annotations/<image>.xml: size, boxes (xyxy) per entity id, and the ids annotated
    as having no box or being the whole scene."""
    root = ET.parse(path).getroot()
    out = {child.tag: int(child.text) for child in root.find("size")}
    boxes, nobox, scene = defaultdict(list), [], []
    for obj in root.iter("object"):
        bndbox = obj.find("bndbox")
        for name in obj.findall("name"):  # one drawn box can belong to several entities
            if bndbox is not None:
                boxes[name.text].append([int(bndbox.find(t).text)
                                         for t in ("xmin", "ymin", "xmax", "ymax")])
                continue
            if int(obj.findtext("nobndbox", "0")) > 0:
                nobox.append(name.text)
            if int(obj.findtext("scene", "0")) > 0:
                scene.append(name.text)
    return {**out, "boxes": dict(boxes), "nobox": nobox, "scene": scene}


def parse_sentences(path: str | os.PathLike) -> list[dict]:
    """One Sentences/<image>.txt: per line the plain sentence and its bracketed phrases
    `[/EN#<id>/<type>[/<type>...] words]` with entity id, types and first word index."""
    sentences = []
    for line in Path(path).read_text().split("\n"):
        if not line:
            continue
        words, phrases, current = [], [], None
        for token in line.split():
            if current is None and token.startswith("["):
                _, entity, *types = token.split("/")
                current = {"first_word_index": len(words), "phrase_id": entity[3:],
                           "phrase_type": types, "words": []}
                continue
            if current is not None and token.endswith("]"):
                token = token[:-1]
                current["words"].append(token)
                words.append(token)
                current["phrase"] = " ".join(current.pop("words"))
                phrases.append(current)
                current = None
                continue
            if current is not None:
                current["words"].append(token)
            words.append(token)
        sentences.append({"sentence": " ".join(words), "phrases": phrases})
    return sentences


def flickr_targets(flickr_dir: str | os.PathLike, split: str | Sequence[str] | None = None, *,
                   merge_boxes: bool = False) -> dict:
    """{(image_id, sentence_index): the sentence's phrases that have boxes, each with its
    `boxes`}; the order of that list is the order predictions must follow."""
    root = Path(flickr_dir)
    if isinstance(split, str):
        split_file = root / f"{split}.txt"
        if not split_file.is_file():
            raise ValueError(f"No split file {split_file}; give a list of image ids or the "
                             "Flickr30k Entities folder that holds train/val/test.txt.")
        split = [s.strip() for s in split_file.read_text().split("\n") if s.strip()]
    if split is None:
        split = sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    targets = {}
    for image_id in map(str, split):
        boxes = parse_entities_xml(root / "Annotations" / f"{image_id}.xml")["boxes"]
        if merge_boxes:  # one box enclosing all of an entity's boxes
            boxes = {k: [[min(b[0] for b in v), min(b[1] for b in v),
                          max(b[2] for b in v), max(b[3] for b in v)]] for k, v in boxes.items()}
        for s, sent in enumerate(parse_sentences(root / "Sentences" / f"{image_id}.txt")):
            phrases = [{**p, "boxes": boxes[p["phrase_id"]]} for p in sent["phrases"]
                       if p["phrase_id"] in boxes]
            if phrases:
                targets[image_id, s] = phrases
    return targets


def _box_iou(a_M4: np.ndarray, b_G4: np.ndarray) -> np.ndarray:
    """Pairwise IoU [M, G] of xyxy boxes, areas without a +1 (as MDETR's evaluator)."""
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    lt = np.maximum(a_M4[:, None, :2], b_G4[None, :, :2])
    rb = np.minimum(a_M4[:, None, 2:], b_G4[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    return inter / (area(a_M4)[:, None] + area(b_G4)[None, :] - inter)


def flickr_recall(predictions: dict, annotations: str | os.PathLike | dict,
                  split: str | Sequence[str] | None = None, *, k: Sequence[int] = (1, 5, 10),
                  iou: float = 0.5, merge_boxes: bool = False) -> dict:
    """Recall@k over phrases, overall (`R@k`) and per phrase type (`R@k/<type>`); k = -1 is
    the upper bound over all boxes given. `predictions[(image_id, sentence_index)]` holds one
    ranked list of xyxy boxes per phrase of `flickr_targets`, in that order."""
    targets = (annotations if isinstance(annotations, dict)
               else flickr_targets(annotations, split, merge_boxes=merge_boxes))
    preds = {(str(i), int(s)): v for (i, s), v in predictions.items()}
    missing = [key for key in targets if key not in preds]
    if missing:
        raise ValueError(f"{len(missing)} sentences have no prediction, e.g. image "
                         f"{missing[0][0]} sentence {missing[0][1]}; predict every sentence "
                         "listed by flickr_targets.")
    hits, totals = defaultdict(int), defaultdict(int)
    for key, phrases in targets.items():
        boxes = preds[key]
        if len(boxes) != len(phrases):
            raise ValueError(f"Image {key[0]} sentence {key[1]} has {len(phrases)} phrases with "
                             f"boxes but {len(boxes)} predictions; give one ranked box list "
                             "per phrase of flickr_targets.")
        for ranked, phrase in zip(boxes, phrases):
            ranked_M4 = np.asarray(ranked, np.float64).reshape(-1, 4)
            best_M = _box_iou(ranked_M4, np.asarray(phrase["boxes"], np.float64)).max(1,
                              initial=0.0)
            for kk in k:
                name = "upper_bound" if kk == -1 else f"R@{kk}"
                found = best_M[: None if kk == -1 else kk].max(initial=0.0) >= iou
                for group in ["", *(f"/{t}" for t in phrase["phrase_type"])]:
                    hits[name + group] += int(found)
                    totals[name + group] += 1
    out = {name: hits[name] / totals[name] for name in totals}
    return {**out, "phrases": sum(len(p) for p in targets.values()), "sentences": len(targets)}


# --- reporting -------------------------------------------------------------------------------

def pr_curve_png(precision_TRKAM: np.ndarray, path: str | os.PathLike,
                 title: str = "precision-recall") -> None:
    """Precision against recall averaged over classes (area all, largest maxDets), at IoU 0.5
    and averaged over IoU 0.5:0.95, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    p = np.asarray(precision_TRKAM, np.float64)[:, :, :, 0, -1]
    recall_R = np.linspace(0.0, 1.0, p.shape[1])

    def mean_curve(x_TRK: np.ndarray) -> np.ndarray:
        valid = x_TRK > -1  # -1: classes without ground truth
        return np.where(valid, x_TRK, 0).sum((0, 2)) / np.maximum(valid.sum((0, 2)), 1)

    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    for x_TRK, label in ((p[:1], "IoU 0.50"), (p, "IoU 0.50:0.95")):
        curve = mean_curve(x_TRK)
        ax.plot(recall_R, curve, label=f"{label} (AP {100 * _mean_valid(x_TRK):.1f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def format_table(metrics: dict, title: str = "detection") -> str:
    """AP rows first in the usual order, then AR and recall rows, as percentages."""
    scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
    keys = [k for k in _TABLE_ORDER if k in scalars]
    keys += [k for k in scalars if k not in keys]
    width = max([len(k) for k in keys] + [6])
    lines = [title]
    for key in keys:
        v = scalars[key]
        lines.append(f"  {key:<{width}}  " + ("    -" if np.isnan(v) else f"{100 * v:5.1f}"))
    for key in ("phrases", "sentences"):
        if key in metrics:
            lines.append(f"  {key:<{width}}  {metrics[key]:5d}")
    return "\n".join(lines)
