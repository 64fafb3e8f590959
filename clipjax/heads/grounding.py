"""GLIP prompts (Li et al. 2022): detection as phrase grounding over CLIP BPE tokens.

A detector grounds class names instead of predicting class ids: the names form one
caption ("person. bicycle. car"), each name's characters pick its tokens in a positive
map, a region's score for a class is the mean of its tokens' probabilities, and training
targets are the map's rows for the boxes' classes. Evaluation over many classes (LVIS)
runs one prompt per chunk of 40 classes; training prompts hold an image's positive
classes and up to 85 sampled negatives (GLIP-T's O365 config: RANDOM_SAMPLE_NEG 85,
CONTROL_PROB (0, 0, 0.5, 0), SEPARATION_TOKENS ". ").

Departures from microsoft/GLIP (od_to_grounding.py, modulated_coco.py, inference.py):
- CLIP BPE with character offsets replaces BERT; <start_of_text> sits where [CLS] did,
  so map columns are shifted by one as in GLIP;
- a name's tokens are those whose characters overlap its span (GLIP looks up the tokens
  of its first and last characters, with +-1, 2 fallbacks; the same for real names);
- rows sum to exactly 1 (GLIP divides by sum + 1e-6); a name cut off by the context,
  even in part, is an error, or an all-zero row with truncate_ok (GLIP keeps whatever its
  fallbacks find);
- clean_name also strips the name and collapses every whitespace run (same token ids);
- negatives are drawn from the classes that are not positive, so a prompt gets exactly
  the number drawn (GLIP draws from all classes and drops the positives it hits).
"""

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import tokenizer as tk

SEPARATOR = ". "
PER_PROMPT = 40  # LVIS chunked evaluation (TEST.CHUNKED_EVALUATION)
MAX_NEGATIVES = 85  # DATASETS.RANDOM_SAMPLE_NEG
P_FULL = 0.5  # chance of all max_negatives; otherwise a uniform count in 1..max


def clean_name(name: str) -> str:
    """A class name as GLIP puts it in a prompt: "bow_(weapon)" -> "bow"."""
    name = re.sub(r"\(.*\)", "", name).replace("_", " ")
    return " ".join(name.split())


def build_prompt(names: Sequence[str],
                 separator: str = SEPARATOR) -> tuple[str, list[tuple[int, int]]]:
    """GLIP's caption: cleaned names joined by `separator`, none after the last; and their spans."""
    caption, spans = "", []
    for c, name in enumerate(names):
        cleaned = clean_name(name)
        if not cleaned:
            raise ValueError(f"class name {name!r} (prompt position {c}) is empty once cleaned "
                             "(parentheses and underscores removed): give the class a name.")
        if c:
            caption += separator
        spans.append((len(caption), len(caption) + len(cleaned)))
        caption += cleaned
    return caption, spans


