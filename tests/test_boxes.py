"""GLIP's box machinery against NumPy transcriptions of microsoft/GLIP (maskrcnn_benchmark):
anchors, the VLDyHead box coder, ATSS assignment, centerness, GIoU, the token focal loss,
the whole per-image loss, NMS against brute force, and the ATSS postprocessor."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipjax.heads import boxes

# ---- NumPy transcriptions of the reference (float64) -----------------------------------


def ref_anchors(image_size, strides, sizes):
    """generate_anchors (ratio 1, one scale) + AnchorGenerator.grid_anchors."""
    out = []
    for stride, size in zip(strides, sizes):
        base = np.array([1, 1, stride, stride], float) - 1
        w, h = base[2] - base[0] + 1, base[3] - base[1] + 1
        xc, yc = base[0] + 0.5 * (w - 1), base[1] + 0.5 * (h - 1)
        ws = np.round(np.sqrt(w * h / 1.0))
        hs = np.round(ws * 1.0)
        base = np.array([xc - 0.5 * (ws - 1), yc - 0.5 * (hs - 1),
                         xc + 0.5 * (ws - 1), yc + 0.5 * (hs - 1)])
        w, h = base[2] - base[0] + 1, base[3] - base[1] + 1
        xc, yc = base[0] + 0.5 * (w - 1), base[1] + 0.5 * (h - 1)
        ws, hs = w * (size / stride), h * (size / stride)
        cell = np.array([xc - 0.5 * (ws - 1), yc - 0.5 * (hs - 1),
                         xc + 0.5 * (ws - 1), yc + 0.5 * (hs - 1)])
        gh, gw = int(np.ceil(image_size[0] / stride)), int(np.ceil(image_size[1] / stride))
        sy, sx = np.meshgrid(np.arange(0, gh * stride, stride, dtype=float),
                             np.arange(0, gw * stride, stride, dtype=float), indexing="ij")
        shifts = np.stack([sx.ravel(), sy.ravel(), sx.ravel(), sy.ravel()], 1)
        out.append(shifts + cell[None])
    return out


def ref_encode(gt, an):
    ew, eh = an[:, 2] - an[:, 0] + 1, an[:, 3] - an[:, 1] + 1
    ex, ey = (an[:, 2] + an[:, 0]) / 2, (an[:, 3] + an[:, 1]) / 2
    gw, gh = gt[:, 2] - gt[:, 0] + 1, gt[:, 3] - gt[:, 1] + 1
    gx, gy = (gt[:, 2] + gt[:, 0]) / 2, (gt[:, 3] + gt[:, 1]) / 2
    return np.stack([10 * (gx - ex) / ew, 10 * (gy - ey) / eh,
                     5 * np.log(gw / ew), 5 * np.log(gh / eh)], 1)


def ref_decode(preds, an):
    w, h = an[:, 2] - an[:, 0] + 1, an[:, 3] - an[:, 1] + 1
    cx, cy = (an[:, 2] + an[:, 0]) / 2, (an[:, 3] + an[:, 1]) / 2
    dx, dy = preds[:, 0] / 10, preds[:, 1] / 10
    dw = np.minimum(preds[:, 2] / 5, np.log(1000.0 / 16))
    dh = np.minimum(preds[:, 3] / 5, np.log(1000.0 / 16))
    px, py, pw, ph = dx * w + cx, dy * h + cy, np.exp(dw) * w, np.exp(dh) * h
    return np.stack([px - 0.5 * (pw - 1), py - 0.5 * (ph - 1),
                     px + 0.5 * (pw - 1), py + 0.5 * (ph - 1)], 1)


def ref_iou(b1, b2, to_remove=1):
    """boxlist_iou (to_remove=0: continuous boxes, only to show the tests would notice)."""
    area = lambda b: (b[:, 2] - b[:, 0] + to_remove) * (b[:, 3] - b[:, 1] + to_remove)
    lt = np.maximum(b1[:, None, :2], b2[:, :2])
    rb = np.minimum(b1[:, None, 2:], b2[:, 2:])
    wh = np.clip(rb - lt + to_remove, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area(b1)[:, None] + area(b2) - inter)


def ref_atss(levels, gt, topk=9, ddof=1, to_remove=1):
    """ATSSLossComputation.prepare_targets for one image: (gt index or -1, positive [A, G]).
    torch.topk leaves distance ties unordered; here (as in lax.top_k) the lower index wins.
    ddof and to_remove other than the reference's only show that a test would notice."""
    an = np.concatenate(levels)
    n_a, n_g = len(an), len(gt)
    ious = ref_iou(an, gt, to_remove)
    gpts = np.stack([(gt[:, 2] + gt[:, 0]) / 2, (gt[:, 3] + gt[:, 1]) / 2], 1)
    acx, acy = (an[:, 2] + an[:, 0]) / 2, (an[:, 3] + an[:, 1]) / 2
    dist = np.sqrt(((np.stack([acx, acy], 1)[:, None] - gpts[None]) ** 2).sum(-1))
    cand, start = [], 0
    for lv in levels:
        d = dist[start:start + len(lv)]
        k = min(topk, len(lv))
        cand.append(np.argsort(d, axis=0, kind="stable")[:k] + start)
        start += len(lv)
    cand = np.concatenate(cand, 0)  # [K, G]
    cious = ious[cand, np.arange(n_g)]
    is_pos = cious >= (cious.mean(0) + cious.std(0, ddof=ddof))[None]
    flat = cand + np.arange(n_g)[None] * n_a
    ecx, ecy = np.tile(acx, n_g), np.tile(acy, n_g)
    ltrb = np.stack([ecx[flat] - gt[:, 0], ecy[flat] - gt[:, 1],
                     gt[:, 2] - ecx[flat], gt[:, 3] - ecy[flat]], 1)
    is_pos &= ltrb.min(1) > 0.01
    ious_inf = np.full(n_g * n_a, -1e8)
    index = flat.reshape(-1)[is_pos.reshape(-1)]
    ious_inf[index] = ious.T.reshape(-1)[index]
    ious_inf = ious_inf.reshape(n_g, n_a).T
    matched = ious_inf.argmax(1)
    matched[ious_inf.max(1) == -1e8] = -1
    return matched, ious_inf > -1e8


