"""Image–text and classification data sources, named by one spec string each.

A spec is `KIND:LOCATION` with optional `?key=value&key=value` options:

    wds:/data/laion/{00000..01023}.tar          WebDataset tars as img2dataset writes them:
    wds:gs://bucket/cc12m/{0000..2175}.tar      key.jpg|jpeg|png|webp + key.txt (+ key.json);
                                                any fsspec URL; several patterns join with ::
    csv:/data/cc3m/train.tsv?img_key=filepath&caption_key=title
                                                OpenCLIP's CSV/TSV convention; options sep
                                                (tab, comma or one character; default comma for
                                                .csv, tab otherwise) and root (the directory
                                                relative image paths start from; default the
                                                CSV file's own)
    folder:/data/photos                         images with sidecar captions: a.jpg + a.txt
    imagefolder:/data/imagenet/val              one subfolder per class; option template, e.g.
                                                template=a photo of a {}. adds captions
    tfds:coco_captions?data_dir=/data/tfds&split=train
    tfds:imagenet2012:5.1.0?data_dir=/data/tfds&split=validation
                                                a prepared TFDS dataset, read without
                                                TensorFlow (array_record or tfrecord files);
                                                options data_dir, split, image_key, text_key,
                                                label_key (found by name when omitted)
    arrayrecord:/data/laion-ar                  what `clipjax data convert` writes (a folder
    arrayrecord:/data/laion-ar/*.array_record   or a glob inside it)

Every kind also takes `weight=` (its share of a mixture) and `max_pixels=` (larger images
are skipped as decompression bombs; default PIL's limit, 89.5 megapixels). Options are
read after the last `?` when all that follows it is `key=value` pairs, so a glob's `?`
stays part of the path.

A source is read either by index (`random_access`: `len(source)`, `source.read(i)`), which
gives a global shuffle and exact resume, or, for WebDataset tars, shard by shard
(`source.shards`, `source.read_shard(url)`). Either way a read never raises for bad data:
the record carries `skip=(reason, detail)` and the pipeline counts it. Missing files and
bad specs raise when the source is opened, before training starts.
"""

import csv
import io
import json
import logging
import os
import posixpath
import re
import struct
import tarfile
import threading
import urllib.parse
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from clipjax.tfrecord import masked_crc32c

log = logging.getLogger("clipjax.data")
_OPEN_LOCK = threading.Lock()

Record = dict[str, Any]  # key, image (bytes | None), text, label (int | None), skip

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS)  # 89,478,485: PIL's own warning threshold
ARRAYRECORD_META = "clipjax_dataset.json"

# Why a sample is skipped; the pipeline reports each as "skipped/<reason>".
SKIP_REASONS = (
    "missing_image",     # no image member in the tar group, or the file does not exist
    "empty_image",       # zero bytes
    "corrupt_image",     # not an image PIL can decode
    "truncated_image",   # the encoded data stops early
    "image_too_large",   # more than max_pixels: a decompression bomb
    "missing_caption",   # no caption, or only whitespace
    "caption_not_utf8",  # caption bytes that are not UTF-8
    "truncated_shard",   # a tar that ends or breaks mid-stream; its earlier samples are kept
    "unreadable_file",   # an I/O error reading a shard or file that existed at start
    "corrupt_record",    # an ArrayRecord or TFRecord entry that does not parse
)


