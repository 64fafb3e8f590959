"""The CLIP tokenizer gives open_clip.tokenize's ids, fast paths and caches included."""

import html
import random

import ftfy
import numpy as np
import pytest
from reference import open_clip

from clipjax import tokenizer as tk

CORPUS = [
    "a photo of a cat",
    "A Photo Of A CAT on the MAT",
    "Hello, World!!! How's it going?... (fine) [ok] {yes} -- \"quoted\" ~tilde~",
    "It's the dog's bone; they're here, we've been, I'm sure, you'll see, he'd go, don't",
    "IT'S THEY'RE WE'VE I'M YOU'LL HE'D DON'T 'S'T're",
    "1234567 3.14159 1,000,000 2nd 10km 0x1F 007 ٣ x² ½ Ⅻ",
    "fish &amp; chips &lt;b&gt;bold&lt;/b&gt; &amp;lt;i&amp;gt; &amp;amp;amp; &quot;q&quot;",
    "&#39;x&#39; &#x263a; &eacute;t&eacute; &EACUTE; &nbsp;&nbsp;spaced &bogus; & alone",
    "<b>tag</b> &amp; entity with a less-than sign",
    "cafÃ© naÃ¯ve â€œsmart quotesâ€\x9d",
    "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
    "crème brûlée à la française, Zürich, ørsted, señor, cafe\u0301 (decomposed)",
    "日本語のテキスト 東京の夜景 北京 서울의 밤",
    "🐶🐱👍🏽 ❤️ 👨‍👩‍👧 party🎉time",
    "ＬＯＵＤ　ＮＯＩＳＥＳ and ﬂubberiﬁc ligatures",
    "  lots   of\n\n spaces\tand\ttabs \r\n crlf \x0b\x0c ",
    "",
    "   ",
    "\n\t",
    "\x00\x1b[31mred\x1b[0m \x7f bell\x07",
    "literal <start_of_text> and <end_of_text> and <START_OF_TEXT> and <<end_of_text>>",
    "'ſ ſtraße <ſtart_of_text> Kelvin \u212a İstanbul STRASSE Straße",
    "zero\u200bwidth non\u00a0breaking line\u2028separator para\u2029graph next\x85line",
    "C++ #hashtag @user http://example.com/a_b?c=d&e=f snake_case_name",
    "iPhone X vs. Galaxy S10+ — 4K HDR 💯%",
    "مرحبا بالعالم שלום עולם नमस्ते दुनिया Ελληνικά Москва",
    "x" * 300,
    "a dog running on the beach " * 40,
    "Stock Photo - Image #12345, $19.99, 100% cotton | Shutterstock",
]


@pytest.fixture(scope="module")
def oc():
    return open_clip()


def _reference_ids(oc, texts: list[str], context_length: int = 77) -> np.ndarray:
    return oc.tokenize(texts, context_length=context_length).numpy()


def test_matches_open_clip_on_diverse_corpus(oc):
    ids_BL = tk.tokenize(CORPUS)
    assert ids_BL.dtype == np.int32 and ids_BL.shape == (len(CORPUS), 77)
    expected_BL = _reference_ids(oc, CORPUS)
    for text, got, want in zip(CORPUS, ids_BL, expected_BL):
        assert got.tolist() == want.tolist(), repr(text)


def test_known_ids_without_open_clip():
    ids = tk.tokenize("a photo of a cat")[0]
    assert ids.tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70
    assert (tk.SOT_ID, tk.EOT_ID, tk.VOCAB_SIZE) == (49406, 49407, 49408)
    assert tk.default_tokenizer().vocab_size == 49408
    assert tk.default_tokenizer().decode([tk.SOT_ID, tk.EOT_ID]) == "<start_of_text><end_of_text>"


def test_long_caption_truncates_keeping_eot_last(oc):
    text = "a dog running on the beach " * 40
    ids = tk.tokenize(text)[0]
    assert ids[0] == tk.SOT_ID and ids[-1] == tk.EOT_ID and (ids != 0).all()
    full = tk.default_tokenizer().encode(text)
    assert ids[1:-1].tolist() == full[:75]


