"""`tfds:` sources: a dataset that TFDS has prepared on disk, read without TensorFlow.

    tfds:coco_captions?data_dir=/data/tfds&split=train
    tfds:imagenet2012:5.1.0?data_dir=/data/tfds&split=validation

The dataset lives in data_dir/name[/config]/version (the newest version unless the spec
names one after a second colon). array_record files are read through
`tfds.data_source`; tfrecord files (what `tfds build` writes by default) by clipjax's own
TFRecord reader, which checks both CRCs of every record, and TFDS's NumPy parser. Images
stay encoded until the pipeline decodes them with its own checks.
"""

import json
import os
import re
import threading
from typing import Any

import numpy as np

from clipjax import tfrecord
from clipjax.data.sources import Source, check_files_exist, skipped

_TEXT_KEYS = ("captions/text", "caption", "text", "captions")
_VERSION = re.compile(r"\d+\.\d+\.\d+")
_OPEN_LOCK = threading.Lock()  # readers open lazily, in whichever thread reads first


def _data_dir(options: dict[str, str]) -> str:
    return os.path.expanduser(options.get("data_dir") or os.environ.get("TFDS_DATA_DIR")
                              or "~/tensorflow_datasets")


def dataset_dir(location: str, data_dir: str, spec: str) -> str:
    """data_dir/name[/config]/version, the newest version when `location` names none."""
    name, _, version = location.partition(":")
    if version and not _VERSION.fullmatch(version):
        fixed = spec.replace(f"{name}:{version}", name, 1)
        fixed += f"{'&' if '?' in fixed else '?'}split={version}"
        raise ValueError(f"{spec!r}: after tfds:{name}: comes a version such as 3.0.2, not "
                         f"{version!r}; give the split as an option: {fixed!r}.")
    base = os.path.join(data_dir, name)
    if not os.path.isdir(base):
        raise FileNotFoundError(f"{spec!r}: no prepared TFDS dataset {name!r} in {data_dir!r}; "
                                "pass data_dir= or prepare it with tfds first.")

    def versions(d):
        return sorted((v for v in os.listdir(d) if _VERSION.fullmatch(v)
                       and os.path.isfile(os.path.join(d, v, "dataset_info.json"))),
                      key=lambda v: tuple(map(int, v.split("."))))

    found = versions(base)
    if not found and "/" not in name:
        configs = [c for c in sorted(os.listdir(base)) if os.path.isdir(os.path.join(base, c))
                   and versions(os.path.join(base, c))]
        if len(configs) == 1:
            base = os.path.join(base, configs[0])
            found = versions(base)
        elif configs:
            raise ValueError(f"{spec!r}: TFDS dataset {name!r} has configs {', '.join(configs)}; "
                             f"name one, e.g. tfds:{name}/{configs[0]}.")
    if version:
        if version not in found:
            raise FileNotFoundError(f"{spec!r}: version {version} of {name!r} is not prepared in "
                                    f"{base!r} (found: {', '.join(found) or 'none'}).")
        return os.path.join(base, version)
    if not found:
        raise FileNotFoundError(f"{spec!r}: {base!r} holds no prepared version of {name!r}.")
    return os.path.join(base, found[-1])


def split_names(spec: str, location: str, options: dict[str, str]) -> list[str]:
    """The splits a prepared dataset has, from its dataset_info.json (no TFDS import)."""
    directory = dataset_dir(location, _data_dir(options), spec)
    with open(os.path.join(directory, "dataset_info.json")) as f:
        return [s["name"] for s in json.load(f).get("splits", [])]


def _get_path(example: dict, key: str):
    for part in key.split("/"):
        example = example[part]
    return example


def _nested(key: str, value) -> dict:
    out = value
    for part in reversed(key.split("/")):
        out = {part: out}
    return out


def _feature_keys(features) -> dict[str, Any]:
    """Feature paths ("captions/text") to feature objects, nested dicts flattened."""
    import tensorflow_datasets as tfds
    out = {}

    def visit(prefix, feature):
        out[prefix] = feature
        inner = feature.feature if isinstance(feature, tfds.features.Sequence) else feature
        if isinstance(inner, tfds.features.FeaturesDict):
            for k, v in inner.items():
                visit(f"{prefix}/{k}" if prefix else k, v)

    for k, v in features.items():
        visit(k, v)
    return out


