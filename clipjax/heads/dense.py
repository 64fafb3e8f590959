"""What the segmentation heads (LSeg, GroupViT) share: data, evaluation, encoders, loading.

A head module brings its model and `scorer(model) -> (embed_labels, scores)`:
embed_labels(params, names) -> label embeddings, scores(params, uint8 images [B, H, W, 3],
labels) -> per-pixel class scores [B, H, W, C] (GroupViT's include background at 0).
Everything else here is the same for both.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

DENSE_TASKS = ("lseg", "groupvit")


def is_synthetic(spec: str) -> bool:
    return spec == "synthetic" or spec.startswith("synthetic:")


def train_classnames(config) -> tuple[str, ...]:
    """The label list LSeg trains with: the built-in words or the dataset's class names."""
    spec = config.data.source
    if is_synthetic(spec):
        from clipjax.data import synthetic_seg

        kind = config.get("head", {}).get("train_words", "canonical")
        return tuple(synthetic_seg.label_words(kind))
    from clipjax.data import segmentation

    try:
        return tuple(segmentation.classnames(spec))
    except ValueError:
        # No data on this machine (`clipjax compile` plans a pod from a laptop): only the
        # class count shapes the step; training still reads the data and says what is missing.
        kind = segmentation.parse_seg_spec(spec)[0]
        if kind not in segmentation.BUILTIN_CLASSES:
            raise
        return tuple(segmentation.BUILTIN_CLASSES[kind])


def synthetic_shapes(config) -> dict:
    """data.max_shapes and data.shape_size (half-extents as fractions of the image), when a
    config sets them, for the built-in images."""
    out = {}
    if config.data.get("max_shapes"):
        out["max_shapes"] = int(config.data.max_shapes)
    if config.data.get("shape_size"):
        out["shape_size"] = tuple(float(v) for v in config.data.shape_size)
    return out


def build_data(head, config, state: dict | None):
    """Resumable host-local training batches in the head's batch layout."""
    spec = config.data.source
    keys = head.batch_keys(config)
    if is_synthetic(spec):
        from clipjax.data import synthetic_seg

        it = synthetic_seg.SyntheticSegIterator(
            config.global_batch, image_size=config.data.image_size,
            context_length=config.data.context_length, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            **synthetic_shapes(config), **head.synthetic_options(config))
    elif not spec:
        raise ValueError("data.source is empty; give a dataset, e.g. "
                         f"data.source='{head.EXAMPLE_SOURCE}', or 'synthetic'.")
    else:
        it = head.real_data(config)
    out = _Only(it, keys, config.seed, config.global_batch)
    if state:
        out.set_state(state)
    return out


class _Only:
    """An iterator's batches restricted to the keys a step reads, plus "rng" when the step
    asks for it: a uint32 seed per row from (seed, batch, row of the global batch), so
    GroupViT's Gumbel noise is the same whatever the mesh, hosts or resumption."""

    def __init__(self, it, keys, seed: int, global_batch: int):
        self.it, self.keys, self.seed, self.global_batch = it, keys, seed, global_batch
        self.batches = 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        out = {k: v for k, v in batch.items() if k in self.keys}
        if "rng" in self.keys:
            from clipjax.data import stages

            b = len(next(iter(out.values())))
            first = jax.process_index() * b
            out["rng"] = np.asarray([stages.uint32_seed(self.seed, self.batches, first + i)
                                     for i in range(b)], np.uint32)
        self.batches += 1
        return out

    def get_state(self):
        return {"data": self.it.get_state(), "batches": self.batches}

    def set_state(self, state):
        self.it.set_state(state["data"])
        self.batches = int(state["batches"])

    def __getattr__(self, name):  # stats(), class_names, ...
        return getattr(self.it, name)


def eval_set(spec: str, config, num_examples: int = 0):
    """An evaluation split: the built-in held-out images or a dataset spec."""
    spec = spec.strip()
    if is_synthetic(spec):
        from clipjax.data import synthetic_seg

        n = int(spec.split(":", 1)[1]) if ":" in spec else (num_examples or 256)
        return synthetic_seg.SyntheticSegSet(n, seed=config.seed, image_size=config.data.image_size,
                                             **synthetic_shapes(config))
    from clipjax.data import segmentation

    return segmentation.eval_set(spec, max_examples=num_examples)


@dataclasses.dataclass
class DenseEncoders:
    """A head's label embedding and per-pixel scoring, jitted and spread over the mesh."""

    embed_labels: Any  # (params, names) -> [C, E]
    scores: Any  # jitted (params, uint8 [B, H, W, 3], labels) -> [B, H, W, C]
    mesh: Any
    batch_size: int
    crop: int  # the training crop: the sliding window's size

    def logits_fn(self, params, labels):
        """images [n, H, W, 3] uint8 (NumPy) -> scores [n, H, W, C] (NumPy), in batches
        padded to a multiple of the batch shards."""
        from clipjax import sharding

        shards = sharding.batch_size(self.mesh) if self.mesh is not None else 1

        def run(images):
            images = np.asarray(images)
            out = []
            for lo in range(0, len(images), self.batch_size):
                part = images[lo:lo + self.batch_size]
                pad = -len(part) % shards
                if pad:
                    part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
                if self.mesh is not None:
                    part = jax.device_put(part, sharding.batch_sharding(self.mesh, 4))
                out.append(np.asarray(self.scores(params, part, labels))[:len(part) - pad])
            return np.concatenate(out)

        return run


