"""Zero-shot classification: class embeddings from prompt ensembles, top-k over images.

The protocol is OpenCLIP's (and OpenAI's notebook's): each class's prompts are encoded and
L2-normalised, averaged, and the mean renormalised; an image's class scores are the dot
products of its normalised embedding with those class embeddings.
"""

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from clipjax.evals.encoders import Encoders, Params, embed_images, embed_texts
from clipjax.evals.prompts import ClassName, display_name, prompts_for


def classifier(encoders: Encoders, params: Params, classnames: Sequence[ClassName],
               templates: Sequence[str]) -> np.ndarray:
    """Unit-norm class embeddings w_CE: the renormalised mean of each class's prompt embeddings."""
    if not classnames or not templates:
        raise ValueError("Zero-shot classification needs at least one class name and one "
                         "template; check --classes and --templates.")
    prompts = [prompts_for(c, templates) for c in classnames]
    txt_TE = embed_texts(encoders, params, [p for ps in prompts for p in ps])
    return ensemble(txt_TE, [len(ps) for ps in prompts])


def ensemble(txt_TE: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """Per class (consecutive rows, `counts` of them): mean of unit-norm rows, renormalised."""
    txt_TE = txt_TE / np.linalg.norm(txt_TE, axis=-1, keepdims=True)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    # Counts in the embeddings' dtype: an integer array would promote float32 to float64.
    mean_CE = np.add.reduceat(txt_TE, starts, axis=0) / np.asarray(counts, txt_TE.dtype)[:, None]
    return mean_CE / np.linalg.norm(mean_CE, axis=-1, keepdims=True)


def true_class_rank(scores_BC: np.ndarray, labels_B: np.ndarray) -> np.ndarray:
    """How many classes rank above the true one; ties go to the lower class index, as with
    a stable sort or jax.lax.top_k, so a correct top-k is rank < k."""
    s_true = np.take_along_axis(scores_BC, labels_B[:, None], axis=1)
    lower = np.arange(scores_BC.shape[1])[None] < labels_B[:, None]
    return (scores_BC > s_true).sum(1) + ((scores_BC == s_true) & lower).sum(1)


@dataclasses.dataclass
class Result:
    """A zero-shot run: top-k accuracies, per-class accuracy, confusion matrix."""

    topk: dict[int, float]
    classnames: list[str]
    labels: np.ndarray  # [N]
    predictions: np.ndarray  # [N] top-1 class
    num_templates: int

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def confusion(self) -> np.ndarray:
        """Counts [true class, predicted class]."""
        c = self.num_classes
        return np.bincount(self.labels * c + self.predictions, minlength=c * c).reshape(c, c)

    def per_class_accuracy(self) -> np.ndarray:
        """Top-1 accuracy of each class; NaN for a class without images."""
        conf = self.confusion()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.diag(conf) / conf.sum(1)

    def metrics(self, prefix: str = "zeroshot") -> dict[str, float]:
        return {f"{prefix}/top{k}": v for k, v in self.topk.items()}

    def to_json(self) -> dict:
        acc = self.per_class_accuracy()
        return {"num_images": len(self.labels), "num_classes": self.num_classes,
                "num_templates": self.num_templates,
                **{f"top{k}": v for k, v in self.topk.items()},
                "per_class": [{"class": n, "accuracy": None if np.isnan(a) else float(a),
                               "images": int(m)}
                              for n, a, m in zip(self.classnames, acc, self.confusion().sum(1))]}


def score(img_NE: np.ndarray, labels_N: np.ndarray, w_CE: np.ndarray, ks: Sequence[int] = (1, 5),
          chunk: int = 8192) -> tuple[dict[int, float], np.ndarray]:
    """(top-k accuracy for each k (capped at the class count), top-1 predictions)."""
    c = len(w_CE)
    if labels_N.size and (labels_N.min() < 0 or labels_N.max() >= c):
        raise ValueError(f"Labels run from {labels_N.min()} to {labels_N.max()} but there are "
                         f"{c} class names; the class list and the label space disagree.")
    ranks, preds = [], []
    for lo in range(0, len(img_NE), chunk):
        s_BC = img_NE[lo:lo + chunk] @ w_CE.T
        ranks.append(true_class_rank(s_BC, labels_N[lo:lo + chunk]))
        preds.append(s_BC.argmax(1))
    rank_N = np.concatenate(ranks) if ranks else np.zeros(0, np.int64)
    n = max(len(rank_N), 1)
    return ({k: float((rank_N < min(k, c)).sum() / n) for k in ks},
            np.concatenate(preds) if preds else np.zeros(0, np.int64))


def evaluate(encoders: Encoders, params: Params, batches: Iterable[Mapping[str, np.ndarray]],
             classnames: Sequence[ClassName], templates: Sequence[str],
             ks: Sequence[int] = (1, 5), progress: Callable[[int], None] | None = None) -> Result:
    """Zero-shot top-k of `batches` ({"image", "label"} host-local) against the class names."""
    w_CE = classifier(encoders, params, classnames, templates)
    out = embed_images(encoders, params, batches, progress=progress)
    if "label" not in out:
        raise ValueError("The evaluation data yielded no images; check the dataset path and split.")
    labels = out["label"].astype(np.int64)
    topk, preds = score(out["embedding"], labels, w_CE, ks)
    return Result(topk, [display_name(c) for c in classnames], labels, preds, len(templates))


def default_templates(source, classes: str | None = None) -> list[str]:
    """The templates a labelled dataset (clipjax.evals.data.labelled) calls for: the synthetic
    data's own, a shipped dataset's (named by `classes` or implied by the dataset), else
    OpenAI's 80."""
    from clipjax.data import synthetic
    from clipjax.evals import data, prompts

    if isinstance(source, data.SyntheticImages):
        return list(synthetic.TEMPLATES)
    known = classes if classes in prompts.datasets() else getattr(source, "dataset", None)
    return prompts.templates(known) if known else prompts.openai_imagenet_templates()


def evaluator(batches: Callable[[Encoders], Iterable[Mapping[str, np.ndarray]]],
              classnames: Sequence[ClassName], templates: Sequence[str],
              name: str = "zeroshot", ks: Sequence[int] = (1, 5)):
    """An Evaluator: `batches(encoders)` gives a fresh pass over {"image", "label"}."""
    def run(encoders: Encoders, params: Params) -> dict[str, float]:
        return evaluate(encoders, params, batches(encoders), classnames, templates,
                        ks).metrics(name)

    return run
