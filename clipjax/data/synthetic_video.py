"""The built-in video dataset: one coloured shape that moves or changes size, made in NumPy.

Every video is a pure function of (seed, split, index), drawn with the image dataset's
counter-based hash (`clipjax.data.synthetic`), so a video does not depend on the batch or
the host that draws it and an iterator's state is one integer.

The label is one of six motions. The geometry of a video is drawn without looking at its
direction: a trajectory (two end positions, or two sizes) is drawn as an unordered pair and
rendered in its canonical order (rightwards, downwards, growing); "moving left", "moving up"
and "shrinking" play those frames backwards. So `render(..., motion_B=m)` and
`render(..., motion_B=MIRROR[m])` are the same frames in reverse order, and the frames of a
video as a set, hence any mean over frames, say nothing of its direction: only a model that
reads the order can tell left from right or growing from shrinking.
"""

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np

from clipjax.data import synthetic
from clipjax.data.synthetic import (_SHAPE_WORDS, _COLOUR_WORDS, COLOURS, SHAPES, _pick,
                                    _sdf, _uniform, _word)
from clipjax.evals import prompts
from clipjax.tokenizer import tokenize

MOTIONS = ("moving left", "moving right", "moving up", "moving down", "growing", "shrinking")
CLASSNAMES = MOTIONS  # the action classes; label = index into MOTIONS
MIRROR = np.asarray([1, 0, 3, 2, 5, 4])  # the motion a video shows when played backwards
_BACKWARDS = np.asarray([True, False, True, False, False, True])  # canonical order reversed

# ActionCLIP's 16 prompts (utils/Text_Prompt.py), in its order.
ACTION_TEMPLATES = prompts.ACTION_TEMPLATES  # ActionCLIP's 16

# Splits 2 and 3 of the shared hash, so no video reuses an image's random numbers.
SPLITS = {"train": 2, "test": 3, "held_out": 3}

_RADIUS = (0.12, 0.18)  # half-extent / frame size of a moving shape
_SMALL_RADIUS = (0.08, 0.12)  # of a growing shape at its smallest, and of a distractor
_GROWTH = (1.8, 2.6)  # largest / smallest half-extent of a growing shape
_TRAVEL = (0.5, 1.0)  # distance moved / the room the frame leaves
_DISTRACTOR = 0.3  # probability of a second, still shape of another colour
_TEMPLATE_FIELD = 0xFFF1  # the hash field of the iterator's template draw

# Verb phrase (third person) and gerund phrase per motion; every caption holds one of them.
_MOTION_VERBS = (
    ("moves to the left", "slides leftwards", "drifts left", "travels left", "heads left"),
    ("moves to the right", "slides rightwards", "drifts right", "travels right", "heads right"),
    ("moves up", "rises", "drifts upwards", "climbs", "slides up"),
    ("moves down", "falls", "drifts downwards", "sinks", "slides down"),
    ("grows", "gets bigger", "expands", "grows larger", "swells"),
    ("shrinks", "gets smaller", "contracts", "shrinks away", "dwindles"))
_MOTION_GERUNDS = (
    ("moving left", "sliding to the left", "drifting left", "heading left"),
    ("moving right", "sliding to the right", "drifting right", "heading right"),
    ("moving up", "rising", "drifting upwards", "climbing"),
    ("moving down", "falling", "drifting downwards", "sinking"),
    ("growing", "getting bigger", "expanding", "swelling"),
    ("shrinking", "getting smaller", "contracting", "dwindling"))
_SHAPE_WORDS_V = {**_SHAPE_WORDS, "circle": (*_SHAPE_WORDS["circle"], "ball")}
# {c} colour, {s} shape, {v} motion verb phrase, {g} motion gerund phrase, {b} background.
_CAPTIONS = ("a {c} {s} {v}", "the {c} {s} {v}", "a video of a {c} {s} {g}", "a {c} {s} {g}",
             "{c} {s} {g}", "a clip of the {c} {s} {g}", "watch the {c} {s} {v}",
             "a {c} {s} {g} on a {b} background", "the {s} is {c} and it {v}",
             "a {s}, coloured {c}, {g}")


@dataclasses.dataclass(frozen=True)
class Videos:
    """Rendered videos: frames uint8 [B, T, S, S, 3], the motion label [B] and its factors."""

    frames_BTHWC: np.ndarray
    motion_B: np.ndarray  # int32 index into MOTIONS
    shape_B: np.ndarray  # index into synthetic.SHAPES
    colour_B: np.ndarray  # index into synthetic.COLOURS
    background_B: np.ndarray  # 0 dark, 1 grey

    # The names the data contract uses.
    frames = property(lambda self: self.frames_BTHWC)
    motion = property(lambda self: self.motion_B)