class TfdsSource(Source):
    """A prepared TFDS dataset: array_record through tfds.data_source, tfrecord by our reader."""

    kind = "tfds"
    options_allowed = {"data_dir": "TFDS data directory", "split": "split, e.g. train[:10%]",
                       "image_key": "image feature", "text_key": "caption feature",
                       "label_key": "class label feature"}

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        import tensorflow_datasets as tfds
        self.directory = dataset_dir(location, _data_dir(options), spec)
        self.dataset_name = location.partition(":")[0].split("/")[0]
        self.split = options.get("split", "train")
        info = tfds.builder_from_directory(self.directory).info
        keys = _feature_keys(info.features)
        self.image_key = options.get("image_key", "image")
        if self.image_key not in keys:
            raise ValueError(f"{spec!r} has no image feature {self.image_key!r} (features: "
                             f"{', '.join(sorted(keys))}); pass image_key=.")
        self.text_key = options.get("text_key") or next((k for k in _TEXT_KEYS if k in keys), None)
        label_key = options.get("label_key")
        if label_key is None and isinstance(keys.get("label"), tfds.features.ClassLabel):
            label_key = "label"
        self.label_key = label_key
        for key in (self.text_key, self.label_key):
            if key is not None and key not in keys:
                raise ValueError(f"{spec!r} has no feature {key!r} (features: "
                                 f"{', '.join(sorted(keys))}).")
        if self.text_key is None and self.label_key is None:
            raise ValueError(f"{spec!r} has neither captions nor class labels that clipjax "
                             f"recognises (features: {', '.join(sorted(keys))}); pass text_key= "
                             "or label_key=.")
        self.has_text, self.has_label = self.text_key is not None, self.label_key is not None
        if self.has_label:
            names = getattr(keys[self.label_key], "names", None)
            self.class_names = list(names) if names else None
        try:
            instructions = info.splits[self.split].file_instructions
        except (KeyError, ValueError) as e:
            raise ValueError(f"{spec!r}: split {self.split!r} is not available ({e}); splits: "
                             f"{', '.join(info.splits.keys())}.") from None
        self.file_format = info.file_format.value if info.file_format else "tfrecord"
        if self.file_format == "array_record":
            self._length = sum(fi.take for fi in instructions)
        elif self.file_format == "tfrecord":
            # Our own index: TFDS's tfrecord reading goes through tf.data.
            check_files_exist([fi.filename for fi in instructions], "TFRecord files")
            self.records: list[tuple[str, int, int]] = []
            for fi in instructions:
                offsets = tfrecord.offsets(fi.filename)
                take = fi.take if fi.take >= 0 else len(offsets) - fi.skip
                self.records += [(fi.filename, o, n) for o, n in offsets[fi.skip:fi.skip + take]]
            self._length = len(self.records)
        else:
            raise ValueError(f"{spec!r} is stored as {self.file_format}; clipjax reads TFDS "
                             "array_record and tfrecord files.")
        self._open_source = None

    def __len__(self):
        return self._length

    def _open(self):
        with _OPEN_LOCK:  # read() runs in several threads
            if getattr(self, "_open_source", None) is None:
                import tensorflow_datasets as tfds
                builder = tfds.builder_from_directory(self.directory)
                # Images stay encoded: the pipeline decodes them with its own checks.
                self._open_decoders = _nested(self.image_key, tfds.decode.SkipDecoding())
                self._open_features = builder.info.features
                if self.file_format == "array_record":
                    self._open_source = builder.as_data_source(
                        split=self.split, decoders=self._open_decoders)
                else:
                    self._open_source = self  # records are read by _example
        return self._open_source

    def _example(self, index: int) -> dict:
        source = self._open()
        if source is not self:
            return source[index]
        filename, offset, length = self.records[index]
        with open(filename, "rb") as f:
            data = tfrecord.read(f.fileno(), offset, length)
        return self._open_features.deserialize_example_np(data, decoders=self._open_decoders)

    def read(self, index):
        key = f"{self.location}[{self.split}] #{index}"
        try:
            example = self._example(index)
        except Exception as e:  # a record that does not parse must not stop a run
            return skipped(key, "corrupt_record", f"{type(e).__name__}: {e}")
        text = None
        if self.text_key is not None:
            text = _get_path(example, self.text_key)
            if isinstance(text, np.ndarray):
                text = text.tolist()
        label = int(_get_path(example, self.label_key)) if self.label_key else None
        return {"key": key, "image": _get_path(example, self.image_key), "text": text,
                "label": label}
