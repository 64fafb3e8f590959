"""CLIP's byte-level BPE tokenizer, id for id the same as OpenAI CLIP's and `open_clip.tokenize`."""

import difflib
import functools
import gzip
import html
import importlib.resources
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence

import ftfy
import numpy as np
import regex

VOCAB_SIZE = 49408  # 256 bytes + 256 word-final bytes + 48,894 merges + 2 specials
SOT_ID = 49406  # <start_of_text>
EOT_ID = 49407  # <end_of_text>; also where CLIP's text tower reads its embedding
PAD_ID = 0
CONTEXT_LENGTH = 77

_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_SPECIALS = ("<start_of_text>", "<end_of_text>")
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - len(_SPECIALS)
_WORD_END = "</w>"

# Pre-tokenisation: the two specials, English clitics, letter runs, single digits, and runs
# of anything else that is not whitespace. IGNORECASE matters although the text is already
# lowercased: 'ſ' is its own lower case but folds to 's', so "'ſ" is a clitic match.
_WORD_RE = regex.compile(
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)

# ftfy.fix_text and html.unescape leave printable ASCII without '&' untouched (no entities,
# no control characters, no \r, nothing to re-decode), so such captions, the bulk of web
# alt-text, skip ftfy, which takes a quarter of the reference tokenizer's time. The test
# suite checks the claim against ftfy. (Stdlib re: 4x faster than regex for this test.)
_NEEDS_FTFY_RE = re.compile(r"[^\t\n\x20-\x25\x27-\x7e]")

# Both caches are bounded: a long run over a web-scale corpus meets millions of distinct
# words (misspellings, URLs, hashes), and an unbounded cache would only grow.
_CACHE_LIMIT = 1 << 20
_NO_RANK = float("inf")  # pairs that never merge


def _byte_chars() -> list[tuple[int, str]]:
    """(byte, stand-in char) in vocabulary order: printable Latin-1 as is, the rest from U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    # BPE merges are written over visible characters, so whitespace and control bytes get
    # stand-ins; byte order within each group fixes the first 256 vocabulary ids.
    return [(b, chr(b)) for b in printable] + [(b, chr(256 + n)) for n, b in enumerate(others)]


def _is_plain(text: str) -> bool:
    """Whether ftfy and html.unescape would return text unchanged (see _NEEDS_FTFY_RE)."""
    return text.isascii() and _NEEDS_FTFY_RE.search(text) is None


def clean(text: str) -> str:
    """The reference cleanup: ftfy, HTML unescaped twice, whitespace collapsed, lowercased."""
    if not _is_plain(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def _chunks(text: str) -> list[str]:
    """The cleaned text split at its spaces, which no pre-tokenisation match spans or looks past."""
    if _is_plain(text):
        return text.lower().split()  # what clean() would give, split, minus its join
    return clean(text).split(" ")


# html.unescape's own pattern (CPython Lib/html/__init__.py); a match unescaped alone gives
# what it gives in place, so entities can be replaced one at a time with their offsets.
_CHARREF_RE = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")


def _unescape_tracked(text: str, starts: list[int], ends: list[int]):
    """html.unescape(text), with each output character's original [start, end) carried along."""
    out, out_starts, out_ends, last = [], [], [], 0
    for match in _CHARREF_RE.finditer(text):
        piece = html.unescape(match.group())
        if piece == match.group():  # not an entity after all ("&e=f"): characters kept
            continue
        i, j = match.span()
        out.append(text[last:i])
        out_starts += starts[last:i]
        out_ends += ends[last:i]
        out.append(piece)  # every character of the replacement comes from the whole entity
        out_starts += [starts[i]] * len(piece)
        out_ends += [ends[j - 1]] * len(piece)
        last = j
    out.append(text[last:])
    return "".join(out), out_starts + starts[last:], out_ends + ends[last:]


