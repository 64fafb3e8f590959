"""CLIPasso: black Bézier strokes moved until a frozen CLIP ResNet sees the photo in them.

Nothing is trained. The control points of S cubic strokes follow Adam (lr 1.0) on CLIPasso's
loss (Vinker et al. 2022; yael-vinker/CLIPasso models/loss.py, painterly_rendering.py): the
mean squared difference of the ResNet's layer2 and layer3 maps of sketch and photo, plus
0.1 x (1 - cos) of their attention-pool embeddings, over the pair and 4 copies warped
jointly (torchvision's RandomPerspective(0.5, p=1, fill=0) then RandomResizedCrop(scale=0.8,
ratio=1)). Every `eval_every` iterations the un-augmented loss is taken; a seed stops once
it changes by <= 1e-5 twice without an improvement between, keeps its best strokes, and of
the seeds of an image (rows of one vmapped batch spread over the mesh) the lowest wins.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipjax.data.transforms import CLIP_MEAN, CLIP_STD
from clipjax.heads import raster
from clipjax.models.resnet import ModifiedResNet

LAYERS = ("stem", "layer1", "layer2", "layer3", "layer4")  # CLIPasso's conv-layer order


@dataclasses.dataclass(frozen=True)
class Settings:
    """CLIPasso's defaults (config.py, run_object_sketching.py)."""

    strokes: int = 16
    iterations: int = 2001
    eval_every: int = 10
    width: float = 1.5  # diffvg's stroke_width, half the drawn width (raster.CLIPASSO_WIDTH)
    lr: float = 1.0
    opacity_lr: float = 0.01
    optimise_opacity: bool = False
    augments: int = 4
    distortion: float = 0.5
    crop_scale: float = 0.8
    layer_weights: tuple[float, ...] = (0.0, 0.0, 1.0, 1.0, 0.0)
    fc_weight: float = 0.1
    min_delta: float = 1e-5
    samples: int = 32  # points along each curve for the rasteriser's polyline
    # White strokes on black, for a tower that never saw a white background (the tiny CLIPs
    # of the built-in shapes); CLIPasso draws black on white.
    inverted: bool = False

    def check(self) -> None:
        """One sentence for a setting a user can get wrong."""
        if len(self.layer_weights) != len(LAYERS):
            raise ValueError(f"layer weights {self.layer_weights} give {len(self.layer_weights)} "
                             f"numbers; give one for each of {', '.join(LAYERS)}, e.g. 0,0,1,1,0.")
        for name in ("strokes", "iterations", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: give a positive number.")
        if self.width <= 0:
            raise ValueError(f"width={self.width}: give a positive stroke width in pixels.")


# --- augmentation ------------------------------------------------------------------------


def perspective_corners(key: jax.Array, size: int, distortion: float = 0.5):
    """(start_42, end_42) corners as torchvision's RandomPerspective draws them (x, y)."""
    bound = int(distortion * (size // 2)) + 1
    u_42 = jax.random.randint(key, (4, 2), 0, bound).astype(jnp.float32)
    # Corners TL, TR, BR, BL: TR/BR take x from [size - bound, size), BR/BL y likewise.
    high_42 = jnp.asarray([[0, 0], [1, 0], [1, 1], [0, 1]], bool)
    end_42 = jnp.where(high_42, size - bound + u_42, u_42)
    start_42 = jnp.asarray([[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]],
                           jnp.float32)
    return start_42, end_42


def homography(src_42: jax.Array, dst_42: jax.Array, size: float = 1.0) -> jax.Array:
    """The projective map [3, 3] taking the four src points to dst (solved at unit scale)."""
    s, d = src_42 / size, dst_42 / size
    x, y, u, v = s[:, 0], s[:, 1], d[:, 0], d[:, 1]
    one, zero = jnp.ones_like(x), jnp.zeros_like(x)
    rows_u = jnp.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
    rows_v = jnp.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    h_8 = jnp.linalg.solve(jnp.concatenate([rows_u, rows_v]), jnp.concatenate([u, v]))
    h_33 = jnp.append(h_8, 1.0).reshape(3, 3)
    scale_33 = jnp.diag(jnp.asarray([size, size, 1.0], jnp.float32))
    return jnp.linalg.multi_dot([scale_33, h_33, jnp.linalg.inv(scale_33)],
                                precision="highest")


def warp_perspective(image_HWC: jax.Array, out_to_in_33: jax.Array, fill: float = 0.0):
    """torchvision's perspective(): output pixel centres mapped into the input, bilinear,
    outside filled (the fill blended by the sampled in-bounds mask, as torchvision does)."""
    h, w, _ = image_HWC.shape
    ys_YX, xs_YX = jnp.meshgrid(jnp.arange(h) + 0.5, jnp.arange(w) + 0.5, indexing="ij")
    grid_3YX = jnp.stack([xs_YX, ys_YX, jnp.ones_like(xs_YX)])
    # Full float32: a TPU's default bf16 passes would move pixels at 224 px.
    p_3YX = jnp.einsum("ij,jyx->iyx", out_to_in_33, grid_3YX, precision="highest")
    coords = [p_3YX[1] / p_3YX[2] - 0.5, p_3YX[0] / p_3YX[2] - 0.5]  # row, column indices

    def sample(plane):
        return jax.scipy.ndimage.map_coordinates(plane, coords, 1, "constant", 0.0)

    out_CYX = jax.vmap(sample)(jnp.moveaxis(image_HWC, -1, 0))
    mask_YX = sample(jnp.ones((h, w), image_HWC.dtype))
    return jnp.moveaxis(out_CYX * mask_YX + (1.0 - mask_YX) * fill, 0, -1)


def crop_side(size: int, scale: float) -> int:
    """RandomResizedCrop's square side at a fixed scale and ratio 1 (its first draw fits)."""
    return int(round(math.sqrt(scale * size * size)))


def resize(image_HWC: jax.Array, out: int) -> jax.Array:
    """Bilinear (antialiased when shrinking) to out x out, edges clamped, as torch resize()."""
    h, w, c = image_HWC.shape
    if (h, w) == (out, out):
        return image_HWC
    scale = jnp.asarray([out / h, out / w], jnp.float32)
    return jax.image.scale_and_translate(image_HWC, (out, out, c), (0, 1), scale,
                                         jnp.zeros(2, jnp.float32), "linear", antialias=True)


def augment(key: jax.Array, images_NHWC: jax.Array, out: int, distortion: float = 0.5,
            crop_scale: float = 0.8, fill: float = 0.0) -> jax.Array:
    """One random perspective and one random resized crop, the same for all N images."""
    k_persp, k_crop = jax.random.split(key)
    size = images_NHWC.shape[1]
    start_42, end_42 = perspective_corners(k_persp, size, distortion)
    out_to_in_33 = homography(end_42, start_42, size)  # torchvision maps output to input
    warped = jax.vmap(warp_perspective, (0, None, None))(images_NHWC, out_to_in_33, fill)
    side = crop_side(size, crop_scale)
    top, left = jax.random.randint(k_crop, (2,), 0, size - side + 1)
    crop = jax.lax.dynamic_slice(warped, (0, top, left, 0), (len(warped), side, side,
                                                             warped.shape[-1]))
    return jax.vmap(lambda x: resize(x, out))(crop)


def normalize(image_HWC: jax.Array) -> jax.Array:
    """[0, 1] RGB -> CLIP's standardised input."""
    return (image_HWC - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def views(key: jax.Array, sketch_HWC: jax.Array, photo_HWC: jax.Array, out: int,
          s: Settings) -> tuple[jax.Array, jax.Array]:
    """(sketch_VHWC, photo_VHWC), normalised: the pair resized to the tower, then
    `s.augments` joint warps (V = 1 + augments)."""
    pair_2HWC = jnp.stack([sketch_HWC, photo_HWC])
    plain_2HWC = jax.vmap(lambda x: resize(x, out))(pair_2HWC)
    if s.augments:
        warp = lambda k: augment(k, pair_2HWC, out, s.distortion, s.crop_scale)  # noqa: E731
        aug_A2HWC = jax.vmap(warp)(jax.random.split(key, s.augments))
        all_V2HWC = jnp.concatenate([plain_2HWC[None], aug_A2HWC])
    else:
        all_V2HWC = plain_2HWC[None]
    all_V2HWC = normalize(all_V2HWC)
    return all_V2HWC[:, 0], all_V2HWC[:, 1]


# --- the loss -----------------------------------------------------------------------------


def tower_of(config) -> ModifiedResNet:
    """The frozen image tower of a ResNet CLIP config, BatchNorm in eval mode."""
    v = config.vision
    return ModifiedResNet(v.image_size, tuple(v.layers), v.width, v.heads, config.embed_dim)


def clip_loss(fc_s_VE, maps_s: dict, fc_p_VE, maps_p: dict, s: Settings):
    """(total, {layer: weighted MSE, "fc": weighted 1 - cos}) over all views, as CLIPConvLoss."""
    parts = {name: w * jnp.mean(jnp.square(maps_s[name] - maps_p[name]))
             for name, w in zip(LAYERS, s.layer_weights) if w}
    if s.fc_weight:
        a, b = fc_s_VE.astype(jnp.float32), fc_p_VE.astype(jnp.float32)
        cos_V = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))
        parts["fc"] = s.fc_weight * jnp.mean(1.0 - cos_V)
    return sum(parts.values()), parts


def draw(strokes: dict, canvas: int, s: Settings) -> jax.Array:
    """One row's strokes -> RGB canvas [H, W, 3] in [0, 1], black on white (or inverted)."""
    widths_S = jnp.full(strokes["points"].shape[:1], 2.0 * s.width)
    grey = raster.render(strokes["points"], widths_S, strokes["opacity"], canvas,
                         samples=s.samples)
    return raster.to_rgb(1.0 - grey if s.inverted else grey)


def row_loss(tower: ModifiedResNet, params, strokes: dict, photo_HWC: jax.Array, key, canvas: int,
             s: Settings, augment_views: bool = True):
    """(loss, parts, sketch canvas) of one sketch against its photo; no augmentation when
    `augment_views` is False (the evaluation loss)."""
    sketch_HWC = draw(strokes, canvas, s)
    s_eval = s if augment_views else dataclasses.replace(s, augments=0)
    sketch_V, photo_V = views(key, sketch_HWC, photo_HWC, tower.image_size, s_eval)
    apply = lambda x: tower.apply({"params": params}, x, return_features=True)  # noqa: E731
    fc_s, maps_s = apply(sketch_V)
    fc_p, maps_p = apply(jax.lax.stop_gradient(photo_V))
    loss, parts = clip_loss(fc_s, maps_s, fc_p, maps_p, s)
    return loss, parts, sketch_HWC[..., 0]


# --- early stopping -----------------------------------------------------------------------


def stop_update(best, armed, loss, min_delta: float = 1e-5):
    """One evaluation of painterly_rendering.py's rule -> (best, armed, improved, stop).

    A change of more than min_delta downwards is a new best and disarms; a change of at
    most min_delta stops when armed, else arms; a rise of more than min_delta does neither.
    """
    delta = loss - best
    improved = (jnp.abs(delta) > min_delta) & (delta < 0)
    flat = jnp.abs(delta) <= min_delta
    return (jnp.where(improved, loss, best), jnp.where(improved, False, armed | flat),
            improved, flat & armed)


def stop_index(losses, min_delta: float = 1e-5) -> int | None:
    """The evaluation at which the rule stops a run with these losses (None: it runs on)."""
    best, armed = jnp.inf, jnp.asarray(False)
    for i, loss in enumerate(losses):
        best, armed, _, stop = stop_update(best, armed, jnp.float32(loss), min_delta)
        if bool(stop):
            return i
    return None


# --- initial strokes ----------------------------------------------------------------------

INIT_TAG = 2**31 - 1  # folded into a seed's key for its initial strokes (iterations stay below)


def initial_points(photo_HWC, strokes: int, seeds_K, vit=None, vit_params=None,
                   mask_HW=None, inverted: bool = False) -> np.ndarray:
    """Starting strokes [K, S, 4, 2] (pixels) of one photo ([0, 1] RGB, the canvas size) for
    each seed: starts drawn from the ViT's attention on the photo's XDoG lines, each stroke
    a short random walk (saliency.py); without a ViT every line pixel is equally likely.
    Where XDoG draws fewer line pixels than strokes inside the mask (CLIPasso then fails),
    attention alone decides."""
    from clipjax.heads import saliency

    photo_HWC = jnp.asarray(photo_HWC, jnp.float32)
    canvas = photo_HWC.shape[0]
    if vit is None:
        attn_HW = np.ones((canvas, canvas), np.float32)
    else:  # the ViT sees the photo at its own size; the map is resized to the canvas
        small_HWC = normalize(resize(photo_HWC, vit.config.vision.image_size))
        attn_HW = np.asarray(saliency.attention_map(vit, vit_params, small_HWC[None], canvas)[0])
    # XDoG inks the dark side of edges: for light strokes on black, of the negative.
    lines_HW = saliency.xdog(np.asarray(normalize(1.0 - photo_HWC if inverted else photo_HWC)))
    where_HW = attn_HW * (1.0 - lines_HW) * (1.0 if mask_HW is None else np.asarray(mask_HW))
    if (where_HW > 0).sum() < strokes:  # too few line pixels (a light object): attention alone
        lines_HW = np.zeros_like(lines_HW)
    prob_HW = saliency.saliency(attn_HW, lines_HW, mask_HW)
    out = []
    for seed in seeds_K:
        k_start, k_walk = jax.random.split(jax.random.fold_in(jax.random.key(int(seed)), INIT_TAG))
        starts_S2 = saliency.sample_starts(k_start, prob_HW, strokes)
        out.append(np.asarray(saliency.init_strokes(k_walk, starts_S2, canvas)))
    return np.stack(out)


# --- the loop -----------------------------------------------------------------------------


class State(NamedTuple):
    """Rows (images x seeds) first in every leaf."""

    strokes: dict  # {"points": [R, S, 4, 2], "opacity": [R, S]}
    opt: Any
    best: dict
    best_loss_R: jax.Array
    armed_R: jax.Array
    stopped_R: jax.Array
    best_iter_R: jax.Array


def optimizer(s: Settings) -> optax.GradientTransformation:
    """Adam on the points (torch's defaults, lr 1.0); on the opacities only when asked."""
    opacity = optax.adam(s.opacity_lr) if s.optimise_opacity else optax.set_to_zero()
    return optax.multi_transform({"points": optax.adam(s.lr), "opacity": opacity},
                                 {"points": "points", "opacity": "opacity"})


def init_state(points_RS42, s: Settings) -> State:
    points = jnp.asarray(points_RS42, jnp.float32)
    strokes = {"points": points, "opacity": jnp.ones(points.shape[:2], jnp.float32)}
    r = len(points)
    best = jax.tree.map(jnp.copy, strokes)  # its own buffers: the state is donated
    return State(strokes, optimizer(s).init(strokes), best, jnp.full((r,), jnp.inf),
                 jnp.zeros((r,), bool), jnp.zeros((r,), bool), jnp.zeros((r,), jnp.int32))


def untraced(s: Settings) -> Settings:
    """`s` with the fields the compiled functions do not depend on set to one value."""
    return dataclasses.replace(s, iterations=1, eval_every=1, min_delta=0.0)


@functools.lru_cache(maxsize=16)
def step_fns(tower: ModifiedResNet, s: Settings, canvas: int) -> tuple[Callable, Callable]:
    """(evaluate, step), jitted over rows, the state donated.

    evaluate(params, state, photos_RHWC, iteration, min_delta) -> (state, eval_loss_R,
    canvas_RHW): the un-augmented loss of the current strokes and the stopping rule's
    bookkeeping.
    step(params, state, photos_RHWC, seeds_R, iteration) -> state: one Adam step on the
    augmented loss, its warps drawn from (seed, iteration).
    """
    tx = optimizer(s)
    rows_like = lambda m, x: m.reshape((-1,) + (1,) * (x.ndim - 1))  # noqa: E731

    def evaluate(params, state: State, photos_RHWC, iteration, min_delta):
        one = lambda st, ph: row_loss(tower, params, st, ph, None, canvas, s, False)  # noqa
        loss_R, _, canvas_RHW = jax.vmap(one)(state.strokes, photos_RHWC)
        active_R = ~state.stopped_R
        best_R, armed_R, improved_R, stop_R = stop_update(state.best_loss_R, state.armed_R,
                                                          loss_R, min_delta)
        improved_R &= active_R
        best = jax.tree.map(lambda new, old: jnp.where(rows_like(improved_R, new), new, old),
                            state.strokes, state.best)
        state = state._replace(
            best=best, best_loss_R=jnp.where(active_R, best_R, state.best_loss_R),
            armed_R=jnp.where(active_R, armed_R, state.armed_R),
            stopped_R=state.stopped_R | (stop_R & active_R),
            best_iter_R=jnp.where(improved_R, iteration, state.best_iter_R))
        return state, loss_R, canvas_RHW

    def step(params, state: State, photos_RHWC, seeds_R, iteration):
        keys_R = jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(seed), iteration))(
            seeds_R)

        def total(strokes):
            one = lambda st, ph, k: row_loss(tower, params, st, ph, k, canvas, s)[0]  # noqa
            return jnp.sum(jax.vmap(one)(strokes, photos_RHWC, keys_R))

        updates, opt = tx.update(jax.grad(total)(state.strokes), state.opt, state.strokes)
        strokes = optax.apply_updates(state.strokes, updates)
        strokes = {**strokes, "opacity": jnp.clip(strokes["opacity"], 0.0, 1.0)}
        return state._replace(strokes=strokes, opt=opt)

    return jax.jit(evaluate, donate_argnums=(1,)), jax.jit(step, donate_argnums=(1,))