def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"Unknown synthetic video split {split!r}; choose train or test.")
    return SPLITS[split]


def _draw_shapes(sdf_out: np.ndarray, shape_B: np.ndarray, dx: np.ndarray, dy: np.ndarray,
                 r: np.ndarray) -> None:
    for k, shape in enumerate(SHAPES):  # each video's own shape only
        m = shape_B == k
        if m.any():
            sdf_out[m] = _sdf(shape, dx[m], dy[m], r[m])


def render(seed: int, split: str, index_B: np.ndarray, num_frames: int, image_size: int,
           motion_B: np.ndarray | None = None) -> Videos:
    """The videos at `index_B` of `split` ("train" or "test"); `motion_B` replaces the drawn
    motions (the rest of each video stays as drawn)."""
    sid, s, t_n = _split_id(split), image_size, num_frames
    if num_frames < 2:
        raise ValueError(f"A video needs at least 2 frames to show a motion, got {num_frames}.")
    index_B = np.asarray(index_B, np.int64)
    b = len(index_B)
    u = _uniform(seed, sid, index_B, 0, 24).astype(np.float32)
    drawn = _pick(u[:, 0], len(MOTIONS))
    motion_B = drawn if motion_B is None else np.broadcast_to(np.asarray(motion_B, np.int64), (b,))
    axis_B = motion_B // 2  # 0 horizontal, 1 vertical, 2 size
    shape_B, colour_B = _pick(u[:, 1], len(SHAPES)), _pick(u[:, 2], len(COLOURS))

    # The trajectory in canonical order, phase 0..1 over the frames: (x, y, half-extent).
    phase_T = np.linspace(0.0, 1.0, t_n, dtype=np.float32)
    moving = axis_B < 2
    r_move = (_RADIUS[0] + (_RADIUS[1] - _RADIUS[0]) * u[:, 3]) * s
    r_small = (_SMALL_RADIUS[0] + (_SMALL_RADIUS[1] - _SMALL_RADIUS[0]) * u[:, 3]) * s
    r_big = r_small * (_GROWTH[0] + (_GROWTH[1] - _GROWTH[0]) * u[:, 12])
    margin = np.where(moving, r_move, r_big) + 1.0
    room = s - 2 * margin
    travel = np.where(moving, room * (_TRAVEL[0] + (_TRAVEL[1] - _TRAVEL[0]) * u[:, 9]), 0.0)
    start = margin + (room - travel) * u[:, 10]  # along the moving axis
    across = margin + room * u[:, 11]  # the other coordinate, fixed
    along_BT = start[:, None] + travel[:, None] * phase_T[None]
    cx_BT = np.where((axis_B == 0)[:, None], along_BT, across[:, None])
    cy_BT = np.where((axis_B == 1)[:, None], along_BT, across[:, None])
    cy_BT = np.where((axis_B == 2)[:, None], start[:, None], cy_BT)  # centre of a growing shape
    log_r = np.log(r_small)[:, None] + np.log(r_big / r_small)[:, None] * phase_T[None]
    r_BT = np.where(moving[:, None], r_move[:, None], np.exp(log_r)).astype(np.float32)

    grid = np.arange(s, dtype=np.float32) + 0.5
    x = grid[None, None, None, :] - cx_BT[:, :, None, None]
    y = grid[None, None, :, None] - cy_BT[:, :, None, None]
    angle = (u[:, 4] - 0.5) * math.radians(24)  # a small tilt, fixed over the video
    cos = np.cos(angle)[:, None, None, None]
    sin = np.sin(angle)[:, None, None, None]
    sdf_BTHW = np.empty((b, t_n, s, s), np.float32)
    _draw_shapes(sdf_BTHW, shape_B, cos * x + sin * y, -sin * x + cos * y, r_BT[..., None, None])
    alpha_BTHW1 = np.clip(0.5 - sdf_BTHW, 0.0, 1.0)[..., None]

    # Background: a tinted level, a fixed texture and a flicker indexed by canonical phase.
    level = 0.02 + 0.28 * u[:, 5]
    tint_BC = (u[:, 13:16] - 0.5) * 0.08
    noise_BP = _uniform(seed, sid, index_B, 1, s * s).astype(np.float32) - 0.5
    flicker_BTP = np.stack([np.roll(noise_BP, 97 * (k + 1), axis=1) for k in range(t_n)], 1)
    texture_BTHW = (0.05 * noise_BP[:, None] + 0.03 * flicker_BTP).reshape(b, t_n, s, s)
    img = (level[:, None] + tint_BC)[:, None, None, None, :] + texture_BTHW[..., None]

    # A still distractor, under the moving shape.
    d_shape = _pick(u[:, 16], len(SHAPES))
    d_colour = (colour_B + 1 + _pick(u[:, 17], len(COLOURS) - 1)) % len(COLOURS)
    d_r = (_SMALL_RADIUS[0] + (_SMALL_RADIUS[1] - _SMALL_RADIUS[0]) * u[:, 18]) * s
    d_cx, d_cy = [d_r + 1 + (s - 2 * d_r - 2) * u[:, k] for k in (19, 20)]
    d_sdf = np.empty((b, s, s), np.float32)
    _draw_shapes(d_sdf, d_shape, grid[None, None, :] - d_cx[:, None, None],
                 grid[None, :, None] - d_cy[:, None, None], d_r[:, None, None])
    d_alpha = np.clip(0.5 - d_sdf, 0.0, 1.0) * (u[:, 21] < _DISTRACTOR)[:, None, None]
    palette = np.asarray(list(COLOURS.values()), np.float32)
    d_alpha = d_alpha[:, None, :, :, None]
    # Composited in place: these [B, T, S, S, 3] passes are most of the time.
    img += (palette[d_colour][:, None, None, None, :] - img) * d_alpha

    rgb_BC = palette[colour_B] + (u[:, 6:9] - 0.5) * 0.16
    img += (rgb_BC[:, None, None, None, :] - img) * alpha_BTHW1
    img *= 255
    img += 0.5  # round to nearest on the cast, which truncates
    frames = np.clip(img, 0, 255, out=img).astype(np.uint8)
    back = _BACKWARDS[motion_B]
    frames[back] = frames[back, ::-1]
    return Videos(frames, motion_B.astype(np.int32), shape_B, colour_B,
                  (level > 0.16).astype(np.int64))


