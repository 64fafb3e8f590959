"""Zero-shot classification, retrieval, linear probes and search.

One protocol for every evaluator, the one the training loop's eval hook calls every N steps:

    evaluator(encoders: Encoders, params) -> dict[str, float]

`encoders = make_encoders(model, mesh)` bundles the model's jitted encoders (unit-norm
`encode_image(params, img_BHWC) -> img_BE` and `encode_text(params, tokens_BL) -> txt_BE`,
plus `image_features` for linear probes), its image size and context length, the mesh its
rows are sharded over and the batch size. `params` are the model's parameters, placed as
the caller keeps them (the training state's own shardings work as they are). An evaluator
owns its data: it is built once, from a function `batches(encoders)` that gives a fresh
pass over host-local {"image", "label" / "index"} batches, and returns metrics named
"task/metric", e.g. "zeroshot/top1", "zeroshot/top5", "retrieval/i2t_R@1",
"retrieval/t2i_R@5", "linear_probe/top1".

    evaluators = clipjax.evals.synthetic_evaluators()      # the built-in data's two
    metrics = clipjax.evals.run_all(evaluators, make_encoders(model, mesh), params)

A training config names its evaluators in one string, `config_evaluators(config.eval.zeroshot)`.
Video heads' evaluators (text-video retrieval, action recognition) follow the same protocol
on `clipjax.evals.video.VideoEncoders`.
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from clipjax.evals.encoders import Encoders, embed_images, embed_texts, make_encoders

Evaluator = Callable[[Encoders, Any], dict[str, float]]

__all__ = ["Encoders", "Evaluator", "config_evaluators", "embed_images", "embed_texts",
           "make_encoders", "run_all", "synthetic_evaluators"]


def run_all(evaluators: Iterable[Evaluator] | Mapping[str, Evaluator], encoders: Encoders,
            params: Any) -> dict[str, float]:
    """Every evaluator's metrics in one dict (names must not collide)."""
    metrics: dict[str, float] = {}
    for ev in (evaluators.values() if isinstance(evaluators, Mapping) else evaluators):
        out = ev(encoders, params)
        if clash := set(out) & set(metrics):
            raise ValueError(f"Two evaluators report {sorted(clash)}; give them different names.")
        metrics.update(out)
    return metrics


def synthetic_evaluators(num_examples: int = 1024, seed: int = 0, captions_per_image: int = 5,
                         batch_size: int = 256) -> dict[str, Evaluator]:
    """Zero-shot and retrieval on the built-in data's held-out split, with its own class
    names and templates: the evaluators for a run on the synthetic data."""
    from clipjax.data import synthetic
    from clipjax.evals import data, retrieval, zeroshot

    source = data.SyntheticImages(num_examples, seed, captions_per_image)
    batches = data.batch_fn(source, batch_size)
    return {"zeroshot": zeroshot.evaluator(batches, synthetic.CLASSNAMES, synthetic.TEMPLATES),
            "retrieval": retrieval.evaluator(batches, source.captions())}


def config_evaluators(spec: str, *, num_examples: int = 1024, seed: int = 0,
                      batch_size: int = 256) -> dict[str, Evaluator]:
    """The evaluators a training config's `eval.zeroshot` string names.

    "synthetic" (or "synthetic:N"): `synthetic_evaluators` on `num_examples` (N) held-out
    images; "": none; anything else is a labelled dataset as `clipjax eval zeroshot
    --dataset` takes it (a source spec such as
    "tfds:imagenet2012?data_dir=/data/tfds&split=validation", "imagefolder:/data/val", or a
    class-folder path): {"zeroshot": ...} with the dataset's class names and default
    templates, over all its images. The data is opened and checked here, so a bad spec
    raises ValueError or FileNotFoundError before training starts.
    """
    from clipjax.evals import data, zeroshot

    spec = spec.strip()
    if not spec:
        return {}
    if spec == "synthetic" or spec.startswith("synthetic:"):
        images = data.labelled(spec)
        return synthetic_evaluators(images.num_examples if ":" in spec else num_examples,
                                    seed=seed, batch_size=batch_size)
    images = data.labelled(spec)
    return {"zeroshot": zeroshot.evaluator(data.batch_fn(images, batch_size), images.classnames,
                                           zeroshot.default_templates(images))}
