"""Video evaluation: ranks with ties counted once (and the reference's over-count on the same
example), retrieval metrics against a loop-by-loop transcription (MSVD's several captions
per video), ActionCLIP's per-template softmax mean, view averaging, and both evaluators end
to end on the 8-device mesh with a fake head whose scores NumPy reproduces."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipjax import sharding, tokenize
from clipjax.evals import video

# ---------------------------------------------------------------- metrics

# Rows 0 and 1 tie their target with another video at the top, row 2 is beaten once.
TIES_QC = np.array([[0.9, 0.9, 0.1],
                    [0.2, 0.5, 0.5],
                    [0.3, 0.7, 0.6]])


def _clip4clip_compute_metrics(x):
    """CLIP4Clip's metrics.py compute_metrics, transcribed (0-based `ind`)."""
    sx = np.sort(-x, axis=1)
    d = np.diag(-x)[:, None]
    ind = np.where(sx - d == 0)[1]
    return {"R1": float(np.sum(ind == 0)) * 100 / len(ind), "MR": np.median(ind) + 1,
            "MeanR": np.mean(ind) + 1}


def test_ranks_count_ties_once_where_the_reference_over_counts():
    # A tie is one competitor: each row's target has exactly one candidate as high as it.
    np.testing.assert_array_equal(video.ranks(TIES_QC, np.arange(3)), [2, 2, 2])
    m = video.retrieval_metrics(TIES_QC, np.arange(3))
    assert m["video_retrieval/t2v_R@1"] == 0.0
    assert m["video_retrieval/t2v_R@5"] == 1.0
    assert m["video_retrieval/t2v_MdR"] == 2.0
    assert m["video_retrieval/t2v_MnR"] == 2.0
    # A collapsed model (all scores equal) ranks every target last, not first.
    np.testing.assert_array_equal(video.ranks(np.zeros((4, 4)), np.arange(4)), [4, 4, 4, 4])
    # The reference finds two "ranks" (0 and 1) for each tied row: 5 entries for 3 queries.
    ref = _clip4clip_compute_metrics(TIES_QC)
    assert ref == {"R1": 40.0, "MR": 2.0, "MeanR": pytest.approx(1.6)}
    # Without ties the two agree.
    sim = np.random.default_rng(0).normal(size=(7, 7))
    ref = _clip4clip_compute_metrics(sim)
    m = video.retrieval_metrics(sim, np.arange(7), prefix="x")
    assert (100 * m["x/t2v_R@1"], m["x/t2v_MdR"], m["x/t2v_MnR"]) == pytest.approx(
        (ref["R1"], ref["MR"], ref["MeanR"]))


