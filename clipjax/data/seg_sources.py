"""Segmentation datasets as users have them: ADE20K, PASCAL VOC, Context-60, COCO-Object
and mask folders, each a Source of (image, label map) records (clipjax.data.segmentation
describes the specs and puts them through the pipeline)."""

import csv
import io
import os
import warnings

import numpy as np
from PIL import Image

from clipjax.data import sources as sources_lib
from clipjax.data.sources import BadSample, Record, Source
IGNORE = -1
_BAD = -2  # a raw mask value that names no class (in the lookup tables below)

MASK_SKIP_REASONS = (
    "missing_mask",        # the mask file does not exist
    "corrupt_mask",        # not an image PIL can decode
    "mask_not_indexed",    # a colour (RGB...) mask, not class indices (mode P, L, or I)
    "mask_size_mismatch",  # the mask is not the image's size
    "mask_out_of_range",   # a value outside [0, num_classes) that is not the ignore value
)
SKIP_REASONS = (*sources_lib.SKIP_REASONS, *MASK_SKIP_REASONS)

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television", "airplane", "dirt track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage",
    "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike",
    "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag")

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor")

CONTEXT_CLASSES = (  # mmseg's PascalContextDataset order (its converter's label order)
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat",
    "book", "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food",
    "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person",
    "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign",
    "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood")

COCO_OBJECT_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")

# The 80 thing ids of COCO-Stuff's 0-based label maps (COCO category id - 1; 0..90 less the 11
# ids COCO never used), in order: GroupViT's clsID_to_trID gives the i-th of them class i + 1.
COCO_STUFF_THING_IDS = (*range(0, 11), *range(12, 25), 26, 27, *range(30, 44), *range(45, 65),
                        66, 69, *range(71, 82), *range(83, 90))


def _table(values: dict[int, int]) -> np.ndarray:
    """A 256-entry lookup from raw mask values to classes; unlisted values are _BAD."""
    lut = np.full(256, _BAD, np.int32)
    for raw, cls in values.items():
        lut[raw] = cls
    return lut


def _indices(num_classes: int, *, shift: int = 0, ignore: int = 255) -> np.ndarray:
    """raw v -> v - shift for classes [0, num_classes), `ignore` -> IGNORE."""
    lut = _table({v + shift: v for v in range(num_classes)})
    lut[ignore] = IGNORE
    return lut


def coco_stuff_to_object() -> np.ndarray:
    """GroupViT's convert_coco_object.py as a lookup: thing ids -> 1..80; stuff ids (91..181),
    255 (unlabelled) and the unused thing ids -> 0 (background); 182..254 name nothing."""
    lut = _table({v: 0 for v in (*range(182), 255)})
    lut[list(COCO_STUFF_THING_IDS)] = np.arange(1, 81)
    return lut


# ---------------------------------------------------------------------------------------
# Specs and sources.


# The datasets whose class names are built in (`clipjax compile` needs only their count).
BUILTIN_CLASSES = {"ade20k": ADE20K_CLASSES, "voc": VOC_CLASSES, "context": CONTEXT_CLASSES,
                   "coco_object": COCO_OBJECT_CLASSES}


def parse_seg_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """`"kind:root?k=v"` -> (kind, root, options), kind one of KINDS."""
    return sources_lib.parse_spec(spec, KINDS, "Segmentation data",
                              "voc:/data/VOCdevkit/VOC2012?split=val")


def _folder(path: str, what: str, fix: str) -> str:
    if not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} does not exist: {fix}")
    return path


def _first_folder(root: str, subfolders: tuple[str, ...], what: str, fix: str) -> str:
    for sub in subfolders:
        if os.path.isdir(os.path.join(root, sub)):
            return os.path.join(root, sub)
    looked = " or ".join(repr(os.path.join(root, s)) for s in subfolders)
    raise ValueError(f"{what} folder {looked} does not exist: {fix}")


def _split_ids(path: str, fix: str) -> list[str]:
    if not os.path.isfile(path):
        raise ValueError(f"Split file {path!r} does not exist: {fix}")
    with open(path, encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip()]


def _stems(folder: str, extensions: tuple[str, ...]) -> list[tuple[str, str]]:
    """(stem, file name) of the files in `folder` with those extensions, sorted."""
    out = []
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in extensions and not name.startswith("."):
            out.append((stem, name))
    return out


def read_object_info(path: str) -> tuple[str, ...]:
    """Class names by index from ADE20K's objectInfo150.txt (tab-separated Idx Ratio Train
    Val Name) or its .csv; the first name of each synonym list ("door, double door")."""
    with open(path, encoding="utf-8", newline="") as f:
        if path.endswith(".csv"):
            rows = list(csv.reader(f))
        else:
            rows = [line.rstrip("\n").split("\t") for line in f]
    names = {}
    for row in rows:
        if len(row) >= 5 and row[0].strip().isdigit():
            names[int(row[0])] = row[4].replace(";", ",").split(",")[0].strip()
    if sorted(names) != list(range(1, len(names) + 1)) or not names:
        raise ValueError(f"{path!r} does not number its classes 1, 2, 3, ... in an Idx column: "
                         "give ADE20K's objectInfo150.txt, or remove it to use the built-in "
                         "names.")
    return tuple(names[i] for i in range(1, len(names) + 1))


