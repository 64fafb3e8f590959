"""Detection and grounding datasets as users have them: COCO, LVIS and MDETR's Flickr30k
Entities, each a Source of (image, boxes) records (clipjax.data.detection describes the
specs and puts them through the pipeline).

Annotations are read and checked once, when the source is opened: each one that cannot be a
box is skipped and counted by reason over the whole file (`stats()`), so a run reports the
same counts on every host. Images are decoded later, in the pipeline, which skips and counts
a missing or corrupt file as for every other source.
"""

import collections
import json
import math
import os

import numpy as np

from clipjax.data import sources as sources_lib
from clipjax.data.sources import BadSample, Record, Source

# Why an annotation is not a box; each is counted as "skipped_boxes/<reason>".
BOX_SKIP_REASONS = (
    "unknown_image",      # its image_id names no image of the file
    "unknown_category",   # its category_id names no category of the file
    "bad_bbox",           # bbox is not four finite numbers
    "empty_box",          # zero or negative width or height
    "box_outside_image",  # no part of it lies inside the image
    "no_phrase",          # a grounding box whose tokens_positive is empty (flickr)
)
# Kept but worth knowing: "crowd_boxes" (iscrowd: in the evaluation ground truth, never a
# training target), "clipped_boxes" (partly outside the image: clipped to it).
IMAGE_SKIP_REASONS = (
    "no_boxes",              # training only: an image without a single training box
    "image_size_mismatch",   # the decoded image is not the size its annotation file says
)


def _folder(path: str, what: str, fix: str) -> str:
    if not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} does not exist: {fix}")
    return path


def _load_json(path: str, fix: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"Annotation file {path!r} does not exist: {fix}")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"Annotation file {path!r} is not valid JSON ({e}): re-download "
                             "or re-convert it.") from None
    if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
        raise ValueError(f"Annotation file {path!r} is not in COCO format (a dict with images "
                         "and annotations): give a COCO-style instances JSON.")
    return data


