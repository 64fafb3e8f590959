"""Video evaluation: text <-> video retrieval (CLIP4Clip) and action recognition (ActionCLIP).

Heads differ in how a video meets a text: meanP and seqTransf embed a video to one vector,
tightTransf scores every text x video pair through a cross model. So a head hands the
evaluators three jitted functions (`VideoEncoders`): `encode_video` and `encode_text` give
pytrees of per-row arrays, and `similarity(params, txt, vid) -> [Q, V]` scores a block of
texts against a block of videos. Texts are encoded once and kept on every device; each
batch of videos is encoded once and scored at once against every block of texts, so
neither the video features nor a rows x texts score table for multi-view testing is ever
held whole: only per-video sums are (Q x V for retrieval, V x C for actions).

Ranks are 1-based and count ties once, against the query: a query's rank is 1 + the
number of other candidates scoring at least as high as its target, so a target tied with
another candidate is not a hit at R@1, and a collapsed model that scores every candidate
alike ranks last rather than first. CLIP4Clip's metrics.py (`np.where(sorted - diag ==
0)`) instead adds one entry per tied candidate, which over-counts ties
(ArrowLuo/CLIP4Clip#80). Scores that are NaN count as -inf.

Recall@K and top-k accuracy are fractions, as the image evaluators report them;
MdR and MnR are the median and mean of the 1-based ranks (np.median: the middle two
averaged for an even count, as CLIP4Clip's compute_metrics).
"""

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from clipjax import sharding
from clipjax.evals.encoders import _any_host, _chunks, _gather, host_share
from clipjax.evals.prompts import ClassName, display_name
from clipjax.evals.retrieval import flatten_captions
from clipjax.evals.zeroshot import true_class_rank
from clipjax.tokenizer import tokenize

Params = Any
KS = (1, 5, 10)
_VIDEO_KEYS = ("video", "frame_mask")
_KEEP = ("index", "label")  # the batch entries gathered alongside each row


@dataclasses.dataclass(frozen=True)
class VideoEncoders:
    """What a video evaluator needs from a head: jitted encoders, a pairwise scorer, sizes.

    encode_video(params, {"video": uint8 [B,T,S,S,3], "frame_mask": bool [B,T]}) and
    encode_text(params, tokens_BL) return pytrees of [B, ...] arrays;
    similarity(params, txt (pytree of [Q, ...]), vid (pytree of [V, ...])) -> logits [Q, V]
    at the scale the head's loss and the paper's test use (ActionCLIP: 100 * cos).
    """

    encode_video: Callable[[Params, dict], Any]
    encode_text: Callable[[Params, jax.Array], Any]
    similarity: Callable[[Params, Any, Any], jax.Array]
    num_frames: int
    image_size: int
    context_length: int
    mesh: Mesh
    batch_size: int = 64  # global rows per call; a multiple of the mesh's batch shards


class VideoSet(Protocol):
    """A video evaluation set. `batches(b)` is a fresh, finite pass over host-local
    {"video" uint8 [b,T,S,S,3], "frame_mask" bool [b,T], "index" int [b], "label" int [b]
    where labelled}; several rows with one index are views (clips x crops) of one video."""

    num_videos: int
    classnames: Sequence[ClassName] | None

    def captions(self) -> list[list[str]] | None: ...

    def batches(self, batch_size: int) -> Iterable[Mapping[str, np.ndarray]]: ...


# ---------------------------------------------------------------- metrics (pure NumPy)

def _scores(sim: np.ndarray) -> np.ndarray:
    sim = np.asarray(sim)
    return np.where(np.isnan(sim), -np.inf, sim)


def ranks(sim_QC: np.ndarray, target_Q: np.ndarray) -> np.ndarray:
    """1-based rank of each query's target: 1 + how many other candidates score as high."""
    s_QC = _scores(sim_QC)
    target_Q = np.asarray(target_Q, np.int64)
    s_true = s_QC[np.arange(len(s_QC)), target_Q]
    return (s_QC >= s_true[:, None]).sum(1)  # the target itself is the 1


def ranks_multi(sim_QC: np.ndarray, positives_QC: np.ndarray) -> np.ndarray:
    """1-based rank of each query's best-scoring positive: 1 + how many non-positive
    candidates score as high (ties counted once, as `ranks`)."""
    s_QC, pos_QC = _scores(sim_QC), np.asarray(positives_QC, bool)
    if missing := int((~pos_QC.any(1)).sum()):
        raise ValueError(f"{missing} of {len(pos_QC)} queries have no positive candidate; "
                         "every query needs at least one.")
    best = np.where(pos_QC, s_QC, -np.inf).max(1)
    return 1 + ((s_QC >= best[:, None]) & ~pos_QC).sum(1)


