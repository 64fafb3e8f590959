"""Built-in segmentation data: several coloured shapes per image, a per-pixel class mask and
captions that name every shape, made in NumPy from the shapes of `synthetic`.

Like `synthetic`, every example is a pure function of (seed, split, index) through the same
counter-based hash, so examples do not depend on batch size or host, the training and
held-out splits never share an image, and an iterator's state is one integer.

Classes are the background and the six shapes (`CLASSES`); a pixel belongs to a shape when
the shape covers at least half of it, later shapes drawn over earlier ones. Captions name
each shape with its colour ("a red circle and a blue box"), so a caption-only model
(GroupViT) can learn to segment; every shape word in them is a noun to textblob's
PatternTagger. That tagger calls "cross" a verb and "plus" a conjunction, so captions call
a cross a "plus sign" (head noun "sign"), and they leave out the colour words it tags as
nouns (cyan, lime, cobalt, lemon, violet, aqua) so that noun extraction finds shapes only.
"""

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from clipjax.data import synthetic
from clipjax.data.synthetic import (COLOURS, SHAPES, SPLITS, _COLOUR_WORDS, _SHAPE_WORDS, _pick,
                                    _sdf, _uniform)
from clipjax.tokenizer import tokenize

IGNORE = -1  # a mask value that evaluation skips (the synthetic masks have none)
CLASSES = ("background",) + SHAPES  # mask value k is CLASSES[k]
# The words of each class other than its canonical label word (`label_words("canonical")`).
SYNONYMS = {"background": ("background",), **{s: _SHAPE_WORDS[s][1:] for s in SHAPES}}

# Words the captions use: those PatternTagger tags as nouns (shapes) and adjectives (colours).
_CAPTION_SHAPES = {s: tuple(w for w in _SHAPE_WORDS[s] if w not in ("cross", "plus"))
                   for s in SHAPES}
_CAPTION_COLOURS = {c: tuple(w for w in _COLOUR_WORDS[c]
                             if w not in ("cyan", "lime", "cobalt", "lemon", "violet", "aqua"))
                    for c in COLOURS}
_LABEL_WORDS = {
    "canonical": ("other",) + SHAPES,  # LSeg's convention: "other" for the background
    "synonym": tuple(SYNONYMS[c][0] for c in CLASSES),
    "caption": ("background",) + tuple(_CAPTION_SHAPES[s][0] for s in SHAPES),
}
# {all}: every shape, "a A, a B and a C"; {first} one shape, {rest} the others.
_CAPTIONS = ("{all}", "a photo of {all}", "a picture of {all}", "there is {all}",
             "{first} next to {rest}", "{first} beside {rest}", "{first} with {rest}",
             "there is {first} next to {rest}")
_ONE_SHAPE_CAPTIONS = 4  # the templates above that read well with a single shape
_CANONICAL = 0.6  # probability of a shape's or colour's first word over a synonym

_SIZE_RANGE = (0.11, 0.22)  # half-extent / image size
_EXTENT = 1.1  # the farthest any shape reaches from its centre, in half-extents (triangle)
_CANDIDATES = 16  # positions tried per shape to keep it clear of the earlier ones
# Hash fields, apart from those `synthetic` uses so that the two datasets share no stream.
_F_IMAGE, _F_NOISE, _F_SHAPE, _F_PLACE, _F_CAPTION, _F_TEMPLATE, _F_NOUN = range(32, 39)
_PER_SHAPE = 8


def label_words(kind: str = "canonical") -> tuple[str, ...]:
    """One label per class, in mask order: "canonical" ("other", "circle", ... "ring"; LSeg
    calls the background "other"), "synonym" (each class's first synonym: "background",
    "disc", "box", "wedge", "rhombus", "plus sign", "hoop"), or "caption" (the words the
    captions use most: "background", "circle", ... "plus sign", "ring")."""
    if kind not in _LABEL_WORDS:
        raise ValueError(f"Unknown label words {kind!r}; choose one of {', '.join(_LABEL_WORDS)}.")
    return _LABEL_WORDS[kind]


@dataclasses.dataclass(frozen=True)
class SegExamples:
    """Rendered examples; S (slots) is max_shapes, slots at or past count_B[i] hold -1."""

    image_BHWC: np.ndarray  # uint8
    mask_BHW: np.ndarray  # int32 class index, 0 background, shape k -> k + 1
    shapes_BS: np.ndarray  # int32 index into SHAPES, in drawing order
    colours_BS: np.ndarray  # int32 index into COLOURS
    count_B: np.ndarray  # int32 number of shapes, 1..max_shapes
    centre_BS2: np.ndarray  # float32 (x, y) in pixels
    radius_BS: np.ndarray  # float32 half-extent in pixels
    angle_BS: np.ndarray  # float32 tilt in radians


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"Unknown synthetic split {split!r}; choose one of {', '.join(SPLITS)}.")
    return SPLITS[split]


