"""Built-in detection data: coloured shapes with their boxes, and six colour-shape pairs that
training never shows, so that a grounding model's AP on them measures composition.

Classes are the 36 colour x shape names of `synthetic` ("red circle", label shape * 6 +
colour, COCO category id label + 1). HELD_OUT is a Latin square: one pair per shape and per
colour, so every colour and every shape is seen in training, but never in those pairs.
Training images draw their 1..max_shapes shapes from the 30 seen classes and their prompts
name the present classes and sampled absent seen ones ("red circle. blue square. green
ring."), shuffled (detection.class_targets). Evaluation images draw each shape from the
held-out classes with probability 6/36: every class equally often.

Shapes never touch: each one's axis-aligned extent keeps clear of the others' by _GAP
pixels (a shape that finds no clear place among _CANDIDATES is left out), so a box, the
tight box of the pixels the shape covers at least half, holds that shape alone.

As in `synthetic`, an example is a pure function of (seed, split, index) through the same
counter-based hash; an iterator's state is one integer.
"""

import dataclasses
import json
import math
import os
from collections.abc import Iterator

import numpy as np

from clipjax.data import detection, synthetic
from clipjax.data.synthetic import CLASSNAMES, COLOURS, SHAPES, SPLITS, _pick, _sdf, _uniform
from clipjax.heads import grounding

HELD_OUT = (("blue", "circle"), ("purple", "square"), ("red", "triangle"),
            ("cyan", "diamond"), ("green", "cross"), ("yellow", "ring"))
UNSEEN = tuple(sorted(SHAPES.index(s) * len(COLOURS) + list(COLOURS).index(c)
                      for c, s in HELD_OUT))
SEEN = tuple(c for c in range(len(CLASSNAMES)) if c not in UNSEEN)
CATEGORY_IDS = tuple(range(1, len(CLASSNAMES) + 1))  # label + 1

_SIZE_RANGE = (0.12, 0.2)  # half-extent / image size: 15-26 px shapes at 64 px
_EXTENT = 1.1  # the farthest any shape reaches from its centre along x or y, in half-extents
_GAP = 2.0  # pixels between two shapes' extents
_CANDIDATES = 16
# Evaluation images: chance that a shape is a held-out pair. 6/36 draws every class equally
# often, so AP over the seen and over the held-out pairs rest on the same base rate.
_P_UNSEEN = len(UNSEEN) / len(CLASSNAMES)
# Hash fields, apart from those of `synthetic` (0..) and `synthetic_seg` (32..38).
_F_IMAGE, _F_NOISE, _F_SHAPE, _F_PLACE, _F_PROMPT = range(48, 53)
_PER_SHAPE = 8


@dataclasses.dataclass(frozen=True)
class DetExamples:
    """Rendered examples; slots past the shapes drawn hold label -1 and a zero box."""

    image_BHWC: np.ndarray  # uint8
    labels_BS: np.ndarray  # int32 class index (CLASSNAMES), -1 for no shape
    boxes_BS4: np.ndarray  # float32 xyxy in pixels, the tight box of the shape's pixels


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"Unknown synthetic split {split!r}; choose one of {', '.join(SPLITS)}.")
    return SPLITS[split]