def _rank_metrics(rank_Q: np.ndarray, name: str, ks: Sequence[int] = KS) -> dict[str, float]:
    out = {f"{name}_R@{k}": float((rank_Q <= k).mean()) for k in ks}
    out[f"{name}_MdR"] = float(np.median(rank_Q))
    out[f"{name}_MnR"] = float(np.mean(rank_Q))
    return out


def retrieval_metrics(sim_TV: np.ndarray, video_of_T: np.ndarray,
                      prefix: str = "video_retrieval", v2t: str = "videos") -> dict[str, float]:
    """t2v and v2t R@1/5/10 (fractions), MdR and MnR from caption x video scores.

    t2v: each caption is a query against every video. v2t: each video is a query;
    "videos" (CLIP4Clip's multi-sentence protocol, MSVD) collapses each video's captions
    into one candidate scored by its best caption and ranks the video's own among the V;
    "captions" (COCO style) ranks the video's best caption among all T captions. With one
    caption per video (MSR-VTT 1k-A) both are the plain transpose.
    """
    s_TV = _scores(sim_TV)
    video_of_T = np.asarray(video_of_T, np.int64)
    t, v = s_TV.shape
    if len(video_of_T) != t:
        raise ValueError(f"{t} caption rows but {len(video_of_T)} caption-to-video indices; "
                         "give one video index per caption.")
    if t and (video_of_T.min() < 0 or video_of_T.max() >= v):
        raise ValueError(f"Caption video indices must lie in [0, {v}); some lie outside, so "
                         "captions and videos do not line up.")
    if missing := v - len(np.unique(video_of_T)):
        raise ValueError(f"{missing} of {v} videos have no caption; every video needs at least "
                         "one for video-to-text recall.")
    if v2t == "videos":
        best_VV = np.full((v, v), -np.inf)  # [captions' video, scored video]
        np.maximum.at(best_VV, video_of_T, s_TV)
        v2t_V = ranks(best_VV.T, np.arange(v))
    elif v2t == "captions":
        v2t_V = ranks_multi(s_TV.T, video_of_T[None, :] == np.arange(v)[:, None])
    else:
        raise ValueError(f"v2t={v2t!r}: use 'videos' (CLIP4Clip, MSVD) or 'captions'.")
    out = _rank_metrics(ranks(s_TV, video_of_T), "t2v")
    out.update(_rank_metrics(v2t_V, "v2t"))
    return {f"{prefix}/{k}": val for k, val in out.items()}


def action_scores(logits_VKC: np.ndarray) -> np.ndarray:
    """probs_VC: a softmax over classes under each of the K templates, then their mean
    (ActionCLIP's test.py)."""
    x = np.asarray(logits_VKC, np.float64)
    x = np.exp(x - x.max(-1, keepdims=True))
    return (x / x.sum(-1, keepdims=True)).mean(1)


def _add_views(sums_N, counts_N, scores_R, index_R) -> None:
    np.add.at(sums_N, index_R, scores_R)
    np.add.at(counts_N, index_R, 1)


def _view_means(sums_N, counts_N) -> tuple[np.ndarray, np.ndarray]:
    index_V = np.flatnonzero(counts_N)
    counts = counts_N[index_V].reshape(-1, *[1] * (sums_N.ndim - 1))
    return sums_N[index_V] / counts, index_V


def average_views(scores_R: np.ndarray, index_R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores_V, index_V): the mean of the rows (views) of each video, by ascending index."""
    scores_R = np.asarray(scores_R)
    index_V, inverse = np.unique(np.asarray(index_R), return_inverse=True)
    sums = np.zeros((len(index_V), *scores_R.shape[1:]), np.float64)
    counts = np.zeros(len(index_V), np.int64)
    _add_views(sums, counts, scores_R, inverse.reshape(-1))
    return _view_means(sums, counts)[0], index_V


def topk_accuracy(scores_VC: np.ndarray, labels_V: np.ndarray,
                  ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy (a fraction) for each k (capped at the class count); equal scores go to
    the lower class index, as with torch.topk in ActionCLIP's test and zero-shot here."""
    scores_VC, labels_V = np.asarray(scores_VC), np.asarray(labels_V, np.int64)
    c = scores_VC.shape[1]
    if labels_V.size and (labels_V.min() < 0 or labels_V.max() >= c):
        raise ValueError(f"Labels run from {labels_V.min()} to {labels_V.max()} but there are "
                         f"{c} classes; the class list and the label space disagree.")
    rank_V = true_class_rank(scores_VC, labels_V)
    n = max(len(rank_V), 1)
    return {k: float((rank_V < min(k, c)).sum() / n) for k in ks}


# ---------------------------------------------------------------- running the encoders