def render(seed: int, split: str, index_B, image_size: int, max_shapes: int = 3,
           shape_size: tuple[float, float] = _SIZE_RANGE) -> SegExamples:
    """The examples at `index_B` of `split` ("train" or "held_out"): 1..max_shapes shapes,
    each with a half-extent drawn from `shape_size` (fractions of the image size)."""
    sid, s = _check_split(split), image_size
    index_B = np.asarray(index_B, np.int64)
    b, n = len(index_B), max_shapes
    u = _uniform(seed, sid, index_B, _F_IMAGE, 2)
    count_B = 1 + _pick(u[:, 0], n)
    background_level = (0.02 + 0.38 * u[:, 1]).astype(np.float32)
    p = _uniform(seed, sid, index_B, _F_SHAPE, n * _PER_SHAPE).reshape(b, n, _PER_SHAPE)
    present_BS = np.arange(n)[None] < count_B[:, None]
    shapes_BS = np.where(present_BS, _pick(p[..., 0], len(SHAPES)), -1)
    colours_BS = np.where(present_BS, _pick(p[..., 1], len(COLOURS)), -1)
    lo, hi = shape_size
    radius_BS = ((lo + (hi - lo) * p[..., 2]) * s).astype(np.float32)
    angle_BS = ((p[..., 3] - 0.5) * math.radians(24)).astype(np.float32)  # a slight tilt
    jitter_BS3 = (p[..., 4:7] - 0.5) * 0.16

    # Each shape takes the first of its candidate centres clear of the earlier shapes, or
    # the least overlapping one when none is: mostly separated, a fixed number of draws.
    cand = _uniform(seed, sid, index_B, _F_PLACE, n * _CANDIDATES * 2).reshape(b, n, _CANDIDATES, 2)
    centre_BS2 = np.zeros((b, n, 2), np.float32)
    for k in range(n):
        margin = _EXTENT * radius_BS[:, k] + 0.5
        c_BK2 = margin[:, None, None] + (s - 2 * margin)[:, None, None] * cand[:, k]
        clear_BK = np.full((b, _CANDIDATES), np.inf)
        for j in range(k):
            gap = np.linalg.norm(c_BK2 - centre_BS2[:, None, j], axis=-1)
            gap -= _EXTENT * (radius_BS[:, k] + radius_BS[:, j])[:, None] + 1.0
            clear_BK = np.minimum(clear_BK, gap)
        ok_BK = clear_BK >= 0
        pick_B = np.where(ok_BK.any(1), ok_BK.argmax(1), clear_BK.argmax(1))
        centre_BS2[:, k] = c_BK2[np.arange(b), pick_B]

    noise_BHW = _uniform(seed, sid, index_B, _F_NOISE, s * s).reshape(b, s, s).astype(np.float32)
    img_BHWC = np.repeat((background_level[:, None, None] + 0.06 * (noise_BHW - 0.5))[..., None],
                         3, axis=-1)
    mask_BHW = np.zeros((b, s, s), np.int32)
    grid = np.arange(s, dtype=np.float32) + 0.5
    palette = np.asarray(list(COLOURS.values()))
    for k in range(n):
        x = grid[None, None, :] - centre_BS2[:, k, 0, None, None]
        y = grid[None, :, None] - centre_BS2[:, k, 1, None, None]
        cos = np.cos(angle_BS[:, k])[:, None, None]
        sin = np.sin(angle_BS[:, k])[:, None, None]
        dx, dy = cos * x + sin * y, -sin * x + cos * y
        sdf_BHW = np.full((b, s, s), np.inf, np.float32)
        for t, shape in enumerate(SHAPES):
            m = shapes_BS[:, k] == t
            sdf_BHW[m] = _sdf(shape, dx[m], dy[m], radius_BS[m, k, None, None])
        alpha_BHW = np.clip(0.5 - sdf_BHW, 0.0, 1.0)  # a one-pixel antialiased edge
        rgb_BC = (palette[np.maximum(colours_BS[:, k], 0)] + jitter_BS3[:, k]).astype(np.float32)
        a = alpha_BHW[..., None]
        img_BHWC = img_BHWC * (1 - a) + rgb_BC[:, None, None] * a
        mask_BHW = np.where(alpha_BHW >= 0.5, shapes_BS[:, k, None, None] + 1, mask_BHW)
    image = np.clip(np.rint(img_BHWC * 255), 0, 255).astype(np.uint8)
    return SegExamples(image, mask_BHW.astype(np.int32), shapes_BS.astype(np.int32),
                       colours_BS.astype(np.int32), count_B.astype(np.int32), centre_BS2,
                       radius_BS, angle_BS)