def test_ranks_multi_and_nan():
    sim = np.array([[0.1, 0.8, 0.8, 0.5], [0.4, 0.3, 0.2, 0.9]])
    pos = np.array([[1, 0, 1, 0], [1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(video.ranks_multi(sim, pos), [2, 2])
    with pytest.raises(ValueError, match="no positive"):
        video.ranks_multi(sim, np.zeros_like(pos))
    # A NaN target scores -inf: behind every finite candidate.
    np.testing.assert_array_equal(video.ranks(np.array([[np.nan, 0.0, 1.0]]), [0]), [3])


def _brute_retrieval(sim_TV, video_of_T, v2t):
    t, v = sim_TV.shape
    # Rank = 1 + every other candidate scoring at least as high (a tie is one competitor).
    t2v = [1 + sum(sim_TV[q, j] >= sim_TV[q, video_of_T[q]] for j in range(v)
                   if j != video_of_T[q]) for q in range(t)]
    v2t_ranks = []
    for j in range(v):
        own = [q for q in range(t) if video_of_T[q] == j]
        if v2t == "videos":
            group = [max(sim_TV[q, j] for q in range(t) if video_of_T[q] == i) for i in range(v)]
            v2t_ranks.append(1 + sum(g >= group[j] for i, g in enumerate(group) if i != j))
        else:
            best = max(sim_TV[q, j] for q in own)
            v2t_ranks.append(1 + sum(sim_TV[q, j] >= best for q in range(t) if q not in own))
    out = {}
    for name, r in (("t2v", np.array(t2v)), ("v2t", np.array(v2t_ranks))):
        for k in (1, 5, 10):
            out[f"video_retrieval/{name}_R@{k}"] = np.mean(r <= k)
        out[f"video_retrieval/{name}_MdR"] = np.median(r)
        out[f"video_retrieval/{name}_MnR"] = np.mean(r)
    return out


@pytest.mark.parametrize("v2t", ["videos", "captions"])
def test_retrieval_metrics_match_brute_force_with_several_captions(v2t):
    rng = np.random.default_rng(1)
    v = 17
    video_of_T = np.concatenate([np.arange(v), rng.integers(0, v, 25)])
    rng.shuffle(video_of_T)
    # Small integers: ties everywhere.
    sim = rng.integers(0, 6, (len(video_of_T), v)).astype(np.float32)
    got = video.retrieval_metrics(sim, video_of_T, v2t=v2t)
    want = _brute_retrieval(sim, video_of_T, v2t)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k]), k


def test_one_caption_per_video_is_the_transpose():
    sim = np.random.default_rng(2).normal(size=(9, 9))
    perm = np.random.default_rng(3).permutation(9)
    a = video.retrieval_metrics(sim[perm], perm, v2t="videos")
    b = video.retrieval_metrics(sim[perm], perm, v2t="captions")
    assert a == b
    v2t_V = video.ranks(sim.T, np.arange(9))
    np.testing.assert_allclose(a["video_retrieval/v2t_MnR"], v2t_V.mean())


def test_retrieval_metrics_errors():
    with pytest.raises(ValueError, match="no caption"):
        video.retrieval_metrics(np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError, match="lie in"):
        video.retrieval_metrics(np.zeros((2, 2)), [0, 2])


def test_action_scores_are_the_mean_of_per_template_softmaxes():
    logits = np.random.default_rng(4).normal(size=(3, 4, 5)) * 10
    want = np.zeros((3, 5))
    for r in range(3):
        for k in range(4):
            z = sum(math.exp(x) for x in logits[r, k])
            want[r] += [math.exp(x) / z / 4 for x in logits[r, k]]
    np.testing.assert_allclose(video.action_scores(logits), want, rtol=1e-12)
    np.testing.assert_allclose(video.action_scores(logits).sum(1), 1.0)


def test_average_views_and_topk():
    scores = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [0.0, 4.0]])
    avg, index = video.average_views(scores, [7, 2, 7, 2])
    np.testing.assert_array_equal(index, [2, 7])
    np.testing.assert_allclose(avg, [[1.5, 3.0], [3.0, 2.5]])
    s = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0], [0.3, 0.3, 0.4]])
    # Row 1 ties class 0 with class 1: the lower index wins, so label 1 misses top-1.
    assert video.topk_accuracy(s, [1, 1, 0], ks=(1, 2, 5)) == {
        1: pytest.approx(1 / 3), 2: 1.0, 5: 1.0}
    with pytest.raises(ValueError, match="label space"):
        video.topk_accuracy(s, [3, 0, 0])


# ---------------------------------------------------------------- evaluators end to end

E, T, S, L, SCALE = 6, 3, 4, 12, 10.0
RNG = np.random.default_rng(5)
PARAMS = {"table": RNG.normal(size=(49408, E)).astype(np.float32),
          "proj": RNG.normal(size=(3, E)).astype(np.float32)}
CLASSES = ["run", "jump", "swim", "ride", "climb", "throw"]
TEMPLATES = ["a video of {}", "someone doing {}", "{}"]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _junit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def fake_encoders(batch_size: int) -> video.VideoEncoders:
    """A 'tight' head: a video is its per-frame mean pixels and mask (a pytree), a text the
    normalised sum of token vectors; similarity pools the frames, projects and normalises
    them and takes SCALE x cosine. NumPy repeats all of it in _ref_* below."""
    def encode_video(p, batch):
        return {"frames": batch["video"].astype(jnp.float32).mean((2, 3)) / 255,
                "mask": batch["frame_mask"]}

    def encode_text(p, tok_BL):
        return _junit(jnp.where(tok_BL[..., None] > 0, p["table"][tok_BL], 0).sum(1))

    def similarity(p, txt_QE, vid):
        m = vid["mask"][..., None].astype(jnp.float32)
        v = _junit(((vid["frames"] * m).sum(1) / m.sum(1)) @ p["proj"])
        return SCALE * txt_QE @ v.T

    return video.VideoEncoders(jax.jit(encode_video), jax.jit(encode_text), jax.jit(similarity),
                               T, S, L, sharding.create_mesh(), batch_size)


class FakeVideos:
    """Random clips, some with two views, each with its own frame count, in shuffled order."""

    def __init__(self, num_videos=11, seed=0, labelled=True):
        rng = np.random.default_rng(seed)
        self.num_videos = num_videos
        self.classnames = CLASSES if labelled else None
        self.label = rng.integers(0, len(CLASSES), num_videos)
        index = np.concatenate([np.arange(num_videos), rng.integers(0, num_videos, 4)])
        self.index = rng.permutation(index)
        r = len(self.index)
        self.video = rng.integers(0, 256, (r, T, S, S, 3), dtype=np.uint8)
        self.mask = np.arange(T)[None] < rng.integers(1, T + 1, r)[:, None]
        words = ["red", "blue", "ball", "dog", "cat", "car", "left", "up", "fast"]
        self._captions = [[" ".join(rng.choice(words, 3)) for _ in range(rng.integers(1, 4))]
                          for _ in range(num_videos)]
        self.labelled = labelled

    def captions(self):
        return self._captions

    def batches(self, batch_size):
        for lo in range(0, len(self.index), batch_size):
            rows = slice(lo, lo + batch_size)
            b = {"video": self.video[rows], "frame_mask": self.mask[rows],
                 "index": self.index[rows]}
            if self.labelled:
                b["label"] = self.label[b["index"]].astype(np.int32)
            yield b