def ref_centerness(reg_targets, an):
    g = ref_decode(reg_targets, an)
    cx, cy = (an[:, 2] + an[:, 0]) / 2, (an[:, 3] + an[:, 1]) / 2
    lr = np.stack([cx - g[:, 0], g[:, 2] - cx], 1)
    tb = np.stack([cy - g[:, 1], g[:, 3] - cy], 1)
    return np.sqrt(lr.min(1) / lr.max(1) * (tb.min(1) / tb.max(1)))


def ref_giou_losses(pred, target, an):
    """GIoULoss per box, before the weighted sum."""
    p, t = ref_decode(pred, an), ref_decode(target, an)
    px2, py2 = np.maximum(p[:, 0], p[:, 2]), np.maximum(p[:, 1], p[:, 3])
    parea = (px2 - p[:, 0]) * (py2 - p[:, 1])
    tarea = (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])
    x1, y1 = np.maximum(p[:, 0], t[:, 0]), np.maximum(p[:, 1], t[:, 1])
    x2, y2 = np.minimum(px2, t[:, 2]), np.minimum(py2, t[:, 3])
    inter = np.where((y2 > y1) & (x2 > x1), (x2 - x1) * (y2 - y1), 0.0)
    enc = (np.maximum(px2, t[:, 2]) - np.minimum(p[:, 0], t[:, 0])) * (
        np.maximum(py2, t[:, 3]) - np.minimum(p[:, 1], t[:, 1])) + 1e-7
    union = parea + tarea - inter + 1e-7
    return 1 - (inter / union - (enc - union) / enc)


def ref_token_focal(logits, targets, text_mask, alpha=0.25, gamma=2.0):
    """token_sigmoid_binary_focal_loss(...).sum() for one image."""
    sel = np.broadcast_to(text_mask[None] > 0, logits.shape)
    x, t = logits[sel], targets[sel]
    p = 1 / (1 + np.exp(-x))
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    return float(((alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t) ** gamma).sum())


