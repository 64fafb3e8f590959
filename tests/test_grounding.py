"""GLIP prompts: token offsets, positive maps, chunking, negative sampling, class scores."""

import json
import random
from importlib import resources

import jax
import numpy as np
import pytest
from test_tokenizer import CORPUS

from clipjax import tokenizer as tk
from clipjax.heads import grounding as gr

AWKWARD = ["hot-dog", "t.v.", "baby's bib", "Refrigerator", "giraffe", "aardvark",
           "cocktail shaker", "crème brûlée", "ＴＶ set", "traffic  light", "UPPER Case",
           "bow_(weapon)", "&amp; more", "İstanbul", "ﬁsh", "🐶 dog", "don't"]


def _flatten(items):
    return [s for x in items for s in (_flatten(x) if isinstance(x, list) else [x])]


def _prompt_texts() -> list[str]:
    table = json.loads(resources.files("clipjax.evals").joinpath("prompts.json").read_text())
    return sorted({s for entry in table.values() for key in ("classes", "templates")
                   for s in _flatten(entry.get(key, []))})


def _fuzz(n: int, seed: int = 0) -> list[str]:
    pieces = ["a", "B", "cat", "Dog", "  ", " ", "\t", "-", ".", "'s", "'", "é", "e\u0301", "ß",
              "İ", "ΟΔΟΣ", "&amp;", "&lt;", "&bogus;", "&#39;", "&nbsp;", "ﬁ", "Ｗ", "🐶", "日本",
              "\u200b", "\x00", "3", "½", "x²", "<start_of_text>", "\r\n", "\u00a0", "ǅ", "ﬀ"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def _token_text(tok: tk.Tokenizer, i: int) -> str:
    return tok.decode([i]).strip()


def test_offsets_known_values():
    cases = {
        "Hot-Dog  T.V.": [(0, 3), (3, 4), (4, 7), (9, 10), (10, 11), (11, 12), (12, 13)],
        "&amp; Café": [(0, 5), (6, 10)],  # the entity becomes "&": its token covers all of it
        "ﬁsh ＴＶ": [(0, 3), (4, 6)],  # ligature and full width: same length after cleaning
        "cafe\u0301 ok": [(0, 5), (6, 8)],  # NFC joins e + accent: "café" covers both
        "İstanbul": [(0, 1), (0, 1), (1, 8)],  # İ lowers to i + dot, split over two tokens
        "a\u00a0b": [(0, 1), (2, 3)],
        "": [],
    }
    for text, want in cases.items():
        ids, offsets = tk.encode_with_offsets(text)
        assert ids == tk.default_tokenizer().encode(text), repr(text)
        assert offsets == want, repr(text)


def test_offsets_of_plain_text_spell_each_token():
    tok = tk.Tokenizer()
    texts = _prompt_texts() + [" ".join(AWKWARD[:7]), "A  Photo\tof a  HOT-DOG!!"]
    assert len(texts) > 3000
    for text in texts:
        ids, offsets = tok.encode_with_offsets(text)
        assert ids == tok.encode(text), repr(text)
        assert len(offsets) == len(ids)
        for i, (s, e) in zip(ids, offsets):
            assert text[s:e].lower() == _token_text(tok, i), (text, s, e)


@pytest.mark.parametrize("texts", [CORPUS, _fuzz(300)], ids=["tokenizer_corpus", "fuzz"])
def test_offsets_on_text_the_cleaner_rewrites(texts):
    tok = tk.Tokenizer()
    for text in texts:
        ids, offsets = tok.encode_with_offsets(text)
        assert ids == tok.encode(text), repr(text)
        assert len(offsets) == len(ids)
        starts = [s for s, _ in offsets]
        assert starts == sorted(starts), repr(text)
        for i, (s, e) in zip(ids, offsets):
            assert 0 <= s < e <= len(text), (text, s, e)
            token = _token_text(tok, i)
            if "\ufffd" in token or "EACUTE" in text[s:e]:
                continue  # part of a character's bytes; or "&EACUTE;", unescaped by ftfy only
            # A character split over tokens (İ -> i + dot) is in each: containment, not equality.
            assert token in tk.clean(text[s:e]), (text, token, text[s:e])


def test_build_prompt_joins_cleaned_names_without_trailing_separator():
    caption, spans = gr.build_prompt(["person", "hot_dog", "bow_(weapon)", "  traffic   light "])
    assert caption == "person. hot dog. bow. traffic light"
    assert [caption[a:b] for a, b in spans] == ["person", "hot dog", "bow", "traffic light"]
    assert gr.build_prompt(["a", "b"], separator=" , ")[0] == "a , b"
    with pytest.raises(ValueError, match="empty once cleaned"):
        gr.build_prompt(["cat", "(unknown)"])


def _glip_positive_map(offsets, spans, length):
    """GLIP's create_positive_map: first..last char's tokens, +1 for the start token, / sum."""
    def char_to_token(ch):
        return next((t for t, (s, e) in enumerate(offsets) if s <= ch < e), None)
    map_CL = np.zeros((len(spans), length))
    for c, (beg, end) in enumerate(spans):
        first, last = char_to_token(beg), char_to_token(end - 1)
        map_CL[c, first + 1:last + 2] = 1
    return map_CL / (map_CL.sum(-1, keepdims=True) + 1e-6)


def test_positive_map_matches_tokenizer_offsets_on_awkward_names():
    caption, spans = gr.build_prompt(AWKWARD)
    tokens_L, map_CL = gr.prompt_tokens(caption, spans, context_length=77)
    assert tokens_L.dtype == np.int32 and map_CL.dtype == np.float32
    assert map_CL.shape == (len(AWKWARD), 77)
    np.testing.assert_array_equal(tokens_L, tk.tokenize(caption, 77)[0])
    ids, offsets = tk.encode_with_offsets(caption)
    np.testing.assert_allclose(map_CL, _glip_positive_map(offsets, spans, 77), atol=1e-5)
    np.testing.assert_allclose(map_CL.sum(1), 1.0, rtol=1e-6)
    assert map_CL[:, 0].sum() == 0 and map_CL[:, len(ids) + 1:].sum() == 0
    tok = tk.default_tokenizer()
    for c, name in enumerate(AWKWARD):
        cols = np.flatnonzero(map_CL[c])
        np.testing.assert_array_equal(cols, np.arange(cols[0], cols[-1] + 1))
        spelled = tok.decode(tokens_L[cols]).replace(" ", "")
        want = tk.clean(gr.clean_name(name)).replace(" ", "")
        # "t.v." ends in a full stop that merges with the separator's into one ".." token.
        assert spelled == want or (name == "t.v." and spelled == "t.v.."), (name, spelled)
    assert np.count_nonzero(map_CL[AWKWARD.index("aardvark")]) == 3


def test_truncated_names_raise_or_get_zero_rows():
    names = ["person", "cocktail shaker", "aardvark", "dog"]
    caption, spans = gr.build_prompt(names)  # person . co ck tail shaker . aard var k . dog
    with pytest.raises(ValueError, match="2 of 4 class names, first 'aardvark'.*fewer classes"):
        gr.prompt_tokens(caption, spans, context_length=10)  # 8 tokens: "aard" fits, "k" does not
    tokens_L, map_CL = gr.prompt_tokens(caption, spans, context_length=10, truncate_ok=True)
    _, full_CL = gr.prompt_tokens(caption, spans, context_length=32)
    np.testing.assert_array_equal(map_CL[:2], full_CL[:2, :10])
    assert map_CL[2:].sum() == 0  # "aardvark" is cut in part: no half-named class
    assert tokens_L[-1] == tk.EOT_ID
    with pytest.raises(ValueError, match="no text tokens"):
        gr.prompt_tokens("cat \x00", [(0, 3), (4, 5)], context_length=16)
    with pytest.raises(ValueError, match="take spans from build_prompt"):
        gr.prompt_tokens("cat", [(0, 4)], context_length=16)


def test_class_prompt_and_labels_to_positive_map():
    names = ["cat", "dog", "hot dog", "aardvark"]
    tokens_L, map_CL = gr.class_prompt(names, [3, 0, 2], context_length=16)
    want_tokens, want_CL = gr.prompt_tokens(*gr.build_prompt(["aardvark", "cat", "hot dog"]), 16)
    np.testing.assert_array_equal(tokens_L, want_tokens)
    np.testing.assert_array_equal(map_CL, want_CL)
    map_ML = gr.labels_to_positive_map([0, 3, 1, 0], [3, 0, 2], map_CL)
    want_ML = np.stack([map_CL[1], map_CL[0], np.zeros_like(map_CL[0]), map_CL[1]])
    np.testing.assert_array_equal(map_ML, want_ML)
    with pytest.raises(ValueError, match="repeat"):
        gr.labels_to_positive_map([0], [1, 1], map_CL[:2])


def test_class_score_is_the_mean_over_its_tokens():
    caption, spans = gr.build_prompt(["cocktail shaker", "cat", "aardvark", "t.v."])
    _, map_CL = gr.prompt_tokens(caption, spans, context_length=24)
    probs_BAL = np.random.default_rng(0).random((2, 5, 24)).astype(np.float32)
    want_BAC = np.zeros((2, 5, 4))
    for c in range(4):
        cols = np.flatnonzero(map_CL[c])
        want_BAC[..., c] = probs_BAL[..., cols].mean(-1)
    np.testing.assert_allclose(gr.class_scores(probs_BAL[0], map_CL), want_BAC[0], rtol=1e-5)
    got_BAC = jax.jit(gr.class_scores)(probs_BAL, map_CL)
    assert isinstance(got_BAC, jax.Array) and got_BAC.shape == (2, 5, 4)
    np.testing.assert_allclose(np.asarray(got_BAC), want_BAC, rtol=1e-5)


def test_chunks_cover_every_class_once():
    chunks = gr.chunk_classes(1203)
    assert [len(c) for c in chunks] == [40] * 30 + [3]
    np.testing.assert_array_equal(np.concatenate(chunks), np.arange(1203))
    assert [c.tolist() for c in gr.chunk_classes(5, per_prompt=2)] == [[0, 1], [2, 3], [4]]
    assert gr.chunk_classes(0) == []
    with pytest.raises(ValueError, match="per_prompt"):
        gr.chunk_classes(10, per_prompt=0)


def test_sample_prompt_keeps_positives_and_bounds_negatives():
    positive = [7, 3, 3, 1000]
    counts = []
    for seed in range(200):
        ids = gr.sample_prompt(np.random.default_rng(seed), positive, 1203)
        assert len(set(ids.tolist())) == len(ids) and ids.min() >= 0 and ids.max() < 1203
        assert {3, 7, 1000} <= set(ids.tolist())
        counts.append(len(ids) - 3)
    counts = np.array(counts)
    assert counts.min() >= 1 and counts.max() == 85
    assert 0.35 < np.mean(counts == 85) < 0.65  # all 85 half the time, else uniform 1..85
    assert 20 < counts[counts < 85].mean() < 60

    a = gr.sample_prompt(np.random.default_rng(5), positive, 1203)
    np.testing.assert_array_equal(a, gr.sample_prompt(np.random.default_rng(5), positive, 1203))
    assert not np.array_equal(a, gr.sample_prompt(np.random.default_rng(6), positive, 1203))
    first = [gr.sample_prompt(np.random.default_rng(s), positive, 1203)[0] for s in range(20)]
    assert len(set(first)) > 5  # positives and negatives are mixed, not positives first

    small = gr.sample_prompt(np.random.default_rng(0), [1, 2], 6, p_full=1.0, shuffle=False)
    np.testing.assert_array_equal(small, np.arange(6))  # every other class, sorted
    assert gr.sample_prompt(np.random.default_rng(0), [0, 1], 2).tolist() in ([0, 1], [1, 0])
    with pytest.raises(ValueError, match="contiguous"):
        gr.sample_prompt(np.random.default_rng(0), [5], 5)


def test_sample_prompt_fits_the_token_budget():
    names = [f"thing {i % 10}" for i in range(200)]
    lengths_C = gr.name_lengths(names)
    np.testing.assert_array_equal(lengths_C, 3)  # "thing", a digit, "."
    for seed in range(20):
        ids = gr.sample_prompt(np.random.default_rng(seed), [4, 9], 200, p_full=1.0,
                               lengths_C=lengths_C, budget=30)
        assert {4, 9} <= set(ids.tolist()) and len(ids) == 9  # 2 positives + 7 negatives < 30
        tokens_L, map_CL = gr.class_prompt(names, ids, context_length=32)
        assert map_CL.sum() == pytest.approx(len(ids))
    ids = gr.sample_prompt(np.random.default_rng(0), np.arange(20), 200, lengths_C=lengths_C,
                           budget=30)  # positives alone overflow: 10 of them are kept
    assert len(ids) == 10 and ids.max() < 20
