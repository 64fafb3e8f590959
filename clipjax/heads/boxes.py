"""Boxes for GLIP's ATSS detector: anchors, box coding, ATSS targets, losses, NMS.

Numbers follow microsoft/GLIP (maskrcnn_benchmark, VLDyHead). Boxes are xyxy pixels. Where
the reference uses the legacy inclusive-pixel convention (a box x1..x2 is x2 - x1 + 1 wide:
anchor sizes, the box coder, ATSS IoU, NMS, clipping) so do we (`PIXEL`); the GIoU loss and
centerness use plain differences, as the reference does. Generic utilities default to
continuous boxes (offset 0). The jnp half runs per image on padded targets (gt [M, 4] with a
validity mask [M]) under jit and vmap; NMS and postprocessing run on the host in NumPy.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PIXEL = 1.0  # the reference's TO_REMOVE
WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # BoxCoder (wx, wy, ww, wh)
CLIP = math.log(1000.0 / 16)  # bbox_xform_clip: the largest dw/dh fed to exp
INSIDE = 0.01  # ATSS: an anchor centre must lie this far inside its gt box
REG_WEIGHT = 2.0  # MODEL.ATSS.REG_LOSS_WEIGHT


def _xp(x):
    """NumPy for host arrays, jnp otherwise, so the coder serves both the step and eval."""
    return np if isinstance(x, np.ndarray) else jnp


# ---- box utilities ---------------------------------------------------------------------

def xyxy_to_cxcywh(b_N4):
    xp = _xp(b_N4)
    x1, y1, x2, y2 = (b_N4[..., i] for i in range(4))
    return xp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def cxcywh_to_xyxy(b_N4):
    xp = _xp(b_N4)
    cx, cy, w, h = (b_N4[..., i] for i in range(4))
    return xp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def box_area(b_N4, offset: float = 0.0):
    return (b_N4[..., 2] - b_N4[..., 0] + offset) * (b_N4[..., 3] - b_N4[..., 1] + offset)


def pairwise_iou(a_A4, b_M4, offset: float = 0.0):
    """IoU [A, M]; offset=PIXEL is maskrcnn_benchmark's boxlist_iou."""
    xp = _xp(a_A4)
    lt = xp.maximum(a_A4[:, None, :2], b_M4[None, :, :2])
    rb = xp.minimum(a_A4[:, None, 2:], b_M4[None, :, 2:])
    wh = xp.clip(rb - lt + offset, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a_A4, offset)[:, None] + box_area(b_M4, offset)[None, :] - inter
    return xp.where(union > 0, inter / xp.where(union > 0, union, 1), 0)


def giou(pred_N4, target_N4):
    """Elementwise generalised IoU as the ATSS loss computes it (pred corners sorted, eps 1e-7)."""
    px1, py1 = pred_N4[..., 0], pred_N4[..., 1]
    px2 = jnp.maximum(px1, pred_N4[..., 2])
    py2 = jnp.maximum(py1, pred_N4[..., 3])
    tx1, ty1, tx2, ty2 = (target_N4[..., i] for i in range(4))
    iw = jnp.minimum(px2, tx2) - jnp.maximum(px1, tx1)
    ih = jnp.minimum(py2, ty2) - jnp.maximum(py1, ty1)
    inter = jnp.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    enclose = (jnp.maximum(px2, tx2) - jnp.minimum(px1, tx1)) * (
        jnp.maximum(py2, ty2) - jnp.minimum(py1, ty1)) + 1e-7
    union = (px2 - px1) * (py2 - py1) + (tx2 - tx1) * (ty2 - ty1) - inter + 1e-7
    return inter / union - (enclose - union) / enclose


def giou_loss(pred_N4, target_N4):
    """1 - GIoU per box; the caller weights and sums."""
    return 1.0 - giou(pred_N4, target_N4)


# ---- anchors and the box coder ---------------------------------------------------------

