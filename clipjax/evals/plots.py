"""PNG figures: per-class accuracy, confusion matrix, recall@K curves, a run's loss curve."""

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Figure without pyplot: no global backend state, nothing to close, works headless.
from matplotlib.figure import Figure

MAX_LABELLED = 40  # classes beyond this lose their tick labels (and the bar chart its middle)


def per_class_accuracy(path: str | os.PathLike, classnames: Sequence[str], accuracy_C: np.ndarray,
                       title: str = "zero-shot accuracy per class") -> None:
    """Horizontal bars, worst class at the top; with many classes only the 20 worst and the
    20 best are drawn."""
    acc = np.nan_to_num(np.asarray(accuracy_C, float), nan=0.0)
    order = np.argsort(acc, kind="stable")
    if len(order) > MAX_LABELLED:
        half = MAX_LABELLED // 2
        order = np.concatenate([order[:half], order[-half:]])
        title += f" ({half} worst and {half} best of {len(acc)})"
    names = [classnames[i] for i in order]
    fig = Figure(figsize=(7, 1.5 + 0.22 * len(order)))
    ax = fig.subplots()
    ax.barh(np.arange(len(order)), acc[order] * 100, color="tab:blue")
    ax.set_yticks(np.arange(len(order)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("top-1 accuracy (%)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def confusion_matrix(path: str | os.PathLike, classnames: Sequence[str], confusion_CC: np.ndarray,
                     title: str = "zero-shot confusion (rows: true, columns: predicted)") -> None:
    """Row-normalised confusion matrix; class names on the axes up to MAX_LABELLED classes."""
    conf = np.asarray(confusion_CC, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        rows = np.nan_to_num(conf / conf.sum(1, keepdims=True))
    c = len(conf)
    side = min(12, 3 + 0.22 * min(c, 50))
    fig = Figure(figsize=(side + 1, side))
    ax = fig.subplots()
    im = ax.imshow(rows, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    if c <= MAX_LABELLED:
        ax.set_xticks(np.arange(c), classnames, rotation=90, fontsize=7)
        ax.set_yticks(np.arange(c), classnames, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def recall_curve(path: str | os.PathLike, curve: dict[str, list[float]],
                 title: str = "retrieval recall@K") -> None:
    """Recall@K against K (log scale) for both directions."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for key, label in (("i2t", "image → text"), ("t2i", "text → image")):
        ax.plot(curve["k"], np.asarray(curve[key]) * 100, marker=".", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def loss_curve(jsonl: str | os.PathLike, png: str | os.PathLike) -> None:
    """A training run's loss (and zero-shot top-1, when it was evaluated) from metrics.jsonl."""
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    evals = [r for r in rows if "zeroshot/top1" in r]
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["zeroshot/top1"] for r in evals], "o-",
                 color="tab:orange", label="zero-shot top-1")
        ax2.set_ylabel("zero-shot top-1")
        ax2.set_ylim(0, 1)
    ax.set_title(Path(jsonl).parent.name)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