def ref_image_loss(logits, deltas, ctr, levels, gt, gmap, text_mask):
    """One image of ATSSLossComputation.__call__ (dot-product token loss), as sums."""
    an = np.concatenate(levels)
    matched, _ = ref_atss(levels, gt) if len(gt) else (np.full(len(an), -1), None)
    pos = matched >= 0
    tok = np.zeros((len(an), logits.shape[1]))
    tok[pos] = gmap[matched[pos]]
    tok[~pos] = 0
    tok[~pos, -1] = 1  # unmatched_labels[-1] = 1
    out = {"token": ref_token_focal(logits, tok, text_mask), "num_pos": float(pos.sum())}
    if pos.any():
        reg = ref_encode(gt[matched[pos]], an[pos])
        ct = ref_centerness(reg, an[pos])
        out["giou"] = float((ref_giou_losses(deltas[pos], reg, an[pos]) * ct).sum())
        s = 1 / (1 + np.exp(-ctr[pos]))
        out["centerness"] = float(-(ct * np.log(s) + (1 - ct) * np.log(1 - s)).sum())
        out["centerness_weight"] = float(ct.sum())
    else:
        out.update(giou=0.0, centerness=0.0, centerness_weight=0.0)
    return out


# ---- shared crafted scene ----------------------------------------------------------------

IMAGE = (96, 128)
STRIDES = (8, 16, 32, 64)  # the last level has 4 locations, fewer than topk
GT_VALID = np.array([[10, 12, 50, 60],    # two overlapping boxes
                     [22, 18, 62, 66],
                     [68, 2, 79, 13],     # a small box
                     [100, 60, 127, 95]], float)  # touching the image corner
PAD = np.array([[0, 0, 0, 0], [90, 90, 20, 20]], float)  # padding, one of it inverted


def _scene():
    """Valid gts interleaved with padding rows: (gt [6, 4], valid [6], valid row indices)."""
    gt = np.stack([GT_VALID[0], PAD[0], GT_VALID[1], GT_VALID[2], PAD[1], GT_VALID[3]])
    valid = np.array([1, 0, 1, 1, 0, 1], bool)
    return gt, valid, np.flatnonzero(valid)


@functools.lru_cache(maxsize=None)
def _assign_fn(level_sizes):
    return jax.jit(functools.partial(boxes.atss_assign, level_sizes=level_sizes))


def test_anchors_match_the_reference_generator_level_by_level():
    a, sizes = boxes.anchors(IMAGE, STRIDES)
    ref = ref_anchors(IMAGE, STRIDES, [8 * s for s in STRIDES])
    assert sizes == tuple(len(r) for r in ref) == (12 * 16, 6 * 8, 3 * 4, 2 * 2)
    np.testing.assert_array_equal(a, np.concatenate(ref).astype(np.float32))
    np.testing.assert_array_equal(a[0], [-28, -28, 35, 35])  # 64 inclusive pixels, centre 3.5
    np.testing.assert_array_equal(a[1] - a[0], [8, 0, 8, 0])  # x runs fastest
    np.testing.assert_array_equal(a[16] - a[0], [0, 8, 0, 8])
    # a size that does not divide: ceil, as the FPN's stride-2 convolutions give
    assert boxes.anchors((100, 70), (8, 16))[1] == (13 * 9, 7 * 5)


