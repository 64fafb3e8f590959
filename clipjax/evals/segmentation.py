"""Semantic segmentation evaluation: one confusion matrix per split, IoU under both of the
conventions papers report, and mmseg-style inference (whole image or sliding window,
multi-scale, flip) around any batched scoring function.

The two mIoUs differ only in classes that appear in neither the targets nor the
predictions of a whole split: mmseg (GroupViT, most recent papers) skips them, a NaN
IoU left out of the mean; PyTorch-Encoding (LSeg) divides by `spacing(1) + union`, so
they count as IoU 0 in a mean over all classes.

Resizing is bilinear with half-pixel centres and no antialiasing, in NumPy: what cv2
(mmseg's image resize) and PyTorch's `interpolate(align_corners=False)` (its logit resize)
both compute.
"""

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from clipjax.data.synthetic_seg import IGNORE  # -1: target pixels that count nowhere

LogitsFn = Callable[[np.ndarray], np.ndarray]  # uint8 images [B,H,W,3] -> scores [B,h,w,C]


# --- metrics ------------------------------------------------------------------------------

def confusion_matrix(pred_HW: np.ndarray, target_HW: np.ndarray, num_classes: int,
                     ignore: int = IGNORE) -> np.ndarray:
    """Pixel counts int64 [C, C], rows the target class, columns the predicted one."""
    pred, target = np.asarray(pred_HW).ravel(), np.asarray(target_HW).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"A prediction of shape {np.shape(pred_HW)} cannot be scored against a "
                         f"mask of shape {np.shape(target_HW)}; predict at the mask's size.")
    keep = target != ignore
    pred, target = pred[keep].astype(np.int64), target[keep].astype(np.int64)
    for name, x in (("mask", target), ("prediction", pred)):
        if x.size and (x.min() < 0 or x.max() >= num_classes):
            raise ValueError(f"A {name} holds class {x.min() if x.min() < 0 else x.max()}, "
                             f"outside 0..{num_classes - 1}; give the right number of classes "
                             f"or mark unlabelled pixels {ignore}.")
    counts = np.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def scores(conf: np.ndarray) -> dict:
    """Pixel accuracy, per-class IoU and accuracy, and mIoU under both conventions.

    `miou`: mmseg's (GroupViT's), the nanmean of IoU over classes with a non-empty union.
    `miou_zeros`: PyTorch-Encoding's (LSeg's), inter / (spacing(1) + union) averaged over
    every class, so a class absent from targets and predictions counts 0.
    """
    conf = np.asarray(conf, np.float64)
    inter = np.diag(conf)
    target, pred = conf.sum(1), conf.sum(0)
    union = target + pred - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
        acc = np.where(target > 0, inter / target, np.nan)
    present = union > 0
    return {"pixel_accuracy": float(inter.sum() / max(conf.sum(), 1)),
            "miou": float(iou[present].mean()) if present.any() else float("nan"),
            "miou_zeros": float(np.mean(inter / (np.spacing(1) + union))),
            "macc": float(np.nanmean(acc)) if (target > 0).any() else float("nan"),
            "iou": iou, "class_accuracy": acc}


def report(result: dict, classnames: Sequence[str], title: str = "segmentation") -> str:
    """A table: pixel accuracy, both mIoUs named by convention, then IoU per class in order."""
    pct = lambda x: "    -" if np.isnan(x) else f"{100 * x:5.1f}"  # noqa: E731
    width = max([len(str(c)) for c in classnames] + [10])
    rows = [("pixel accuracy", result["pixel_accuracy"]),
            ("mIoU, absent classes skipped (mmseg, GroupViT)", result["miou"]),
            ("mIoU, absent classes as 0 (PyTorch-Encoding, LSeg)", result["miou_zeros"])]
    lines = [title]
    if "examples" in result:
        lines.append(f"  {'images':<52}{result['examples']}")
    lines += [f"  {name:<52}{100 * x:.2f}" for name, x in rows]
    lines.append(f"  {'class':<{width}}    IoU   acc")
    for name, iou, acc in zip(classnames, result["iou"], result["class_accuracy"]):
        lines.append(f"  {name:<{width}}  {pct(iou)} {pct(acc)}")
    return "\n".join(lines)


