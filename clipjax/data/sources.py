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

Video datasets (msrvtt:, msvd:, k400:, ucf101:, hmdb51:, videolist:, rawframes:) are
described in clipjax.data.video_sources and read by clipjax.data.video.

Every kind also takes `weight=` (its share of a mixture) and `max_pixels=` (larger images
are skipped as decompression bombs; default PIL's limit, 89.5 megapixels). Options are
read after the last `?` when all that follows it is `key=value` pairs, so a glob's `?`
stays part of the path.

A source is read either by index (`random_access`: `len(source)`, `source.read(i)`), which
gives a global shuffle and exact resume, or, for WebDataset tars, shard by shard
(`source.shards`, `source.read_shard(url)`). Either way a read never raises for bad data:
the record carries `skip=(reason, detail)` and the pipeline counts it. Missing files and
bad specs raise when the source is opened, before training starts.

This module holds the spec syntax, file access, the checks every read shares and the
Source base; file_sources.py (csv, folder, imagefolder, and `ImageFiles` for a list of
paths that code chose), wds_source.py, tfds_source.py and arrayrecord.py hold the kinds.
"""

import io
import logging
import os
import posixpath
import re
import urllib.parse
import warnings
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger("clipjax.data")

Record = dict[str, Any]  # key, image (bytes | None), text, label (int | None), skip

# What counts as an image file (by suffix) in folders and tar groups; PIL decodes each.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "ppm", "pgm", "tif", "tiff")
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS)  # 89,478,485: PIL's own warning threshold

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
    "missing_video",     # a video file or frame folder that does not exist
    "empty_video",       # zero bytes, no video stream, or no frames
    "corrupt_video",     # a video FFmpeg cannot open or decode
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


def parse_spec(spec: str, kinds: tuple[str, ...] | None = None, what: str = "Data source",
               example: str = "wds:/data/shards/{00000..00099}.tar"
               ) -> tuple[str, str, dict[str, str]]:
    """`"kind:location?k=v"` -> (kind, location, options), kind one of `kinds` (default:
    the image-text sources' KINDS)."""
    kinds = KINDS if kinds is None else kinds
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{what} {spec!r} has no kind: write KIND:LOCATION with KIND one of "
                         f"{', '.join(kinds)}, e.g. '{example}'.")
    kind, rest = spec.split(":", 1)
    if kind not in kinds:
        raise ValueError(f"Unknown {what.lower()} kind {kind!r} in {spec!r}: use one of "
                         f"{', '.join(kinds)}.")
    location, options = rest, {}
    head, sep, tail = rest.rpartition("?")
    if sep and _OPTIONS_RE.fullmatch(tail):
        location = head
        options = dict(urllib.parse.parse_qsl(tail, keep_blank_values=True, strict_parsing=False))
    if not location:
        raise ValueError(f"{what} {spec!r} names no location after '{kind}:'.")
    return kind, location, options


def format_spec(kind: str, location: str, options: dict[str, str]) -> str:
    """The spec string of (kind, location, options): parse_spec's inverse."""
    if not options:
        return f"{kind}:{location}"
    quoted = "&".join(f"{k}={urllib.parse.quote(str(v), safe=' /:,.-_~()[]{}*@!$')}"
                      for k, v in options.items())
    return f"{kind}:{location}?{quoted}"


def source_class(kind: str) -> "type[Source]":
    """The Source subclass that reads `kind` (one of KINDS)."""
    if kind == "tfds":
        from clipjax.data.tfds_source import TfdsSource
        return TfdsSource
    if kind == "arrayrecord":
        from clipjax.data.arrayrecord import ArrayRecordSource
        return ArrayRecordSource
    if kind == "wds":
        from clipjax.data.wds_source import WebDatasetSource
        return WebDatasetSource
    if kind in VIDEO_KINDS:
        from clipjax.data import video_sources
        return video_sources.KINDS[kind]
    from clipjax.data import file_sources
    return file_sources.KINDS[kind]


def open_source(spec: "str | Source") -> "Source":
    """The source a spec names, checked: missing files and bad options raise here."""
    if isinstance(spec, Source):
        return spec
    kind, location, options = parse_spec(spec)
    return source_class(kind)(spec, location, options)


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


def list_images(root: str) -> list[str]:
    """Every image file under `root` (any depth, by IMAGE_EXTENSIONS, hidden files and
    folders left out), sorted, as paths or URLs like `root`."""
    def wanted(path: str) -> bool:
        base = posixpath.basename(path)
        return (not base.startswith(".") and "." in base
                and base.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)

    if _is_local(root):
        root = _local(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"Folder {root!r} does not exist.")
        out = []
        for directory, folders, files in os.walk(root, followlinks=True):
            folders[:] = [d for d in folders if not d.startswith(".")]
            out += [os.path.join(directory, f) for f in files if wanted(f)]
        return sorted(out)
    fs, path = _fs(root)
    if not fs.isdir(path):
        raise FileNotFoundError(f"Folder {root!r} does not exist.")
    protocol = root.split("://", 1)[0]
    return sorted(f"{protocol}://{p}" for p in fs.find(path)
                  if wanted(p) and "/." not in p[len(path):])


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


# csv, folder and imagefolder live in file_sources.py; wds_source.py, tfds_source.py and
# arrayrecord.py hold the others; video_sources.py the video datasets (read through
# clipjax.data.video, not make_iterator).
VIDEO_KINDS = ("msrvtt", "msvd", "k400", "ucf101", "hmdb51", "videolist", "rawframes")
KINDS = ("wds", "csv", "folder", "imagefolder", "tfds", "arrayrecord", *VIDEO_KINDS)