def test_box_coder_matches_reference_and_round_trips():
    rng = np.random.default_rng(0)
    an = boxes.anchors((64, 64), (8, 16))[0].astype(np.float64)
    xy = rng.uniform(0, 60, (len(an), 2))
    gt = np.concatenate([xy, xy + rng.uniform(1, 90, (len(an), 2))], 1)
    want = ref_encode(gt, an)
    np.testing.assert_allclose(boxes.encode(an, gt), want, rtol=1e-9)  # NumPy path (eval)
    np.testing.assert_allclose(jax.jit(boxes.encode)(an, gt), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(boxes.decode(an, boxes.encode(an, gt)), gt, atol=1e-9)
    deltas = rng.normal(0, 3, (len(an), 4))
    deltas[:5, 2:] = 40.0  # beyond the clip: exp(log(1000/16)) = 62.5 x the anchor
    got = np.asarray(jax.jit(boxes.decode)(jnp.asarray(an, jnp.float32),
                                           jnp.asarray(deltas, jnp.float32)))
    np.testing.assert_allclose(got, ref_decode(deltas, an), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(got[:5, 2] - got[:5, 0] + 1, 62.5 * 64, rtol=1e-5)


def test_atss_assignment_matches_reference_on_the_crafted_scene():
    a, sizes = boxes.anchors(IMAGE, STRIDES)
    gt, valid, rows = _scene()
    got = np.asarray(_assign_fn(sizes)(a, gt_M4=gt, gt_valid_M=valid))
    levels = np.split(a.astype(np.float64), np.cumsum(sizes)[:-1])
    want, pos_AG = ref_atss(levels, GT_VALID)
    np.testing.assert_array_equal(got, np.where(want >= 0, rows[np.maximum(want, 0)], -1))
    # the scene exercises what it is meant to: every gt gets anchors (the small one too),
    # some anchor is positive for both overlapping boxes, and padding never matches
    assert all((want == g).any() for g in range(len(GT_VALID)))
    assert (pos_AG[:, 0] & pos_AG[:, 1]).any()
    assert not np.isin(got, np.flatnonzero(~valid)).any()


@pytest.mark.parametrize("seed", range(6))
def test_atss_assignment_matches_reference_on_random_scenes(seed):
    rng = np.random.default_rng(seed)
    a, sizes = boxes.anchors(IMAGE, STRIDES)
    xy = rng.uniform(0, 90, (6, 2))
    gt = np.concatenate([xy, xy + rng.uniform(3, 60, (6, 2))], 1)
    valid = rng.random(6) < 0.7
    valid[0] = True
    got = np.asarray(_assign_fn(sizes)(a, gt_M4=gt, gt_valid_M=valid))
    levels = np.split(a.astype(np.float64), np.cumsum(sizes)[:-1])
    want, _ = ref_atss(levels, gt[valid])
    rows = np.flatnonzero(valid)
    np.testing.assert_array_equal(got, np.where(want >= 0, rows[np.maximum(want, 0)], -1))
    assert (got >= 0).any()


def test_atss_follows_the_reference_details_a_near_miss_would_change():
    """Two gts (among padding) where torch's unbiased std and boxlist_iou's +1 each decide an
    anchor: the population std or continuous IoU would assign differently."""
    a, sizes = boxes.anchors(IMAGE, STRIDES)
    levels = np.split(a.astype(np.float64), np.cumsum(sizes)[:-1])
    gt = np.array([[0, 2, 56, 61], [55, 3, 114, 59]], float)
    want, _ = ref_atss(levels, gt)
    assert (want != ref_atss(levels, gt, ddof=0)[0]).any()
    assert (want != ref_atss(levels, gt, to_remove=0)[0]).any()
    padded = np.concatenate([PAD, gt[:1], PAD, gt[1:]])
    got = np.asarray(_assign_fn(sizes)(a, gt_M4=padded,
                                       gt_valid_M=np.array([0, 0, 1, 0, 0, 1], bool)))
    np.testing.assert_array_equal(got, np.where(want >= 0, np.array([2, 5])[np.maximum(want, 0)],
                                                -1))


def test_atss_with_no_gts_is_all_background():
    a, sizes = boxes.anchors(IMAGE, STRIDES)
    gt, _, _ = _scene()
    assert (np.asarray(_assign_fn(sizes)(a, gt_M4=gt, gt_valid_M=np.zeros(6, bool))) == -1).all()
    none = boxes.atss_assign(a, sizes, np.zeros((0, 4)), np.zeros(0, bool))
    assert (np.asarray(none) == -1).all()
    with pytest.raises(ValueError, match="level_sizes"):
        boxes.atss_assign(a, sizes[:-1], gt, np.ones(6, bool))


def test_centerness_and_giou_match_reference():
    rng = np.random.default_rng(1)
    a, sizes = boxes.anchors(IMAGE, STRIDES)
    levels = np.split(a.astype(np.float64), np.cumsum(sizes)[:-1])
    matched, _ = ref_atss(levels, GT_VALID)
    pos = matched >= 0
    an, g = a[pos].astype(np.float64), GT_VALID[matched[pos]]
    reg = ref_encode(g, an)
    # the last row's centre lies outside its box: 0, not NaN
    got = jax.jit(boxes.centerness_targets)(
        jnp.asarray(np.concatenate([an, an[:1]]), jnp.float32),
        jnp.asarray(np.concatenate([g, [[500., 500., 600., 600.]]]), jnp.float32))
    np.testing.assert_allclose(got[:-1], ref_centerness(reg, an), rtol=1e-5, atol=1e-6)
    assert float(got[-1]) == 0.0
    pred = rng.normal(0, 2, reg.shape)
    pred[:3, 2] = -30.0  # near-empty predictions
    pred[3:5, 0] = 40.0  # far off the target: GIoU < 0
    loss = jax.jit(lambda an, p, t: boxes.giou_loss(boxes.decode(an, p), boxes.decode(an, t)))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    want = ref_giou_losses(pred, reg, an)
    assert want.max() > 1.0
    np.testing.assert_allclose(loss(f32(an), f32(pred), f32(reg)), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loss(f32(an), f32(reg), f32(reg)), 0.0, atol=1e-6)


def test_focal_losses_match_reference():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (7, 6))
    targets = (rng.random((7, 6)) < 0.3).astype(float)
    mask = np.array([1, 1, 1, 1, 0, 0])
    p = 1 / (1 + np.exp(-logits))
    ce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    p_t = np.where(targets > 0, p, 1 - p)
    want = np.where(targets > 0, 0.25, 0.75) * ce * (1 - p_t) ** 2
    focal, token, bce = jax.jit(lambda x, t, m: (
        boxes.sigmoid_focal_loss(x, t), boxes.token_focal_loss(x, t, m),
        boxes.sigmoid_focal_loss(x, t, alpha=-1, gamma=0)))(
            jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(focal, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(token), ref_token_focal(logits, targets, mask), rtol=1e-5)
    assert ref_token_focal(logits, targets, mask) < want.sum()  # the mask removed something
    np.testing.assert_allclose(bce, ce, rtol=1e-5, atol=1e-7)  # gamma 0, no alpha: plain BCE


def test_detection_loss_matches_reference_vmapped_with_an_empty_image_and_finite_grads():
    rng = np.random.default_rng(3)
    a, sizes = boxes.anchors(IMAGE, STRIDES)
    n_a, n_tok = len(a), 8
    gt, valid, rows = _scene()
    gmap = np.zeros((6, n_tok))
    gmap[0, 1:3] = 1
    gmap[2, 3] = 1
    gmap[3, 4:6] = 0.5  # a normalised map: the loss binarises it
    gmap[5, 1:3] = 1
    masks = np.array([[1] * n_tok, [1] * 6 + [0] * 2])  # full prompt, padded prompt
    batch = dict(logits=rng.normal(-2, 2, (2, n_a, n_tok)), deltas=rng.normal(0, 1, (2, n_a, 4)),
                 ctr=rng.normal(0, 1, (2, n_a)), gt=np.stack([gt, gt]),
                 valid=np.stack([valid, np.zeros(6, bool)]), gmap=np.stack([gmap, gmap]),
                 mask=masks)
    batch = {k: jnp.asarray(v, jnp.float32 if v.dtype != bool else bool) for k, v in batch.items()}

    def per_image(lg, dl, ct, g, v, m, tm):
        return boxes.detection_loss(lg, dl, ct, a, sizes, g, v, m, tm)

    def total(lg, dl, ct):
        terms = jax.vmap(per_image)(lg, dl, ct, batch["gt"], batch["valid"], batch["gmap"],
                                    batch["mask"])
        return sum(boxes.normalize_losses(terms).values()), terms

    (loss, terms), grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True))(
        batch["logits"], batch["deltas"], batch["ctr"])
    levels = np.split(a.astype(np.float64), np.cumsum(sizes)[:-1])
    np64 = {k: np.asarray(v, np.float64) for k, v in batch.items()}
    refs = [ref_image_loss(np64["logits"][0], np64["deltas"][0], np64["ctr"][0], levels,
                           GT_VALID, (gmap[rows] > 0).astype(float), masks[0]),
            ref_image_loss(np64["logits"][1], np64["deltas"][1], np64["ctr"][1], levels,
                           np.zeros((0, 4)), np.zeros((0, n_tok)), masks[1])]
    for i, ref in enumerate(refs):
        for k, v in ref.items():
            np.testing.assert_allclose(float(terms[k][i]), v, rtol=2e-5, atol=1e-5, err_msg=k)
    assert refs[0]["num_pos"] > 0 and refs[1]["num_pos"] == 0
    # the reference's normalisation on one GPU: token and centerness over max(#pos, 1), GIoU x 2
    # over the centerness-target sum
    n_pos = max(refs[0]["num_pos"], 1.0)
    want = (sum(r["token"] for r in refs) / n_pos + refs[0]["centerness"] / n_pos
            + 2 * refs[0]["giou"] / refs[0]["centerness_weight"])
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    assert np.abs(np.asarray(grads[1][1])).max() == 0  # no positives: no box gradient
    assert np.abs(np.asarray(grads[1][0])).max() > 0