def make_encoders(head, model, mesh, batch_size: int = 16) -> DenseEncoders:
    from clipjax import sharding

    if mesh is not None:
        batch_size = -(-batch_size // sharding.batch_size(mesh)) * sharding.batch_size(mesh)
    embed_labels, scores = head.scorer(model)
    return DenseEncoders(embed_labels, jax.jit(scores), mesh, batch_size,
                         model.crop if hasattr(model, "crop") else model.config.vision.image_size)


def predict_options(head, config, spec: str, **given) -> dict:
    """How a split is scored: the whole (same-size) built-in images, or sliding windows of
    the training crop (LSeg: stride 2/3 of it, as PyTorch-Encoding; GroupViT: its
    settings) over real images; `given` overrides."""
    s = head.settings(config)
    crop = s.get("eval_crop") or config.data.image_size
    if is_synthetic(spec):
        opts = dict(mode="whole")
    else:
        opts = dict(mode=s.get("eval_mode", "slide"), crop=crop,
                    stride=s.get("eval_stride") or (crop // 2 if "eval_stride" in s else
                                                    crop * 2 // 3),
                    scales=tuple(s.get("eval_scales", (1.0,))), flip=bool(s.get("eval_flip")),
                    short_side=s.get("short_side") or None)
    opts.update({k: v for k, v in given.items() if v is not None})
    return opts


def evaluator(dataset, names, prefix: str, options: dict, label_options: dict | None = None,
              groups: dict[str, list[int]] | None = None):
    """evaluator(encoders, params) -> {prefix/miou, prefix/miou_zeros, prefix/pixel_accuracy}:
    one confusion matrix over the split, both mIoU conventions; `groups` {name: class
    indices} adds prefix/miou_<name> over those classes (absent ones skipped)."""
    from clipjax.evals import segmentation as seg_evals

    def run(encoders: DenseEncoders, params) -> dict[str, float]:
        labels = encoders.embed_labels(params, list(names), **(label_options or {}))
        out = seg_evals.evaluate(encoders.logits_fn(params, labels), dataset, len(names),
                                 **options)
        metrics = {f"{prefix}/miou": float(out["miou"]), f"{prefix}/miou_zeros":
                   float(out["miou_zeros"]), f"{prefix}/pixel_accuracy":
                   float(out["pixel_accuracy"])}
        iou = np.asarray(out["iou"], np.float64)
        for name, index in (groups or {}).items():
            part = iou[index]
            metrics[f"{prefix}/miou_{name}"] = float(np.nanmean(part)) if np.isfinite(
                part).any() else float("nan")
        return metrics

    return run


def build_evaluators(head, config) -> dict:
    spec = config.eval.get("segmentation", "")
    if not spec:
        return {}
    dataset = eval_set(spec, config, config.eval.num_examples)
    options = predict_options(head, config, spec)
    return head.evaluators(config, dataset, spec, options)


def task(head, name: str):
    from clipjax.heads import Task

    return Task(
        name=name, batch_ndim=head.BATCH_NDIM, build_models=head.build_models,
        encode=head.encode, loss=head.loss, batch_keys=head.batch_keys,
        build_data=lambda config, state: build_data(head, config, state),
        build_evaluators=lambda config: build_evaluators(head, config),
        make_encoders=lambda model, mesh: make_encoders(head, model, mesh),
        derive=lambda model, params, loaded=frozenset(): params,
        identity=lambda config: {"task": name, "head": _jsonable(head.settings(config))},
        next_command=head.next_command, frozen=tuple(getattr(head, "FROZEN", ())),
        batch_stats=lambda model: bool(getattr(head, "BATCH_STATS", False)
                                       and getattr(model, "train", False)))


def _jsonable(settings: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def load(checkpoint: str) -> tuple:
    """(head module, eval model, params, config) of an LSeg or GroupViT checkpoint (a
    training workdir or the model.safetensors it wrote)."""
    import importlib

    from clipjax import weights

    w = weights.load(checkpoint)
    trained = (w.config or {}).get("task", "clip")
    if trained not in DENSE_TASKS:
        raise ValueError(f"{checkpoint} holds a {trained} model; segmentation needs an LSeg or "
                         "GroupViT checkpoint: train one with clipjax train --config "
                         "lseg_synthetic (or groupvit_synthetic) first.")
    config = ml_collections.ConfigDict(w.config)
    config.scan, config.remat, config.dtype = False, "none", "float32"
    module = importlib.import_module(f"clipjax.heads.{trained}")
    model = module.build_models(config)[1]
    params = jax.tree.map(jnp.asarray, w.params)
    return module, model, params, config