class SegSource(Source):
    """Pairs of (image path, mask path) and the lookup from raw mask values to classes."""

    kind = ""
    has_text = False
    mask_modes = ("P", "L")
    options_allowed = {"split": "which part of the dataset"}

    def _finish(self, keys: list[str], images: list[str], masks: list[str],
                class_names: tuple[str, ...], lut: np.ndarray) -> None:
        self.keys, self.images, self.masks = keys, images, masks
        self.class_names = list(class_names)
        self.lut = lut
        if not keys:
            raise ValueError(f"{self.spec!r} lists no images: check the split and the folders "
                             "under its root.")

    @property
    def classnames(self) -> tuple[str, ...]:
        return tuple(self.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, index: int) -> Record:
        return {"key": self.keys[index], "image": self.images[index],
                "mask": self.masks[index], "text": None, "label": None, "skip": None}

    def load(self, record: Record) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 [H, W, 3], mask int32 [H, W]) of a record; BadSample if unusable."""
        image = sources_lib.open_image(_read(record["image"], "image"), self.max_pixels)
        mask = _open_mask(_read(record["mask"], "mask"), self.max_pixels)
        if mask.mode not in self.mask_modes:
            raise BadSample("mask_not_indexed", f"mode {mask.mode}: masks must be index PNGs "
                                                f"(mode {' or '.join(self.mask_modes)}), never "
                                                "converted to colour")
        if mask.size != image.size:
            raise BadSample("mask_size_mismatch", f"mask {mask.size[0]}x{mask.size[1]}, image "
                                                  f"{image.size[0]}x{image.size[1]}")
        try:
            mask.load()
            raw = np.asarray(mask)
        except Exception as e:
            raise BadSample("corrupt_mask", f"{type(e).__name__}: {e}") from None
        image_HWC = _rgb(sources_lib.load_pixels(image))
        return image_HWC, self.convert(raw)

    def convert(self, raw: np.ndarray) -> np.ndarray:
        """Raw mask values -> int32 classes with IGNORE; BadSample for values naming none."""
        low, high = int(raw.min()), int(raw.max())
        if low < 0 or high >= len(self.lut):
            value = low if low < 0 else high
            raise BadSample("mask_out_of_range", f"value {value} in a {self.num_classes}-class "
                                                 "mask")
        mask_HW = self.lut[raw]
        if (mask_HW == _BAD).any():
            value = int(raw[mask_HW == _BAD][0])
            raise BadSample("mask_out_of_range", f"value {value} in a {self.num_classes}-class "
                                                 "mask")
        return mask_HW


def _read(path: str, what: str) -> bytes:
    try:
        return sources_lib.read_bytes(path)
    except FileNotFoundError:
        raise BadSample(f"missing_{what}", f"{path} does not exist") from None
    except OSError as e:
        raise BadSample("unreadable_file", f"{type(e).__name__}: {e}") from None


def _open_mask(data: bytes, max_pixels: int) -> Image.Image:
    if len(data) == 0:
        raise BadSample("corrupt_mask", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            mask = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises many types for bad headers; none may stop a run
        raise BadSample("corrupt_mask", f"{type(e).__name__}: {e}") from None
    if mask.size[0] * mask.size[1] > max_pixels:
        raise BadSample("image_too_large", f"mask {mask.size[0]}x{mask.size[1]}")
    return mask


def _rgb(image: Image.Image) -> np.ndarray:
    try:
        return np.asarray(image.convert("RGB"))
    except Exception as e:  # odd modes and broken palettes must not stop a run
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None


class Ade20kSource(SegSource):
    kind = "ade20k"

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        root = _folder(location, "ADE20K folder", "point ade20k: at ADEChallengeData2016 (the "
                       "folder holding images/ and annotations/).")
        split = options.get("split", "training")
        fix = "use split=training or split=validation, or fix the ade20k: folder."
        images = _folder(os.path.join(root, "images", split), "ADE20K image folder", fix)
        masks = _folder(os.path.join(root, "annotations", split), "ADE20K annotation folder",
                        fix)
        names = ADE20K_CLASSES
        for info in ("objectInfo150.txt", "objectInfo150.csv"):
            if os.path.isfile(os.path.join(root, info)):
                names = read_object_info(os.path.join(root, info))
                break
        pairs = _stems(images, (".jpg", ".jpeg"))
        self._finish([s for s, _ in pairs], [os.path.join(images, n) for _, n in pairs],
                     [os.path.join(masks, s + ".png") for s, _ in pairs], names,
                     _indices(len(names), shift=1, ignore=0))


class VocSource(SegSource):
    kind = "voc"
    options_allowed = {**SegSource.options_allowed,
                       "masks": "mask folder under the root (default SegmentationClass)"}
    split_dir = os.path.join("ImageSets", "Segmentation")
    mask_dir = "SegmentationClass"
    default_split = "train"
    splits = "train, val or trainval"
    classes = VOC_CLASSES

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        root = _folder(location, f"{self.kind} folder", f"point {self.kind}: at the VOCdevkit "
                       "year folder holding JPEGImages/ and ImageSets/.")
        split = options.get("split", self.default_split)
        ids = _split_ids(os.path.join(root, self.split_dir, f"{split}.txt"),
                         f"use split={self.splits}, or fix the {self.kind}: folder.")
        images = _folder(os.path.join(root, "JPEGImages"), "Image folder", "fix the folder.")
        masks = _folder(os.path.join(root, options.get("masks", self.mask_dir)), "Mask folder",
                        "fix the folder, or the masks= option.")
        self._finish(ids, [os.path.join(images, i + ".jpg") for i in ids],
                     [os.path.join(masks, i + ".png") for i in ids], self.classes,
                     _indices(len(self.classes)))


class ContextSource(VocSource):
    kind = "context"
    options_allowed = SegSource.options_allowed
    split_dir = os.path.join("ImageSets", "SegmentationContext")
    mask_dir = "SegmentationClassContext"
    splits = "train or val"
    classes = CONTEXT_CLASSES


class CocoObjectSource(SegSource):
    kind = "coco_object"

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        root = _folder(location, "COCO folder", "point coco_object: at the folder holding "
                       "images/ (or train2017/, val2017/) and annotations/.")
        split = options.get("split", "train2017")
        fix = "use split=train2017 or split=val2017, or fix the coco_object: folder."
        images = _first_folder(root, (os.path.join("images", split), split), "COCO image", fix)
        masks = _first_folder(root, (os.path.join("annotations", split),
                                     os.path.join("stuffthingmaps_trainval2017", split)),
                              "COCO mask", fix + " Masks are GroupViT's *_instanceTrainIds.png "
                              "or COCO-Stuff's stuffthingmaps.")
        converted = any(n.endswith("_instanceTrainIds.png") for n in os.listdir(masks))
        suffix = "_instanceTrainIds.png" if converted else ".png"
        pairs = _stems(images, (".jpg", ".jpeg", ".png"))
        self._finish([s for s, _ in pairs], [os.path.join(images, n) for _, n in pairs],
                     [os.path.join(masks, s + suffix) for s, _ in pairs], COCO_OBJECT_CLASSES,
                     _indices(81) if converted else coco_stuff_to_object())
        self.converted = converted


class SegFolderSource(SegSource):
    kind = "segfolder"
    mask_modes = ("P", "L", "I", "I;16")

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        root = _folder(location, "Segmentation folder", "point segfolder: at the folder "
                       "holding images/, masks/ and classes.txt.")
        split = options.get("split", "")
        fix = "put the images in images/ and the masks in masks/ (or their <split>/ folders)."
        images = _folder(os.path.join(root, "images", split).rstrip(os.sep), "Image folder", fix)
        masks = _folder(os.path.join(root, "masks", split).rstrip(os.sep), "Mask folder", fix)
        names_file = os.path.join(root, "classes.txt")
        if not os.path.isfile(names_file):
            raise ValueError(f"Class list {names_file!r} does not exist: write one class name a "
                             "line, in label order.")
        with open(names_file, encoding="utf-8") as f:
            names = tuple(line.strip() for line in f if line.strip())
        if not 0 < len(names) < 256:
            raise ValueError(f"{names_file!r} names {len(names)} classes; a segfolder holds 1 "
                             "to 255 (255 is the ignore value).")
        pairs = _stems(images, (".jpg", ".jpeg", ".png"))
        self._finish([s for s, _ in pairs], [os.path.join(images, n) for _, n in pairs],
                     [os.path.join(masks, s + ".png") for s, _ in pairs], names,
                     _indices(len(names)))


KINDS: dict[str, type[SegSource]] = {
    "ade20k": Ade20kSource,
    "voc": VocSource,
    "context": ContextSource,
    "coco_object": CocoObjectSource,
    "segfolder": SegFolderSource,
}


def open_seg_source(data: "str | SegSource") -> SegSource:
    """The dataset a spec names, checked: missing folders and split files raise here."""
    if isinstance(data, SegSource):
        return data
    kind, location, options = parse_seg_spec(data)
    return KINDS[kind](data, location, options)


def classnames(spec: "str | SegSource") -> tuple[str, ...]:
    """The class names of a dataset, by class index."""
    return open_seg_source(spec).classnames


def num_classes(spec: "str | SegSource") -> int:
    return open_seg_source(spec).num_classes