def captions(seed: int, split: str, videos: Videos, index_B: np.ndarray,
             variant: int = 0) -> list[str]:
    """One caption per video naming its colour, shape and motion; `variant` draws another
    wording of the same video."""
    u = _uniform(seed, _split_id(split), np.asarray(index_B, np.int64), 2 + variant, 8)
    colour_names = list(COLOURS)
    out = []
    for i in range(len(u)):
        m = videos.motion_B[i]
        verbs, gerunds = _MOTION_VERBS[m], _MOTION_GERUNDS[m]
        template = _CAPTIONS[_pick(u[i, 6:7], len(_CAPTIONS))[0]]
        out.append(template.format(
            s=_word(_SHAPE_WORDS_V[SHAPES[videos.shape_B[i]]], u[i, 0], u[i, 1]),
            c=_word(_COLOUR_WORDS[colour_names[videos.colour_B[i]]], u[i, 2], u[i, 3]),
            v=verbs[_pick(u[i, 4:5], len(verbs))[0]], g=gerunds[_pick(u[i, 5:6], len(gerunds))[0]],
            b=("dark", "grey")[videos.background_B[i]]))
    return out


def _batch(videos: Videos) -> dict[str, np.ndarray]:
    b, t_n = videos.frames_BTHWC.shape[:2]
    return {"video": videos.frames_BTHWC, "frame_mask": np.ones((b, t_n), bool),
            "label": videos.motion_B.astype(np.int32)}


# --- training batches ---------------------------------------------------------------------