class BadSample(Exception):
    """A sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def skipped(key: str, reason: str, detail: str = "") -> Record:
    return {"key": key, "image": None, "text": None, "label": None, "skip": (reason, detail)}


# ---------------------------------------------------------------------------------------
# Decoding checks shared by the pipeline and the converter.


def caption_text(value) -> str:
    """A caption as clean str: bytes must be UTF-8, and blank captions are missing."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadSample("caption_not_utf8", str(e)) from None
    if value is None:
        raise BadSample("missing_caption", "no caption")
    value = value.strip()
    if not value:
        raise BadSample("missing_caption", "caption is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates are how a CSV read with errors="surrogateescape" marks bad bytes.
        raise BadSample("caption_not_utf8", "caption holds bytes that are not UTF-8") from None
    return value


def open_image(data, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parse an encoded image's header (pixels are decoded by the caller's `load()`)."""
    if data is None:
        raise BadSample("missing_image", "no image")
    if isinstance(data, np.ndarray):  # TFDS tensors stored raw rather than encoded
        return Image.fromarray(data.squeeze(-1) if data.ndim == 3 and data.shape[-1] == 1 else data)
    if len(data) == 0:
        raise BadSample("empty_image", "zero bytes")
    try:
        with warnings.catch_warnings():
            # We apply max_pixels ourselves; PIL's own bomb check stays on as a backstop.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadSample("image_too_large", str(e)) from None
    except Exception as e:  # PIL raises many types for bad headers; none may stop a run
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadSample("image_too_large", f"{width}x{height} is more than {max_pixels} pixels")
    if width == 0 or height == 0:
        raise BadSample("corrupt_image", f"{width}x{height} image")
    return image


def load_pixels(image: Image.Image) -> Image.Image:
    """Decode the pixels of an opened image, mapping failures to BadSample."""
    try:
        image.load()
    except Exception as e:
        text = str(e)
        truncated = "truncated" in text.lower() or isinstance(e, EOFError)
        reason = "truncated_image" if truncated else "corrupt_image"
        raise BadSample(reason, f"{type(e).__name__}: {text}") from None
    return image


# ---------------------------------------------------------------------------------------
# Specs.


_OPTIONS_RE = re.compile(r"[A-Za-z_]\w*=[^&]*(&[A-Za-z_]\w*=[^&]*)*")


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """`"kind:location?k=v"` -> (kind, location, options)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"Data source {spec!r} has no kind: write KIND:LOCATION with KIND one of "
                         f"{', '.join(KINDS)}, e.g. 'wds:/data/shards/{{00000..00099}}.tar'.")
    kind, rest = spec.split(":", 1)
    if kind not in KINDS:
        raise ValueError(f"Unknown data source kind {kind!r} in {spec!r}: use one of "
                         f"{', '.join(KINDS)}.")
    location, options = rest, {}
    head, sep, tail = rest.rpartition("?")
    if sep and _OPTIONS_RE.fullmatch(tail):
        location = head
        options = dict(urllib.parse.parse_qsl(tail, keep_blank_values=True, strict_parsing=False))
    if not location:
        raise ValueError(f"Data source {spec!r} names no location after '{kind}:'.")
    return kind, location, options


def open_source(spec: "str | Source") -> "Source":
    """The source a spec names, checked: missing files and bad options raise here."""
    if isinstance(spec, Source):
        return spec
    kind, location, options = parse_spec(spec)
    return KINDS[kind](spec, location, options)