def _ref_sim_QR(texts, vs):
    tok = tokenize(texts, L)
    txt = _unit(np.where(tok[..., None] > 0, PARAMS["table"][tok], 0).sum(1))
    frames = vs.video.astype(np.float64).mean((2, 3)) / 255
    m = vs.mask[..., None]
    vid = _unit(((frames * m).sum(1) / m.sum(1)) @ PARAMS["proj"])
    return SCALE * txt @ vid.T


def _ref_mean_views(x_RC, index_R, n):
    return np.stack([x_RC[index_R == i].mean(0) for i in range(n)])


@pytest.mark.parametrize("batch_size", [8, 24])
def test_retrieval_evaluator_end_to_end(batch_size):
    vs = FakeVideos()
    enc = fake_encoders(batch_size)
    texts = [c for caps in vs.captions() for c in caps]
    video_of_T = np.repeat(np.arange(vs.num_videos), [len(c) for c in vs.captions()])
    want_TV = _ref_mean_views(_ref_sim_QR(texts, vs).T, vs.index, vs.num_videos).T
    # Text blocks of 8 leave the last one padded; 15 rows leave a padded video batch.
    sim_TV, got_of_T = video.retrieval_scores(enc, PARAMS, vs, text_chunk=8)
    np.testing.assert_array_equal(got_of_T, video_of_T)
    np.testing.assert_allclose(sim_TV, want_TV, rtol=1e-5, atol=1e-5)
    metrics = video.retrieval_evaluator(vs, text_chunk=8)(enc, PARAMS)
    want = video.retrieval_metrics(want_TV, video_of_T)
    assert metrics == pytest.approx(want)
    assert metrics == pytest.approx(_brute_retrieval(want_TV, video_of_T, "videos"))


def test_action_evaluator_end_to_end():
    vs = FakeVideos(seed=1)
    enc = fake_encoders(8)
    prompts = [t.format(c) for t in TEMPLATES for c in CLASSES]
    logits_RKC = _ref_sim_QR(prompts, vs).T.reshape(-1, len(TEMPLATES), len(CLASSES))
    e = np.exp(logits_RKC - logits_RKC.max(-1, keepdims=True))
    probs_RC = (e / e.sum(-1, keepdims=True)).mean(1)
    want_VC = _ref_mean_views(probs_RC, vs.index, vs.num_videos)

    probs_VC, index_V, labels_V = video.score_videos(enc, PARAMS, vs, CLASSES, TEMPLATES)
    np.testing.assert_array_equal(index_V, np.arange(vs.num_videos))
    np.testing.assert_array_equal(labels_V, vs.label)
    np.testing.assert_allclose(probs_VC, want_VC, rtol=1e-4, atol=1e-6)

    metrics = video.action_evaluator(vs, CLASSES, TEMPLATES)(enc, PARAMS)
    rank = (want_VC > want_VC[np.arange(vs.num_videos), vs.label][:, None]).sum(1)
    assert metrics == pytest.approx({"action/top1": np.mean(rank < 1),
                                     "action/top5": np.mean(rank < 5)})
    # Three classes: top-5 is capped at 3, so every video is a hit.
    three = video.action_evaluator(vs, CLASSES[:3], TEMPLATES)
    vs.label %= 3
    assert three(enc, PARAMS)["action/top5"] == 1.0


def test_evaluators_name_the_fix():
    enc = fake_encoders(8)
    with pytest.raises(ValueError, match="no captions"):
        unlabelled = FakeVideos(labelled=False)
        unlabelled.captions = lambda: None
        video.retrieval_scores(enc, PARAMS, unlabelled)
    with pytest.raises(ValueError, match="needs a labelled set"):
        video.action_evaluator(FakeVideos(labelled=False), CLASSES, TEMPLATES)(enc, PARAMS)
    wrong = video.VideoEncoders(enc.encode_video, enc.encode_text, enc.similarity, T + 1, S, L,
                                enc.mesh, 8)
    with pytest.raises(ValueError, match="num_frames=4"):
        video.score_videos(wrong, PARAMS, FakeVideos(), CLASSES, TEMPLATES)