def anchors(image_size: tuple[int, int], strides: Sequence[int] = (8, 16, 32, 64, 128),
            scale: float = 8.0) -> tuple[np.ndarray, tuple[int, ...]]:
    """One square anchor per location, (scale * stride) wide, level by level, rows then columns.

    As make_anchor_generator_complex with ASPECT_RATIOS (1.0,), SCALES_PER_OCTAVE 1: the cell
    anchor is centred at (stride - 1) / 2 and spans scale*stride inclusive pixels; level l
    has ceil(H / stride) x ceil(W / stride) locations (the FPN's stride-2 convolutions).
    """
    height, width = image_size
    out, sizes = [], []
    for s in strides:
        gh, gw = -(-height // s), -(-width // s)
        half, c = (scale * s - PIXEL) / 2, (s - PIXEL) / 2
        cy, cx = np.meshgrid(np.arange(gh) * s + c, np.arange(gw) * s + c, indexing="ij")
        cx, cy = cx.reshape(-1), cy.reshape(-1)
        out.append(np.stack([cx - half, cy - half, cx + half, cy + half], axis=1))
        sizes.append(gh * gw)
    return np.concatenate(out).astype(np.float32), tuple(sizes)


def _whc(b_A4):
    """Widths, heights (inclusive pixels) and centres, as GLIP's VLDyHead BoxCoder takes them."""
    w = b_A4[..., 2] - b_A4[..., 0] + PIXEL
    h = b_A4[..., 3] - b_A4[..., 1] + PIXEL
    return w, h, (b_A4[..., 0] + b_A4[..., 2]) / 2, (b_A4[..., 1] + b_A4[..., 3]) / 2


def encode(ref_A4, gt_A4):
    """Regression targets of gt boxes relative to reference boxes (weights 10, 10, 5, 5)."""
    xp = _xp(gt_A4)
    rw, rh, rx, ry = _whc(ref_A4)
    gw, gh, gx, gy = _whc(gt_A4)
    wx, wy, ww, wh = WEIGHTS
    return xp.stack([wx * (gx - rx) / rw, wy * (gy - ry) / rh,
                     ww * xp.log(gw / rw), wh * xp.log(gh / rh)], axis=-1)


def decode(ref_A4, deltas_A4):
    """Boxes from deltas; dw, dh clipped at log(1000/16) so exp stays finite."""
    xp = _xp(deltas_A4)
    rw, rh, rx, ry = _whc(ref_A4)
    wx, wy, ww, wh = WEIGHTS
    cx = deltas_A4[..., 0] / wx * rw + rx
    cy = deltas_A4[..., 1] / wy * rh + ry
    w = xp.exp(xp.minimum(deltas_A4[..., 2] / ww, CLIP)) * rw
    h = xp.exp(xp.minimum(deltas_A4[..., 3] / wh, CLIP)) * rh
    return xp.stack([cx - (w - PIXEL) / 2, cy - (h - PIXEL) / 2,
                     cx + (w - PIXEL) / 2, cy + (h - PIXEL) / 2], axis=-1)


# ---- ATSS targets ----------------------------------------------------------------------

def _centres(b_N4):
    return (b_N4[..., 0] + b_N4[..., 2]) / 2, (b_N4[..., 1] + b_N4[..., 3]) / 2


def atss_assign(anchors_A4, level_sizes: Sequence[int], gt_M4, gt_valid_M, topk: int = 9):
    """Index of each anchor's gt (-1 background): per level the topk anchors nearest each gt's
    centre are candidates; those with IoU >= mean + std (unbiased) of the candidates' IoUs and
    centre inside the box are positive; an anchor positive for several gts takes the highest
    IoU. Padding gts never match. Ties in distance go to the lower anchor index."""
    a_A4 = jnp.asarray(anchors_A4, jnp.float32)
    n_anchors, n_gt = a_A4.shape[0], gt_M4.shape[0]
    if sum(level_sizes) != n_anchors:
        raise ValueError(f"level_sizes sum to {sum(level_sizes)} but there are {n_anchors} "
                         "anchors; pass the level_sizes that anchors() returned with them.")
    if n_gt == 0:
        return jnp.full((n_anchors,), -1, jnp.int32)
    gt_M4 = jnp.asarray(gt_M4, jnp.float32)
    iou_AM = pairwise_iou(a_A4, gt_M4, offset=PIXEL)
    ax, ay = _centres(a_A4)
    gx, gy = _centres(gt_M4)
    dist_MA = jnp.sqrt((gx[:, None] - ax[None]) ** 2 + (gy[:, None] - ay[None]) ** 2)
    cands, start = [], 0
    for n in level_sizes:
        _, idx_MK = jax.lax.top_k(-dist_MA[:, start:start + n], min(topk, n))
        cands.append(idx_MK + start)
        start += n
    cand_MK = jnp.concatenate(cands, axis=1)
    ciou_MK = jnp.take_along_axis(iou_AM.T, cand_MK, axis=1)
    # torch's unbiased std; a lone candidate (NaN there) gets 0
    std_M = ciou_MK.std(axis=1, ddof=1) if cand_MK.shape[1] > 1 else 0.0
    pos_MK = ciou_MK >= (ciou_MK.mean(axis=1) + std_M)[:, None]
    cx, cy = ax[cand_MK], ay[cand_MK]
    margin_MK = jnp.minimum(jnp.minimum(cx - gt_M4[:, 0:1], cy - gt_M4[:, 1:2]),
                            jnp.minimum(gt_M4[:, 2:3] - cx, gt_M4[:, 3:4] - cy))
    pos_MK &= (margin_MK > INSIDE) & jnp.asarray(gt_valid_M, bool)[:, None]
    rows = jnp.arange(n_gt)[:, None]
    pos_MA = jnp.zeros((n_gt, n_anchors), bool).at[rows, cand_MK].set(pos_MK)
    best_A = jnp.argmax(jnp.where(pos_MA.T, iou_AM, -jnp.inf), axis=1)
    return jnp.where(pos_MA.any(axis=0), best_A, -1).astype(jnp.int32)


def centerness_targets(anchors_A4, gt_A4):
    """sqrt(min/max(l, r) * min/max(t, b)) of each anchor centre in its gt box, the gt taken
    through encode/decode as the reference does; 0 (not NaN) where the centre lies outside."""
    g_A4 = decode(anchors_A4, encode(anchors_A4, gt_A4))
    ax, ay = _centres(anchors_A4)
    l, t, r, b = ax - g_A4[..., 0], ay - g_A4[..., 1], g_A4[..., 2] - ax, g_A4[..., 3] - ay

    def ratio(u, v):
        hi = jnp.maximum(u, v)
        return jnp.where(hi > 0, jnp.minimum(u, v) / jnp.where(hi > 0, hi, 1.0), 0.0)

    return jnp.sqrt(jnp.clip(ratio(l, r), 0, None) * jnp.clip(ratio(t, b), 0, None))


# ---- losses ----------------------------------------------------------------------------

def _bce_with_logits(x, t):
    return jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Elementwise binary focal loss (RetinaNet; GLIP's token_sigmoid_binary_focal_loss)."""
    p = jax.nn.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = _bce_with_logits(logits, targets) * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def token_focal_loss(logits_AL, targets_AL, text_mask_L, alpha: float = 0.25,
                     gamma: float = 2.0):
    """Focal loss summed over anchors and real tokens; padding tokens drop out, as the
    reference's masked_select does. Unnormalised: the caller divides by the positive count."""
    loss_AL = sigmoid_focal_loss(logits_AL, targets_AL, alpha, gamma)
    return jnp.sum(jnp.where(jnp.asarray(text_mask_L, bool)[None, :], loss_AL, 0.0))


def detection_loss(cls_logits_AL, box_deltas_A4, centerness_A, anchors_A4,
                   level_sizes: Sequence[int], gt_M4, gt_valid_M, gt_map_ML, text_mask_L,
                   topk: int = 9, alpha: float = 0.25, gamma: float = 2.0) -> dict:
    """One image's ATSS loss sums and counts; vmap over images, then `normalize_losses`.

    token: focal loss of the token logits against the matched gt's binary positive map
    (background anchors target only the last position, the reference's "no object" slot,
    which the text mask hides unless the prompt fills every position); giou: (1 - GIoU) of
    positives weighted by their centerness targets; centerness: BCE of the centerness logits
    on positives. level_sizes must be static (close over it before jit/vmap).
    """
    # float32 whatever the model's dtype, as the reference's custom_fwd(cast_inputs=float32)
    cls_logits_AL, box_deltas_A4, centerness_A, anchors_A4 = (
        jnp.asarray(x, jnp.float32) for x in (cls_logits_AL, box_deltas_A4, centerness_A,
                                             anchors_A4))
    n_tokens = cls_logits_AL.shape[-1]
    if gt_M4.shape[0] == 0:  # nothing to match: one padding row keeps the gathers shaped
        gt_M4, gt_valid_M = jnp.zeros((1, 4)), jnp.zeros((1,), bool)
        gt_map_ML = jnp.zeros((1, n_tokens))
    if gt_map_ML.shape[-1] != n_tokens:
        raise ValueError(f"gt_map has {gt_map_ML.shape[-1]} token positions but the logits "
                         f"have {n_tokens}; build the positive map at the text length.")
    matched_A = atss_assign(anchors_A4, level_sizes, jax.lax.stop_gradient(gt_M4),
                            gt_valid_M, topk)
    pos_A = matched_A >= 0
    idx_A = jnp.maximum(matched_A, 0)
    no_object_L = jnp.zeros((n_tokens,)).at[-1].set(1.0)
    tgt_AL = jnp.where(pos_A[:, None], (gt_map_ML[idx_A] > 0).astype(jnp.float32),
                       no_object_L[None])
    token = token_focal_loss(cls_logits_AL, tgt_AL, text_mask_L, alpha, gamma)
    # Negatives regress onto their own anchor, so every branch stays finite under jit.
    gt_A4 = jax.lax.stop_gradient(jnp.where(pos_A[:, None], gt_M4[idx_A], anchors_A4))
    ctr_A = jnp.where(pos_A, centerness_targets(anchors_A4, gt_A4), 0.0)
    target_A4 = decode(anchors_A4, encode(anchors_A4, gt_A4))
    pred_A4 = decode(anchors_A4, box_deltas_A4)
    posf = pos_A.astype(jnp.float32)
    return {
        "token": token,
        "giou": jnp.sum(giou_loss(pred_A4, target_A4) * ctr_A),
        "centerness": jnp.sum(posf * _bce_with_logits(centerness_A, ctr_A)),
        "num_pos": jnp.sum(posf),
        "centerness_weight": jnp.sum(ctr_A),
    }


def normalize_losses(terms: dict, reg_weight: float = REG_WEIGHT) -> dict:
    """Global-batch losses from detection_loss terms (summed over every leading axis).

    The reference divides each GPU's sums by max(total positives / #GPUs, 1) and the GIoU sum
    by the all-reduced centerness-target sum / #GPUs, then averages gradients over GPUs; on
    JAX's global view that is the global sum over the global positive count (max 1) and over
    the global centerness-target sum, with no per-device bookkeeping.
    """
    s = {k: jnp.sum(v) for k, v in terms.items()}
    num_pos = jnp.maximum(s["num_pos"], 1.0)
    weight = jnp.where(s["centerness_weight"] > 0, s["centerness_weight"], 1.0)
    return {"token": s["token"] / num_pos, "giou": reg_weight * s["giou"] / weight,
            "centerness": s["centerness"] / num_pos}


# ---- host side: NMS and postprocessing -------------------------------------------------

def nms(boxes_N4, scores_N, iou_threshold: float, offset: float = 0.0) -> np.ndarray:
    """Greedy NMS: kept indices by descending score; a box goes when IoU >= threshold with a
    kept one (offset=PIXEL is maskrcnn_benchmark's nms)."""
    boxes_N4 = np.asarray(boxes_N4, np.float64)
    order = np.argsort(-np.asarray(scores_N), kind="stable")
    b = boxes_N4[order]
    area = box_area(b, offset)
    alive = np.ones(len(b), bool)
    keep = []
    for i in range(len(b)):
        if not alive[i]:
            continue
        keep.append(i)
        rest = b[i + 1:]
        w = np.clip(np.minimum(b[i, 2], rest[:, 2]) - np.maximum(b[i, 0], rest[:, 0]) + offset,
                    0, None)
        h = np.clip(np.minimum(b[i, 3], rest[:, 3]) - np.maximum(b[i, 1], rest[:, 1]) + offset,
                    0, None)
        inter = w * h
        with np.errstate(divide="ignore", invalid="ignore"):
            alive[i + 1:] &= ~(inter / (area[i] + area[i + 1:] - inter) >= iou_threshold)
    return order[np.asarray(keep, np.int64)]


def batched_nms(boxes_N4, scores_N, labels_N, iou_threshold: float,
                offset: float = 0.0) -> np.ndarray:
    """NMS within each label (boxlist_ml_nms); kept indices by descending score."""
    scores_N, labels_N = np.asarray(scores_N), np.asarray(labels_N)
    keep = [np.flatnonzero(labels_N == c)[nms(np.asarray(boxes_N4)[labels_N == c],
                                              scores_N[labels_N == c], iou_threshold, offset)]
            for c in np.unique(labels_N)]
    keep = np.concatenate(keep) if keep else np.zeros((0,), np.int64)
    return keep[np.argsort(-scores_N[keep], kind="stable")]


def postprocess(scores_AC, box_deltas_A4, centerness_A, anchors_A4, level_sizes: Sequence[int],
                pre_nms_thresh: float = 0.05, pre_nms_top_n: int = 1000, nms: float = 0.6,
                max_detections: int = 100, image_size: tuple[int, int] | None = None):
    """One image's detections as ATSSPostProcessor: (boxes [n, 4] xyxy, scores [n], labels [n]).

    scores_AC are class probabilities (GLIP: the mean token sigmoid of each class's span),
    centerness_A logits. Per level, (anchor, class) pairs scoring > pre_nms_thresh, at most
    pre_nms_top_n by score x centerness; score sqrt(score x centerness); boxes clipped to
    image_size (height, width) when given; NMS per class; then the max_detections best (ties
    at the cut kept, as the reference's kthvalue). Labels index the columns of scores_AC.
    """
    scores_AC = np.asarray(scores_AC, np.float32)
    deltas_A4 = np.asarray(box_deltas_A4, np.float32)
    anchors_A4 = np.asarray(anchors_A4, np.float32)
    ctr_A = 1.0 / (1.0 + np.exp(-np.asarray(centerness_A, np.float32)))
    boxes, scores, labels, start = [], [], [], 0
    for n in level_sizes:
        loc, cls = np.nonzero(scores_AC[start:start + n] > pre_nms_thresh)
        joint = scores_AC[start + loc, cls] * ctr_A[start + loc]
        top = np.argsort(-joint, kind="stable")[:pre_nms_top_n]
        loc, cls = loc[top] + start, cls[top]
        boxes.append(decode(anchors_A4[loc], deltas_A4[loc]))
        scores.append(np.sqrt(joint[top]))
        labels.append(cls)
        start += n
    boxes_N4 = np.concatenate(boxes).reshape(-1, 4)
    scores_N, labels_N = np.concatenate(scores), np.concatenate(labels).astype(np.int64)
    if image_size is not None:
        height, width = image_size
        boxes_N4[:, 0::2] = np.clip(boxes_N4[:, 0::2], 0, width - PIXEL)
        boxes_N4[:, 1::2] = np.clip(boxes_N4[:, 1::2], 0, height - PIXEL)
    keep = batched_nms(boxes_N4, scores_N, labels_N, nms, offset=PIXEL)
    if len(keep) > max_detections > 0:
        keep = keep[scores_N[keep] >= scores_N[keep][max_detections - 1]]
    return boxes_N4[keep], scores_N[keep], labels_N[keep]
