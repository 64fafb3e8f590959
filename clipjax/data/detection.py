"""Detection as phrase grounding (GLIP): images, boxes and prompts through the one grain pipeline.

    it = make_det_iterator("coco:/data/coco?split=train2017", global_batch_size=64,
                           image_size=800, context_length=77, train=True, seed=0)
    batch = next(it)   # image uint8 [b, S, S, 3], tokens int32 [b, L], boxes float32 [b, M, 4],
                       # box_mask bool [b, M], positive_map float32 [b, M, L]
    state = it.get_state()   # as pipeline.DataIterator: resumable, host-split, skip counts
    for ex in det_eval_set("coco:/data/coco?split=val2017", image_size=800): ...

The image is placed top-left on an S x S canvas padded with CLIP's mean colour (PAD_RGB,
which normalises to about 0); boxes are xyxy in canvas pixels, the first M of the image's
boxes, the rest dropped and counted. Row m of positive_map is the positive map of box m's
phrase over the token positions (column 0 is <start_of_text>), summing to 1. Specs:

    coco:/data/coco?split=train2017|val2017[&json=PATH]
        annotations/instances_<split>.json, images <split>/<file_name>
    lvis:/data/coco[?json=NAME]
        lvis_v1_minival_inserted_image_name.json (GLIP's minival) by default; the images
        are the COCO ones, found by the last two parts of coco_url (val2017/x.jpg)
    flickr:/data/flickr30k?split=train|val|test[&json=PATH]
        MDETR's mdetr_annotations/final_flickr_separateGT_<split>.json (COCO format, one
        image entry per sentence: caption, sentence_id, original_img_id, and per phrase
        with a box tokens_positive_eval [[start, end]]; per box bbox and tokens_positive,
        the caption's character spans of its phrases), images flickr30k-images/<file_name>
    synthetic (the built-in shapes, clipjax.data.synthetic_det; synthetic:N to evaluate N)

Crowd boxes are never training targets but stay in the evaluation ground truth; bad
annotations are skipped when the file is read and counted (det_sources.BOX_SKIP_REASONS).

Training prompts follow GLIP's od_to_grounding: all the image's classes and up to
`max_negatives` (85) sampled absent ones, shuffled, joined by ". " (grounding.sample_prompt).
When they do not fit the context, negatives go first, then positives in random order, whose
boxes are dropped and counted (GLIP screens prompts the same way); a flickr prompt is the
caption, and a box's map is the union of its phrases' tokens. Augmentation (augment) is
GLIP's: a random short side of scale x S with the long side capped at S, then a horizontal
flip of image and boxes (the text is not touched: "left" stays "left", as in GLIP), and
optionally MDETR's random crop that keeps boxes.
"""

import collections
import dataclasses

import grain
import numpy as np
from PIL import Image

from clipjax.data import pipeline, stages
from clipjax.data.det_sources import (  # noqa: F401 (the datasets' public names, here too)
    BOX_SKIP_REASONS, BadSample, DetSource, open_det_source, parse_det_spec)
from clipjax.data.transforms import CLIP_MEAN
from clipjax.heads import grounding

PAD_RGB = tuple(int(round(255 * m)) for m in CLIP_MEAN)  # (123, 117, 104)
DROP_REASONS = ("over_max_boxes", "over_context")  # boxes left out of a batch row


def is_synthetic(spec) -> bool:
    return isinstance(spec, str) and (spec == "synthetic" or spec.startswith("synthetic:"))


# ---------------------------------------------------------------------------------------
# Geometry: one transform for the pixels and the boxes.


def place(image_HWC: np.ndarray, size: int) -> np.ndarray:
    """The image at the top left of a size x size canvas of PAD_RGB."""
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = PAD_RGB
    h, w = image_HWC.shape[:2]
    canvas[:h, :w] = image_HWC
    return canvas


def _resize(image_HWC: np.ndarray, new_w: int, new_h: int) -> np.ndarray:
    if image_HWC.shape[:2] == (new_h, new_w):
        return image_HWC
    return np.asarray(Image.fromarray(image_HWC).resize((new_w, new_h), Image.Resampling.BILINEAR))