@pytest.mark.parametrize("context_length", [2, 3, 8, 16, 100])
def test_other_context_lengths(oc, context_length):
    ids_BL = tk.tokenize(CORPUS, context_length=context_length)
    assert ids_BL.shape == (len(CORPUS), context_length)
    np.testing.assert_array_equal(ids_BL, _reference_ids(oc, CORPUS, context_length))
    for text, ids in zip(CORPUS, ids_BL):
        n = min(len(tk.default_tokenizer().encode(text)), context_length - 2)
        assert ids[0] == tk.SOT_ID and ids[n + 1] == tk.EOT_ID and not ids[n + 2:].any(), repr(text)


def test_single_string_is_a_batch_of_one():
    one = tk.tokenize("a red car")
    assert one.shape == (1, 77)
    np.testing.assert_array_equal(one, tk.tokenize(["a red car"]))
    np.testing.assert_array_equal(one, tk.tokenize(("a red car",)))
    assert tk.tokenize([]).shape == (0, 77)


def test_unseen_words_match_open_clip_bpe(oc):
    """Fresh tokenizers on made-up words, so every word runs the merge loop, repeats included."""
    rng = random.Random(0)
    words = ["".join(rng.choices("aaabbeeinnorst", k=rng.randint(1, 18))) for _ in range(400)]
    words += ["a" * n for n in range(1, 12)] + ["ab" * n for n in range(1, 8)]
    words += ["hahahahaha", "lollll", "mississippi", "aaaaabbbbbaaaaa"]
    words += ["".join(chr(rng.randint(0xA0, 0x2FFF)) for _ in range(rng.randint(1, 5)))
              for _ in range(100)]
    ours, theirs = tk.Tokenizer(), oc.tokenizer.SimpleTokenizer()
    for word in words:
        assert ours.encode(word) == theirs.encode(word), repr(word)


def test_full_caches_are_emptied_and_refilled(oc, monkeypatch):
    monkeypatch.setattr(tk, "_CACHE_LIMIT", 3)
    tokenizer = tk.Tokenizer()
    np.testing.assert_array_equal(tokenizer(CORPUS), _reference_ids(oc, CORPUS))
    np.testing.assert_array_equal(tokenizer(CORPUS), _reference_ids(oc, CORPUS))
    assert len(tokenizer._word_cache) <= 3 and len(tokenizer._chunk_cache) <= 3


def test_plain_ascii_is_left_alone_by_ftfy_and_unescape():
    """The skip of ftfy for plain ASCII rests on this; '&' and control characters are excluded."""
    rng = random.Random(0)
    alphabet = "\t\n" + "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "&")
    for _ in range(2000):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 40)))
        assert tk._is_plain(text)
        assert html.unescape(html.unescape(ftfy.fix_text(text))) == text, repr(text)
    for text in ["&amp;", "a\rb", "\x00", "\x1b[0m", "\x7f", "é", "\x0b"]:
        assert not tk._is_plain(text), repr(text)


def test_decode_round_trips_lowercase_ascii():
    tokenizer = tk.default_tokenizer()
    for text in ["a photo of a cat", "the quick brown fox jumps over the lazy dog", "zyzzyva"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text + " "
    text = "a cat, sitting on 3 mats!"
    assert tokenizer.decode(tokenizer.encode(text)).replace(" ", "") == text.replace(" ", "")
    assert tokenizer.decode(np.asarray(tokenizer.encode("日本 café"))) == "日本 café "


def test_bad_input_gets_an_actionable_error():
    with pytest.raises(TypeError, match=r"texts\[1\] is int, not str.*convert or drop"):
        tk.tokenize(["ok", 3])
    with pytest.raises(TypeError, match="decode bytes first"):
        tk.tokenize(b"a photo")
    with pytest.raises(TypeError, match="sequence of str"):
        tk.tokenize(None)
    with pytest.raises(ValueError, match="context_length must be at least 2.*got 1"):
        tk.tokenize("a photo", context_length=1)
    with pytest.raises(TypeError, match="context_length must be an int"):
        tk.tokenize("a photo", context_length=7.0)
    with pytest.raises(TypeError, match="encode takes a str"):
        tk.default_tokenizer().encode(None)