# --- resizing -----------------------------------------------------------------------------

def _lerp(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Bilinear resampling of one axis: half-pixel centres, edges clamped."""
    n_in = x.shape[axis]
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    frac = (src - lo).astype(np.float32).reshape([-1 if i == axis else 1 for i in range(x.ndim)])
    a, out = np.take(x, lo, axis), np.take(x, np.minimum(lo + 1, n_in - 1), axis)
    out -= a  # in place: these arrays can be hundreds of megabytes
    out *= frac
    out += a
    return out


def resize(x_BHWC: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of [B, H, W, C] to `size` (h, w); uint8 in, rounded uint8 out."""
    h, w = size
    if x_BHWC.shape[1:3] == (h, w):
        return x_BHWC
    y = _lerp(_lerp(x_BHWC.astype(np.float32), 1, h), 2, w)
    if x_BHWC.dtype == np.uint8:
        return np.clip(np.rint(y), 0, 255).astype(np.uint8)
    return y


def _softmax_(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in place (x is always an array this module made)."""
    x -= x.max(-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(-1, keepdims=True)
    return x


# --- inference ----------------------------------------------------------------------------

def _pair(x) -> tuple[int, int]:
    return (int(x), int(x)) if np.isscalar(x) else (int(x[0]), int(x[1]))


def _call(logits_fn: LogitsFn, images_BHWC: np.ndarray, max_batch: int) -> np.ndarray:
    """Scores [B, H, W, C] at the images' size, from at most `max_batch` images a call."""
    out = []
    for lo in range(0, len(images_BHWC), max_batch):
        batch = images_BHWC[lo:lo + max_batch]
        y = np.asarray(logits_fn(batch), np.float32)
        if y.ndim != 4 or len(y) != len(batch):
            raise ValueError(f"logits_fn must return scores [B, h, w, classes] for {len(batch)} "
                             f"images; it returned shape {y.shape}.")
        out.append(resize(y, batch.shape[1:3]))
    return np.concatenate(out)


def _slide(logits_fn: LogitsFn, images_BHWC: np.ndarray, crop, stride, max_batch: int):
    """mmseg's slide_inference: crop x crop windows every `stride`, overlapping logits
    averaged; the image is zero-padded (bottom, right) to at least one window."""
    (ch, cw), (sh, sw) = _pair(crop), _pair(stride)
    b, h, w, c = images_BHWC.shape
    hp, wp = max(h, ch), max(w, cw)
    padded = np.zeros((b, hp, wp, c), images_BHWC.dtype)
    padded[:, :h, :w] = images_BHWC
    boxes = []
    for i in range(max(hp - ch + sh - 1, 0) // sh + 1):
        for j in range(max(wp - cw + sw - 1, 0) // sw + 1):
            y2, x2 = min(i * sh + ch, hp), min(j * sw + cw, wp)
            boxes.append((y2 - ch, x2 - cw))
    windows = np.stack([padded[:, y:y + ch, x:x + cw] for y, x in boxes], 1)
    logits = _call(logits_fn, windows.reshape(-1, ch, cw, c), max_batch)
    logits = logits.reshape(b, len(boxes), ch, cw, -1)
    total = np.zeros((b, hp, wp, logits.shape[-1]), np.float32)
    count = np.zeros((hp, wp, 1), np.float32)
    for k, (y, x) in enumerate(boxes):
        total[:, y:y + ch, x:x + cw] += logits[:, k]
        count[y:y + ch, x:x + cw] += 1
    return (total / count)[:, :h, :w]


def _scaled_size(h: int, w: int, scale: float, short_side: int | None, crop) -> tuple[int, int]:
    if crop is not None:
        h, w = _pair(crop)
    elif short_side is not None:
        f = short_side / min(h, w)
        h, w = h * f, w * f
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def predict_batch(logits_fn: LogitsFn, images_BHWC: np.ndarray, *, mode: str = "whole",
                  crop=None, stride=None, scales: Sequence[float] = (1.0,), flip: bool = False,
                  short_side: int | None = None, max_batch: int = 16) -> np.ndarray:
    """Class probabilities float32 [B, H, W, C] of same-size images; see `predict`."""
    images_BHWC = np.asarray(images_BHWC)
    if images_BHWC.dtype != np.uint8 or images_BHWC.ndim != 4:
        raise ValueError(f"predict takes uint8 images [B, H, W, 3]; got {images_BHWC.dtype} "
                         f"{images_BHWC.shape}.")
    if mode not in ("whole", "slide"):
        raise ValueError(f"Unknown inference mode {mode!r}; choose whole or slide.")
    if mode == "slide" and crop is None:
        raise ValueError("Sliding-window inference needs a crop size; pass crop=.")
    if mode == "slide" and stride is None:
        stride = tuple(max(1, 2 * c // 3) for c in _pair(crop))  # mmseg's 512 / 341
    b, h, w, _ = images_BHWC.shape
    total = 0.0
    for scale in scales:
        size = _scaled_size(h, w, scale, short_side, crop if mode == "whole" else None)
        x = resize(images_BHWC, size)
        views = np.concatenate([x, x[:, :, ::-1]]) if flip else x  # one call for both
        if mode == "whole":
            logits = _call(logits_fn, views, max_batch)
        else:
            logits = _slide(logits_fn, views, crop, stride, max_batch)
        if flip:
            logits = np.concatenate([logits[:b], logits[b:, :, ::-1]])
        # As mmseg: logits back to the original size, then softmax, then the average.
        probs = _softmax_(resize(logits, (h, w)))
        total = total + (probs[:b] + probs[b:] if flip else probs)
    return (total / (len(scales) * (2 if flip else 1))).astype(np.float32)


def predict(logits_fn: LogitsFn, image_HWC: np.ndarray, **options) -> np.ndarray:
    """Class probabilities float32 [H, W, C] of one uint8 image, at its own size.

    `logits_fn` scores a batch of uint8 images at any resolution; its scores are resized
    bilinearly to the images it saw. mode "whole" scores the image resized by each of
    `scales` (after `short_side` resizes its short side, keeping the aspect ratio; or,
    given `crop`, resized to crop x crop for fixed-size models, times the scale). mode
    "slide" scores crop x crop windows every `stride` (default 2/3 of crop) of each scaled
    image. `flip` adds horizontal flips, flipped back. Softmax probabilities at the original
    size are averaged over scales and flips; `max_batch` caps the images per call.
    """
    return predict_batch(logits_fn, np.asarray(image_HWC)[None], **options)[0]


def labels(probs_HWC: np.ndarray, background: float | None = None) -> np.ndarray:
    """Predicted classes [H, W]; with a `background` threshold the probabilities are of the
    foreground classes 1..C-1 only and a pixel none reaches is class 0 (GroupViT's rule)."""
    if background is None:
        return probs_HWC.argmax(-1)
    return np.where(probs_HWC.max(-1) < background, 0, probs_HWC.argmax(-1) + 1)


def evaluate(logits_fn: LogitsFn, dataset: Iterable, num_classes: int, *, max_examples: int = 0,
             background: float | None = None, batch_size: int = 1, **predict_options) -> dict:
    """`scores` of one confusion matrix over (key, image, mask) examples, plus "examples"
    and "confusion". Up to `batch_size` consecutive same-size images share one prediction
    (one logits_fn call when they fit `max_batch`); `background` as in `labels`."""
    conf = np.zeros((num_classes, num_classes), np.int64)
    pending: list = []
    expected = num_classes - 1 if background is not None else num_classes

    def flush():
        probs = predict_batch(logits_fn, np.stack([im for im, _ in pending]), **predict_options)
        if probs.shape[-1] != expected:
            raise ValueError(f"logits_fn scored {probs.shape[-1]} classes; evaluation over "
                             f"{num_classes} classes needs {expected}"
                             + (" (the foreground ones, with a background threshold)."
                                if background is not None else "."))
        for p, (_, mask) in zip(probs, pending):
            conf[...] += confusion_matrix(labels(p, background), mask, num_classes)
        pending.clear()

    n = 0
    for _, image, mask in dataset:
        if max_examples and n >= max_examples:
            break
        if pending and (len(pending) >= batch_size or image.shape != pending[0][0].shape):
            flush()
        pending.append((np.asarray(image), np.asarray(mask)))
        n += 1
    if pending:
        flush()
    return {**scores(conf), "examples": n, "confusion": conf}