def expand_braces(pattern: str) -> list[str]:
    """Shell-style braces: `a{00..02}b{x,y}` -> a00bx a00by a01bx ... (zero padding kept)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise ValueError(f"Unbalanced braces in {pattern!r}: write e.g. "
                             "shards/{000..099}.tar.")
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        if int(hi) < int(lo):
            raise ValueError(f"Empty range {{{body}}} in {pattern!r}: the first number must not "
                             "exceed the second.")
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise ValueError(f"Cannot expand {{{body}}} in {pattern!r}: use {{first..last}} or "
                         "{a,b,c}.")
    return [expanded for item in items for expanded in expand_braces(head + item + tail)]


# ---------------------------------------------------------------------------------------
# File access: local paths through the OS, anything else through fsspec.


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _fs(url: str):
    import fsspec
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise ValueError(f"Cannot open {url!r}: {e}. Install the fsspec filesystem for its "
                         "protocol, e.g. pip install gcsfs (gs://) or s3fs (s3://).") from None


def open_file(url: str):
    if _is_local(url):
        return open(_local(url), "rb")
    fs, path = _fs(url)
    return fs.open(path, "rb")


def read_bytes(url: str) -> bytes:
    with open_file(url) as f:
        return f.read()


def check_files_exist(urls: list[str], what: str) -> None:
    """Raise one FileNotFoundError naming the missing files, listing each folder once."""
    missing = []
    by_dir: dict[str, list[str]] = {}
    for url in urls:
        if _is_local(url):
            if not os.path.isfile(_local(url)):
                missing.append(url)
        else:
            by_dir.setdefault(posixpath.dirname(url), []).append(url)
    for directory, members in by_dir.items():
        fs, path = _fs(directory)
        try:
            present = {p.rstrip("/") for p in fs.ls(path, detail=False)}
        except FileNotFoundError:
            present = set()
        missing += [u for u in members if _fs(u)[1].rstrip("/") not in present]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        shown = ", ".join(missing[:3]) + more
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} {what} do not exist: {shown}; "
                                "fix the path or the brace range.")


def _list_files(root: str) -> list[str]:
    """Every file under `root`, sorted, as paths or URLs like `root`."""
    if _is_local(root):
        root = _local(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"Folder {root!r} does not exist.")
        return sorted(os.path.join(d, f) for d, _, files in os.walk(root, followlinks=True)
                      for f in files)
    fs, path = _fs(root)
    if not fs.isdir(path):
        raise FileNotFoundError(f"Folder {root!r} does not exist.")
    protocol = root.split("://", 1)[0]
    return sorted(f"{protocol}://{p}" for p in fs.find(path))


def _has_extension(path: str, extensions) -> bool:
    base = posixpath.basename(path)
    return "." in base and base.rsplit(".", 1)[-1].lower() in extensions


# ---------------------------------------------------------------------------------------
# Sources.


class Source:
    """What every source has; subclasses fill in reading."""

    kind = ""
    random_access = True
    has_text = True
    has_label = False
    options_allowed: dict[str, str] = {}  # option -> what it means (for error messages)

    def __init__(self, spec: str, location: str, options: dict[str, str]):
        allowed = {"weight": "mixture weight", "max_pixels": "largest image",
                   **self.options_allowed}
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"Unknown option {unknown[0]!r} for {self.kind} source {spec!r}: "
                             f"valid options are {', '.join(sorted(allowed))}.")
        self.spec, self.location, self.options = spec, location, dict(options)
        self.weight = _positive(options.get("weight", "1"), "weight", spec, float)
        self.max_pixels = _positive(options.get("max_pixels", str(DEFAULT_MAX_PIXELS)),
                                    "max_pixels", spec, int)
        self.class_names: list[str] | None = None

    def __len__(self) -> int:
        raise TypeError(f"{self.kind} sources are read shard by shard and have no length.")

    def read(self, index: int) -> Record:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __getstate__(self):
        # Readers and file handles are opened lazily in each process that reads.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_open")}


def _positive(value: str, name: str, spec: str, cast):
    try:
        out = cast(value)
    except ValueError:
        out = 0
    if not out > 0:
        raise ValueError(f"Option {name}={value!r} in {spec!r} must be a positive "
                         f"{cast.__name__}.")
    return out


class WebDatasetSource(Source):
    """Tar shards of `key.ext` members, grouped by key, read in order."""

    kind = "wds"
    random_access = False

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        self.shards = [url for part in location.split("::") for url in expand_braces(part)]
        if not self.shards:
            raise ValueError(f"{spec!r} names no shards.")
        if len(set(self.shards)) != len(self.shards):
            raise ValueError(f"{spec!r} names some shards twice; each shard must appear once.")
        check_files_exist(self.shards, "WebDataset shards")

    def read_shard(self, url: str) -> Iterator[Record]:
        """The shard's samples in tar order; a broken tar ends with a skip record."""
        name = posixpath.basename(url)
        group: dict[str, bytes] = {}
        key = None
        opened = False
        try:
            with open_file(url) as f:
                opened = True
                tar = tarfile.open(fileobj=f, mode="r|*")
                for member in tar:
                    if not member.isfile():
                        continue
                    directory, base = posixpath.split(member.name)
                    stem, dot, ext = base.partition(".")
                    if not dot or not stem:
                        continue  # not a `key.ext` member (e.g. a hidden file)
                    member_key = posixpath.join(directory, stem)
                    if member_key != key:
                        if key is not None:
                            yield self._record(f"{name}/{key}", group)
                        key, group = member_key, {}
                    group[ext.lower()] = tar.extractfile(member).read()
        except GeneratorExit:  # closed early (at exit, tarfile may already be torn down)
            raise
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            if group:  # the members read before the break
                yield self._record(f"{name}/{key}", group)
            reason = "truncated_shard" if opened else "unreadable_file"
            yield skipped(name, reason, f"{type(e).__name__}: {e}")
            return
        if key is not None:
            yield self._record(f"{name}/{key}", group)

    @staticmethod
    def _record(key: str, group: dict[str, bytes]) -> Record:
        image = next((group[e] for e in WDS_IMAGE_EXTENSIONS if e in group), None)
        return {"key": key, "image": image, "text": group.get("txt"), "label": None}