def prompt_tokens(caption: str, spans: Sequence[tuple[int, int]], context_length: int,
                  truncate_ok: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """int32 tokens_L laid out as clipjax.tokenize does; float32 map_CL: a name's tokens sum to 1.

    A name with any token past the context raises a ValueError, or with truncate_ok (for
    training prompts, where GLIP also lets the tail fall off) gets an all-zero row.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2, got {context_length}: pass the "
                         "text tower's context length, e.g. 77.")
    ids, offsets = tk.encode_with_offsets(caption)
    keep = context_length - 2
    row = [tk.SOT_ID, *ids[:keep], tk.EOT_ID]
    tokens_L = np.full(context_length, tk.PAD_ID, np.int32)
    tokens_L[:len(row)] = row

    spans_C2 = np.asarray(spans, np.int64).reshape(-1, 2)
    start_C, end_C = spans_C2[:, 0], spans_C2[:, 1]
    bad = (start_C < 0) | (start_C >= end_C) | (end_C > len(caption))
    if bad.any():
        raise ValueError(f"span {tuple(spans_C2[bad][0])} is not a non-empty [start, end) in "
                         f"the {len(caption)}-character caption: take spans from build_prompt.")
    offsets_T2 = np.asarray(offsets, np.int64).reshape(-1, 2)
    hit_CT = (offsets_T2[None, :, 0] < end_C[:, None]) & (offsets_T2[None, :, 1] > start_C[:, None])
    empty_C = ~hit_CT.any(1)
    if empty_C.any():
        c = int(np.argmax(empty_C))
        raise ValueError(f"name {caption[slice(*spans_C2[c])]!r} (prompt position {c}) has no "
                         "text tokens, only characters the tokenizer drops: rename the class.")
    cut_C = hit_CT[:, keep:].any(1)
    if cut_C.any() and not truncate_ok:
        first = caption[slice(*spans_C2[np.argmax(cut_C)])]
        raise ValueError(f"{cut_C.sum()} of {len(cut_C)} class names, first {first!r}, "
                         f"do not fit in {context_length} text tokens: put fewer classes in each "
                         "prompt (chunk_classes) or use a longer text context.")
    hit_CT[cut_C] = False
    n = min(len(ids), keep)
    map_CL = np.zeros((len(spans_C2), context_length), np.float32)
    map_CL[:, 1:1 + n] = hit_CT[:, :n]  # column 0 is <start_of_text>
    map_CL /= np.maximum(map_CL.sum(1, keepdims=True), 1.0)
    return tokens_L, map_CL


def class_prompt(names: Sequence[str], class_ids: Sequence[int] | np.ndarray,
                 context_length: int, separator: str = SEPARATOR,
                 truncate_ok: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """tokens_L and map_CL of the prompt naming class_ids in order (an LVIS chunk, an image)."""
    caption, spans = build_prompt([names[int(c)] for c in class_ids], separator)
    return prompt_tokens(caption, spans, context_length, truncate_ok)


def chunk_classes(num_classes: int, per_prompt: int = PER_PROMPT) -> list[np.ndarray]:
    """Class ids in consecutive chunks of per_prompt, one prompt each (GLIP's chunked eval)."""
    if per_prompt < 1:
        raise ValueError(f"per_prompt must be at least 1, got {per_prompt}: GLIP uses 40 for LVIS.")
    starts = range(0, num_classes, per_prompt)
    return [np.arange(s, min(s + per_prompt, num_classes)) for s in starts]


def name_lengths(names: Sequence[str], separator: str = SEPARATOR) -> np.ndarray:
    """int32 tokens each class takes in a prompt (name and separator), for sample_prompt."""
    return np.array([len(tk.encode_with_offsets(clean_name(n) + separator)[0]) for n in names],
                    np.int32)


def sample_prompt(rng: np.random.Generator, positive: Sequence[int] | np.ndarray,
                  num_classes: int, max_negatives: int = MAX_NEGATIVES, shuffle: bool = True, *,
                  p_full: float = P_FULL, lengths_C: np.ndarray | None = None,
                  budget: int = tk.CONTEXT_LENGTH - 2) -> np.ndarray:
    """Class ids of one training image's prompt: its positives and sampled negatives, mixed.

    With probability p_full it draws min(max_negatives, #non-positive classes) negatives,
    else a uniform count from 1 to that. Given lengths_C (name_lengths), positives are
    kept in random order while they fit in `budget` tokens and negatives while the
    remainder stays positive, as GLIP screens them; boxes of a dropped positive have no
    class in the prompt (labels_to_positive_map gives them zero rows). shuffle=False
    returns the ids sorted.
    """
    pos = np.unique(np.asarray(positive, np.int64))
    if pos.size and (pos[0] < 0 or pos[-1] >= num_classes):
        raise ValueError(f"positive classes must lie in [0, {num_classes}), got {pos.tolist()}: "
                         "map dataset category ids to contiguous class indices first.")
    candidates = np.setdiff1d(np.arange(num_classes), pos)
    full = min(max_negatives, candidates.size)
    count = 0
    if full > 0:
        count = full if rng.random() < p_full else int(rng.integers(1, full + 1))
    neg = rng.choice(candidates, size=count, replace=False)
    if lengths_C is not None:
        lengths_C = np.asarray(lengths_C)
        pos = rng.permutation(pos) if shuffle else pos
        pos = pos[np.cumsum(lengths_C[pos]) <= budget]
        room = budget - lengths_C[pos].sum()
        neg = neg[np.cumsum(lengths_C[neg]) < room]
    ids = np.concatenate([pos, neg]).astype(np.int32)
    if shuffle:
        rng.shuffle(ids)
    else:
        ids.sort()
    return ids


def class_scores(token_probs_AL: np.ndarray | jax.Array,
                 map_CL: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """scores_AC: each class's mean token probability (map_CL rows sum to 1); batch dims too."""
    if isinstance(token_probs_AL, jax.Array) or isinstance(map_CL, jax.Array):
        return jnp.einsum("...al,...cl->...ac", token_probs_AL, map_CL,
                          precision=jax.lax.Precision.HIGHEST)
    return np.einsum("...al,...cl->...ac", token_probs_AL, map_CL)


def labels_to_positive_map(box_labels_M: Sequence[int] | np.ndarray,
                           prompt_classes_C: Sequence[int] | np.ndarray,
                           map_CL: np.ndarray) -> np.ndarray:
    """map_ML: each box's target tokens, its class's row; zero for a class not in the prompt."""
    classes_C = np.asarray(prompt_classes_C)
    if np.unique(classes_C).size != classes_C.size:
        raise ValueError(f"prompt classes repeat ({classes_C.tolist()}): name each class once "
                         "per prompt.")
    match_MC = np.asarray(box_labels_M).reshape(-1, 1) == classes_C.reshape(1, -1)
    return match_MC.astype(np.float32) @ np.asarray(map_CL, np.float32)