def _check_box(bbox, width: float, height: float) -> tuple[str | None, list[float]]:
    """(reason or None, xyxy clipped to the image) of a COCO xywh bbox; reason "clipped"
    for a box kept after clipping."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return "bad_bbox", []
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return "bad_bbox", []
    if w <= 0 or h <= 0:
        return "empty_box", []
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
    if x1 <= x0 or y1 <= y0:
        return "box_outside_image", []
    clipped = (x0, y0, x1, y1) != (x, y, x + w, y + h)
    return ("clipped" if clipped else None), [x0, y0, x1, y1]


class DetSource(Source):
    """Images of a COCO-format annotation file with their checked boxes, read by index.

    Per image i: keys[i], paths[i], sizes[i] (width, height) and the half-open range
    first[i]:first[i + 1] of its training boxes in boxes_A4 (xyxy, clipped) and classes_A
    (index into class_names). With ground_truth, `coco_gt` keeps the file's valid
    annotations (crowd included, bboxes clipped to the image) for pycocotools and `images` the image
    entries; training leaves both out (None), so that worker processes get a small source.
    """

    kind = ""
    has_text = False
    options_allowed = {"split": "which part of the dataset", "json": "annotation file"}

    def __init__(self, spec: str, location: str, options: dict[str, str], *,
                 require_boxes: bool = False, ground_truth: bool = True):
        super().__init__(spec, location, options)
        self.require_boxes, self.ground_truth = require_boxes, ground_truth
        self._counts: collections.Counter = collections.Counter()

    # --- reading the file ----------------------------------------------------------------

    def _index(self, data: dict, image_path) -> None:
        """Check every annotation of `data` and index the images; image_path(image dict)
        gives the file of an image."""
        cats = sorted(data.get("categories", []), key=lambda c: c["id"])
        if not cats:
            raise ValueError(f"{self.spec!r}: the annotation file lists no categories.")
        self.category_ids = [int(c["id"]) for c in cats]
        self.class_names = [str(c["name"]) for c in cats]  # prompts clean them
        cat_index = {c: i for i, c in enumerate(self.category_ids)}
        images = sorted(data["images"], key=lambda im: im["id"])
        sizes = {im["id"]: (float(im["width"]), float(im["height"])) for im in images}
        by_image = collections.defaultdict(list)
        kept_gt = []
        for ann in data["annotations"]:
            reason, xyxy = self._check(ann, sizes, cat_index)
            if reason in BOX_SKIP_REASONS:
                self._counts[f"skipped_boxes/{reason}"] += 1
                continue
            if self.ground_truth:  # a box partly outside is scored as its visible part
                gt = {k: v for k, v in ann.items() if k != "segmentation"}
                if reason == "clipped":
                    gt["bbox"] = [xyxy[0], xyxy[1], xyxy[2] - xyxy[0], xyxy[3] - xyxy[1]]
                gt.setdefault("iscrowd", 0)
                gt.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
                gt.setdefault("id", len(kept_gt) + 1)
                kept_gt.append(gt)
            if reason == "clipped":
                self._counts["clipped_boxes"] += 1
            if ann.get("iscrowd", 0):
                self._counts["crowd_boxes"] += 1
                continue
            by_image[ann["image_id"]].append((xyxy, cat_index[ann["category_id"]], ann))
        self.keys, self.paths, self.sizes, self.images = [], [], [], []
        boxes, classes, self.first = [], [], [0]
        for im in images:
            anns = by_image.get(im["id"], [])
            if self.require_boxes and not anns:
                self._counts["skipped/no_boxes"] += 1
                continue
            self.keys.append(im["id"])
            self.paths.append(image_path(im))
            self.sizes.append((int(sizes[im["id"]][0]), int(sizes[im["id"]][1])))
            self.images.append(im)
            boxes += [a[0] for a in anns]
            classes += [a[1] for a in anns]
            self._extra(im, [a[2] for a in anns])
            self.first.append(len(classes))
        self.boxes_A4 = np.asarray(boxes, np.float32).reshape(-1, 4)
        self.classes_A = np.asarray(classes, np.int32)
        self.first = np.asarray(self.first, np.int64)
        if not self.keys:
            raise ValueError(f"{self.spec!r} lists no usable images: check the split and the "
                             "annotation file.")
        self.coco_gt = None
        if self.ground_truth:
            listed = set(self.keys)
            self.coco_gt = {"images": self.images,
                            "annotations": [a for a in kept_gt if a["image_id"] in listed],
                            "categories": [{k: v for k, v in c.items() if k != "synonyms"}
                                           for c in cats]}
        else:
            self.images = None

    def _check(self, ann: dict, sizes: dict, cat_index: dict) -> tuple[str | None, list]:
        if ann.get("image_id") not in sizes:
            return "unknown_image", []
        if ann.get("category_id") not in cat_index:
            return "unknown_category", []
        return _check_box(ann.get("bbox"), *sizes[ann["image_id"]])

    def _extra(self, image: dict, anns: list[dict]) -> None:
        """Per-image fields beyond the boxes (the grounding kinds)."""

    # --- the Source protocol -------------------------------------------------------------

    @property
    def classnames(self) -> tuple[str, ...]:
        return tuple(self.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.keys)

    def stats(self) -> dict[str, int]:
        """Annotations skipped or changed when the file was read, by reason."""
        return dict(sorted(self._counts.items()))

    def read(self, index: int) -> Record:
        lo, hi = self.first[index], self.first[index + 1]
        return {"key": str(self.keys[index]), "image": self.paths[index], "text": None,
                "label": None, "skip": None, "image_id": self.keys[index],
                "size": self.sizes[index], "boxes": self.boxes_A4[lo:hi],
                "classes": self.classes_A[lo:hi]}

    def load(self, record: Record) -> np.ndarray:
        """The record's image, uint8 [H, W, 3]; BadSample when it cannot be used."""
        try:
            data = sources_lib.read_bytes(record["image"])
        except FileNotFoundError:
            raise BadSample("missing_image", f"{record['image']} does not exist") from None
        except OSError as e:
            raise BadSample("unreadable_file", f"{type(e).__name__}: {e}") from None
        image = sources_lib.load_pixels(sources_lib.open_image(data, self.max_pixels))
        if image.size != tuple(record["size"]):
            raise BadSample("image_size_mismatch", f"{image.size[0]}x{image.size[1]}, the "
                            f"annotations say {record['size'][0]}x{record['size'][1]}")
        try:
            return np.asarray(image.convert("RGB"))
        except Exception as e:  # odd modes and broken palettes must not stop a run
            raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None


class CocoSource(DetSource):
    """coco:ROOT?split=train2017: ROOT/annotations/instances_<split>.json, ROOT/<split>/."""

    kind = "coco"

    def __init__(self, spec, location, options, **kwargs):
        super().__init__(spec, location, options, **kwargs)
        root = _folder(location, "COCO folder", "point coco: at the folder holding "
                       "annotations/ and the image folders (train2017/, val2017/).")
        split = options.get("split", "train2017")
        name = options.get("json", os.path.join("annotations", f"instances_{split}.json"))
        data = _load_json(os.path.join(root, name), "use split=train2017 or split=val2017 "
                          "(or json=PATH), or fix the coco: folder.")
        images = _folder(os.path.join(root, split), "COCO image folder", f"put the {split} "
                         "images there, or fix split=.")
        self._index(data, lambda im: os.path.join(images, im["file_name"]))