@dataclasses.dataclass
class Sketch:
    """One image's winning sketch."""

    points_S42: np.ndarray
    opacity_S: np.ndarray
    width: float  # the drawn width (2 x Settings.width)
    loss: float  # its best un-augmented loss
    seed: int  # which of the seeds won
    best_iteration: int
    losses_KT: np.ndarray  # every seed's evaluation losses (NaN after it stopped)
    start_points_S42: np.ndarray  # the winning seed's initial strokes
    frames: list | None = None  # the winner's canvases at each evaluation up to its best


def optimise(tower: ModifiedResNet, params, photos_NHWC, points_NKS42, s: Settings,
             seeds_K=None, mesh=None, frames: bool = False,
             progress: Callable[[int, float], None] | None = None) -> list[Sketch]:
    """Sketches of N photos ([0, 1] RGB at the canvas size) from K initial stroke sets each,
    every (image, seed) one row of a vmapped batch spread over the mesh's batch axes."""
    s.check()
    photos_NHWC = np.asarray(photos_NHWC, np.float32)
    points_NKS42 = np.asarray(points_NKS42, np.float32)
    n, k = points_NKS42.shape[:2]
    canvas = photos_NHWC.shape[1]
    seeds_K = np.arange(k) * 1000 if seeds_K is None else np.asarray(seeds_K)
    rows, put, shards = n * k, jnp.asarray, 1
    if mesh is not None:  # rows over the batch axes, the frozen tower replicated
        from clipjax import sharding

        shards = sharding.batch_size(mesh)
        params = jax.device_put(params, sharding.replicated(mesh))
        put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))  # noqa: E731
    pad = -rows % shards  # padding rows repeat the first one and are dropped
    take = np.concatenate([np.arange(rows), np.zeros(pad, np.int64)])
    photos_R = put(np.repeat(photos_NHWC, k, 0)[take])
    seeds_R = put((np.tile(seeds_K, n)[take] % 2**31).astype(np.uint32))
    points_R = points_NKS42.reshape(rows, *points_NKS42.shape[2:])[take]
    state = jax.tree.map(lambda x: put(x) if x.ndim else x, init_state(points_R, s))
    # The loop's length, period and threshold are not traced: one compile serves every run.
    evaluate, step = step_fns(tower, untraced(s), canvas)
    losses, canvases = [], []
    stopped = np.zeros(len(take), bool)
    last = (s.iterations - 1) // s.eval_every * s.eval_every  # later steps go unevaluated
    for it in range(last + 1):
        if it % s.eval_every == 0:
            state, loss_R, canvas_RHW = evaluate(params, state, photos_R, it, s.min_delta)
            losses.append(np.where(stopped, np.nan, np.asarray(loss_R)))  # a stopped row idles
            stopped = np.asarray(state.stopped_R)
            if frames:
                canvases.append(np.uint8(np.clip(np.asarray(canvas_RHW), 0, 1) * 255 + 0.5))
            if stopped[:rows].all():
                break
            best = float(np.min(np.asarray(state.best_loss_R)[:rows]))
        if it < last:
            state = step(params, state, photos_R, seeds_R, it)
            if progress is not None:
                progress(1, best)
    return _winners(state, np.stack(losses, 1)[:rows], canvases, points_R, n, k, s)


def _winners(state: State, losses_RT, canvases, start_RS42, n: int, k: int,
             s: Settings) -> list[Sketch]:
    """Each image's lowest-loss seed (CLIPasso's run_object_sketching.py picks so)."""
    best_R = np.asarray(state.best_loss_R)[:n * k]
    points_R, opacity_R = np.asarray(state.best["points"]), np.asarray(state.best["opacity"])
    best_iter_R = np.asarray(state.best_iter_R)
    out = []
    for i in range(n):
        r = i * k + int(np.argmin(best_R[i * k:(i + 1) * k]))
        frames = None
        if canvases:
            frames = [c[r] for c in canvases[:best_iter_R[r] // s.eval_every + 1]]
        out.append(Sketch(points_R[r], opacity_R[r], 2.0 * s.width, float(best_R[r]), r - i * k,
                          int(best_iter_R[r]), losses_RT[i * k:(i + 1) * k],
                          np.asarray(start_RS42[r]), frames))
    return out