def _keyed(text: str, starts: Sequence[int], ends: Sequence[int]):
    """text NFKD-decomposed and lowercased char by char, with each key char's [start, end)."""
    key, key_starts, key_ends = [], [], []
    for ch, start, end in zip(text, starts, ends):
        piece = unicodedata.normalize("NFKD", ch).lower()
        key.append(piece)
        key_starts += [start] * len(piece)
        key_ends += [end] * len(piece)
    return "".join(key), key_starts, key_ends


def _align(original: str, fixed: str) -> tuple[list[int], list[int]]:
    """Per character of `fixed` (clean() before lowercasing), the [start, end) it came from."""
    # HTML entities are undone exactly. What ftfy changed is found by diffing the result,
    # both sides decomposed (NFKD) and lowercased so width, ligature, NFC and case changes
    # still match character for character.
    unescaped = original
    u_starts, u_ends = list(range(len(original))), list(range(1, len(original) + 1))
    for _ in range(2):
        unescaped, u_starts, u_ends = _unescape_tracked(unescaped, u_starts, u_ends)
    a, a_starts, a_ends = _keyed(unescaped, u_starts, u_ends)
    b, owner, _ = _keyed(fixed, range(len(fixed)), range(len(fixed)))
    starts, ends = [len(original)] * len(fixed), [0] * len(fixed)
    # autojunk off: on long texts it would ignore every frequent character.
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        n, m = i2 - i1, j2 - j1
        for k in range(m):
            if tag == "equal":
                first = last = i1 + k
            elif tag == "replace":  # a rewritten stretch, shared out in proportion
                first, last = i1 + k * n // m, i1 - (-(k + 1) * n // m) - 1
            else:  # inserted: the character before it (or the first one)
                first = last = min(max(i1 - 1, 0), len(a) - 1)
            j = owner[j1 + k]
            starts[j], ends[j] = min(starts[j], a_starts[first]), max(ends[j], a_ends[last])
    return starts, ends


def _remember(cache: dict[str, tuple], key: str, value: tuple) -> None:
    """cache[key] = value, emptying the cache first when it is full."""
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value