class SyntheticVideoIterator(Iterator[dict[str, np.ndarray]]):
    """Endless batches {"video" u8 [b,T,S,S,3], "frame_mask" bool [b,T], "text" i32 [b,L],
    "label" i32 [b]} of one split.

    `batch_size` is the global batch; this host yields rows
    [process_index * b, (process_index + 1) * b) of it, b = batch_size // process_count.
    text="caption" gives each video a caption, text="template" one of `templates` filled with
    its class name (ActionCLIP's training text). State is the next global batch's first index.
    """

    def __init__(self, batch_size: int, *, split: str = "train", num_frames: int = 8,
                 image_size: int = 32, context_length: int = 16, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, text: str = "caption",
                 templates: Sequence[str] = ACTION_TEMPLATES, mirror_pairs: bool = False):
        _split_id(split)
        if batch_size % process_count:
            raise ValueError(f"The global batch size {batch_size} does not divide over "
                             f"{process_count} processes; use a multiple of {process_count}.")
        if text not in ("caption", "template"):
            raise ValueError(f"Unknown text={text!r} for synthetic video; use caption or template.")
        if text == "template" and not all("{}" in t for t in templates):
            raise ValueError("Every template needs a {} where the class name goes.")
        self.batch_size, self.split, self.num_frames = batch_size, split, num_frames
        self.image_size, self.context_length, self.seed = image_size, context_length, seed
        self.process_index, self.process_count = process_index, process_count
        self.text, self.templates = text, tuple(templates)
        # Hard negatives: each clip next to itself played backwards (its mirror motion), so
        # a batch cannot be told apart without the frames' order.
        self.mirror_pairs = bool(mirror_pairs)
        if mirror_pairs and (batch_size // process_count) % 2:
            raise ValueError(f"mirror_pairs needs an even batch on each host; got "
                             f"{batch_size // process_count}.")
        self._next = 0

    def __next__(self) -> dict[str, np.ndarray]:
        per = self.batch_size // self.process_count
        step = self.batch_size // 2 if self.mirror_pairs else self.batch_size
        lo = self._next + self.process_index * (per // 2 if self.mirror_pairs else per)
        self._next += step
        if self.mirror_pairs:
            half = np.arange(lo, lo + per // 2)
            index_B = np.repeat(half, 2)
            drawn = render(self.seed, self.split, half, 2, 4).motion_B
            motion_B = np.stack([drawn, MIRROR[drawn]], 1).reshape(-1)
            videos = render(self.seed, self.split, index_B, self.num_frames, self.image_size,
                            motion_B=motion_B)
        else:
            index_B = np.arange(lo, lo + per)
            videos = render(self.seed, self.split, index_B, self.num_frames, self.image_size)
        if self.text == "caption":
            text = captions(self.seed, self.split, videos, index_B)
        else:
            u = _uniform(self.seed, SPLITS[self.split], index_B, _TEMPLATE_FIELD)[:, 0]
            which = _pick(u, len(self.templates))
            text = [self.templates[k].format(CLASSNAMES[m]) for k, m in zip(which, videos.motion_B)]
        return {**_batch(videos), "text": tokenize(text, self.context_length)}

    def _settings(self) -> dict:
        return {"seed": self.seed, "split": self.split, "batch_size": self.batch_size,
                "num_frames": self.num_frames, "image_size": self.image_size,
                "context_length": self.context_length, "process_count": self.process_count,
                "text": self.text, "mirror_pairs": self.mirror_pairs}

    def get_state(self) -> dict:
        return {"next_index": self._next, **self._settings()}

    def set_state(self, state: dict) -> None:
        """Resume; refused when a setting that shapes the batches differs."""
        synthetic.check_resume(state, self._settings())
        self._next = int(state["next_index"])


# --- the held-out evaluation set ----------------------------------------------------------

class SyntheticVideos:
    """The first `num_videos` of the test split, for action accuracy and video retrieval.

    `batches` yields this host's videos (every process_count-th); the hosts come from JAX
    unless given.
    """

    def __init__(self, num_videos: int, *, seed: int = 0, num_frames: int = 8,
                 image_size: int = 32, captions_per_video: int = 1,
                 process_index: int | None = None, process_count: int | None = None):
        self.num_videos, self.seed, self.split = num_videos, seed, "test"
        self.num_frames, self.image_size = num_frames, image_size
        self.captions_per_video = captions_per_video
        self.process_index, self.process_count = process_index, process_count
        self.classnames = list(CLASSNAMES)
        self.description = f"synthetic video test split ({num_videos} videos)"
        self.skipped: list[tuple[str, str, str]] = []  # never any; the real sets' protocol

    def __len__(self) -> int:
        return self.num_videos

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """One pass over this host's videos in index order, `batch_size` rows a batch."""
        index, count = self.process_index, self.process_count
        if index is None or count is None:
            import jax

            index = jax.process_index() if index is None else index
            count = jax.process_count() if count is None else count
        rows = np.arange(index, self.num_videos, count, dtype=np.int64)
        for lo in range(0, len(rows), batch_size):
            index_B = rows[lo:lo + batch_size]
            videos = render(self.seed, self.split, index_B, self.num_frames, self.image_size)
            yield {**_batch(videos), "index": index_B}

    def captions(self) -> list[list[str]]:
        """`captions_per_video` captions of every video (all hosts alike)."""
        index_B = np.arange(self.num_videos)
        videos = render(self.seed, self.split, index_B, 2, 4)  # captions need no pixels
        caps = [captions(self.seed, self.split, videos, index_B, variant=v)
                for v in range(self.captions_per_video)]
        return [list(c) for c in zip(*caps)]