class LvisSource(DetSource):
    """lvis:ROOT?json=NAME: LVIS v1 (GLIP's minival by default) over the COCO images."""

    kind = "lvis"
    options_allowed = {"json": "annotation file"}

    def __init__(self, spec, location, options, **kwargs):
        super().__init__(spec, location, options, **kwargs)
        root = _folder(location, "LVIS folder", "point lvis: at the folder holding the LVIS "
                       "JSON and the COCO image folders (train2017/, val2017/).")
        name = options.get("json", "lvis_v1_minival_inserted_image_name.json")
        data = _load_json(os.path.join(root, name), "put GLIP's "
                          "lvis_v1_minival_inserted_image_name.json there, or name the file "
                          "with json=.")
        self._index(data, lambda im: os.path.join(root, lvis_image_path(im)))


def lvis_image_path(image: dict) -> str:
    """An LVIS image's path under the root: the last two parts of its coco_url
    ("val2017/000000397133.jpg", as the LVIS API and GLIP read it), else its file_name
    (with val2017/ in front when it names no folder)."""
    if image.get("coco_url"):
        return "/".join(str(image["coco_url"]).split("/")[-2:])
    name = str(image["file_name"])
    return name if "/" in name else os.path.join("val2017", name)


class FlickrSource(DetSource):
    """flickr:ROOT?split=train|val|test: MDETR's mdetr_annotations/final_flickr_separateGT_
    <split>.json (one image entry per sentence) over ROOT/flickr30k-images/."""

    kind = "flickr"
    has_text = True

    def __init__(self, spec, location, options, **kwargs):
        super().__init__(spec, location, options, **kwargs)
        root = _folder(location, "Flickr30k folder", "point flickr: at the folder holding "
                       "mdetr_annotations/ and flickr30k-images/.")
        split = options.get("split", "train")
        name = options.get("json", os.path.join("mdetr_annotations",
                                                f"final_flickr_separateGT_{split}.json"))
        data = _load_json(os.path.join(root, name), "use split=train, val or test (or "
                          "json=PATH), or fix the flickr: folder.")
        images = _folder(os.path.join(root, "flickr30k-images"), "Flickr30k image folder",
                         "put the Flickr30k images there.")
        self.captions, self.box_spans, self.eval_spans = [], [], []
        self._index(data, lambda im: os.path.join(images, im["file_name"]))

    def _check(self, ann, sizes, cat_index):
        reason, xyxy = super()._check(ann, sizes, cat_index)
        if reason not in BOX_SKIP_REASONS and not _spans(ann.get("tokens_positive")):
            return "no_phrase", []
        return reason, xyxy

    def _extra(self, image, anns):
        self.captions.append(str(image["caption"]))
        self.box_spans.append([_spans(a["tokens_positive"]) for a in anns])
        self.eval_spans.append([_spans(p) for p in image.get("tokens_positive_eval", [])])

    def read(self, index: int) -> Record:
        record = super().read(index)
        record["text"] = self.captions[index]
        record["spans"] = self.box_spans[index]
        return record


def _spans(value) -> list[tuple[int, int]]:
    """[[start, end], ...] character spans as tuples; [] for anything else."""
    try:
        return [(int(s), int(e)) for s, e in value or [] if int(e) > int(s)]
    except (TypeError, ValueError):
        return []


KINDS: dict[str, type[DetSource]] = {"coco": CocoSource, "lvis": LvisSource,
                                     "flickr": FlickrSource}


def parse_det_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """`"kind:root?k=v"` -> (kind, root, options), kind one of KINDS."""
    return sources_lib.parse_spec(spec, tuple(KINDS), "Detection data",
                                  "coco:/data/coco?split=train2017")


def open_det_source(data: "str | DetSource", *, require_boxes: bool = False,
                    ground_truth: bool = True) -> DetSource:
    """The dataset a spec names, checked: missing folders and files raise here;
    require_boxes leaves out (and counts) images without a training box, ground_truth
    keeps what evaluation needs (coco_gt, images)."""
    if isinstance(data, DetSource):
        return data
    kind, location, options = parse_det_spec(data)
    return KINDS[kind](data, location, options, require_boxes=require_boxes,
                       ground_truth=ground_truth)