def render(seed: int, split: str, index_B, image_size: int = 64, max_shapes: int = 3,
           shape_size: tuple[float, float] = _SIZE_RANGE) -> DetExamples:
    """The examples at index_B of `split`: "train" draws seen classes only, "held_out"
    each shape from UNSEEN with probability 6/36 (_P_UNSEEN)."""
    sid, s = _check_split(split), image_size
    index_B = np.asarray(index_B, np.int64)
    b, n = len(index_B), max_shapes
    u = _uniform(seed, sid, index_B, _F_IMAGE, 2)
    count_B = 1 + _pick(u[:, 0], n)
    background = (0.02 + 0.38 * u[:, 1]).astype(np.float32)
    p = _uniform(seed, sid, index_B, _F_SHAPE, n * _PER_SHAPE).reshape(b, n, _PER_SHAPE)
    seen = np.asarray(SEEN)[_pick(p[..., 0], len(SEEN))]
    if split == "train":
        labels_BS = seen
    else:
        labels_BS = np.where(p[..., 1] < _P_UNSEEN, np.asarray(UNSEEN)[_pick(p[..., 0], 6)], seen)
    lo, hi = shape_size
    radius_BS = ((lo + (hi - lo) * p[..., 2]) * s).astype(np.float32)
    angle_BS = ((p[..., 3] - 0.5) * math.radians(24)).astype(np.float32)
    jitter_BS3 = (p[..., 4:7] - 0.5) * 0.16

    # Each shape takes its first candidate centre whose extent keeps _GAP from the others'.
    cand = _uniform(seed, sid, index_B, _F_PLACE, n * _CANDIDATES * 2).reshape(
        b, n, _CANDIDATES, 2)
    extent_BS = _EXTENT * radius_BS + 0.5
    present_BS = np.zeros((b, n), bool)
    centre_BS2 = np.zeros((b, n, 2), np.float32)
    for k in range(n):
        margin = extent_BS[:, k] + 0.5
        c_BK2 = margin[:, None, None] + (s - 2 * margin)[:, None, None] * cand[:, k]
        clear_BK = np.ones((b, _CANDIDATES), bool)
        for j in range(k):
            apart = np.abs(c_BK2 - centre_BS2[:, None, j]).max(-1)
            need = (extent_BS[:, k] + extent_BS[:, j] + _GAP)[:, None]
            clear_BK &= ~present_BS[:, j, None] | (apart >= need)
        pick_B = clear_BK.argmax(1)
        present_BS[:, k] = (k < count_B) & clear_BK.any(1)
        centre_BS2[:, k] = c_BK2[np.arange(b), pick_B]
    labels_BS = np.where(present_BS, labels_BS, -1).astype(np.int32)

    noise_BHW = _uniform(seed, sid, index_B, _F_NOISE, s * s).reshape(b, s, s).astype(np.float32)
    img_BHWC = np.repeat((background[:, None, None] + 0.06 * (noise_BHW - 0.5))[..., None], 3, -1)
    boxes_BS4 = np.zeros((b, n, 4), np.float32)
    grid = np.arange(s, dtype=np.float32) + 0.5
    palette = np.asarray(list(COLOURS.values()))
    shape_BS, colour_BS = np.maximum(labels_BS, 0) // 6, np.maximum(labels_BS, 0) % 6
    for k in range(n):
        x = grid[None, None, :] - centre_BS2[:, k, 0, None, None]
        y = grid[None, :, None] - centre_BS2[:, k, 1, None, None]
        cos, sin = np.cos(angle_BS[:, k])[:, None, None], np.sin(angle_BS[:, k])[:, None, None]
        dx, dy = cos * x + sin * y, -sin * x + cos * y
        sdf_BHW = np.full((b, s, s), np.inf, np.float32)
        for t, shape in enumerate(SHAPES):
            m = (shape_BS[:, k] == t) & present_BS[:, k]
            sdf_BHW[m] = _sdf(shape, dx[m], dy[m], radius_BS[m, k, None, None])
        alpha_BHW = np.clip(0.5 - sdf_BHW, 0.0, 1.0)  # a one-pixel antialiased edge
        rgb_BC = (palette[colour_BS[:, k]] + jitter_BS3[:, k]).astype(np.float32)
        a = alpha_BHW[..., None]
        img_BHWC = img_BHWC * (1 - a) + rgb_BC[:, None, None] * a
        inside_BHW = alpha_BHW >= 0.5
        cols_BW, rows_BH = inside_BHW.any(1), inside_BHW.any(2)
        boxes_BS4[:, k] = np.stack([cols_BW.argmax(1), rows_BH.argmax(1),
                                    s - cols_BW[:, ::-1].argmax(1),
                                    s - rows_BH[:, ::-1].argmax(1)], axis=1)
    boxes_BS4[~present_BS] = 0
    image = np.clip(np.rint(img_BHWC * 255), 0, 255).astype(np.uint8)
    return DetExamples(image, labels_BS, boxes_BS4)


