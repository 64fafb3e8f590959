"""The built-in dataset: procedural coloured shapes with varied captions, made in NumPy.

Every example is a pure function of (seed, split, index): its random numbers come from a
counter-based hash, not from a stateful generator, so an example does not depend on the
batch size or on the host that draws it, the training and held-out splits never share an
image, and an iterator's state is one integer.

Classes are shape x colour (6 x 6 = 36, chance 2.8%), named "red circle" ... "cyan ring";
`CLASSNAMES` and `TEMPLATES` serve zero-shot evaluation. Captions vary the wording
(templates, synonyms) and mention size and position, so the text tower has to read them.
"""

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np

from clipjax.data.transforms import CLIP_MEAN, CLIP_STD
from clipjax.tokenizer import tokenize

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
# Far apart in RGB so that 32-pixel images keep them distinct.
COLOURS = {"red": (0.90, 0.12, 0.10), "green": (0.12, 0.72, 0.16), "blue": (0.14, 0.30, 0.95),
           "yellow": (0.96, 0.86, 0.12), "purple": (0.62, 0.16, 0.86), "cyan": (0.10, 0.82, 0.86)}
CLASSNAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)  # label = shape * 6 + colour
TEMPLATES = ("a {}.", "a photo of a {}.", "a picture of a {}.", "there is a {}.")

SPLITS = {"train": 0, "held_out": 1}
SIZES = ("small", "medium", "large")
_SIZE_RANGE = ((0.15, 0.21), (0.23, 0.29), (0.31, 0.38))  # half-extent / image size

# The first word of each list is the one the class names use.
_SHAPE_WORDS = {"circle": ("circle", "disc", "dot"), "square": ("square", "box", "block"),
                "triangle": ("triangle", "wedge"), "diamond": ("diamond", "rhombus"),
                "cross": ("cross", "plus sign", "plus"), "ring": ("ring", "hoop", "donut")}
_COLOUR_WORDS = {"red": ("red", "crimson", "scarlet"), "green": ("green", "emerald", "lime"),
                 "blue": ("blue", "azure", "cobalt"), "yellow": ("yellow", "golden", "lemon"),
                 "purple": ("purple", "violet", "magenta"), "cyan": ("cyan", "turquoise", "aqua")}
_SIZE_WORDS = {"small": ("small", "tiny", "little"), "medium": ("medium", "mid-sized"),
               "large": ("large", "big", "huge")}
# Rows top/middle/bottom by columns left/middle/right.
_POSITION_WORDS = (("in the top left corner", "top left"), ("at the top", "top"),
                   ("in the top right corner", "top right"), ("on the left", "left"),
                   ("in the center", "middle"), ("on the right", "right"),
                   ("in the bottom left corner", "bottom left"), ("at the bottom", "bottom"),
                   ("in the bottom right corner", "bottom right"))
_BACKGROUND_WORDS = ("dark", "grey")  # background level below / above 0.2
# {c} colour, {s} shape, {z} size, {p} position phrase, {q} position noun, {b} background.
_CAPTIONS = ("a {c} {s}", "a photo of a {c} {s}", "a {z} {c} {s}", "a {c} {s} {p}",
             "a {z} {c} {s} {p}", "a picture of a {z} {c} {s}", "there is a {c} {s} {p}",
             "a {c} {s} on a {b} background", "a {s} that is {c}", "a {z} {s}, coloured {c}",
             "a {c} {s} at the {q}", "{c} {s}")
_CANONICAL = 0.6  # probability of the class name's own words over a synonym

_MEAN_C = np.asarray(CLIP_MEAN, np.float32)
_STD_C = np.asarray(CLIP_STD, np.float32)


# --- counter-based randomness -------------------------------------------------------------

def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 that scrambles every bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniform(seed: int, split: int, index_B: np.ndarray, field: int, n: int = 1) -> np.ndarray:
    """Uniforms [B, n] in [0, 1), a fixed function of (seed, split, example index, field)."""
    with np.errstate(over="ignore"):
        key = _mix(np.asarray([seed * 4 + split], np.uint64))
        x = _mix(key ^ _mix(index_B.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)))
        x = _mix(x[:, None] ^ np.uint64(field << 40) ^ np.arange(n, dtype=np.uint64)[None])
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _pick(u: np.ndarray, k: int) -> np.ndarray:
    return np.minimum((u * k).astype(np.int64), k - 1)