def _place(tree, spec_of: Callable[[int], jax.sharding.Sharding]):
    """Global arrays from host-identical NumPy arrays (works across hosts, unlike device_put)."""
    def one(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, spec_of(a.ndim), lambda i: a[i])
    return jax.tree.map(one, tree)


def _pad_rows(tree, rows: int):
    def one(a):
        return a if len(a) == rows else np.concatenate([a, np.repeat(a[:1], rows - len(a), 0)])
    return jax.tree.map(one, tree)


def _rows(fn: Callable, params: Params, batches: Iterable[Mapping[str, np.ndarray]],
          keys: Sequence[str], mesh: Mesh, batch_size: int,
          check: Callable[[dict], None] | None = None) -> Iterator[tuple[Any, dict]]:
    """(fn(params, batch[keys]) on the device, this batch's other entries gathered to every
    host with a "valid" mask) for each global batch of `batch_size` rows; partial batches
    are padded so `fn` compiles once, and a host that runs out feeds padding until all do."""
    local = batch_size // jax.process_count()
    it = _chunks(({k: b[k] for k in (*keys, *_KEEP) if k in b} for b in batches), local)
    template = None
    while True:
        chunk = next(it, None)
        if not _any_host(chunk is not None):
            return
        if chunk is None:
            chunk = {k: v.copy() for k, v in template.items()}
            chunk["valid"][:] = False
        elif check is not None and template is None:
            check(chunk)
        template = chunk
        chunk = _pad_rows(chunk, local)
        chunk["valid"][template["valid"].size:] = False
        inputs = sharding.shard_batch({k: chunk[k] for k in keys}, mesh)
        rest = {k: _gather(v) for k, v in chunk.items() if k not in keys}
        yield fn(params, inputs), rest


def encode_texts(encoders: VideoEncoders, params: Params, texts: Sequence[str]):
    """encode_text's pytree of [N, ...] NumPy arrays for texts every host holds alike."""
    index = {"i": np.arange(len(texts))}
    batches = ({"tokens": tokenize([texts[i] for i in b["i"]], encoders.context_length)}
               for b in host_share(index, encoders.batch_size))
    outs = [jax.tree.map(lambda a: _gather(a)[rest["valid"]], y)
            for y, rest in _rows(lambda p, x: encoders.encode_text(p, x["tokens"]), params,
                                 batches, ["tokens"], encoders.mesh, encoders.batch_size)]
    if not outs:
        raise ValueError("No texts to encode; give at least one caption or class name.")
    return jax.tree.map(lambda *a: np.concatenate(a), *outs)


def _check_video(encoders: VideoEncoders) -> Callable[[dict], None]:
    want = (encoders.num_frames, encoders.image_size, encoders.image_size, 3)

    def check(chunk: dict) -> None:
        if missing := {*_VIDEO_KEYS, "index"} - set(chunk):
            raise ValueError(f"Video batches lack {sorted(missing)}; a video set yields "
                             "'video', 'frame_mask' and 'index' (and 'label' when labelled).")
        if chunk["video"].shape[1:] != want:
            raise ValueError(f"Videos arrive as [T,H,W,C] = {list(chunk['video'].shape[1:])} "
                             f"but the model takes {list(want)}; read them with "
                             f"num_frames={want[0]} and size={want[1]}.")
    return check


def score_rows(encoders: VideoEncoders, params: Params, video_set: VideoSet, txt,
               text_chunk: int | None = None,
               progress: Callable[[int], None] | None = None) -> Iterator[tuple[np.ndarray, dict]]:
    """(sim_Qb, {"index" [b], "label" [b]}) for each batch of video rows: every video encoded
    once and scored by `similarity` against all texts `txt` (pytree of [Q, ...]), which stay
    on every device in blocks of `text_chunk` rows (default: the batch size)."""
    mesh = encoders.mesh
    q = len(jax.tree.leaves(txt)[0])
    tc = min(text_chunk or encoders.batch_size, q)
    blocks = [_place(_pad_rows(jax.tree.map(lambda a: a[lo:lo + tc], txt), tc),
                     lambda _: sharding.replicated(mesh)) for lo in range(0, q, tc)]

    def fn(p, batch):
        vid = encoders.encode_video(p, batch)
        return [encoders.similarity(p, t, vid) for t in blocks]

    for sims, rest in _rows(fn, params, video_set.batches(encoders.batch_size //
                                                          jax.process_count()),
                            _VIDEO_KEYS, mesh, encoders.batch_size, _check_video(encoders)):
        valid = rest.pop("valid")
        sim_Qb = np.concatenate([_gather(s).astype(np.float32) for s in sims])[:q, valid]
        if progress is not None:
            progress(int(valid.sum()))
        yield sim_Qb, {k: v[valid].astype(np.int64) for k, v in rest.items()}