def _host_indices(start: int, end: int, process_index: int, process_count: int) -> np.ndarray:
    """This host's contiguous share of the global examples [start, end)."""
    per = math.ceil((end - start) / process_count)
    lo = start + process_index * per
    return np.arange(lo, min(lo + per, end))


class SyntheticDetIterator(Iterator[dict[str, np.ndarray]]):
    """Batches in GLIP's layout (clipjax.data.detection) of the training split: image u8
    [b,S,S,3], tokens i32 [b,L], boxes f32 [b,M,4], box_mask bool [b,M], positive_map f32
    [b,M,L]; M = max_boxes, default max_shapes.

    Host sharding, the end of a split with `num_examples` and the state follow
    `synthetic.SyntheticIterator`.
    """

    def __init__(self, batch_size: int, *, split: str = "train", image_size: int = 64,
                 context_length: int = 77, seed: int = 0, num_examples: int | None = None,
                 process_index: int = 0, process_count: int = 1, max_shapes: int = 3,
                 max_boxes: int | None = None, max_negatives: int = grounding.MAX_NEGATIVES,
                 shape_size: tuple[float, float] = _SIZE_RANGE):
        _check_split(split)
        if batch_size % process_count:
            raise ValueError(f"The global batch size {batch_size} does not divide over "
                             f"{process_count} processes; use a multiple of {process_count}.")
        self.batch_size, self.split, self.image_size = batch_size, split, image_size
        self.context_length, self.seed, self.num_examples = context_length, seed, num_examples
        self.process_index, self.process_count = process_index, process_count
        self.max_shapes, self.max_negatives = max_shapes, max_negatives
        self.max_boxes = max_shapes if max_boxes is None else max_boxes
        self.shape_size = tuple(float(v) for v in shape_size)
        self.allowed = SEEN if split == "train" else None
        self.lengths_C = grounding.name_lengths(CLASSNAMES)
        self._next = 0

    def __next__(self) -> dict[str, np.ndarray]:
        end = self._next + self.batch_size
        if self.num_examples is not None:
            if self._next >= self.num_examples:
                raise StopIteration
            end = min(end, self.num_examples)
        index_B = _host_indices(self._next, end, self.process_index, self.process_count)
        self._next = end
        ex = render(self.seed, self.split, index_B, self.image_size, self.max_shapes,
                    self.shape_size)
        rows = []
        for i, labels_S, boxes_S4 in zip(index_B, ex.labels_BS, ex.boxes_BS4):
            rng = np.random.default_rng([self.seed, SPLITS[self.split], int(i), _F_PROMPT])
            keep = labels_S >= 0
            rows.append(detection.class_targets(
                rng, boxes_S4[keep], labels_S[keep], CLASSNAMES, self.lengths_C,
                context_length=self.context_length, max_boxes=self.max_boxes,
                max_negatives=self.max_negatives, allowed=self.allowed))
        out = {k: np.stack([r[k] for r in rows]) for k in ("tokens", "boxes", "box_mask",
                                                           "positive_map")}
        return {"image": ex.image_BHWC, **out}

    def _settings(self) -> dict:
        return {"seed": self.seed, "split": self.split, "batch_size": self.batch_size,
                "image_size": self.image_size, "context_length": self.context_length,
                "process_count": self.process_count, "max_shapes": self.max_shapes,
                "max_boxes": self.max_boxes, "max_negatives": self.max_negatives,
                "shape_size": list(self.shape_size)}

    def get_state(self) -> dict:
        return {"next_index": self._next, **self._settings()}

    def set_state(self, state: dict) -> None:
        """Resume; refused when a setting that shapes the batches differs."""
        synthetic.check_resume(state, self._settings())
        self._next = int(state["next_index"])

    def stats(self) -> dict[str, int]:
        return {}  # rendering never fails and every box fits


