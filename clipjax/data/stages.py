"""The pipeline's grain stages: a host's share of a source, shard streams, window shuffles,
per-sample preparation and batching. pipeline.make_iterator puts them together.

Every stage is deterministic for (seed, source, epoch, record) and keeps a JSON state
for exact resume: record positions for random-access sources; for shard streams which
shards are open and how far each has been read; for window shuffles where the window
started and how much of it was handed out.
"""

import functools
import sys
from typing import Any

import grain
import numpy as np
from grain.experimental import index_shuffle
from PIL import Image

from clipjax.data import sources as sources_lib
from clipjax.data import transforms
from clipjax.data.sources import BadSample, Source
from clipjax.tokenizer import default_tokenizer

MAX_SKIPS_PER_BATCH = 256  # a worker reports skips at least this often, even with no rows


def uint32_seed(*words: int) -> int:
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


class HostRecords(grain.MapDataset):
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
        return f"HostRecords({self._source.spec!r}, host {self._host} of {self._hosts})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(self._host + index * self._hosts, self._n)
        seed = uint32_seed(self._seed, self._source_id, epoch)
        record_index = _permuted(position, self._n, seed, self._train)
        record = self._source.read(record_index)
        record["rng"] = [self._seed, self._source_id, epoch, record_index]
        record["index"] = record_index
        return record


class ShardStream(grain.IterDataset):
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
        seed = uint32_seed(self.seed, self.source_id, epoch)
        return epoch, _permuted(position, n, seed, self.train)

    def __iter__(self):
        return _ShardStreamIterator(self)

    def __str__(self) -> str:
        return f"ShardStream({self.source.spec!r}, host {self.host} of {self.hosts})"


class _ShardStreamIterator(grain.DatasetIterator):
    """Round-robin over `open_shards` open tars; state: which shards, how far into each."""

    def __init__(self, ds: ShardStream):
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


class WindowShuffle(grain.IterDataset):
    """Consecutive windows of `size` samples, each emitted in its own random order."""

    def __init__(self, parent: grain.IterDataset, size: int, seed: int):
        super().__init__(parent)
        self.size, self.seed = size, seed

    def __iter__(self):
        return _WindowShuffleIterator(self._parent.__iter__(), self.size, self.seed)

    def __str__(self) -> str:
        return f"WindowShuffle({self.size})"


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


class Prepare:
    """Raw record -> {"image", "text"?, "label"?, "index"?} or {"skip": (reason, detail), "key"}.

    The image stays uint8 here; the batcher normalises it straight into the batch array.
    `index` keeps the record's index in its source (random-access sources only).
    """

    def __init__(self, *, image_size: int, train: bool, context_length: int, has_text: bool,
                 has_label: bool, max_pixels: int, index: bool = False, prompts: int = 0):
        self.image_size, self.train, self.context_length = image_size, train, context_length
        self.has_text, self.has_label, self.max_pixels = has_text, has_label, max_pixels
        self.index = index
        self.prompts = prompts  # > 0: GroupViT's prompts from the caption's nouns [P, L]

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
                caption = sources_lib.caption_text(text)
                out["text"] = default_tokenizer()(caption, self.context_length)[0]
                if self.prompts:
                    from clipjax.evals import prompts as templates
                    from clipjax.heads import nouns

                    prng = rng if rng is not None else np.random.default_rng(record.get("index", 0))
                    out["prompts"] = default_tokenizer()(
                        nouns.multi_label_prompts(caption, self.prompts, prng,
                                                  templates.openai_imagenet_templates()),
                        self.context_length)
            if self.has_label:
                out["label"] = np.int32(record["label"])
            if self.index:
                out["index"] = np.int64(record["index"])
            image = sources_lib.open_image(record["image"], self.max_pixels)
            out["image"] = self._transform(image, rng)
        except BadSample as e:
            return {"skip": (e.reason, e.detail), "key": record["key"]}
        return out

    def _transform(self, image: Image.Image, rng) -> np.ndarray:
        size = self.image_size
        if not self.train:
            sources_lib.load_pixels(image)
            try:  # normalize_uint8 of these is eval_transform's result, bit for bit
                return transforms.eval_pixels(image, size)
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


class Batch(grain.IterDataset):
    """Up to `batch_size` good samples per batch, with the skipped ones' (reason, key, detail).

    The pixels ("image", or "video" when `empty` has no "image") go straight into the batch.
    """

    def __init__(self, parent: grain.IterDataset, batch_size: int, empty: dict[str, np.ndarray],
                 shared_memory: bool):
        super().__init__(parent)
        self.batch_size, self.empty, self.shared_memory = batch_size, empty, shared_memory

    def __iter__(self):
        return _BatchIterator(self._parent.__iter__(), self.batch_size, self.empty,
                              self.shared_memory)

    def __str__(self) -> str:
        return f"Batch({self.batch_size})"


class _BatchIterator(grain.DatasetIterator):

    def __init__(self, parent, batch_size: int, empty: dict[str, np.ndarray],
                 shared_memory: bool):
        super().__init__(parent)
        self._batch_size, self._empty, self._shared_memory = batch_size, empty, shared_memory

    def __next__(self):
        rows, skips = [], []
        while len(rows) < self._batch_size and len(skips) < MAX_SKIPS_PER_BATCH:
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
        pixels = "image" if "image" in self._empty else "video"  # video: uint8 [b, T, H, W, 3]
        batch = {k: np.stack([r[k] for r in rows]) if rows else v for k, v in self._empty.items()
                 if k != pixels}
        # Written straight into the batch, which in a worker process is already the shared
        # memory the main process reads: no per-image float arrays, no extra copies.
        shape, dtype = (len(rows), *self._empty[pixels].shape[1:]), self._empty[pixels].dtype
        new = grain.multiprocessing.SharedMemoryArray if self._shared_memory and rows else np.empty
        pixels_B = new(shape, dtype)  # [b, H, W, 3] or [b, T, H, W, 3]
        for b, row in enumerate(rows):
            if dtype == np.uint8:
                pixels_B[b] = row[pixels]
            else:
                transforms.normalize_uint8(row[pixels], out=pixels_B[b])
        batch[pixels] = pixels_B
        batch["_skipped"] = skips
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)