class Tokenizer:
    """Text -> CLIP token ids, padded and truncated to a fixed context length."""

    vocab_size: int = VOCAB_SIZE
    sot_id: int = SOT_ID
    eot_id: int = EOT_ID

    def __init__(self, vocab_path: str | os.PathLike | None = None):
        if vocab_path is None:
            data = importlib.resources.files(__package__).joinpath(_VOCAB_FILE).read_bytes()
        else:
            with open(vocab_path, "rb") as f:
                data = f.read()
        # Line 0 is a version header; only the first _NUM_MERGES merges form the vocabulary.
        lines = gzip.decompress(data).decode("utf-8").split("\n", _NUM_MERGES + 1)
        merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]

        byte_chars = _byte_chars()
        tokens = [c for _, c in byte_chars]
        tokens += [c + _WORD_END for _, c in byte_chars]
        tokens += ["".join(m) for m in merges]
        tokens += list(_SPECIALS)
        if len(tokens) != VOCAB_SIZE:
            raise ValueError(f"{vocab_path or _VOCAB_FILE} yields {len(tokens)} tokens, not "
                             f"{VOCAB_SIZE}: pass CLIP's bpe_simple_vocab_16e6.txt.gz.")
        self._token_to_id = {t: i for i, t in enumerate(tokens)}
        to_latin1 = {ord(c): b for b, c in byte_chars}
        self._id_to_bytes = [t.translate(to_latin1).encode("latin-1") for t in tokens[:-2]]
        self._id_to_bytes += [s.encode("ascii") for s in _SPECIALS]
        # Later duplicates win, as in a plain dict built from the merge list.
        self._ranks = {m: r for r, m in enumerate(merges)}
        self._byte_to_char = {b: c for b, c in byte_chars}
        # A special token typed in the text is matched whole and gets its own id.
        self._specials = {s: (self._token_to_id[s],) for s in _SPECIALS}
        self._word_cache: dict[str, tuple[int, ...]] = {}
        self._chunk_cache: dict[str, tuple[int, ...]] = {}
        self._span_cache: dict[str, tuple[tuple[int, ...], tuple[tuple[int, int], ...]]] = {}

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-tokenised word: its UTF-8 bytes merged by ascending merge rank."""
        chars = [self._byte_to_char[b] for b in word.encode("utf-8")]
        chars[-1] += _WORD_END
        ranks = self._ranks
        pair_ranks = [ranks.get(pair, _NO_RANK) for pair in zip(chars, chars[1:])]
        while pair_ranks:
            best = min(pair_ranks)
            if best == _NO_RANK:
                break
            # Ranks are unique per pair, so an equal rank is the same pair.
            i = pair_ranks.index(best)
            if pair_ranks.count(best) == 1:
                # The usual case: one merge, and only the two pairs beside it change.
                merged = chars[i] + chars[i + 1]
                chars[i:i + 2] = [merged]
                beside = [ranks.get((chars[i - 1], merged), _NO_RANK)] if i > 0 else []
                if i + 1 < len(chars):
                    beside.append(ranks.get((merged, chars[i + 1]), _NO_RANK))
                pair_ranks[max(i - 1, 0):i + 2] = beside
                continue
            # Every occurrence merges, left to right, so in "a a a" only the first two join.
            merged_chars = chars[:i]
            while i < len(chars):
                if i + 1 < len(chars) and pair_ranks[i] == best:
                    merged_chars.append(chars[i] + chars[i + 1])
                    i += 2
                else:
                    merged_chars.append(chars[i])
                    i += 1
            chars = merged_chars
            pair_ranks = [ranks.get(pair, _NO_RANK) for pair in zip(chars, chars[1:])]
        return tuple(self._token_to_id[c] for c in chars)

    def _word_ids(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-tokenised word, cached."""
        word_ids = self._word_cache.get(word)
        if word_ids is None:
            word_ids = self._specials.get(word) or self._bpe(word)
            _remember(self._word_cache, word, word_ids)
        return word_ids

    def _encode_chunk(self, chunk: str) -> tuple[int, ...]:
        """Ids of one space-free chunk of cleaned text, e.g. "cat," or "it's"."""
        ids: list[int] = []
        for word in _WORD_RE.findall(chunk):
            ids += self._word_ids(word)
        return tuple(ids)

    def _chunk_spans(self, chunk: str) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
        """Ids of one cleaned chunk and each id's [start, end) characters in the chunk, cached."""
        cached = self._span_cache.get(chunk)
        if cached is not None:
            return cached
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        for match in _WORD_RE.finditer(chunk):
            word, at = match.group(), match.start()
            word_ids = self._word_ids(word)
            ids += word_ids
            if word in self._specials:
                spans.append((at, match.end()))
                continue
            # A token is a run of the word's UTF-8 bytes; it covers the characters those
            # bytes belong to (a character split across tokens is in each of them).
            char_of_byte = [c for c, ch in enumerate(word) for _ in ch.encode("utf-8")]
            byte = 0
            for k, i in enumerate(word_ids):
                size = len(self._id_to_bytes[i]) - (len(_WORD_END) if k == len(word_ids) - 1 else 0)
                spans.append((at + char_of_byte[byte], at + char_of_byte[byte + size - 1] + 1))
                byte += size
        result = (tuple(ids), tuple(spans))
        _remember(self._span_cache, chunk, result)
        return result

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without <start_of_text>, <end_of_text> or padding."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode takes a str, got {type(text).__name__}: "
                            "decode bytes or convert the value to str first.")
        # Cached per chunk, so a warm caption costs a split and a few dict lookups; chunks
        # repeat far more than captions do, and give the same ids as the whole text because
        # no match crosses a space.
        cache = self._chunk_cache
        ids: list[int] = []
        for chunk in _chunks(text):
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = self._encode_chunk(chunk)
                _remember(cache, chunk, chunk_ids)
            ids += chunk_ids
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """encode(text) and, per id, the [start, end) characters of `text` it came from.

        Grounding heads (GLIP) need to know which tokens spell which words of a prompt.
        Lowercasing and whitespace collapsing are tracked exactly, and so are HTML
        entities (every character an entity becomes covers the whole entity: "&amp;" ->
        "&"). Other rewrites by the cleaner (ftfy's mojibake, width, ligature and NFC
        fixes) are found by aligning its output with the text, both decomposed and
        lowercased: a rewritten stretch is shared out in proportion over the stretch it
        replaced (approximate for mojibake), and an inserted character maps to the
        character before it. A token covers every character any of its bytes came from,
        so a character split over several byte tokens belongs to each of them.
        """
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode_with_offsets takes a str, got "
                            f"{type(text).__name__}: decode bytes or convert the value first.")
        plain = _is_plain(text)
        fixed = text if plain else html.unescape(html.unescape(ftfy.fix_text(text)))
        starts, ends = (None, None) if plain else _align(text, fixed)
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        # str.split() and \S+ cut at the same (Unicode) whitespace; lower() never changes
        # across a space, so lowering chunk by chunk gives clean()'s chunks.
        for match in re.finditer(r"\S+", fixed):
            chunk, at = match.group(), match.start()
            lowered = chunk.lower()
            chunk_ids, spans = self._chunk_spans(lowered)
            ids += chunk_ids
            if len(lowered) == len(chunk):
                src = None
            else:  # e.g. "İ" lowers to two characters; both come from the one
                src = [c for c, ch in enumerate(chunk) for _ in ch.lower()]
                if len(src) != len(lowered):
                    src = [k * len(chunk) // len(lowered) for k in range(len(lowered))]
            for s, e in spans:
                s, e = (at + s, at + e) if src is None else (at + src[s], at + src[e - 1] + 1)
                if starts is not None:
                    s, e = min(starts[s:e]), max(ends[s:e])
                offsets.append((s, e))
        return ids, offsets

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids, word ends as spaces; specials and padding (id 0 is "!") kept."""
        data = b"".join(self._id_to_bytes[int(i)] for i in ids)
        return data.decode("utf-8", errors="replace").replace(_WORD_END, " ")

    def __call__(self, texts: str | Sequence[str],
                 context_length: int = CONTEXT_LENGTH) -> np.ndarray:
        """int32 ids_BL: SOT, ids, EOT, zero padding; a text too long is cut but keeps EOT last."""
        if isinstance(texts, str):
            texts = [texts]
        elif isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
            raise TypeError(f"texts must be a str or a sequence of str, got "
                            f"{type(texts).__name__}: decode bytes first, or pass a list of str.")
        if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
            raise TypeError(f"context_length must be an int, got {type(context_length).__name__}: "
                            "pass e.g. context_length=77.")
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 to hold <start_of_text> and "
                             f"<end_of_text>, got {context_length}: pass e.g. context_length=77.")
        keep = context_length - 2
        rows = []
        for b, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{b}] is {type(text).__name__}, not str: tokenize takes "
                                "a str or a sequence of str; convert or drop that item first.")
            ids = self.encode(text)
            rows.append([SOT_ID, *ids[:keep], EOT_ID])
        ids_BL = np.full((len(rows), context_length), PAD_ID, np.int32)
        for b, row in enumerate(rows):
            ids_BL[b, :len(row)] = row
        return ids_BL


@functools.cache
def default_tokenizer() -> Tokenizer:
    """The shared tokenizer over the packaged vocabulary, built on first use."""
    return Tokenizer()


def encode_with_offsets(text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of text and each one's [start, end) characters in it, by the default tokenizer."""
    return default_tokenizer().encode_with_offsets(text)


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """int32 ids_BL of CLIP tokens, as open_clip.tokenize gives them; B is 1 for a single str."""
    return default_tokenizer()(texts, context_length)