# --- evaluation set and files -------------------------------------------------------------


def coco_gt(ex: DetExamples, index_B, image_size: int) -> dict:
    """The examples as a COCO ground truth (all 36 categories; area is the box's)."""
    images, annotations = [], []
    for i, labels_S, boxes_S4 in zip(index_B, ex.labels_BS, ex.boxes_BS4):
        images.append({"id": int(i), "width": image_size, "height": image_size,
                       "file_name": f"{int(i):05d}.png"})
        for label, (x0, y0, x1, y1) in zip(labels_S, boxes_S4.tolist()):
            if label >= 0:
                annotations.append({"id": len(annotations) + 1, "image_id": int(i),
                                    "category_id": int(label) + 1,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                                    "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    categories = [{"id": c + 1, "name": name, "supercategory": "shape"}
                  for c, name in enumerate(CLASSNAMES)]
    return {"images": images, "annotations": annotations, "categories": categories}


class SyntheticDetSet:
    """A held-out evaluation set of detection.DetEvalExample (canvas = image, scale 1),
    with its COCO ground truth and the seen and held-out (unseen) category ids."""

    kind = "synthetic"
    classnames = CLASSNAMES
    num_classes = len(CLASSNAMES)
    category_ids = list(CATEGORY_IDS)
    seen_category_ids = [c + 1 for c in SEEN]
    unseen_category_ids = [c + 1 for c in UNSEEN]

    def __init__(self, num_examples: int, *, seed: int = 0, image_size: int = 64,
                 split: str = "held_out", max_shapes: int = 3,
                 shape_size: tuple[float, float] = _SIZE_RANGE, process_index: int = 0,
                 process_count: int = 1):
        _check_split(split)
        self.num_examples, self.seed, self.image_size = num_examples, seed, image_size
        self.split, self.max_shapes = split, max_shapes
        self.shape_size = tuple(float(v) for v in shape_size)
        self.indices = range(process_index, num_examples, process_count)
        self.skipped: dict[str, int] = {}  # as the real eval sets'; rendering never fails
        self.skipped_ids: list[int] = []
        self._gt = None

    def _render(self, index_B) -> DetExamples:
        return render(self.seed, self.split, index_B, self.image_size, self.max_shapes,
                      self.shape_size)

    @property
    def coco_gt(self) -> dict:
        """The ground truth of all num_examples images (every host's)."""
        if self._gt is None:
            index_B = np.arange(self.num_examples)
            self._gt = coco_gt(self._render(index_B), index_B, self.image_size)
        return self._gt

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[detection.DetEvalExample]:
        chunk = 64
        for lo in range(0, len(self.indices), chunk):
            index_B = np.asarray(self.indices[lo:lo + chunk])
            ex = self._render(index_B)
            for i, image, labels_S, boxes_S4 in zip(index_B, ex.image_BHWC, ex.labels_BS,
                                                    ex.boxes_BS4):
                keep = labels_S >= 0
                yield detection.DetEvalExample(int(i), image, image, 1.0, boxes_S4[keep],
                                               labels_S[keep])


def write_coco(folder, count: int, *, image_size: int = 64, seed: int = 0,
               split: str = "held_out", max_shapes: int = 3) -> str:
    """A COCO-layout folder that `coco:FOLDER?split=val` reads: annotations/
    instances_val.json and val/NNNNN.png; returns the folder."""
    from PIL import Image

    folder = os.fspath(folder)
    os.makedirs(os.path.join(folder, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(folder, "val"), exist_ok=True)
    index_B = np.arange(count)
    ex = render(seed, split, index_B, image_size, max_shapes)
    for i, image in zip(index_B, ex.image_BHWC):
        Image.fromarray(image).save(os.path.join(folder, "val", f"{i:05d}.png"))
    with open(os.path.join(folder, "annotations", "instances_val.json"), "w",
              encoding="utf-8") as f:
        json.dump(coco_gt(ex, index_B, image_size), f)
    return folder
