"""Evaluation data: labelled images (class folders, tfds, the synthetic held-out split) and
captioned images (retrieval), as host-local batches of preprocessed images.

Every source yields {"image": f32 [b, S, S, 3], "index": [b]} plus "label" where there is
one; "index" is the row in the whole dataset, so results can be put back in order. Images
go through clipjax.data.transforms.eval_transform (OpenCLIP's evaluation transform), decoded
by PIL on a thread pool one batch ahead of the accelerator.
"""

import concurrent.futures
import csv
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from clipjax.data import synthetic
from clipjax.data.transforms import ImageDecodeError, eval_transform
from clipjax.evals import prompts

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
Batch = dict[str, np.ndarray]


def list_images(root: Path) -> list[Path]:
    """Image files under `root` (by suffix, any depth, hidden entries skipped), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames)
                if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    return out


def _mine(n: int, process_index: int, process_count: int) -> range:
    """This host's rows: every process_count-th, so hosts differ by at most one row."""
    return range(process_index, n, process_count)


def preprocessed_batches(load: Callable[[int], dict], rows: Sequence[int], batch_size: int,
                         on_skip: Callable[[int, Exception], None] | None = None,
                         workers: int | None = None) -> Iterator[Batch]:
    """Batches of `load(row)` ({"image": [S, S, 3], ...} per row) over `rows`, with "index",
    decoded on threads one batch ahead. With `on_skip`, rows whose image cannot be decoded
    are left out and reported; without it the first such error propagates."""
    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    chunks = [list(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        def submit(chunk):
            return [(r, pool.submit(load, r)) for r in chunk]

        pending = submit(chunks[0]) if chunks else []
        for i in range(len(chunks)):
            current = pending
            pending = submit(chunks[i + 1]) if i + 1 < len(chunks) else []
            items = []
            for r, future in current:
                try:
                    items.append({**future.result(), "index": r})
                except ImageDecodeError as e:
                    if on_skip is None:
                        raise
                    on_skip(r, e)
            if items:
                yield {k: np.stack([np.asarray(it[k]) for it in items]) for k in items[0]}


class ImageFolder:
    """Labelled images in one subfolder per class (labels in sorted folder-name order)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Image folder {self.root} does not exist; give a folder with "
                                    "one subfolder of images per class.")
        classes = sorted(d.name for d in self.root.iterdir()
                         if d.is_dir() and not d.name.startswith("."))
        self.label_names = classes
        self.files, labels = [], []
        for label, name in enumerate(classes):
            files = list_images(self.root / name)
            self.files += files
            labels += [label] * len(files)
        self.labels = np.asarray(labels, np.int64)
        if not self.files:
            what = "class subfolders with images" if classes else "class subfolders"
            raise ValueError(f"{self.root} holds no {what}; a labelled image folder needs one "
                             "subfolder of images per class (e.g. root/cat/1.jpg, root/dog/2.jpg).")
        self.description = f"image folder {self.root}"
        self.dataset = None  # no shipped class list implied

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def classnames(self) -> list:
        return prompts.resolve_classnames(self.label_names, self.num_labels, None, None,
                                          self.description)

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, image_size: int, batch_size: int = 256, process_index: int = 0,
                process_count: int = 1) -> Iterator[Batch]:
        def load(r: int) -> dict:
            return {"image": eval_transform(self.files[r], image_size), "label": self.labels[r]}

        return preprocessed_batches(load, _mine(len(self), process_index, process_count),
                                    batch_size)


class TfdsImages:
    """A prepared tfds dataset read through tfds.data_source (no TensorFlow needed for
    array_record files); JPEG/PNG bytes are decoded by PIL, as OpenCLIP decodes files."""

    def __init__(self, name: str, split: str | None, data_dir: str | None,
                 image_key: str = "image", label_key: str = "label"):
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # tfds raises its own DatasetNotFoundError
            raise ValueError(f"tfds knows no dataset {name!r} ({e}); check the name after tfds:.") from e
        splits = list(builder.info.splits) or ["validation", "test"]
        if split is None:
            split = "validation" if "validation" in splits else "test"
        features = builder.info.features
        if label_key not in features or image_key not in features:
            raise ValueError(f"tfds dataset {name} has features {', '.join(features)}, not "
                             f"{image_key!r} and {label_key!r}; it is not an image "
                             "classification dataset.")
        label = features[label_key]
        self.num_labels = int(label.num_classes)
        self.label_names = list(label.names)
        try:
            self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                           decoders={image_key: tfds.decode.SkipDecoding()})
        except Exception as e:
            raise FileNotFoundError(
                f"tfds dataset {name} split {split!r} is not prepared under "
                f"{data_dir or 'the default tfds data dir'} ({type(e).__name__}); prepare it with "
                f"`tfds build {name} --data_dir DIR --file_format array_record` and pass "
                "--data-dir DIR.") from e
        self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
        self.description = f"tfds:{name} split {split!r}"
        self.dataset = prompts.TFDS_DATASETS.get(name)  # the shipped class list, if any

    @property
    def classnames(self) -> list:
        return prompts.resolve_classnames(self.label_names, self.num_labels, None, self.dataset,
                                          self.description)

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, row: int, image_size: int) -> dict:
        example = self.source[row]
        data = example[self.image_key]
        try:
            if isinstance(data, (bytes, np.bytes_)):
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
                    image = im.copy()
            else:
                image = Image.fromarray(np.asarray(data).squeeze())
        except OSError as e:
            raise ImageDecodeError(f"{self.description} row {row} cannot be decoded ({e}).") from e
        return {"image": eval_transform(image, image_size), "label": int(example[self.label_key])}

    def batches(self, image_size: int, batch_size: int = 256, process_index: int = 0,
                process_count: int = 1) -> Iterator[Batch]:
        return preprocessed_batches(lambda r: self._load(r, image_size),
                                    _mine(len(self), process_index, process_count), batch_size)


class SyntheticImages:
    """The first `num_examples` of a split of the built-in synthetic data ("held_out" by
    default), rendered at the model's image size."""

    def __init__(self, num_examples: int = 1024, seed: int = 0, captions_per_image: int = 5,
                 split: str = "held_out"):
        self.num_examples, self.seed, self.split = num_examples, seed, split
        self.captions_per_image = captions_per_image
        self.label_names = list(synthetic.CLASSNAMES)
        self.num_labels = len(self.label_names)
        self.description = f"synthetic {split} split ({num_examples} images)"
        self.dataset = None
        self.classnames = list(synthetic.CLASSNAMES)

    def __len__(self) -> int:
        return self.num_examples

    def batches(self, image_size: int, batch_size: int = 256, process_index: int = 0,
                process_count: int = 1) -> Iterator[Batch]:
        rows = np.asarray(_mine(len(self), process_index, process_count))
        for lo in range(0, len(rows), batch_size):
            idx = rows[lo:lo + batch_size]
            ex = synthetic.render(self.seed, self.split, idx, image_size)
            yield {"image": synthetic.normalize(ex.image_BHWC), "label": ex.label_B, "index": idx}

    def captions(self) -> list[list[str]]:
        idx = np.arange(self.num_examples)
        ex = synthetic.render(self.seed, self.split, idx, 8)  # captions need no pixels
        caps = [synthetic.captions(self.seed, self.split, ex, idx, variant=v)
                for v in range(self.captions_per_image)]
        return [list(c) for c in zip(*caps)]


def labelled(spec: str, data_dir: str | None = None):
    """A labelled source from "synthetic[:N]" (held-out split), "synthetic-train[:N]",
    "tfds:NAME[:SPLIT]" or a class-folder path."""
    head, _, n = spec.partition(":")
    if head in ("synthetic", "synthetic-train"):
        if n and not n.isdigit():
            raise ValueError(f"{spec!r}: the number of synthetic images after ':' must be a "
                             "whole number, e.g. synthetic:1024.")
        return SyntheticImages(int(n) if n else 1024,
                               split="train" if head == "synthetic-train" else "held_out")
    if spec.startswith("tfds:"):
        name, _, split = spec[len("tfds:"):].partition(":")
        return TfdsImages(name, split or None, data_dir)
    return ImageFolder(spec)


def batch_fn(source, batch_size: int = 256):
    """`batches(encoders)` for an evaluator: this host's share of `source` at the model's size."""
    def batches(encoders):
        return source.batches(encoders.image_size, batch_size, jax.process_index(),
                              jax.process_count())

    return batches


class CaptionedImages:
    """Images with several captions each, from a Karpathy-split JSON (dataset_coco.json,
    dataset_flickr30k.json), a JSON list of {"image", "captions"}, or a CSV/TSV with
    `image` and `caption` columns (one row per caption)."""

    def __init__(self, path: str | os.PathLike, images_root: str | os.PathLike | None = None,
                 split: str = "test"):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Caption file {path} does not exist; give a Karpathy JSON, a "
                                    "JSON list of {image, captions} or a CSV with image,caption.")
        root = Path(images_root) if images_root else path.parent
        pairs: dict[str, list[str]] = {}
        if path.suffix == ".json":
            data = json.loads(path.read_text("utf-8"))
            if isinstance(data, dict) and "images" in data:  # Karpathy's split files
                for im in data["images"]:
                    if im.get("split", split) == split or (split == "train" and im.get("split") == "restval"):
                        rel = Path(im.get("filepath", ""), im["filename"])
                        pairs[str(rel)] = [s["raw"] for s in im["sentences"]]
            elif isinstance(data, list):
                for item in data:
                    pairs.setdefault(item["image"], []).extend(item["captions"])
            else:
                raise ValueError(f"{path} is neither a Karpathy split file nor a JSON list of "
                                 "{\"image\": ..., \"captions\": [...]}.")
        else:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="\t" if path.suffix in (".tsv", ".txt") else ",")
                if not {"image", "caption"} <= set(reader.fieldnames or []):
                    raise ValueError(f"{path} needs a header with columns image and caption; it "
                                     f"has {reader.fieldnames}.")
                for row in reader:
                    pairs.setdefault(row["image"], []).append(row["caption"])
        if not pairs:
            raise ValueError(f"{path} lists no images{' for split ' + repr(split) if split else ''}; "
                             "check the file and --split.")
        self.files = [root / p for p in pairs]
        self._captions = list(pairs.values())
        self.description = f"{path} ({len(self.files)} images)"

    def __len__(self) -> int:
        return len(self.files)

    def captions(self) -> list[list[str]]:
        return self._captions

    def batches(self, image_size: int, batch_size: int = 256, process_index: int = 0,
                process_count: int = 1) -> Iterator[Batch]:
        return preprocessed_batches(lambda r: {"image": eval_transform(self.files[r], image_size)},
                                    _mine(len(self), process_index, process_count), batch_size)