# --- examples -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Examples:
    """Rendered examples: images uint8 [B, S, S, 3], labels [B] and their factors."""

    image_BHWC: np.ndarray
    label_B: np.ndarray
    shape_B: np.ndarray
    colour_B: np.ndarray
    size_B: np.ndarray
    position_B: np.ndarray  # 0..8, row-major over top/middle/bottom x left/middle/right
    background_B: np.ndarray  # 0 dark, 1 grey


def _sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance in pixels (negative inside) of `shape` with half-extent r, [B, S, S]."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        return np.maximum(ax, ay) - 0.82 * r
    if shape == "triangle":  # equilateral, apex up (y grows downwards), circumradius 1.1 r
        t = 1.1 * r
        return np.maximum((np.sqrt(3) * ax + dy) / 2 - t / 2, -dy - t / 2)
    if shape == "diamond":
        return (ax + ay - 1.1 * r) / np.sqrt(2)
    if shape == "cross":
        bar = 0.30 * r
        return np.minimum(np.maximum(ax - r, ay - bar), np.maximum(ax - bar, ay - r))
    return np.abs(np.hypot(dx, dy) - 0.72 * r) - 0.28 * r  # ring


def render(seed: int, split: str, index_B: np.ndarray, image_size: int) -> Examples:
    """The examples at `index_B` of `split` ("train" or "held_out"), as uint8 images."""
    if split not in SPLITS:
        raise ValueError(f"Unknown synthetic split {split!r}; choose one of {', '.join(SPLITS)}.")
    s, sid = image_size, SPLITS[split]
    index_B = np.asarray(index_B, np.int64)
    b = len(index_B)
    u = _uniform(seed, sid, index_B, 0, 12)
    shape_B, colour_B, size_B = _pick(u[:, 0], len(SHAPES)), _pick(u[:, 1], 6), _pick(u[:, 2], 3)
    lo, hi = np.asarray(_SIZE_RANGE).T
    r = (lo[size_B] + (hi - lo)[size_B] * u[:, 3]) * s  # half-extent in pixels
    margin = r + 1.0
    cx = margin + (s - 2 * margin) * u[:, 4]
    cy = margin + (s - 2 * margin) * u[:, 5]
    angle = (u[:, 6] - 0.5) * math.radians(24)  # small tilt; 45 degrees would make a diamond
    background_level = 0.02 + 0.38 * u[:, 7]
    jitter = (u[:, 8:11] - 0.5) * 0.16

    grid = np.arange(s, dtype=np.float32) + 0.5
    x = grid[None, None, :] - cx[:, None, None].astype(np.float32)
    y = grid[None, :, None] - cy[:, None, None].astype(np.float32)
    cos = np.cos(angle)[:, None, None].astype(np.float32)
    sin = np.sin(angle)[:, None, None].astype(np.float32)
    dx, dy = cos * x + sin * y, -sin * x + cos * y
    sdf_BHW = np.empty((b, s, s), np.float32)
    for k, shape in enumerate(SHAPES):  # each example's own shape only
        m = shape_B == k
        sdf_BHW[m] = _sdf(shape, dx[m], dy[m], r[m, None, None].astype(np.float32))
    # Coverage from the signed distance: a one-pixel antialiased edge.
    alpha_BHW = np.clip(0.5 - sdf_BHW, 0.0, 1.0)

    rgb_BC = (np.asarray(list(COLOURS.values()))[colour_B] + jitter).astype(np.float32)
    noise_BHW = _uniform(seed, sid, index_B, 1, s * s).reshape(b, s, s).astype(np.float32) - 0.5
    bg_BHW = background_level[:, None, None].astype(np.float32) + 0.06 * noise_BHW
    alpha = alpha_BHW[..., None]
    img = bg_BHW[..., None] * (1 - alpha) + rgb_BC[:, None, None, :] * alpha
    img_BHWC = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)

    third = s / 3
    row = np.minimum((cy // third).astype(np.int64), 2)
    col = np.minimum((cx // third).astype(np.int64), 2)
    return Examples(img_BHWC, shape_B * 6 + colour_B, shape_B, colour_B, size_B, row * 3 + col,
                    (background_level > 0.2).astype(np.int64))


def _word(options: Sequence[str], u_pick: float, u_which: float) -> str:
    if u_pick < _CANONICAL:
        return options[0]
    return options[1 + min(int(u_which * (len(options) - 1)), len(options) - 2)]


def captions(seed: int, split: str, ex: Examples, index_B: np.ndarray, variant: int = 0) -> list[str]:
    """One caption per example; `variant` draws a different wording of the same image."""
    u = _uniform(seed, SPLITS[split], np.asarray(index_B, np.int64), 2 + variant, 8)
    colour_names = list(COLOURS)
    out = []
    for i in range(len(index_B)):
        shape, colour = SHAPES[ex.shape_B[i]], colour_names[ex.colour_B[i]]
        phrase, noun = _POSITION_WORDS[ex.position_B[i]]
        template = _CAPTIONS[_pick(u[i, 6:7], len(_CAPTIONS))[0]]
        out.append(template.format(
            s=_word(_SHAPE_WORDS[shape], u[i, 0], u[i, 1]),
            c=_word(_COLOUR_WORDS[colour], u[i, 2], u[i, 3]),
            z=_word(_SIZE_WORDS[SIZES[ex.size_B[i]]], u[i, 4], u[i, 5]), p=phrase, q=noun,
            b=_BACKGROUND_WORDS[ex.background_B[i]]))
    return out


def normalize(img_BHWC: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 standardised with CLIP's mean and std."""
    return (img_BHWC.astype(np.float32) / np.float32(255) - _MEAN_C) / _STD_C


# --- the iterator -------------------------------------------------------------------------


def check_resume(state: dict, ours: dict) -> None:
    """Refuses a saved iterator state whose settings differ from this run's (states saved
    before a setting was recorded do not name it; those still resume)."""
    differ = [k for k in ours if k in state and state[k] != ours[k]]
    if differ:
        k = differ[0]
        name = "global_batch" if k == "batch_size" else k
        raise ValueError(f"The saved data state was written with {name}={state[k]!r}, this "
                         f"run has {name}={ours[k]!r}: resume with the same data settings "
                         f"(they differ in {', '.join(differ)}), or start a new workdir.")

class SyntheticIterator(Iterator[dict[str, np.ndarray]]):
    """Batches {"image" f32 [b,S,S,3], "text" i32 [b,L], "label" i32 [b]} of one split.

    `batch_size` is the global batch; this host yields rows
    [process_index * b, (process_index + 1) * b) of it, b = batch_size // process_count.
    The training split is endless; a split with `num_examples` ends after them (the last
    batch may be short). State is the index of the next global batch's first example.
    """

    def __init__(self, batch_size: int, *, split: str = "train", image_size: int = 32,
                 context_length: int = 77, seed: int = 0, num_examples: int | None = None,
                 process_index: int = 0, process_count: int = 1):
        if split not in SPLITS:
            raise ValueError(f"Unknown synthetic split {split!r}; choose one of {', '.join(SPLITS)}.")
        if batch_size % process_count:
            raise ValueError(f"The global batch size {batch_size} does not divide over "
                             f"{process_count} processes; use a multiple of {process_count}.")
        self.batch_size, self.split, self.image_size = batch_size, split, image_size
        self.context_length, self.seed, self.num_examples = context_length, seed, num_examples
        self.process_index, self.process_count = process_index, process_count
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
        ex = render(self.seed, self.split, index_B, self.image_size)
        text = captions(self.seed, self.split, ex, index_B)
        return {"image": normalize(ex.image_BHWC),
                "text": tokenize(text, self.context_length),
                "label": ex.label_B.astype(np.int32)}

    def _settings(self) -> dict:
        return {"seed": self.seed, "split": self.split, "batch_size": self.batch_size,
                "image_size": self.image_size, "context_length": self.context_length,
                "process_count": self.process_count}

    def get_state(self) -> dict:
        return {"next_index": self._next, **self._settings()}

    def set_state(self, state: dict) -> None:
        """Resume; refused when the batch size, image size, hosts, seed or split differ."""
        check_resume(state, self._settings())
        self._next = int(state["next_index"])


def write_images(folder, count: int, *, image_size: int = 64, seed: int = 0,
                 split: str = "held_out") -> list[str]:
    """The first `count` images of a split as PNG files named by index and class (for
    trying `clipjax embed` and `search`); returns their paths."""
    import os

    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    index_B = np.arange(count)
    ex = render(seed, split, index_B, image_size)
    paths = []
    for i, (image, label) in enumerate(zip(ex.image_BHWC, ex.label_B)):
        path = os.path.join(folder, f"{i:05d}_{CLASSNAMES[label].replace(' ', '_')}.png")
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths
