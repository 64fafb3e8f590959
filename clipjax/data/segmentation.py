"""Semantic segmentation data: image + label-map pairs through the one grain pipeline.

    it = make_seg_iterator("ade20k:/data/ADEChallengeData2016?split=training",
                           global_batch_size=16, crop_size=480, base_size=520, train=True)
    batch = next(it)   # {"image": uint8 [b, 480, 480, 3], "mask": int32 [b, 480, 480]}
    state = it.get_state()   # as pipeline.DataIterator: resumable, host-split, skip counts
    for key, image_HWC, mask_HW in eval_set("voc:/data/VOCdevkit/VOC2012?split=val"): ...

Masks are int32 class indices, IGNORE (-1) where unlabelled. Specs are KIND:ROOT?opt=v:

    ade20k:/data/ADEChallengeData2016?split=training|validation
        images/<split>/*.jpg, annotations/<split>/<stem>.png; 0 ("other") is IGNORE, v is
        class v-1 of 150; names from objectInfo150.txt (or .csv) in the root, else built in
    voc:/data/VOCdevkit/VOC2012?split=train|val|trainval&masks=SegmentationClass
        ImageSets/Segmentation/<split>.txt, JPEGImages/<id>.jpg, <masks>/<id>.png (palette
        PNGs, read as indices; masks=SegmentationClassAug with split=trainaug for SBD's
        extra masks); 21 classes with background 0; 255 is IGNORE
    context:/data/VOCdevkit/VOC2010?split=train|val
        PASCAL Context-60 as mmseg converts it: ImageSets/SegmentationContext/<split>.txt,
        JPEGImages/<id>.jpg, SegmentationClassContext/<id>.png; 60 classes with background
        0; 255 is IGNORE
    coco_object:/data/coco?split=train2017|val2017
        GroupViT's COCO-Object (background + the 80 things): <masks>/<stem>_instanceTrainIds.png
        where convert_coco_object.py wrote them, else COCO-Stuff's <masks>/<stem>.png converted
        as it does (things 1..80, stuff and 255 background); <masks> is annotations/<split> or
        stuffthingmaps_trainval2017/<split>, images images/<split>/ or <split>/
    segfolder:/data/myset?split=NAME
        images/[<split>/]*.{jpg,jpeg,png}, masks/[<split>/]<stem>.png (index PNGs, mode P, L
        or I), classes.txt (one name a line); 255 is IGNORE

Every kind also takes max_pixels= (larger images are skipped, as in sources.Source). A pair
whose image or mask is missing or does not decode, whose mask is not an index image, differs
in size from its image, or holds a value that is no class, is skipped and counted by reason
(stats()); a missing root, folder or split file raises ValueError when the source is opened.

Training augments image and mask together (augment): resize to a random scale of base_size
(long side), pad to crop_size (mask with IGNORE), random crop, random flip, drawn from the
sample's identity (seed, epoch, record) so that runs are reproducible and resumable.
"""

import grain
import numpy as np
from PIL import Image

from clipjax.data import pipeline, stages
from clipjax.data import sources as sources_lib
from clipjax.data.sources import BadSample
from clipjax.data.seg_sources import (  # noqa: F401 (the datasets' public names, here too)
    ADE20K_CLASSES, BUILTIN_CLASSES, COCO_OBJECT_CLASSES, COCO_STUFF_THING_IDS, CONTEXT_CLASSES,
    IGNORE, KINDS, MASK_SKIP_REASONS, SKIP_REASONS, VOC_CLASSES, Ade20kSource, CocoObjectSource,
    ContextSource, SegFolderSource, SegSource, VocSource, classnames, coco_stuff_to_object,
    num_classes, open_seg_source, parse_seg_spec, read_object_info)
# ---------------------------------------------------------------------------------------
# Augmentation and the pipeline stage.