class CsvSource(Source):
    """Rows of (image path, caption) from a CSV or TSV file."""

    kind = "csv"
    options_allowed = {"img_key": "image path column", "caption_key": "caption column",
                       "sep": "separator", "root": "base of relative paths"}

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        img_key = options.get("img_key", "filepath")
        caption_key = options.get("caption_key", "title")
        default_sep = "," if location.lower().endswith(".csv") else "\t"
        sep = {"tab": "\t", "comma": ",", "\\t": "\t"}.get(options.get("sep", default_sep),
                                                          options.get("sep", default_sep))
        if len(sep) != 1:
            raise ValueError(f"Option sep={sep!r} in {spec!r} must be one character, tab or comma.")
        root = options.get("root", posixpath.dirname(location) if not _is_local(location)
                           else os.path.dirname(os.path.abspath(_local(location))))
        try:
            with open_file(location) as f:
                text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
                reader = csv.reader(text, delimiter=sep)
                header = next(reader, None)
                if header is None:
                    raise ValueError(f"CSV file {location!r} is empty.")
                for column in (img_key, caption_key):
                    if column not in header:
                        raise ValueError(
                            f"CSV file {location!r} has no column {column!r} (columns: "
                            f"{', '.join(header)}): pass img_key= and caption_key=, or sep= if "
                            "the separator is not " + repr(sep) + ".")
                i_img, i_cap = header.index(img_key), header.index(caption_key)
                rows = [(r[i_img], r[i_cap]) if len(r) > max(i_img, i_cap) else ("", "")
                        for r in reader if r]
        except FileNotFoundError:
            raise FileNotFoundError(f"CSV file {location!r} does not exist.") from None
        if not rows:
            raise ValueError(f"CSV file {location!r} has a header but no rows.")
        join = os.path.join if _is_local(root) else posixpath.join
        self.paths = [p if (not p or "://" in p or os.path.isabs(p)) else join(root, p)
                      for p, _ in rows]
        self.captions = [c for _, c in rows]

    def __len__(self):
        return len(self.paths)

    def read(self, index):
        path = self.paths[index]
        if not path:
            return skipped(f"row {index + 2}", "missing_image", "empty image path")
        try:
            image = read_bytes(path)
        except FileNotFoundError:
            return skipped(path, "missing_image", "file does not exist")
        except OSError as e:
            return skipped(path, "unreadable_file", f"{type(e).__name__}: {e}")
        return {"key": path, "image": image, "text": self.captions[index], "label": None}


