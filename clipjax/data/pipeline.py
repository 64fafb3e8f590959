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
are mixed by weight. stats() holds only reasons that occurred. train=False is one pass in
order (evaluation); its batches also carry "index" int64 [b], each row's record index.

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
  processes (0: in this process, random-access sources decoded on `read_threads`
  threads). Bad samples are skipped inside the workers; their reasons and keys travel
  with the batches, so the counts are exact and logged here.

The grain stages themselves are in clipjax.data.stages.

Resuming needs the same sources, seed, batch size, hosts and workers; `set_state` says
which of them differs. State is taken at batch boundaries: a run killed at any point and
restored from its last saved state reads exactly the batches it would have read.
"""

import atexit
import collections
import gc
import json
import logging
import os
import weakref
from collections.abc import Callable, Sequence

import grain
import numpy as np

from clipjax.data import sources as sources_lib
from clipjax.data import stages
from clipjax.data.sources import Source
from clipjax.tokenizer import CONTEXT_LENGTH

log = logging.getLogger("clipjax.data")

STATE_FORMAT = "clipjax-data-1"
SkipHandler = Callable[[str, str, str], None]  # (key, reason, detail) of a skipped sample
_LOGGED_PER_REASON = 100    # skipped keys logged at WARNING per reason, the rest at DEBUG


def _rows(batch: dict) -> int:
    return len(batch["image"] if "image" in batch else batch["video"])


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
                 class_names: list[str] | None, max_consecutive_skips: int,
                 on_skip: SkipHandler | None = None):
        self._dataset, self.batch_size, self.config = dataset, batch_size, config
        self.class_names = class_names
        self._max_consecutive_skips = max_consecutive_skips
        self._on_skip = on_skip
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
            if self._on_skip is not None:
                self._on_skip(key, reason, detail)

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


def in_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    """`ds` run in `num_workers` grain worker processes (0: in this process)."""
    if num_workers <= 0:
        return ds
    _absl_flags_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                       per_worker_buffer_size=2))


def host_share(global_batch_size: int, process_index: int | None,
               process_count: int | None) -> tuple[int, int, int]:
    """(process_index, process_count, host batch size), the hosts from JAX unless given."""
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    if global_batch_size < process_count or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} does not divide over "
                         f"{process_count} hosts: use a multiple of {process_count}.")
    return process_index, process_count, global_batch_size // process_count


def default_num_workers() -> int:
    return max(1, min(32, (os.cpu_count() or 2) - 1))


def make_iterator(data: "str | Source | Sequence[str | Source]", *, global_batch_size: int,
                  image_size: int, train: bool, seed: int = 0,
                  context_length: int = CONTEXT_LENGTH, process_index: int | None = None,
                  process_count: int | None = None, num_workers: int | None = None,
                  weights: Sequence[float] | None = None, shuffle_window: int = 2000,
                  open_shards: int = 4, read_threads: int = 4,
                  max_consecutive_skips: int = 10_000,
                  image_dtype: str = "float32",
                  on_skip: SkipHandler | None = None, prompts: int = 0) -> DataIterator:
    """The host-local batch iterator over one source or a weighted mixture.

    `data` is a spec, a Source, or several: a list, or specs joined by ";" in one string
    (for configs), e.g. "wds:/a/{000..099}.tar?weight=3; csv:/b/train.csv".
    train=True repeats forever with a fresh shuffle per epoch; train=False reads each
    record once, in order, and ends (one source only). `weights` default to each spec's
    `weight=` option. `num_workers` defaults to the CPU count less one, at most 32.
    image_dtype="uint8" gives the pixels before normalisation (a quarter of the bytes to
    move; the train step normalises uint8 on the device); normalize() of them is exactly
    the float32 batch. An evaluation pass over a random-access source also gives "index"
    int64 [b], each row's record index in the source. `on_skip(key, reason, detail)` is
    called for every skipped sample, after it is logged and counted. `prompts` > 0 adds
    GroupViT's multi-label prompts, "prompts" int32 [b, prompts, context_length]: nouns of
    the caption (an offline tagger) in random ImageNet templates, the rest the caption.
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
        if getattr(s, "is_video", False):
            raise ValueError(f"{s.spec!r} is a video dataset: read it with "
                             "clipjax.data.video.make_video_iterator.")
        if s.random_access and len(s) == 0:
            raise ValueError(f"{s.spec!r} holds no records.")
    process_index, process_count, batch_size = host_share(global_batch_size, process_index,
                                                          process_count)
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
    with_index = not train and srcs[0].random_access

    per_source = []
    for i, s in enumerate(srcs):
        host = dict(source_id=i, seed=seed, train=train, process_index=process_index,
                    process_count=process_count)
        prepare = stages.Prepare(image_size=image_size, train=train,
                                 context_length=context_length, has_text=has_text,
                                 has_label=has_label, max_pixels=s.max_pixels, index=with_index,
                                 prompts=prompts if has_text else 0)
        if s.random_access:
            # Prepared on the read threads: PIL decodes and resizes without holding the GIL,
            # so an evaluation pass without worker processes still uses several cores.
            ds = stages.HostRecords(s, **host).map(prepare).to_iter_dataset(
                grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * read_threads))
        else:
            if len(s.shards) < process_count * max(num_workers, 1):
                log.warning("%s has %d shards for %d hosts x %d workers: some read the same "
                            "shard at once (in different epochs); use more shards or convert "
                            "to ArrayRecord.", s.spec, len(s.shards), process_count, num_workers)
            ds = stages.ShardStream(s, open_shards=open_shards, **host)
            if train and shuffle_window > 1:
                ds = stages.WindowShuffle(ds, shuffle_window,
                                          seed=stages.uint32_seed(seed, i, 1 << 20))
            ds = ds.map(prepare)
        per_source.append(ds)
    ds = per_source[0] if len(per_source) == 1 else grain.IterDataset.mix(per_source, weights)
    empty = {"image": np.zeros((0, image_size, image_size, 3), np.dtype(image_dtype))}
    if has_text:
        empty["text"] = np.zeros((0, context_length), np.int32)
    if has_label:
        empty["label"] = np.zeros((0,), np.int32)
    if with_index:
        empty["index"] = np.zeros((0,), np.int64)
    if prompts and has_text:
        empty["prompts"] = np.zeros((0, prompts, context_length), np.int32)
    elif prompts:
        raise ValueError(f"prompts={prompts} needs captions, but {srcs[0].spec!r} gives none; use "
                         "an image-caption source (wds:, csv:, folder:).")
    ds = in_workers(stages.Batch(ds, batch_size, empty, shared_memory=num_workers > 0),
                    num_workers)
    config = {"sources": [s.spec for s in srcs], "weights": weights, "seed": seed,
              "train": train, "global_batch_size": global_batch_size,
              "process_index": process_index, "process_count": process_count,
              "num_workers": num_workers, "image_size": image_size,
              "context_length": context_length, "shuffle_window": shuffle_window,
              "open_shards": open_shards, "image_dtype": image_dtype}
    if prompts:  # recorded only when used: older saved states still resume
        config["prompts"] = prompts
    class_names = srcs[0].class_names if len(srcs) == 1 else None
    return DataIterator(ds, batch_size=batch_size, config=json.loads(json.dumps(config)),
                        class_names=class_names, max_consecutive_skips=max_consecutive_skips,
                        on_skip=on_skip)


def classification_eval(data: "str | Source", *, global_batch_size: int, image_size: int,
                        process_index: int | None = None, process_count: int | None = None,
                        num_workers: int = 0, read_threads: int = 4,
                        on_skip: SkipHandler | None = None) -> tuple[list[str], DataIterator]:
    """(class names, one finite pass of {"image", "label", "index"} batches) for zero-shot
    evaluation and linear probes.

    For class-labelled sources (imagefolder:, tfds: with a ClassLabel, arrayrecord: converted
    from one); each host reads its 1/P share.
    """
    source = sources_lib.open_source(data)
    if not source.has_label or not source.class_names:
        raise ValueError(f"{source.spec!r} has no class labels: use an imagefolder: source, a "
                         "TFDS dataset with a ClassLabel feature, or ArrayRecord converted from "
                         "either.")
    it = make_iterator(source, global_batch_size=global_batch_size, image_size=image_size,
                       train=False, process_index=process_index, process_count=process_count,
                       num_workers=num_workers, read_threads=read_threads, on_skip=on_skip)
    return list(source.class_names), it
