"""Evaluation datasets on the one data layer: labelled images (zero-shot, linear probes) and
captioned images (retrieval), read as host-local batches at the model's image size.

A dataset is a clipjax.data source spec (`imagefolder:/data/imagenet/val`,
`tfds:imagenet2012?data_dir=/data/tfds&split=validation`, `arrayrecord:/data/val-ar`), read
by pipeline.make_iterator(train=False): OpenCLIP's evaluation transform, every record once,
host h of P the records h, h + P, ...; unreadable images are skipped, logged and listed
in `skipped`. `labelled` also takes, wherever a dataset is named (command line or config):

- a bare folder path, meaning `imagefolder:PATH`;
- `data_dir` (--data-dir), added to a tfds: spec as data_dir=; a tfds: spec without split=
  reads the first of `splits` the dataset has (validation, else test);
- `synthetic[:N]` / `synthetic-train[:N]`: the first N (default 1024) images of the
  built-in data's held-out / training split, drawn at the model's image size.

Batches are {"image": f32 [b, S, S, 3], "index": int [b]} plus "label" where there is one;
"index" is the row in the whole dataset, so results can be put back in order.
"""

import csv
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import numpy as np

from clipjax.data import file_sources, pipeline, sources, synthetic
from clipjax.evals import prompts

Batch = dict[str, np.ndarray]
EVAL_SPLITS = ("validation", "test")
_SYNTHETIC = re.compile(r"(synthetic|synthetic-train)(?::(.*))?")
_READ_THREADS = min(16, 2 * (os.cpu_count() or 1))  # PIL decodes without holding the GIL


def dataset_spec(name: str, data_dir: str | None = None,
                 splits: Sequence[str] = EVAL_SPLITS) -> str:
    """The source spec a dataset name stands for (see the module docstring)."""
    if _SYNTHETIC.fullmatch(name):
        return name
    if not re.match(r"[a-z]+:", name) or os.path.exists(name):
        return f"imagefolder:{name}"
    kind, location, options = sources.parse_spec(name)
    if kind != "tfds":
        return name
    if data_dir is not None:
        if options.get("data_dir", data_dir) != data_dir:
            raise ValueError(f"{name!r} names data_dir={options['data_dir']} and --data-dir "
                             f"says {data_dir}; give the data directory once.")
        options["data_dir"] = data_dir
    if "split" not in options:
        from clipjax.data.tfds_source import split_names

        have = split_names(sources.format_spec(kind, location, options), location, options)
        options["split"] = next((s for s in splits if s in have), None)
        if options["split"] is None:
            raise ValueError(f"{name!r} has no {' or '.join(splits)} split (its splits: "
                             f"{', '.join(have) or 'none'}); name one with the option split=.")
    return sources.format_spec(kind, location, options)


class SourceImages:
    """The images of a clipjax.data source, with their labels where it has them."""

    def __init__(self, source: sources.Source, description: str | None = None,
                 on_skip: pipeline.SkipHandler | None = None, strict: bool = False):
        self.source, self.description = source, description or source.spec
        self.label_names = source.class_names
        self.num_labels = len(source.class_names) if source.class_names else None
        # The shipped class list that a known TFDS dataset implies.
        self.dataset = prompts.TFDS_DATASETS.get(getattr(source, "dataset_name", ""))
        self._on_skip, self._strict = on_skip, strict
        self.skipped: list[tuple[str, str, str]] = []  # (key, reason, detail) in the last pass

    def __len__(self) -> int:
        return len(self.source)

    @property
    def classnames(self) -> list:
        return prompts.resolve_classnames(self.label_names, self.num_labels, None, self.dataset,
                                          self.description)

    def _skip(self, key: str, reason: str, detail: str) -> None:
        if self._strict:
            raise ValueError(f"Image {key} cannot be used ({reason}: {detail}); every image of "
                             f"{self.description} is needed: fix the file or leave it out.")
        self.skipped.append((key, reason, detail))
        if self._on_skip is not None:
            self._on_skip(key, reason, detail)

    def batches(self, image_size: int, batch_size: int = 256, process_index: int = 0,
                process_count: int = 1) -> Iterator[Batch]:
        """One pass over this host's share, `batch_size` rows a batch."""
        self.skipped = []
        kw = dict(global_batch_size=batch_size * process_count, image_size=image_size,
                  process_index=process_index, process_count=process_count, num_workers=0,
                  read_threads=_READ_THREADS, on_skip=self._skip)
        if self.source.has_label:
            it = pipeline.classification_eval(self.source, **kw)[1]
        else:
            it = pipeline.make_iterator(self.source, train=False, **kw)
        with it:
            yield from it


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
        self.skipped: list[tuple[str, str, str]] = []

    def __len__(self) -> int:
        return self.num_examples

    def batches(self, image_size: int, batch_size: int = 256, process_index: int = 0,
                process_count: int = 1) -> Iterator[Batch]:
        rows = np.arange(process_index, len(self), process_count)
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


Images = SourceImages | SyntheticImages


def labelled(name: str, data_dir: str | None = None,
             splits: Sequence[str] = EVAL_SPLITS) -> Images:
    """The labelled dataset `name` stands for, opened and checked (missing files, splits,
    class labels raise here)."""
    if match := _SYNTHETIC.fullmatch(name):
        head, n = match.groups()
        if n is not None and not n.isdigit():
            raise ValueError(f"{name!r}: the number of synthetic images after ':' must be a "
                             "whole number, e.g. synthetic:1024.")
        return SyntheticImages(int(n) if n else 1024,
                               split="train" if head == "synthetic-train" else "held_out")
    source = sources.open_source(dataset_spec(name, data_dir, splits))
    if not source.has_label or not source.class_names:
        raise ValueError(f"{source.spec!r} has no class labels; give an imagefolder: source, a "
                         "TFDS dataset with a ClassLabel feature, or ArrayRecord converted from "
                         "either.")
    return SourceImages(source)


def captioned(path: str | os.PathLike, images_root: str | os.PathLike | None = None,
              split: str = "test") -> tuple[SourceImages, list[list[str]]]:
    """(the images, each image's captions) of a caption file: a Karpathy-split JSON
    (dataset_coco.json, dataset_flickr30k.json), a JSON list of {"image", "captions"}, or a
    CSV/TSV with `image` and `caption` columns (one row per caption). Every image must be
    readable: retrieval needs them all."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Caption file {path} does not exist; give a Karpathy JSON, a "
                                "JSON list of {image, captions} or a CSV with image,caption.")
    root = Path(images_root) if images_root else path.parent
    pairs: dict[str, list[str]] = {}
    if path.suffix == ".json":
        data = json.loads(path.read_text("utf-8"))
        if isinstance(data, dict) and "images" in data:  # Karpathy's split files
            wanted = {split, "restval"} if split == "train" else {split}  # Karpathy's train
            for im in data["images"]:
                if im.get("split", split) in wanted:
                    pairs[str(Path(im.get("filepath", ""), im["filename"]))] = [
                        s["raw"] for s in im["sentences"]]
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
    files = file_sources.ImageFiles([str(root / p) for p in pairs], str(path))
    return SourceImages(files, f"{path} ({len(files)} images)", strict=True), list(pairs.values())


def batch_fn(images: Images, batch_size: int = 256) -> Callable[..., Iterator[Batch]]:
    """`batches(encoders)` for an evaluator: this host's share of `images` at the model's size."""
    def batches(encoders):
        return images.batches(encoders.image_size, batch_size, jax.process_index(),
                              jax.process_count())

    return batches