class CaptionFolderSource(Source):
    """Images anywhere under a folder, each captioned by the .txt file beside it."""

    kind = "folder"

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        files = _list_files(location)
        self.paths = [f for f in files if _has_extension(f, IMAGE_EXTENSIONS)]
        if not self.paths:
            raise ValueError(f"Folder {location!r} holds no images "
                             f"({', '.join(IMAGE_EXTENSIONS)}).")

    def __len__(self):
        return len(self.paths)

    def read(self, index):
        path = self.paths[index]
        try:
            image = read_bytes(path)
        except OSError as e:
            return skipped(path, "unreadable_file", f"{type(e).__name__}: {e}")
        try:
            text = read_bytes(path.rsplit(".", 1)[0] + ".txt")
        except FileNotFoundError:
            text = None
        except OSError as e:
            return skipped(path, "unreadable_file", f"caption: {type(e).__name__}: {e}")
        return {"key": path, "image": image, "text": text, "label": None}


class ClassFolderSource(Source):
    """One subfolder per class, classes in sorted order (torchvision's ImageFolder)."""

    kind = "imagefolder"
    has_text = False
    has_label = True
    options_allowed = {"template": "caption template with {} for the class name"}

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        self.template = options.get("template")
        if self.template is not None and "{}" not in self.template:
            raise ValueError(f"Option template={self.template!r} in {spec!r} needs a {{}} where "
                             "the class name goes.")
        self.has_text = self.template is not None
        root = location.rstrip("/")
        files = [f for f in _list_files(root) if _has_extension(f, IMAGE_EXTENSIONS)]
        # The class is the first folder below root; deeper folders belong to it.
        relative = [f[len(root) + 1:].replace(os.sep, "/") for f in files]
        pairs = [(r.split("/", 1)[0], f) for r, f in zip(relative, files) if "/" in r]
        self.class_names = sorted({c for c, _ in pairs})
        if not self.class_names:
            raise ValueError(f"Folder {location!r} has no class subfolders with images.")
        index = {c: i for i, c in enumerate(self.class_names)}
        self.paths = [f for _, f in pairs]
        self.labels = [index[c] for c, _ in pairs]

    def __len__(self):
        return len(self.paths)

    def read(self, index):
        path, label = self.paths[index], self.labels[index]
        try:
            image = read_bytes(path)
        except OSError as e:
            return skipped(path, "unreadable_file", f"{type(e).__name__}: {e}")
        text = self.template.format(self.class_names[label]) if self.template else None
        return {"key": path, "image": image, "text": text, "label": label}


# ---------------------------------------------------------------------------------------
# ArrayRecord: our converted format. A record is a uint32 header length, a JSON header
# {"key", "text", "label"} and the encoded image bytes exactly as the source held them.


def encode_record(key: str, image: bytes, text: str | None, label: int | None) -> bytes:
    header = json.dumps({"key": key, "text": text, "label": label}, ensure_ascii=False).encode()
    return struct.pack("<I", len(header)) + header + image


def decode_record(data: bytes) -> Record:
    try:
        (n,) = struct.unpack_from("<I", data)
        header = json.loads(data[4:4 + n])
        return {"key": header["key"], "image": data[4 + n:], "text": header["text"],
                "label": header["label"]}
    except (struct.error, ValueError, KeyError, TypeError) as e:
        return skipped("?", "corrupt_record", f"{type(e).__name__}: {e}")


