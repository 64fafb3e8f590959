"""ArrayRecord, clipjax's converted format: `clipjax data convert` writes it, `arrayrecord:`
sources read it.

ArrayRecord gives every sample an index, so a converted dataset gets what tar streams
cannot: one global shuffle per epoch and resume at any sample, at any scale. Images are
copied as encoded (no re-compression); captions are checked once here, so the training
run does not meet them again. Each WebDataset tar becomes one shard of the same name;
other sources are cut into shards of `shard_size` records. Shards are written under a
temporary name and renamed when complete, and `clipjax_dataset.json` (records per shard,
fields, class names, what was skipped) is written last: a folder without it is an
unfinished conversion.

A record is a uint32 header length, a JSON header {"key", "text", "label"} and the
encoded image bytes exactly as the source held them.
"""

import collections
import glob
import io
import json
import logging
import multiprocessing
import os
import posixpath
import struct
import threading

import numpy as np

from clipjax.data import sources as sources_lib
from clipjax.data.sources import BadSample, Record, Source, skipped

log = logging.getLogger("clipjax.data")
_OPEN_LOCK = threading.Lock()  # readers open lazily, in whichever thread reads first

FORMAT = "clipjax-arrayrecord-1"
META_FILE = "clipjax_dataset.json"
# group_size:1 makes every record its own chunk: one read per random access.
WRITER_OPTIONS = "group_size:1"
_EXAMPLES_PER_REASON = 20  # skipped keys reported back per shard and reason


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
        if "://" in location and not location.startswith("file://"):
            raise ValueError(f"{spec!r}: ArrayRecord files are read through the local file "
                             "system; copy them to local disk or mount the bucket (gcsfuse).")
        location = location.removeprefix("file://")
        if os.path.isdir(location):
            folder = location
            self.files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                                if f.endswith(".array_record"))
        else:
            folder = os.path.dirname(location)
            self.files = sorted(glob.glob(location))
        if not self.files:
            raise FileNotFoundError(f"No .array_record files match {location!r}.")
        meta_path = os.path.join(folder, META_FILE)
        if not os.path.isfile(meta_path):
            raise ValueError(f"{folder!r} has no {META_FILE}: it was not written by "
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
# Conversion.


def _checked(record: dict, has_text: bool, verify: bool, max_pixels: int) -> dict:
    """The record to store, or BadSample. `verify` decodes every pixel, not just the header."""
    if record.get("skip"):
        raise BadSample(*record["skip"])
    text = record["text"]
    if has_text:
        if isinstance(text, (list, tuple, np.ndarray)):
            good = []
            for t in text:
                try:
                    good.append(sources_lib.caption_text(t))
                except BadSample:
                    pass
            if not good:
                raise BadSample("missing_caption", f"none of {len(text)} captions is usable")
            text = good
        else:
            text = sources_lib.caption_text(text)
    image = record["image"]
    if isinstance(image, np.ndarray):
        buf = io.BytesIO()
        sources_lib.open_image(image, max_pixels).save(buf, "PNG")
        image = buf.getvalue()
    opened = sources_lib.open_image(image, max_pixels)
    if verify:
        sources_lib.load_pixels(opened)
    label = record["label"]
    return {"key": record["key"], "image": bytes(image), "text": text if has_text else None,
            "label": None if label is None else int(label)}


def _records(source, unit):
    if unit[0] == "shard":
        yield from source.read_shard(unit[1])
    else:
        for i in range(unit[1], unit[2]):
            yield source.read(i)


def _convert_unit(job) -> tuple[str, int, dict, list]:
    """Write one output shard; (file name, records, skip counts, skipped examples)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    source, unit, name, dst, verify = job
    skips: collections.Counter = collections.Counter()
    examples = []
    path = os.path.join(dst, name)
    writer = ArrayRecordWriter(path + ".tmp", WRITER_OPTIONS)
    written = 0
    try:
        for record in _records(source, unit):
            try:
                r = _checked(record, source.has_text, verify, source.max_pixels)
            except BadSample as e:
                skips[e.reason] += 1
                if skips[e.reason] <= _EXAMPLES_PER_REASON:
                    examples.append((e.reason, record.get("key", "?"), e.detail))
                continue
            writer.write(encode_record(r["key"], r["image"], r["text"], r["label"]))
            written += 1
    finally:
        writer.close()
    if written:
        os.replace(path + ".tmp", path)
    else:
        os.remove(path + ".tmp")
    return name, written, dict(skips), examples


def convert(src: str, dst: str, *, shard_size: int = 10_000, num_workers: int = 1,
            verify: bool = False, progress: bool = True) -> dict:
    """Convert the source `src` (a spec) into ArrayRecord shards in the new folder `dst`."""
    source = sources_lib.open_source(src)
    if os.path.exists(dst) and os.listdir(dst):
        raise ValueError(f"Output folder {dst!r} is not empty; convert into a new folder.")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}.")
    os.makedirs(dst, exist_ok=True)
    if source.random_access:
        n = len(source)
        count = -(-n // shard_size)
        units = [("range", i * shard_size, min(n, (i + 1) * shard_size)) for i in range(count)]
        names = [f"part-{i:05d}-of-{count:05d}.array_record" for i in range(count)]
    else:
        units = [("shard", url) for url in source.shards]
        names = [posixpath.basename(url).rsplit(".", 1)[0] + ".array_record"
                 for url in source.shards]
        if len(set(names)) != len(names):
            names = [f"part-{i:05d}-of-{len(units):05d}.array_record" for i in range(len(units))]
    jobs = [(source, unit, name, dst, verify) for unit, name in zip(units, names)]

    from tqdm import tqdm
    bar = tqdm(total=len(jobs), unit="shard", disable=not progress, desc=f"convert {source.kind}")
    shards, skipped = [], collections.Counter()
    if num_workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(num_workers)
        results = pool.imap(_convert_unit, jobs)
    else:
        pool, results = None, map(_convert_unit, jobs)
    try:
        for name, written, skips, examples in results:
            if written:
                shards.append({"file": name, "records": written})
            skipped.update(skips)
            for reason, key, detail in examples:
                log.warning("Skipped sample %s: %s (%s)", key, reason, detail)
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    if not shards:
        raise ValueError(f"No usable samples in {src!r} (skipped: {dict(skipped)}).")
    meta = {"format": FORMAT, "source": source.spec, "records": sum(s["records"] for s in shards),
            "has_text": source.has_text, "has_label": source.has_label,
            "class_names": source.class_names, "verified": verify, "shards": shards,
            "skipped": dict(skipped)}
    with open(os.path.join(dst, META_FILE + ".tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(dst, META_FILE + ".tmp"), os.path.join(dst, META_FILE))
    return meta