def letterbox(image_HWC: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """(canvas, scale): the image resized so its longer side is `size`, on the canvas;
    canvas pixels = original pixels x scale (to half a pixel on the shorter side)."""
    h, w = image_HWC.shape[:2]
    s = size / max(h, w)
    new_w, new_h = min(max(round(w * s), 1), size), min(max(round(h * s), 1), size)
    return place(_resize(image_HWC, new_w, new_h), size), s


def random_crop(image_HWC: np.ndarray, boxes_M4: np.ndarray, rng: np.random.Generator, *,
                crop_range: tuple[float, float] = (0.5, 1.0), min_visible: float = 0.5,
                tries: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(crop, its boxes, keep_M): a window of crop_range x each side holding at least one
    box; boxes clipped to it, those with under min_visible of their area left dropped. No
    crop when `tries` windows all lose every box."""
    h, w = image_HWC.shape[:2]
    area_M = np.prod(boxes_M4[:, 2:] - boxes_M4[:, :2], axis=1)
    for _ in range(tries):
        cw = max(int(round(w * rng.uniform(*crop_range))), 1)
        ch = max(int(round(h * rng.uniform(*crop_range))), 1)
        left, top = int(rng.integers(w - cw + 1)), int(rng.integers(h - ch + 1))
        clipped = np.clip(boxes_M4 - [left, top, left, top], 0, [cw, ch, cw, ch])
        visible = np.prod(np.maximum(clipped[:, 2:] - clipped[:, :2], 0), axis=1)
        keep_M = visible >= min_visible * np.maximum(area_M, 1e-6)
        if keep_M.any() or not len(boxes_M4):
            return image_HWC[top:top + ch, left:left + cw], clipped[keep_M], keep_M
    return image_HWC, boxes_M4, np.ones(len(boxes_M4), bool)


def augment(image_HWC: np.ndarray, boxes_M4: np.ndarray, rng: np.random.Generator | None, *,
            size: int, scale: tuple[float, float] = (0.6, 1.0), flip: bool = True,
            crop_prob: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(canvas uint8 [size, size, 3], boxes float32 [K, 4] in canvas pixels, keep_M): the
    boxes that survived (a crop can drop some), moved with the pixels.

    With probability crop_prob a random_crop; then resize so the short side is a uniform
    draw from scale x size, the long side capped at size (GLIP's multi-scale resize with
    its max size), then flip horizontally with probability 1/2. rng=None is the evaluation
    view: the long side = size, no flip, no crop.
    """
    boxes_M4 = np.asarray(boxes_M4, np.float32).reshape(-1, 4)
    keep_M = np.ones(len(boxes_M4), bool)
    if rng is not None and crop_prob > 0 and rng.random() < crop_prob:
        image_HWC, boxes_M4, keep_M = random_crop(image_HWC, boxes_M4, rng)
    h, w = image_HWC.shape[:2]
    short = size if rng is None else rng.uniform(*scale) * size
    s = min(short / min(h, w), size / max(h, w))
    new_w, new_h = min(max(round(w * s), 1), size), min(max(round(h * s), 1), size)
    image_HWC = _resize(image_HWC, new_w, new_h)
    boxes_M4 = boxes_M4 * np.asarray([new_w / w, new_h / h] * 2, np.float32)
    if rng is not None and flip and rng.random() < 0.5:
        image_HWC = image_HWC[:, ::-1]
        boxes_M4 = np.stack([new_w - boxes_M4[:, 2], boxes_M4[:, 1], new_w - boxes_M4[:, 0],
                             boxes_M4[:, 3]], axis=1)
    return place(image_HWC, size), boxes_M4.astype(np.float32), keep_M


# ---------------------------------------------------------------------------------------
# Targets: prompt tokens and each box's positive map.


def pack(tokens_L: np.ndarray, boxes_M4: np.ndarray, map_ML: np.ndarray,
         max_boxes: int) -> dict[str, np.ndarray]:
    """One batch row: the boxes whose map is not empty, the first max_boxes of them, padded;
    "dropped" counts the others by DROP_REASONS."""
    length = len(tokens_L)
    ok = np.flatnonzero(map_ML.sum(1) > 0) if len(map_ML) else np.zeros(0, np.int64)
    over_context = len(map_ML) - len(ok)
    over_max = max(len(ok) - max_boxes, 0)
    ok = ok[:max_boxes]
    boxes = np.zeros((max_boxes, 4), np.float32)
    positive_map = np.zeros((max_boxes, length), np.float32)
    box_mask = np.zeros(max_boxes, bool)
    boxes[:len(ok)] = boxes_M4[ok]
    positive_map[:len(ok)] = map_ML[ok]
    box_mask[:len(ok)] = True
    return {"tokens": tokens_L.astype(np.int32), "boxes": boxes, "box_mask": box_mask,
            "positive_map": positive_map, "dropped": np.asarray([over_max, over_context], np.int32)}


def class_targets(rng: np.random.Generator, boxes_M4: np.ndarray, classes_M: np.ndarray,
                  names, lengths_C: np.ndarray, *, context_length: int, max_boxes: int,
                  max_negatives: int, allowed=None) -> dict[str, np.ndarray]:
    """GLIP's od_to_grounding for one image: its classes and sampled negatives (from
    `allowed` class indices only, when given) as a shuffled prompt, rows from the spans."""
    allowed_K = np.arange(len(names)) if allowed is None else np.asarray(allowed, np.int64)
    where = {int(c): k for k, c in enumerate(allowed_K)}
    positive = sorted({where[int(c)] for c in classes_M})
    sub = grounding.sample_prompt(rng, positive, len(allowed_K), max_negatives,
                                  lengths_C=lengths_C[allowed_K], budget=context_length - 2)
    order_C = allowed_K[sub]
    caption, spans = grounding.build_prompt([names[c] for c in order_C])
    tokens_L, map_CL = grounding.prompt_tokens(caption, spans, context_length, truncate_ok=True)
    map_ML = grounding.labels_to_positive_map(classes_M, order_C, map_CL)
    return pack(tokens_L, boxes_M4, map_ML.reshape(len(classes_M), context_length), max_boxes)


def phrase_maps(caption: str, spans_per_row, context_length: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_L, map_RL): each row the union of its spans' tokens, normalised (MDETR's
    create_positive_map over CLIP BPE); a row whose tokens all fall past the context is 0."""
    flat = [tuple(s) for spans in spans_per_row for s in spans]
    try:
        tokens_L, map_SL = grounding.prompt_tokens(caption, flat, context_length,
                                                   truncate_ok=True)
    except ValueError as e:
        raise BadSample("bad_phrase", str(e)) from None
    member_RL = np.zeros((len(spans_per_row), context_length), bool)
    at = 0
    for r, spans in enumerate(spans_per_row):
        member_RL[r] = (map_SL[at:at + len(spans)] > 0).any(0)
        at += len(spans)
    map_RL = member_RL.astype(np.float32)
    return tokens_L, map_RL / np.maximum(map_RL.sum(1, keepdims=True), 1.0)


# ---------------------------------------------------------------------------------------
# The pipeline stage and the iterator.


class DetPrepare:
    """Raw record -> one batch row (pack's keys, "image", "index"?) or a skip."""

    def __init__(self, source: DetSource, *, image_size: int, context_length: int,
                 max_boxes: int, max_negatives: int, train: bool, scale, flip: bool,
                 crop_prob: float, index: bool):
        self.source, self.size, self.length = source, image_size, context_length
        self.max_boxes, self.max_negatives, self.train = max_boxes, max_negatives, train
        self.scale, self.flip, self.crop_prob, self.index = scale, flip, crop_prob, index
        self.names = list(source.class_names)
        self.lengths_C = None if source.has_text else grounding.name_lengths(self.names)

    def __call__(self, record: dict) -> dict:
        if record.get("skip"):
            return {"skip": tuple(record["skip"]), "key": record["key"]}
        # Prompts are drawn in an evaluation pass too, from the record's identity.
        rng = np.random.default_rng(record["rng"])
        try:
            image_HWC = self.source.load(record)
            canvas, boxes_M4, keep_M = augment(
                image_HWC, record["boxes"], rng if self.train else None, size=self.size,
                scale=self.scale, flip=self.flip, crop_prob=self.crop_prob)
            if self.source.has_text:
                spans = [s for s, k in zip(record["spans"], keep_M) if k]
                tokens_L, map_ML = phrase_maps(record["text"], spans, self.length)
                out = pack(tokens_L, boxes_M4, map_ML, self.max_boxes)
            else:
                out = class_targets(rng, boxes_M4, record["classes"][keep_M], self.names,
                                    self.lengths_C, context_length=self.length,
                                    max_boxes=self.max_boxes, max_negatives=self.max_negatives)
        except BadSample as e:
            return {"skip": (e.reason, e.detail), "key": record["key"]}
        out["image"] = canvas
        if self.index:
            out["index"] = np.int64(record["index"])
        return out


class DetIterator(pipeline.DataIterator):
    """pipeline.DataIterator that also counts boxes: those the annotation file could not
    give (the source's counts) and those a batch row left out (DROP_REASONS)."""

    def __init__(self, *args, source_stats: dict[str, int], **kwargs):
        super().__init__(*args, **kwargs)
        self._source_stats = source_stats
        self._dropped: collections.Counter = collections.Counter()

    def __next__(self) -> dict[str, np.ndarray]:
        batch = super().__next__()
        dropped_B2 = batch.pop("dropped")
        for k, reason in enumerate(DROP_REASONS):
            self._dropped[reason] += int(dropped_B2[:, k].sum())
        return batch

    def get_state(self) -> dict:
        return {**super().get_state(),
                "dropped_boxes": {r: n for r, n in self._dropped.items() if n}}

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self._dropped = collections.Counter(state.get("dropped_boxes", {}))

    def stats(self) -> dict[str, int]:
        """Skipped images and skipped, clipped, crowd and dropped boxes, by reason."""
        out = {f"skipped/{r}": n for r, n in sorted(self._skipped.items()) if n}
        out.update(self._source_stats)
        out.update({f"dropped_boxes/{r}": self._dropped[r] for r in DROP_REASONS
                    if self._dropped[r]})
        return out


def make_det_iterator(spec: "str | DetSource", *, global_batch_size: int, image_size: int,
                      context_length: int, max_boxes: int = 100, train: bool = True,
                      seed: int = 0, num_workers: int = 0,
                      max_negatives: int = grounding.MAX_NEGATIVES,
                      scale: tuple[float, float] = (0.6, 1.0), flip: bool = True,
                      crop_prob: float = 0.0, process_index: int | None = None,
                      process_count: int | None = None, read_threads: int = 4,
                      max_consecutive_skips: int = 10_000,
                      on_skip: pipeline.SkipHandler | None = None):
    """Host-local batches in GLIP's layout (module docstring), resumable and host-split.

    train=True repeats forever, reshuffled each epoch, augmented; it leaves out images
    without a training box (counted as skipped/no_boxes). train=False reads every image
    once, in order, in the evaluation view, and adds "index" int64 [b]. "synthetic" gives
    synthetic_det.SyntheticDetIterator.
    """
    if is_synthetic(spec):
        from clipjax.data import synthetic_det

        process_index, process_count, _ = pipeline.host_share(
            global_batch_size, process_index, process_count)
        return synthetic_det.SyntheticDetIterator(
            global_batch_size, image_size=image_size, context_length=context_length, seed=seed,
            max_boxes=max_boxes, max_negatives=max_negatives, process_index=process_index,
            process_count=process_count)
    scale = (float(scale[0]), float(scale[1]))
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale={scale!r} must be (low, high) with 0 < low <= high <= 1: "
                         "fractions of image_size for the short side.")
    if image_size < 1 or max_boxes < 1:
        raise ValueError(f"image_size {image_size} and max_boxes {max_boxes} must be positive.")
    source = open_det_source(spec, require_boxes=train, ground_truth=False)
    process_index, process_count, batch_size = pipeline.host_share(
        global_batch_size, process_index, process_count)
    prepare = DetPrepare(source, image_size=image_size, context_length=context_length,
                         max_boxes=max_boxes, max_negatives=max_negatives, train=train,
                         scale=scale, flip=flip, crop_prob=crop_prob, index=not train)
    ds = stages.HostRecords(source, source_id=0, seed=seed, train=train,
                            process_index=process_index, process_count=process_count)
    ds = ds.map(prepare).to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads))
    s, m, length = image_size, max_boxes, context_length
    empty = {"image": np.zeros((0, s, s, 3), np.uint8),
             "tokens": np.zeros((0, length), np.int32), "boxes": np.zeros((0, m, 4), np.float32),
             "box_mask": np.zeros((0, m), bool),
             "positive_map": np.zeros((0, m, length), np.float32),
             "dropped": np.zeros((0, len(DROP_REASONS)), np.int32)}
    if not train:
        empty["index"] = np.zeros((0,), np.int64)
    ds = pipeline.in_workers(stages.Batch(ds, batch_size, empty, shared_memory=num_workers > 0),
                             num_workers)
    config = {"kind": "detection", "sources": [source.spec], "seed": seed, "train": train,
              "global_batch_size": global_batch_size, "process_index": process_index,
              "process_count": process_count, "num_workers": num_workers,
              "image_size": image_size, "context_length": context_length,
              "max_boxes": max_boxes, "max_negatives": max_negatives, "scale": list(scale),
              "flip": flip, "crop_prob": crop_prob}
    return DetIterator(ds, batch_size=batch_size, config=config,
                       class_names=list(source.class_names),
                       max_consecutive_skips=max_consecutive_skips, on_skip=on_skip,
                       source_stats=source.stats())


# ---------------------------------------------------------------------------------------
# Evaluation.


@dataclasses.dataclass
class DetEvalExample:
    """One evaluation image; canvas pixels = original pixels x scale + offset."""

    image_id: int
    image: np.ndarray  # uint8 [H, W, 3], the original
    canvas: np.ndarray  # uint8 [S, S, 3], the longer side resized to S, at the top left
    scale: float
    boxes: np.ndarray  # float32 [G, 4] xyxy original pixels: the non-crowd ground truth
    classes: np.ndarray  # int32 [G] class indices (flickr: 0, "object")
    offset: tuple[float, float] = (0.0, 0.0)
    # flickr: the sentence, its tokens and one row per phrase with a box (tokens_positive_eval)
    caption: str | None = None
    tokens: np.ndarray | None = None  # int32 [L]
    phrase_maps: np.ndarray | None = None  # float32 [P, L]
    phrase_boxes: list[np.ndarray] | None = None  # per phrase float32 [n, 4], original pixels
    sentence_id: int | None = None
    original_img_id: str | None = None


class DetEvalSet:
    """Every image of a split once (DetEvalExample); images that cannot be read are
    skipped and counted in `skipped` {reason: count}, their ids in `skipped_ids`.

    coco_gt is the ground truth of the split's first n images (all hosts'), crowd boxes
    included, less the images this set has skipped so far (none score as missed).
    """

    def __init__(self, source: DetSource, indices: range, n: int, *, image_size: int,
                 context_length: int):
        self.source, self.indices = source, indices
        self.image_size, self.context_length = image_size, context_length
        self.kind = source.kind
        self.classnames = source.classnames
        self.num_classes = source.num_classes
        self.category_ids = list(source.category_ids)
        if source.coco_gt is None:
            raise ValueError(f"{source.spec!r} was opened without its ground truth: open it "
                             "with open_det_source(spec) (ground_truth=True) to evaluate.")
        ids = {source.keys[i] for i in range(n)}
        gt = source.coco_gt
        self._gt = {**gt, "images": [im for im in gt["images"] if im["id"] in ids],
                    "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}
        self.skipped: dict[str, int] = {}
        self.skipped_ids: list[int] = []

    @property
    def coco_gt(self) -> dict:
        if not self.skipped_ids:
            return self._gt
        bad = set(self.skipped_ids)
        return {**self._gt, "images": [im for im in self._gt["images"] if im["id"] not in bad],
                "annotations": [a for a in self._gt["annotations"] if a["image_id"] not in bad]}

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        self.skipped, self.skipped_ids = {}, []
        for i in self.indices:
            record = self.source.read(i)
            try:
                image_HWC = self.source.load(record)
            except BadSample as e:
                self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
                self.skipped_ids.append(record["image_id"])
                continue
            canvas, scale = letterbox(image_HWC, self.image_size)
            ex = DetEvalExample(record["image_id"], image_HWC, canvas, scale,
                                np.asarray(record["boxes"], np.float32),
                                np.asarray(record["classes"], np.int32))
            if self.kind == "flickr":
                self._phrases(ex, i, record)
            yield ex

    def _phrases(self, ex: DetEvalExample, i: int, record: dict) -> None:
        """The sentence's phrases: tokens, maps, and each one's boxes (those whose
        tokens_positive overlap the phrase)."""
        phrases = self.source.eval_spans[i]
        image = self.source.images[i]
        ex.caption, ex.sentence_id = record["text"], int(image.get("sentence_id", 0))
        ex.original_img_id = str(image.get("original_img_id", image["id"]))
        try:
            ex.tokens, ex.phrase_maps = phrase_maps(ex.caption, phrases, self.context_length)
        except BadSample:
            ex.tokens, ex.phrase_maps = None, None
        ex.phrase_boxes = []
        for spans in phrases:
            hit = [m for m, box_spans in enumerate(record["spans"])
                   if any(s < e2 and s2 < e for s, e in spans for s2, e2 in box_spans)]
            ex.phrase_boxes.append(ex.boxes[hit].reshape(-1, 4))


def det_eval_set(spec: "str | DetSource", *, image_size: int, max_examples: int = 0,
                 context_length: int = 77, process_index: int = 0, process_count: int = 1,
                 seed: int = 0):
    """The evaluation view of a dataset: its first `max_examples` images (0: all), of which
    host process_index of process_count takes every process_count-th ("synthetic:N": N
    built-in held-out images, default 128)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    if is_synthetic(spec):
        from clipjax.data import synthetic_det

        n = int(spec.split(":", 1)[1]) if ":" in spec else (max_examples or 128)
        return synthetic_det.SyntheticDetSet(n, seed=seed, image_size=image_size,
                                             process_index=process_index,
                                             process_count=process_count)
    source = open_det_source(spec)
    n = min(max_examples, len(source)) if max_examples > 0 else len(source)
    return DetEvalSet(source, range(process_index, n, process_count), n,
                      image_size=image_size, context_length=context_length)