class ArrayRecordSource(Source):
    """Shards written by `clipjax data convert`: random access to every sample."""

    kind = "arrayrecord"

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        if not _is_local(location):
            raise ValueError(f"{spec!r}: ArrayRecord files are read through the local file "
                             "system; copy them to local disk or mount the bucket (gcsfuse).")
        location = _local(location)
        if os.path.isdir(location):
            folder = location
            self.files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                                if f.endswith(".array_record"))
        else:
            import glob
            folder = os.path.dirname(location)
            self.files = sorted(glob.glob(location))
        if not self.files:
            raise FileNotFoundError(f"No .array_record files match {location!r}.")
        meta_path = os.path.join(folder, ARRAYRECORD_META)
        if not os.path.isfile(meta_path):
            raise ValueError(f"{folder!r} has no {ARRAYRECORD_META}: it was not written by "
                             "`clipjax data convert` (read TFDS's ArrayRecord files with tfds:).")
        with open(meta_path) as f:
            meta = json.load(f)
        self.has_text, self.has_label = meta["has_text"], meta["has_label"]
        self.class_names = meta.get("class_names")
        counts = {s["file"]: s["records"] for s in meta["shards"]}
        unknown = [f for f in self.files if os.path.basename(f) not in counts]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not listed in {meta_path}; an interrupted "
                             "conversion leaves such files: convert again.")
        self.lengths = [counts[os.path.basename(f)] for f in self.files]
        self._length = int(sum(self.lengths))
        self._open_reader = None

    def __len__(self):
        return self._length

    def _reader(self):
        with _OPEN_LOCK:  # read() runs in several threads
            if getattr(self, "_open_reader", None) is None:
                from array_record.python.array_record_data_source import ArrayRecordDataSource
                self._open_reader = ArrayRecordDataSource(self.files)
        return self._open_reader

    def read(self, index):
        record = decode_record(self._reader()[index])
        if record.get("skip"):
            record["key"] = f"record {index}"
        return record


# ---------------------------------------------------------------------------------------
# TFDS, read without TensorFlow.

_TFDS_TEXT_KEYS = ("captions/text", "caption", "text", "captions")


def tfrecord_offsets(path: str) -> list[tuple[int, int]]:
    """(offset, length) of each record's data in a TFRecord file, from its framing alone."""
    offsets = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        position = 0
        while position < size:
            header = f.read(12)
            if len(header) < 12:
                raise ValueError(f"TFRecord file {path!r} ends inside a record header.")
            (length,), (crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
            if crc != masked_crc32c(header[:8]):
                raise ValueError(f"TFRecord file {path!r} is corrupt at byte {position}.")
            offsets.append((position + 12, length))
            position += 12 + length + 4
            f.seek(position)
    return offsets


def _tfds_dataset_dir(name: str, data_dir: str, spec: str) -> str:
    """data_dir/name[/config]/version, the newest version when none is given."""
    name, _, version = name.partition(":")
    base = os.path.join(data_dir, name)
    if not os.path.isdir(base):
        raise FileNotFoundError(f"{spec!r}: no prepared TFDS dataset {name!r} in {data_dir!r}; "
                                "pass data_dir= or prepare it with tfds first.")

    def versions(d):
        return sorted((v for v in os.listdir(d) if re.fullmatch(r"\d+\.\d+\.\d+", v)
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


def _get_path(example: dict, key: str):
    for part in key.split("/"):
        example = example[part]
    return example


def _nested(key: str, value) -> dict:
    out = value
    for part in reversed(key.split("/")):
        out = {part: out}
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
        data_dir = options.get("data_dir") or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
            "~/tensorflow_datasets")
        self.directory = _tfds_dataset_dir(location, data_dir, spec)
        self.split = options.get("split", "train")
        builder = tfds.builder_from_directory(self.directory)
        info = builder.info
        features = info.features
        keys = _feature_keys(features)
        self.image_key = options.get("image_key", "image")
        if self.image_key not in keys:
            raise ValueError(f"{spec!r} has no image feature {self.image_key!r} (features: "
                             f"{', '.join(sorted(keys))}); pass image_key=.")
        self.text_key = options.get("text_key") or next(
            (k for k in _TFDS_TEXT_KEYS if k in keys), None)
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
                offsets = tfrecord_offsets(fi.filename)
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
            data = os.pread(f.fileno(), length, offset)
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


KINDS: dict[str, type[Source]] = {
    "wds": WebDatasetSource,
    "csv": CsvSource,
    "folder": CaptionFolderSource,
    "imagefolder": ClassFolderSource,
    "tfds": TfdsSource,
    "arrayrecord": ArrayRecordSource,
}