def _brute_nms(b, s, thr, offset):
    """Every box in descending score is kept unless a kept box overlaps it >= thr."""
    area = (b[:, 2] - b[:, 0] + offset) * (b[:, 3] - b[:, 1] + offset)
    w = np.clip(np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0])
                + offset, 0, None)
    h = np.clip(np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1])
                + offset, 0, None)
    iou = w * h / (area[:, None] + area[None] - w * h)
    kept = []
    for i in sorted(range(len(b)), key=lambda i: -s[i]):
        if all(iou[i, j] < thr for j in kept):
            kept.append(i)
    return np.array(kept, np.int64)


@pytest.mark.parametrize("seed", range(40))
def test_nms_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    xy = rng.uniform(0, 60, (n, 2))
    b = np.concatenate([xy, xy + rng.uniform(2, 40, (n, 2))], 1)
    s = rng.random(n)
    thr = float(rng.choice([0.3, 0.5, 0.6, 0.7]))
    offset = float(seed % 2)
    kept = boxes.nms(b, s, thr, offset)
    np.testing.assert_array_equal(kept, _brute_nms(b, s, thr, offset))
    labels = rng.integers(0, 3, n)
    want = np.concatenate([np.flatnonzero(labels == c)[_brute_nms(b[labels == c], s[labels == c],
                                                                  thr, offset)]
                           for c in np.unique(labels)])
    got = boxes.batched_nms(b, s, labels, thr, offset)
    np.testing.assert_array_equal(got, want[np.argsort(-s[want])])
    if seed == 0:
        assert len(kept) < n  # the boxes are dense enough for suppression to happen