def _index(extra: dict, num_videos: int) -> np.ndarray:
    index = extra["index"]
    if index.size and (index.min() < 0 or index.max() >= num_videos):
        raise ValueError(f"Video indices run from {index.min()} to {index.max()} but the set "
                         f"has {num_videos} videos; its index must be the row in the set.")
    return index


def retrieval_scores(encoders: VideoEncoders, params: Params, video_set: VideoSet,
                     text_chunk: int | None = None,
                     progress: Callable[[int], None] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(sim_TV, video_of_T): every caption against every video; a video's views (rows with
    one index) are averaged in similarity space, the mean of their scores."""
    captions = video_set.captions()
    if captions is None:
        raise ValueError("This video set has no captions; text-video retrieval needs a "
                         "captioned set (MSR-VTT, MSVD).")
    n = video_set.num_videos
    if len(captions) != n:
        raise ValueError(f"{len(captions)} caption lists for {n} videos; give one per video.")
    texts, video_of_T = flatten_captions(captions)
    txt = encode_texts(encoders, params, texts)
    sums_VT = np.zeros((n, len(texts)), np.float64)
    counts_V = np.zeros(n, np.int64)
    for sim_Tb, extra in score_rows(encoders, params, video_set, txt, text_chunk, progress):
        _add_views(sums_VT, counts_V, sim_Tb.T, _index(extra, n))
    sim_VT, index_V = _view_means(sums_VT, counts_V)
    if len(index_V) != n:
        raise ValueError(f"{len(index_V)} of {n} videos were read; every captioned video "
                         "must be readable for retrieval (check the skipped videos).")
    return sim_VT.T, video_of_T


def score_videos(encoders: VideoEncoders, params: Params, video_set: VideoSet,
                 classnames: Sequence[ClassName], templates: Sequence[str],
                 text_chunk: int | None = None,
                 progress: Callable[[int], None] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(probs_VC, index_V, labels_V or None) for the videos read: each row's logits against
    every template x class prompt ([K, C], template-major as ActionCLIP's text_prompt), a
    softmax per template averaged over templates, then averaged over the video's views.
    A class given as a list of synonyms is named by its first."""
    if not classnames or not templates:
        raise ValueError("Action recognition needs at least one class name and one template; "
                         "check the class list and templates.")
    names = [display_name(c) for c in classnames]
    k, c, n = len(templates), len(names), video_set.num_videos
    txt = encode_texts(encoders, params, [t.format(name) for t in templates for name in names])
    sums_VC = np.zeros((n, c), np.float64)
    counts_V = np.zeros(n, np.int64)
    labels_V = np.full(n, -1, np.int64)
    for sim_Qb, extra in score_rows(encoders, params, video_set, txt, text_chunk, progress):
        index = _index(extra, n)
        _add_views(sums_VC, counts_V, action_scores(sim_Qb.T.reshape(-1, k, c)), index)
        if "label" in extra:
            seen = labels_V[index]
            if np.any((seen >= 0) & (seen != extra["label"])):
                raise ValueError("Views of one video carry different labels; a video's rows "
                                 "must share its label.")
            labels_V[index] = extra["label"]
    probs_VC, index_V = _view_means(sums_VC, counts_V)
    labels = labels_V[index_V]
    return probs_VC, index_V, (labels if len(labels) and labels.min() >= 0 else None)


# ---------------------------------------------------------------- evaluators

def retrieval_evaluator(video_set: VideoSet, prefix: str = "video_retrieval",
                        v2t: str = "videos", text_chunk: int | None = None):
    """An Evaluator: text->video and video->text recall on a captioned video set."""
    def run(encoders: VideoEncoders, params: Params) -> dict[str, float]:
        sim_TV, video_of_T = retrieval_scores(encoders, params, video_set, text_chunk)
        return retrieval_metrics(sim_TV, video_of_T, prefix, v2t)

    return run


def action_evaluator(video_set: VideoSet, classnames: Sequence[ClassName],
                     templates: Sequence[str], prefix: str = "action",
                     ks: Sequence[int] = (1, 5), text_chunk: int | None = None):
    """An Evaluator: top-k action accuracy (fractions) of a labelled video set."""
    def run(encoders: VideoEncoders, params: Params) -> dict[str, float]:
        probs_VC, _, labels_V = score_videos(encoders, params, video_set, classnames,
                                             templates, text_chunk)
        if labels_V is None:
            raise ValueError("The video set yielded no labels (or no videos); action accuracy "
                             "needs a labelled set.")
        return {f"{prefix}/top{k}": v for k, v in topk_accuracy(probs_VC, labels_V, ks).items()}

    return run
