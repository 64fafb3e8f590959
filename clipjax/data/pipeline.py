"""The input pipeline: sources -> host share -> shuffle -> decode/augment -> tokens -> batches.

    it = make_iterator("wds:/data/laion/{00000..01023}.tar", global_batch_size=32768,
                       image_size=224, train=True, seed=0)
    batch = next(it)   # {"image": float32 [b, 224, 224, 3], "text": int32 [b, 77]}
    state = it.get_state()          # JSON-serialisable; saved with each checkpoint
    it.set_state(state)             # the next batch is the one that would have come next
    it.stats()                      # {"skipped/corrupt_image": 3, ...} for the metrics

b is the host-local batch, global_batch_size // process_count. Classification sources give
"label" int32 [b] (and "text" only with a caption template). Sources are spec strings
(see clipjax.data.sources) or Source objects; several (a list, or specs joined by ";")
are mixed by weight. stats() holds only reasons that occurred.

How the data is cut, so that every run is a pure function of (sources, seed, hosts,
workers, batch size):

- Random-access sources (csv, folder, imagefolder, tfds, arrayrecord) are one permutation
  per epoch over all records, drawn from (seed, source, epoch). Host h of P reads
  positions h, h + P, h + 2P, ... of the concatenated epochs, so each epoch is read exactly
  once across hosts and every host moves through the epochs in step.
- WebDataset tars are permuted per epoch the same way, shard by shard; host h reads
  shards h, h + P, ...; each worker keeps `open_shards` tars open, takes their samples in
  turn, and shuffles them within windows of `shuffle_window` samples.
- Each sample's augmentation (crop, caption choice) draws from a generator seeded by the
  sample's identity (seed, source, epoch, record), never by its position in a worker.
- Decoding, augmentation, tokenisation and batching run in `num_workers` grain worker
  processes (0: in this process). Bad samples are skipped inside the workers; their
  reasons and keys travel with the batches, so the counts are exact and logged here.

Resuming needs the same sources, seed, batch size, hosts and workers; `set_state` says
which of them differs. State is taken at batch boundaries: a run killed at any point and
restored from its last saved state reads exactly the batches it would have read.
"""

import atexit
import collections
import functools
import gc
import json
import logging
import os
import sys
import weakref
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from grain.experimental import index_shuffle
from PIL import Image

from clipjax.data import sources as sources_lib
from clipjax.data import transforms
from clipjax.data.sources import BadSample, Source
from clipjax.tokenizer import CONTEXT_LENGTH, default_tokenizer

log = logging.getLogger("clipjax.data")

STATE_FORMAT = "clipjax-data-1"
_MAX_SKIPS_PER_BATCH = 256  # a worker reports skips at least this often, even with no rows
_LOGGED_PER_REASON = 100    # skipped keys logged at WARNING per reason, the rest at DEBUG


def _uint32_seed(*words: int) -> int:
    return int(np.random.SeedSequence(list(words)).generate_state(1)[0])


_TABLE_LIMIT = 1 << 16  # permutations up to this length are tabulated