def test_postprocess_on_a_crafted_case():
    a, sizes = boxes.anchors((64, 64), (8, 16))  # 64 + 16 anchors, 3 classes
    scores = np.zeros((80, 3), np.float32)
    ctr = np.zeros(80, np.float32)
    scores[9, 0] = 0.9      # kept
    scores[10, 0] = 0.8     # its neighbour (IoU 0.78): suppressed, same class
    scores[10, 1] = 0.7     # other class: kept
    scores[64 + 5, 2] = 0.04  # below pre_nms_thresh, however sure its centerness
    ctr[64 + 5] = 10.0
    scores[64 + 6, 2] = 0.5
    ctr[64 + 6] = -2.0
    sig = lambda x: 1 / (1 + np.exp(-x))
    deltas = np.zeros((80, 4), np.float32)
    bx, sc, lb = boxes.postprocess(scores, deltas, ctr, a, sizes, image_size=(64, 64))
    np.testing.assert_array_equal(lb, [0, 1, 2])
    np.testing.assert_allclose(sc, np.sqrt([0.9 * 0.5, 0.7 * 0.5, 0.5 * sig(-2.0)]), rtol=1e-6)
    np.testing.assert_allclose(bx, np.clip(a[[9, 10, 64 + 6]], 0, 63))
    assert bx.min() == 0 and bx.max() == 63
    # anchor 11, two columns right of 9, overlaps it with IoU exactly 0.6 in inclusive pixels
    # (48 x 64 / (2 x 64 x 64 - 48 x 64)): suppressed, as maskrcnn_benchmark's nms (>=, +1)
    scores[11, 0] = 0.6
    _, sc0, lb0 = boxes.postprocess(scores, deltas, ctr, a, sizes)
    np.testing.assert_array_equal(lb0, [0, 1, 2])
    scores[11, 0] = 0.0
    # per-level candidate cap, then the detection cap
    _, sc1, lb1 = boxes.postprocess(scores, deltas, ctr, a, sizes, pre_nms_top_n=1)
    np.testing.assert_array_equal(lb1, [0, 2])
    _, sc2, lb2 = boxes.postprocess(scores, deltas, ctr, a, sizes, max_detections=2)
    np.testing.assert_array_equal(lb2, [0, 1])
    # deltas move the boxes through the coder
    deltas[9] = [1.0, -1.0, 0.5, 0.0]
    bx3, _, _ = boxes.postprocess(scores, deltas, ctr, a, sizes)
    want = ref_decode(deltas[9:10].astype(float), a[9:10].astype(float))[0]
    np.testing.assert_allclose(bx3[0], want, rtol=1e-5)