# --- captions and prompts -----------------------------------------------------------------

def _word(options: Sequence[str], u_pick: float, u_which: float) -> str:
    if u_pick < _CANONICAL or len(options) == 1:
        return options[0]
    return options[1 + min(int(u_which * (len(options) - 1)), len(options) - 2)]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _and(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _captions(seed: int, split: str, ex: SegExamples, index_B) -> tuple[list[str], list[list[str]]]:
    """Captions and, for each, the shape words it uses (in the caption's order)."""
    n = ex.shapes_BS.shape[1]
    u = _uniform(seed, _check_split(split), np.asarray(index_B, np.int64), _F_CAPTION, 1 + 5 * n)
    colour_names = list(COLOURS)
    texts, words = [], []
    for i in range(len(ex.count_B)):
        count = int(ex.count_B[i])
        order = np.argsort(u[i, 1:1 + count])  # name the shapes in a random order
        phrases, nouns = [], []
        for k in order:
            v = u[i, 1 + n + 4 * k:]
            noun = _word(_CAPTION_SHAPES[SHAPES[ex.shapes_BS[i, k]]], v[0], v[1])
            colour = _word(_CAPTION_COLOURS[colour_names[ex.colours_BS[i, k]]], v[2], v[3])
            phrases.append(_a(f"{colour} {noun}"))
            nouns.append(noun)
        options = _CAPTIONS if count > 1 else _CAPTIONS[:_ONE_SHAPE_CAPTIONS]
        template = options[_pick(u[i, :1], len(options))[0]]
        texts.append(template.format(all=_and(phrases), first=phrases[0],
                                     rest=_and(phrases[1:]) if count > 1 else ""))
        words.append(nouns)
    return texts, words


def captions(seed: int, split: str, ex: SegExamples, index_B) -> list[str]:
    """One caption per example that names every shape in it with its colour."""
    return _captions(seed, split, ex, index_B)[0]


def prompts(seed: int, split: str, index_B, captions_B: Sequence[str],
            nouns_B: Sequence[Sequence[str]], num_prompts: int) -> list[list[str]]:
    """GroupViT's multi-label prompts: up to `num_prompts` distinct nouns of each caption, in
    a random order, each in a random ImageNet template; the other slots hold the caption."""
    from clipjax.evals.prompts import openai_imagenet_templates

    templates = openai_imagenet_templates()
    sid, index_B = _check_split(split), np.asarray(index_B, np.int64)
    most = max([len(n) for n in nouns_B] + [1])
    order_u = _uniform(seed, sid, index_B, _F_NOUN, most)
    template_u = _uniform(seed, sid, index_B, _F_TEMPLATE, num_prompts)
    out = []
    for i, (caption, nouns) in enumerate(zip(captions_B, nouns_B)):
        nouns = list(dict.fromkeys(nouns))
        chosen = [nouns[j] for j in np.argsort(order_u[i, :len(nouns)])][:num_prompts]
        texts = [templates[_pick(template_u[i, j], len(templates))].format(noun)
                 for j, noun in enumerate(chosen)]
        out.append(texts + [caption] * (num_prompts - len(texts)))
    return out


# --- the iterator -------------------------------------------------------------------------

_FIELDS = ("image", "mask", "text")


class SyntheticSegIterator(Iterator[dict[str, np.ndarray]]):
    """Batches {"image" u8 [b,S,S,3], "mask" i32 [b,S,S], "text" i32 [b,L]} of one split,
    the `fields` asked for, plus "prompts" i32 [b,P,L] when `prompts` = P > 0.

    Host sharding, the end of a split with `num_examples` and the state follow
    `synthetic.SyntheticIterator`. `nouns_fn(caption)` picks the prompt nouns (GroupViT
    tags the caption's nouns); by default the shape words in the caption.
    """

    def __init__(self, batch_size: int, *, split: str = "train", image_size: int = 64,
                 context_length: int = 16, seed: int = 0, num_examples: int | None = None,
                 process_index: int = 0, process_count: int = 1, max_shapes: int = 3,
                 shape_size: tuple[float, float] = _SIZE_RANGE,
                 fields: Sequence[str] = _FIELDS, prompts: int = 0,
                 nouns_fn: Callable[[str], list[str]] | None = None):
        _check_split(split)
        if batch_size % process_count:
            raise ValueError(f"The global batch size {batch_size} does not divide over "
                             f"{process_count} processes; use a multiple of {process_count}.")
        unknown = [f for f in fields if f not in _FIELDS]
        if unknown:
            raise ValueError(f"Unknown synthetic segmentation field {unknown[0]!r}; choose from "
                             f"{', '.join(_FIELDS)} (prompts come with prompts=N).")
        self.batch_size, self.split, self.image_size = batch_size, split, image_size
        self.context_length, self.seed, self.num_examples = context_length, seed, num_examples
        self.process_index, self.process_count = process_index, process_count
        self.max_shapes, self.fields, self.prompts = max_shapes, tuple(fields), prompts
        self.shape_size = tuple(float(v) for v in shape_size)
        self.nouns_fn = nouns_fn
        self._next = 0

    def __next__(self) -> dict[str, np.ndarray]:
        end = self._next + self.batch_size
        if self.num_examples is not None:
            if self._next >= self.num_examples:
                raise StopIteration
            end = min(end, self.num_examples)
        # This host's contiguous share of the global batch.
        n = end - self._next
        per = math.ceil(n / self.process_count)
        lo = self._next + self.process_index * per
        index_B = np.arange(lo, min(lo + per, end))
        self._next = end
        ex = render(self.seed, self.split, index_B, self.image_size, self.max_shapes,
                    self.shape_size)
        out = {}
        if "image" in self.fields:
            out["image"] = ex.image_BHWC
        if "mask" in self.fields:
            out["mask"] = ex.mask_BHW
        if "text" in self.fields or self.prompts:
            texts, nouns = _captions(self.seed, self.split, ex, index_B)
            if "text" in self.fields:
                out["text"] = tokenize(texts, self.context_length)
            if self.prompts:
                if self.nouns_fn is not None:
                    nouns = [list(self.nouns_fn(t)) for t in texts]
                p = prompts(self.seed, self.split, index_B, texts, nouns, self.prompts)
                ids = tokenize([t for row in p for t in row], self.context_length)
                out["prompts"] = ids.reshape(len(index_B), self.prompts, self.context_length)
        return out

    def _settings(self) -> dict:
        return {"seed": self.seed, "split": self.split, "batch_size": self.batch_size,
                "image_size": self.image_size, "context_length": self.context_length,
                "process_count": self.process_count, "max_shapes": self.max_shapes,
                "shape_size": list(self.shape_size)}

    def get_state(self) -> dict:
        return {"next_index": self._next, **self._settings()}

    def set_state(self, state: dict) -> None:
        """Resume; refused when the batch size, image size, hosts, seed or split differ."""
        synthetic.check_resume(state, self._settings())
        self._next = int(state["next_index"])


# --- evaluation set and files -------------------------------------------------------------

class SyntheticSegSet:
    """A held-out evaluation set yielding (key, image_HWC uint8, mask_HW int32) one by one."""

    classnames = CLASSES
    num_classes = len(CLASSES)

    def __init__(self, num_examples: int, *, seed: int = 0, image_size: int = 64,
                 split: str = "held_out", max_shapes: int = 3,
                 shape_size: tuple[float, float] = _SIZE_RANGE):
        _check_split(split)
        self.num_examples, self.seed, self.image_size = num_examples, seed, image_size
        self.split, self.max_shapes = split, max_shapes
        self.shape_size = tuple(float(v) for v in shape_size)
        self.skipped: dict[str, int] = {}  # as the real eval sets'; rendering never fails

    def __len__(self) -> int:
        return self.num_examples

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        chunk = 64
        for lo in range(0, self.num_examples, chunk):
            index_B = np.arange(lo, min(lo + chunk, self.num_examples))
            ex = render(self.seed, self.split, index_B, self.image_size, self.max_shapes,
                    self.shape_size)
            for i, image, mask in zip(index_B, ex.image_BHWC, ex.mask_BHW):
                yield f"{i:05d}", image, mask


def write_dataset(folder, count: int, *, image_size: int = 64, seed: int = 0,
                  split: str = "held_out", max_shapes: int = 3) -> str:
    """A "segfolder" dataset: images/NNNNN.png, masks/NNNNN.png (mode L class indices) and
    classes.txt (one class a line, in index order); returns the folder."""
    from PIL import Image

    folder = os.fspath(folder)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "masks"), exist_ok=True)
    for key, image, mask in SyntheticSegSet(count, seed=seed, image_size=image_size, split=split,
                                            max_shapes=max_shapes):
        Image.fromarray(image).save(os.path.join(folder, "images", f"{key}.png"))
        Image.fromarray(mask.astype(np.uint8)).save(os.path.join(folder, "masks", f"{key}.png"))
    with open(os.path.join(folder, "classes.txt"), "w", encoding="utf-8") as f:
        f.write("".join(c + "\n" for c in CLASSES))
    return folder