@functools.lru_cache(maxsize=8)
def _permutation_table(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(length)


def _permuted(index: int, length: int, seed: int, shuffle: bool) -> int:
    """Position `index` of a permutation of range(length) drawn from `seed`."""
    if not shuffle or length == 1:
        return index
    if length <= _TABLE_LIMIT:
        # index_shuffle walks cycles over a larger domain and takes milliseconds for short
        # ranges (24 ms for 2 shards); a table of a short permutation is cheap.
        return int(_permutation_table(length, seed)[index])
    return index_shuffle(index, max_index=length - 1, seed=seed, rounds=4)


class _HostRecords(grain.MapDataset):
    """Host `process_index`'s records of a random-access source, epoch after epoch."""

    def __init__(self, source: Source, *, source_id: int, seed: int, train: bool,
                 process_index: int, process_count: int):
        super().__init__()
        self._source, self._source_id, self._seed, self._train = source, source_id, seed, train
        self._host, self._hosts = process_index, process_count
        self._n = len(source)

    def __len__(self) -> int:
        if self._train:
            return sys.maxsize
        return len(range(self._host, self._n, self._hosts))

    def __str__(self) -> str:
        return f"_HostRecords({self._source.spec!r}, host {self._host} of {self._hosts})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(self._host + index * self._hosts, self._n)
        seed = _uint32_seed(self._seed, self._source_id, epoch)
        record_index = _permuted(position, self._n, seed, self._train)
        record = self._source.read(record_index)
        record["rng"] = [self._seed, self._source_id, epoch, record_index]
        return record


class _ShardStream(grain.IterDataset):
    """Host `process_index`'s samples of a WebDataset source, shard after shard."""

    def __init__(self, source: Source, *, source_id: int, seed: int, train: bool,
                 process_index: int, process_count: int, open_shards: int):
        super().__init__()
        self.source, self.source_id, self.seed, self.train = source, source_id, seed, train
        self.host, self.hosts, self.open_shards = process_index, process_count, open_shards
        self.start, self.step = 0, 1  # this worker's slice of the host's shard sequence

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Keep every sl.step-th shard from sl.start on (grain calls this once per worker)."""
        del sequential_slice
        start, step = sl.start or 0, sl.step or 1
        self.start, self.step = self.start + start * self.step, self.step * step

    def shard_count(self) -> int | None:
        """How many shards this worker reads; None when training (it never stops)."""
        if self.train:
            return None
        host_shards = len(range(self.host, len(self.source.shards), self.hosts))
        return len(range(self.start, host_shards, self.step))

    def shard(self, k: int) -> tuple[int, int]:
        """(epoch, shard index) of this worker's k-th shard."""
        n = len(self.source.shards)
        epoch, position = divmod(self.host + (self.start + k * self.step) * self.hosts, n)
        seed = _uint32_seed(self.seed, self.source_id, epoch)
        return epoch, _permuted(position, n, seed, self.train)

    def __iter__(self):
        return _ShardStreamIterator(self)

    def __str__(self) -> str:
        return f"_ShardStream({self.source.spec!r}, host {self.host} of {self.hosts})"


class _ShardStreamIterator(grain.DatasetIterator):
    """Round-robin over `open_shards` open tars; state: which shards, how far into each."""

    def __init__(self, ds: _ShardStream):
        super().__init__()
        self._ds = ds
        self._next_shard = 0
        self._open: list[list[int]] = []  # [k, samples already taken] per slot
        self._readers: list[Any] = []
        self._turn = 0

    def _reader(self, k: int, skip: int):
        epoch, shard = self._ds.shard(k)
        reader = self._ds.source.read_shard(self._ds.source.shards[shard])
        for _ in range(skip):
            next(reader, None)
        return epoch, shard, reader

    def __next__(self):
        total = self._ds.shard_count()
        while True:
            more = total is None or self._next_shard < total
            while len(self._open) < self._ds.open_shards and more:
                self._open.append([self._next_shard, 0])
                self._readers.append(None)
                self._next_shard += 1
                more = total is None or self._next_shard < total
            if not self._open:
                raise StopIteration
            t = self._turn % len(self._open)
            k, taken = self._open[t]
            if self._readers[t] is None:
                self._readers[t] = self._reader(k, taken)
            epoch, shard, reader = self._readers[t]
            record = next(reader, None)
            if record is None:  # shard done: the next one takes its slot
                if total is None or self._next_shard < total:
                    self._open[t] = [self._next_shard, 0]
                    self._readers[t] = None
                    self._next_shard += 1
                else:
                    del self._open[t], self._readers[t]
                continue
            self._open[t][1] += 1
            self._turn = t + 1
            record["rng"] = [self._ds.seed, self._ds.source_id, epoch, shard, taken]
            return record

    def get_state(self):
        return {"next_shard": self._next_shard, "open": [list(s) for s in self._open],
                "turn": self._turn % max(len(self._open), 1)}

    def set_state(self, state):
        self._next_shard, self._turn = state["next_shard"], state["turn"]
        self._open = [list(s) for s in state["open"]]
        self._readers = [None] * len(self._open)


class _WindowShuffle(grain.IterDataset):
    """Consecutive windows of `size` samples, each emitted in its own random order."""

    def __init__(self, parent: grain.IterDataset, size: int, seed: int):
        super().__init__(parent)
        self.size, self.seed = size, seed

    def __iter__(self):
        return _WindowShuffleIterator(self._parent.__iter__(), self.size, self.seed)

    def __str__(self) -> str:
        return f"_WindowShuffle({self.size})"


class _WindowShuffleIterator(grain.DatasetIterator):
    """State: the parent's state where the window starts, its number, how much was taken."""

    def __init__(self, parent, size: int, seed: int):
        super().__init__(parent)
        self._size, self._seed = size, seed
        self._window: list | None = None  # None: not read yet (start, or after set_state)
        self._index, self._taken, self._start = 0, 0, None

    def _fill(self) -> None:
        self._start = self._parent.get_state()
        items = []
        for item in self._parent:
            items.append(item)
            if len(items) == self._size:
                break
        order = np.random.default_rng([self._seed, self._index]).permutation(len(items))
        self._window = [items[i] for i in order]

    def __next__(self):
        if self._window is None:
            self._fill()
        elif self._taken == len(self._window):
            self._index, self._taken = self._index + 1, 0
            self._fill()
        if self._taken == len(self._window):
            raise StopIteration
        item, self._window[self._taken] = self._window[self._taken], None
        self._taken += 1
        return item

    def get_state(self):
        if self._window is None:
            start = self._start if self._start is not None else self._parent.get_state()
            return {"start": start, "window": self._index, "taken": self._taken}
        if self._taken == len(self._window):  # the next window starts where the parent is
            return {"start": self._parent.get_state(), "window": self._index + 1, "taken": 0}
        return {"start": self._start, "window": self._index, "taken": self._taken}

    def set_state(self, state):
        self._parent.set_state(state["start"])
        self._start, self._index, self._taken = state["start"], state["window"], state["taken"]
        self._window = None


class _Prepare:
    """Raw record -> {"image", "text"?, "label"?} or {"skip": (reason, detail), "key"}.

    The image stays uint8 here; the batcher normalises it straight into the batch array.
    """

    def __init__(self, *, image_size: int, train: bool, context_length: int, has_text: bool,
                 has_label: bool, max_pixels: int):
        self.image_size, self.train, self.context_length = image_size, train, context_length
        self.has_text, self.has_label, self.max_pixels = has_text, has_label, max_pixels

    def __call__(self, record: dict) -> dict:
        if record.get("skip"):
            return {"skip": tuple(record["skip"]), "key": record["key"]}
        rng = np.random.default_rng(record["rng"]) if self.train else None
        try:
            out = {}
            if self.has_text:
                text = record["text"]
                if isinstance(text, (list, tuple)):  # several captions: one per visit
                    if not text:
                        raise BadSample("missing_caption", "no captions")
                    text = text[int(rng.integers(len(text)))] if rng is not None else text[0]
                out["text"] = default_tokenizer()(sources_lib.caption_text(text),
                                                  self.context_length)[0]
            if self.has_label:
                out["label"] = np.int32(record["label"])
            image = sources_lib.open_image(record["image"], self.max_pixels)
            out["image"] = self._transform(image, rng)
        except BadSample as e:
            return {"skip": (e.reason, e.detail), "key": record["key"]}
        return out

    def _transform(self, image: Image.Image, rng) -> np.ndarray:
        size = self.image_size
        if not self.train:
            sources_lib.load_pixels(image)
            try:  # eval_transform's steps; normalize_uint8 then gives the same bits
                image = transforms.center_crop(transforms.resize_shortest_side(image, size), size)
                return transforms.rgb_array(image)
            except Exception as e:  # odd modes and broken palettes must not stop a run
                raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None
        box = transforms.random_resized_crop_box(*image.size, rng)
        left, top, crop_w, crop_h = box
        try:
            if image.format == "JPEG" and min(crop_w, crop_h) >= 2 * size:
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while the crop stays at least
                # `size` pixels: the same crop for a fraction of the decoding work.
                width, height = image.size
                image.draft("RGB", (-(-width * size // crop_w), -(-height * size // crop_h)))
                sources_lib.load_pixels(image)
                sx, sy = image.size[0] / width, image.size[1] / height
                image = image.resize((size, size), Image.Resampling.BICUBIC,
                                     box=(left * sx, top * sy, (left + crop_w) * sx,
                                          (top + crop_h) * sy))
            else:
                sources_lib.load_pixels(image)
                image = transforms.resized_crop(image, box, size)
            return transforms.rgb_array(image)
        except BadSample:
            raise
        except Exception as e:
            raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None


class _Batch(grain.IterDataset):
    """Up to `batch_size` good samples per batch, with the skipped ones' (reason, key, detail)."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, empty: dict[str, np.ndarray],
                 shared_memory: bool):
        super().__init__(parent)
        self.batch_size, self.empty, self.shared_memory = batch_size, empty, shared_memory

    def __iter__(self):
        return _BatchIterator(self._parent.__iter__(), self.batch_size, self.empty,
                              self.shared_memory)

    def __str__(self) -> str:
        return f"_Batch({self.batch_size})"


class _BatchIterator(grain.DatasetIterator):

    def __init__(self, parent, batch_size: int, empty: dict[str, np.ndarray],
                 shared_memory: bool):
        super().__init__(parent)
        self._batch_size, self._empty, self._shared_memory = batch_size, empty, shared_memory

    def __next__(self):
        rows, skips = [], []
        while len(rows) < self._batch_size and len(skips) < _MAX_SKIPS_PER_BATCH:
            try:
                element = next(self._parent)
            except StopIteration:
                break
            if "skip" in element:
                reason, detail = element["skip"]
                skips.append((reason, element["key"], detail))
            else:
                rows.append(element)
        if not rows and not skips:
            raise StopIteration
        batch = {k: np.stack([r[k] for r in rows]) if rows else v for k, v in self._empty.items()
                 if k != "image"}
        # Written straight into the batch, which in a worker process is already the shared
        # memory the main process reads: no per-image float arrays, no extra copies.
        shape, dtype = (len(rows), *self._empty["image"].shape[1:]), self._empty["image"].dtype
        new = grain.multiprocessing.SharedMemoryArray if self._shared_memory and rows else np.empty
        image_BHWC = new(shape, dtype)
        for b, row in enumerate(rows):
            if dtype == np.uint8:
                image_BHWC[b] = row["image"]
            else:
                transforms.normalize_uint8(row["image"], out=image_BHWC[b])
        batch["image"] = image_BHWC
        batch["_skipped"] = skips
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def _rows(batch: dict) -> int:
    return len(batch["image"])


# Iterators still open at exit are closed while the interpreter is whole: grain's own
# cleanup, left to garbage collection at shutdown, fails noisily and leaks shared memory.
_OPEN_ITERATORS: "weakref.WeakSet[DataIterator]" = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
    for it in list(_OPEN_ITERATORS):
        it.close()
        it._it = None  # and let grain's objects go now, while their modules still exist
    gc.collect()


class DataIterator:
    """Host-local batches of numpy arrays, with a JSON state and skip counts.

    Worker batches hold up to b good samples; this re-cuts them into batches of exactly b
    (the last of a finite pass may be smaller). The saved state is the grain state before
    the first batch not yet fully handed out, plus how many of its rows were.
    """

    def __init__(self, dataset: grain.IterDataset, *, batch_size: int, config: dict,
                 class_names: list[str] | None, max_consecutive_skips: int):
        self._dataset, self.batch_size, self.config = dataset, batch_size, config
        self.class_names = class_names
        self._max_consecutive_skips = max_consecutive_skips
        self._it = None
        self._pending: list[list] = []  # [grain state before it, batch, rows handed out]
        self._exhausted = False
        self._skipped: collections.Counter = collections.Counter()
        self._consecutive_skips = 0
        self._resume_rows = 0
        self.batches = 0

    def _grain(self):
        if self._it is None:
            self._it = iter(self._dataset)
            _OPEN_ITERATORS.add(self)
        return self._it

    def __iter__(self):
        return self

    def _fetch(self) -> None:
        state_before = self._grain().get_state()
        try:
            batch = next(self._grain())
        except StopIteration:
            self._exhausted = True
            return
        skips = batch.pop("_skipped")
        resume_rows, self._resume_rows = self._resume_rows, 0
        if not resume_rows:  # a partly handed-out batch had its skips counted before the save
            self._count_skips(skips)
        n = _rows(batch)
        if n:
            self._consecutive_skips = 0
            self._pending.append([state_before, batch, resume_rows])
        elif self._consecutive_skips >= self._max_consecutive_skips:
            reasons = ", ".join(f"{r} {c}" for r, c in self._skipped.most_common())
            raise RuntimeError(f"The last {self._consecutive_skips} samples were all skipped "
                               f"({reasons}): the data is unusable; check "
                               f"{self.config['sources']}.")

    def _count_skips(self, skips) -> None:
        for reason, key, detail in skips:
            self._skipped[reason] += 1
            self._consecutive_skips += 1
            count = self._skipped[reason]
            level = logging.WARNING if count <= _LOGGED_PER_REASON else logging.DEBUG
            log.log(level, "Skipped sample %s: %s (%s)", key, reason, detail)
            if count == _LOGGED_PER_REASON:
                log.warning("Further %s skips are logged at DEBUG level.", reason)

    def __next__(self) -> dict[str, np.ndarray]:
        b = self.batch_size
        while sum(_rows(p[1]) - p[2] for p in self._pending) < b and not self._exhausted:
            self._fetch()
        if not self._pending:
            raise StopIteration
        first = self._pending[0]
        if first[2] == 0 and _rows(first[1]) == b:  # the usual case: a whole worker batch
            self._pending.pop(0)
            self.batches += 1
            return {k: np.asarray(v) for k, v in first[1].items()}
        parts, need = [], b
        while need and self._pending:
            entry = self._pending[0]
            _, batch, done = entry
            take = min(_rows(batch) - done, need)
            parts.append({k: v[done:done + take] for k, v in batch.items()})
            entry[2] += take
            need -= take
            if entry[2] == _rows(batch):
                self._pending.pop(0)
        self.batches += 1
        return {k: np.asarray(np.concatenate([p[k] for p in parts])) for k in parts[0]}

    def get_state(self) -> dict:
        """A JSON-serialisable dict; `set_state` resumes from it."""
        if self._pending:
            grain_state, rows = self._pending[0][0], self._pending[0][2]
        else:
            grain_state, rows = self._grain().get_state(), self._resume_rows
        state = {"format": STATE_FORMAT, "config": self.config, "grain": grain_state,
                 "rows_done": rows, "skipped": dict(self._skipped), "batches": self.batches}
        return json.loads(json.dumps(state))  # a copy, and proof that it serialises

    def set_state(self, state: dict) -> None:
        """Continue exactly where the run that saved `state` was."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"Not a clipjax data-iterator state (format {STATE_FORMAT!r}): "
                             "pass what DataIterator.get_state() returned.")
        saved = state["config"]
        differ = [k for k in sorted(set(saved) | set(self.config))
                  if saved.get(k) != self.config.get(k)]
        if differ:
            k = differ[0]
            raise ValueError(f"The saved data state was written with {k}={saved.get(k)!r}, this "
                             f"iterator has {k}={self.config.get(k)!r}: resume with the same data "
                             f"settings (they differ in {', '.join(differ)}).")
        self._grain().set_state(state["grain"])
        self._pending, self._exhausted = [], False
        self._resume_rows = state["rows_done"]
        self._skipped = collections.Counter(state["skipped"])
        self._consecutive_skips = 0
        self.batches = state["batches"]

    def stats(self) -> dict[str, int]:
        """Samples skipped so far (this run and the runs it resumed), by reason; {} if none."""
        return {f"skipped/{r}": self._skipped[r] for r in sources_lib.SKIP_REASONS
                if self._skipped.get(r)}

    def summary(self) -> str:
        """One line for the end of a run."""
        total = sum(self._skipped.values())
        if not total:
            return "No samples were skipped."
        reasons = ", ".join(f"{r} {c}" for r, c in self._skipped.most_common())
        return f"Skipped {total} samples: {reasons}."

    def close(self) -> None:
        """Stop the worker processes."""
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        _OPEN_ITERATORS.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside an absl app, take their defaults."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def default_num_workers() -> int:
    return max(1, min(32, (os.cpu_count() or 2) - 1))


def make_iterator(data: "str | Source | Sequence[str | Source]", *, global_batch_size: int,
                  image_size: int, train: bool, seed: int = 0,
                  context_length: int = CONTEXT_LENGTH, process_index: int | None = None,
                  process_count: int | None = None, num_workers: int | None = None,
                  weights: Sequence[float] | None = None, shuffle_window: int = 2000,
                  open_shards: int = 4, read_threads: int = 4,
                  max_consecutive_skips: int = 10_000,
                  image_dtype: str = "float32") -> DataIterator:
    """The host-local batch iterator over one source or a weighted mixture.

    `data` is a spec, a Source, or several: a list, or specs joined by ";" in one string
    (for configs), e.g. "wds:/a/{000..099}.tar?weight=3; csv:/b/train.csv".
    train=True repeats forever with a fresh shuffle per epoch; train=False reads each
    record once, in order, and ends (one source only). `weights` default to each spec's
    `weight=` option. `num_workers` defaults to the CPU count less one, at most 32.
    image_dtype="uint8" gives the pixels before normalisation (a quarter of the bytes to
    move; the train step normalises uint8 on the device); normalize() of them is exactly
    the float32 batch.
    """
    if image_dtype not in ("float32", "uint8"):
        raise ValueError(f"image_dtype must be 'float32' or 'uint8', got {image_dtype!r}.")
    if isinstance(data, str):
        specs = [s.strip() for s in data.split(";") if s.strip()]
    else:
        specs = [data] if isinstance(data, Source) else list(data)
    if not specs:
        raise ValueError("No data sources given: pass a spec such as 'wds:/data/{000..099}.tar'.")
    srcs = [sources_lib.open_source(s) for s in specs]
    for s in srcs:
        if s.random_access and len(s) == 0:
            raise ValueError(f"{s.spec!r} holds no records.")
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    if global_batch_size < process_count or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} does not divide over "
                         f"{process_count} hosts: use a multiple of {process_count}.")
    batch_size = global_batch_size // process_count
    if not train and len(srcs) > 1:
        raise ValueError("An evaluation pass reads one source; evaluate the sources one by one.")
    weights = [s.weight for s in srcs] if weights is None else list(weights)
    if len(weights) != len(srcs) or not all(w > 0 for w in weights):
        raise ValueError(f"Give one positive weight per source ({len(srcs)}), got {weights}.")
    has_text, has_label = srcs[0].has_text, srcs[0].has_label
    for s in srcs[1:]:
        if (s.has_text, s.has_label) != (has_text, has_label):
            raise ValueError(f"Sources {srcs[0].spec!r} and {s.spec!r} give different fields "
                             "(captions vs labels); mix like with like, or give the class folder "
                             "a caption template (template=a photo of a {}.).")
    num_workers = default_num_workers() if num_workers is None else num_workers

    per_source = []
    for i, s in enumerate(srcs):
        host = dict(source_id=i, seed=seed, train=train, process_index=process_index,
                    process_count=process_count)
        if s.random_access:
            ds = _HostRecords(s, **host).to_iter_dataset(
                grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * read_threads))
        else:
            if len(s.shards) < process_count * max(num_workers, 1):
                log.warning("%s has %d shards for %d hosts x %d workers: some read the same "
                            "shard at once (in different epochs); use more shards or convert "
                            "to ArrayRecord.", s.spec, len(s.shards), process_count, num_workers)
            ds = _ShardStream(s, open_shards=open_shards, **host)
            if train and shuffle_window > 1:
                ds = _WindowShuffle(ds, shuffle_window, seed=_uint32_seed(seed, i, 1 << 20))
        per_source.append(ds.map(_Prepare(image_size=image_size, train=train,
                                          context_length=context_length, has_text=has_text,
                                          has_label=has_label, max_pixels=s.max_pixels)))
    ds = per_source[0] if len(per_source) == 1 else grain.IterDataset.mix(per_source, weights)
    empty = {"image": np.zeros((0, image_size, image_size, 3), np.dtype(image_dtype))}
    if has_text:
        empty["text"] = np.zeros((0, context_length), np.int32)
    if has_label:
        empty["label"] = np.zeros((0,), np.int32)
    ds = _Batch(ds, batch_size, empty, shared_memory=num_workers > 0)
    if num_workers > 0:
        _absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=2))
    config = {"sources": [s.spec for s in srcs], "weights": weights, "seed": seed,
              "train": train, "global_batch_size": global_batch_size,
              "process_index": process_index, "process_count": process_count,
              "num_workers": num_workers, "image_size": image_size,
              "context_length": context_length, "shuffle_window": shuffle_window,
              "open_shards": open_shards, "image_dtype": image_dtype}
    class_names = srcs[0].class_names if len(srcs) == 1 else None
    return DataIterator(ds, batch_size=batch_size, config=json.loads(json.dumps(config)),
                        class_names=class_names, max_consecutive_skips=max_consecutive_skips)


def classification_eval(data: "str | Source", *, global_batch_size: int, image_size: int,
                        process_index: int | None = None, process_count: int | None = None,
                        num_workers: int = 0) -> tuple[list[str], DataIterator]:
    """(class names, one finite pass of {"image", "label"} batches) for zero-shot evaluation.

    For `imagefolder:` and TFDS classification sources; each host reads its 1/P share.
    """
    source = sources_lib.open_source(data)
    if not source.has_label or not source.class_names:
        raise ValueError(f"{source.spec!r} has no class labels: use an imagefolder: source or a "
                         "TFDS dataset with a ClassLabel feature.")
    it = make_iterator(source, global_batch_size=global_batch_size, image_size=image_size,
                       train=False, process_index=process_index, process_count=process_count,
                       num_workers=num_workers)
    return list(source.class_names), it