def augment(image_HWC: np.ndarray, mask_HW: np.ndarray, rng: np.random.Generator | None, *,
            crop: int, base_size: int, scale: tuple[float, float] = (0.5, 2.0),
            flip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [crop, crop, 3], mask int32 [crop, crop]) with one geometry for both.

    Resize so the long side is base_size x a scale drawn from `scale` (bilinear image,
    nearest mask), pad right and bottom to at least crop x crop (image 0, mask IGNORE), crop
    at random, flip horizontally with probability 1/2. rng=None is the deterministic view:
    scale 1, the centre crop, no flip.
    """
    height, width = mask_HW.shape
    s = 1.0 if rng is None else float(rng.uniform(*scale))
    long = max(int(base_size * s + 0.5), 1)
    if height >= width:
        new_h, new_w = long, max(int(width * long / height + 0.5), 1)
    else:
        new_h, new_w = max(int(height * long / width + 0.5), 1), long
    if (new_h, new_w) != (height, width):
        image_HWC = np.asarray(Image.fromarray(image_HWC).resize((new_w, new_h),
                                                                 Image.Resampling.BILINEAR))
        mask_HW = np.asarray(Image.fromarray(mask_HW.astype(np.int32)).resize(
            (new_w, new_h), Image.Resampling.NEAREST)).astype(np.int32)
    pad_h, pad_w = max(crop - new_h, 0), max(crop - new_w, 0)
    if pad_h or pad_w:
        image_HWC = np.pad(image_HWC, ((0, pad_h), (0, pad_w), (0, 0)))
        mask_HW = np.pad(mask_HW, ((0, pad_h), (0, pad_w)), constant_values=IGNORE)
    room_h, room_w = mask_HW.shape[0] - crop, mask_HW.shape[1] - crop
    if rng is None:
        top, left, mirror = room_h // 2, room_w // 2, False
    else:
        top, left = int(rng.integers(room_h + 1)), int(rng.integers(room_w + 1))
        mirror = flip and bool(rng.random() < 0.5)
    image_HWC = image_HWC[top:top + crop, left:left + crop]
    mask_HW = mask_HW[top:top + crop, left:left + crop]
    if mirror:
        image_HWC, mask_HW = image_HWC[:, ::-1], mask_HW[:, ::-1]
    return np.ascontiguousarray(image_HWC), np.ascontiguousarray(mask_HW, np.int32)


class SegPrepare:
    """Raw pair record -> {"image", "mask", "index"?} or {"skip": (reason, detail), "key"}."""

    def __init__(self, source: SegSource, *, crop: int, base_size: int,
                 scale: tuple[float, float], train: bool, index: bool):
        self.source, self.crop, self.base_size = source, crop, base_size
        self.scale, self.train, self.index = scale, train, index

    def __call__(self, record: dict) -> dict:
        if record.get("skip"):
            return {"skip": tuple(record["skip"]), "key": record["key"]}
        rng = np.random.default_rng(record["rng"]) if self.train else None
        try:
            image_HWC, mask_HW = self.source.load(record)
        except BadSample as e:
            return {"skip": (e.reason, e.detail), "key": record["key"]}
        image_HWC, mask_HW = augment(image_HWC, mask_HW, rng, crop=self.crop,
                                     base_size=self.base_size, scale=self.scale)
        out = {"image": image_HWC, "mask": mask_HW}
        if self.index:
            out["index"] = np.int64(record["index"])
        return out


class SegIterator(pipeline.DataIterator):
    """pipeline.DataIterator whose stats() also names the mask reasons."""

    def stats(self) -> dict[str, int]:
        known = [r for r in SKIP_REASONS if self._skipped.get(r)]
        other = sorted(r for r in self._skipped if r not in SKIP_REASONS and self._skipped[r])
        return {f"skipped/{r}": self._skipped[r] for r in known + other}


def make_seg_iterator(data: "str | SegSource", *, global_batch_size: int, crop_size: int,
                      base_size: int, train: bool, seed: int = 0,
                      scale: tuple[float, float] = (0.5, 2.0), process_index: int | None = None,
                      process_count: int | None = None, num_workers: int = 0,
                      read_threads: int = 4, max_consecutive_skips: int = 10_000,
                      on_skip: pipeline.SkipHandler | None = None) -> SegIterator:
    """Host-local batches {"image": uint8 [b, crop, crop, 3], "mask": int32 [b, crop, crop]}.

    A pipeline.DataIterator (get_state, set_state, stats, close, class_names). train=True
    repeats forever, reshuffled each epoch, augmented by `augment`; train=False reads each
    pair once, in order, as augment's deterministic view (scale 1, centre crop), and adds
    "index" int64 [b], each row's record index. Whole-image evaluation reads eval_set.
    """
    source = open_seg_source(data)
    scale = (float(scale[0]), float(scale[1]))
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale={scale!r} must be (low, high) with 0 < low <= high.")
    if crop_size < 1 or base_size < 1:
        raise ValueError(f"crop_size {crop_size} and base_size {base_size} must be positive.")
    process_index, process_count, batch_size = pipeline.host_share(
        global_batch_size, process_index, process_count)
    with_index = not train
    prepare = SegPrepare(source, crop=crop_size, base_size=base_size, scale=scale, train=train,
                         index=with_index)
    ds = stages.HostRecords(source, source_id=0, seed=seed, train=train,
                            process_index=process_index, process_count=process_count)
    ds = ds.map(prepare).to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads))
    empty = {"image": np.zeros((0, crop_size, crop_size, 3), np.uint8),
             "mask": np.zeros((0, crop_size, crop_size), np.int32)}
    if with_index:
        empty["index"] = np.zeros((0,), np.int64)
    ds = pipeline.in_workers(stages.Batch(ds, batch_size, empty, shared_memory=num_workers > 0),
                             num_workers)
    config = {"kind": "segmentation", "sources": [source.spec], "seed": seed, "train": train,
              "global_batch_size": global_batch_size, "process_index": process_index,
              "process_count": process_count, "num_workers": num_workers,
              "crop_size": crop_size, "base_size": base_size, "scale": list(scale)}
    return SegIterator(ds, batch_size=batch_size, config=config,
                       class_names=list(source.class_names),
                       max_consecutive_skips=max_consecutive_skips, on_skip=on_skip)


# ---------------------------------------------------------------------------------------
# Evaluation.


class SegEvalSet:
    """Every pair once at its original size: (key, image uint8 [H, W, 3], mask int32 [H, W]).

    len() counts the pairs listed (bad ones included); iteration skips bad pairs and counts
    them in `skipped` {reason: count}.
    """

    def __init__(self, source: SegSource, indices: range):
        self.source, self.indices = source, indices
        self.classnames = source.classnames
        self.num_classes = source.num_classes
        self.skipped: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        for i in self.indices:
            record = self.source.read(i)
            try:
                image_HWC, mask_HW = self.source.load(record)
            except BadSample as e:
                self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
                continue
            yield record["key"], image_HWC, mask_HW


def eval_set(spec: "str | SegSource", *, max_examples: int = 0, process_index: int = 0,
             process_count: int = 1) -> SegEvalSet:
    """The evaluation view of a dataset: its first `max_examples` pairs (0: all), of which
    host `process_index` of `process_count` takes every process_count-th."""
    source = open_seg_source(spec)
    n = min(max_examples, len(source)) if max_examples > 0 else len(source)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    return SegEvalSet(source, range(process_index, n, process_count))
