"""CLIPasso's stroke initialisation: where a frozen ViT looks, on the image's XDoG lines.

The recipe of yael-vinker/CLIPasso (models/painter_params.py, ViT-B/32 by default):

1. `attention_map`: the class token's attention to the patches, averaged over every layer
   and head, resized from the patch grid to the canvas with torch's bicubic, min-max
   normalised;
2. `xdog`: an eXtended Difference-of-Gaussians drawing of the same (CLIP-normalised) image,
   1 on paper and 0 on its ink lines;
3. `saliency`: attention x (1 - drawing) (x an optional object mask), a softmax with
   temperature 0.3 over the pixels where that is positive, zero elsewhere;
4. `sample_starts`: stroke starts drawn from it without replacement;
5. `init_strokes`: each stroke's other 3 control points a random walk from its start.

`initial_strokes` runs all five. Steps 1 and 5 run in JAX; 2 and 3 in NumPy on the host
(SciPy's Gaussian filter and scikit-image's Otsu threshold, as the reference), once per
sketch. Nothing here is trained.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.ndimage import gaussian_filter
from skimage.color import rgb2gray
from skimage.filters import threshold_otsu

TEMPERATURE = 0.3  # CLIPasso's --softmax_temp
RADIUS = 0.05  # get_path's random-walk radius, a fraction of the canvas
BICUBIC_A = -0.75  # torch's (and OpenCV's) cubic-convolution coefficient


def bicubic_matrix(n_in: int, n_out: int, a: float = BICUBIC_A) -> np.ndarray:
    """[n_out, n_in] weights of torch's interpolate(mode="bicubic", align_corners=False).

    jax.image.resize's "cubic" is Keys' kernel with a = -0.5 and renormalises at the border;
    torch uses a = -0.75 and repeats the edge sample. Upsampling CLIPasso's 7 x 7 grid to 224,
    the two differ by up to 0.07 of the map's range, enough to move the sampled starts, so
    the map is resized with torch's weights (tests/test_saliency.py matches torch to 1e-5).
    """
    src_O = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5  # half-pixel centres
    left_O = np.floor(src_O).astype(np.int64)
    frac_O = src_O - left_O

    def kernel(x):
        x = np.abs(x)
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return np.where(x <= 1, near, np.where(x < 2, far, 0.0))

    m_OI = np.zeros((n_out, n_in))
    for tap in range(-1, 3):
        index_O = np.clip(left_O + tap, 0, n_in - 1)  # torch clamps: the edge sample repeats
        np.add.at(m_OI, (np.arange(n_out), index_O), kernel(frac_O - tap))
    return m_OI


def resize_bicubic(x_BYX: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B, Y, X] -> [B, *size] as torch's bicubic (align_corners=False), in float32."""
    my_OY = jnp.asarray(bicubic_matrix(x_BYX.shape[1], size[0]), jnp.float32)
    mx_PX = jnp.asarray(bicubic_matrix(x_BYX.shape[2], size[1]), jnp.float32)
    return jnp.einsum("oy,byx,px->bop", my_OY, x_BYX.astype(jnp.float32), mx_PX)


def _min_max(x_BYX: jax.Array) -> jax.Array:
    lo = x_BYX.min((1, 2), keepdims=True)
    span = x_BYX.max((1, 2), keepdims=True) - lo
    return (x_BYX - lo) / jnp.maximum(span, jnp.finfo(jnp.float32).tiny)  # flat map -> zeros


@functools.partial(jax.jit, static_argnums=(0, 3))
def _attention_map(model, params, img_BHWC: jax.Array, canvas: int) -> jax.Array:
    attn_LBHNN = model.apply({"params": params}, img_BHWC, method=model.image_attention)
    cls_BN = attn_LBHNN[:, :, :, 0, 1:].mean((0, 2))  # class row, patches only; layers, heads
    p = model.config.vision.patch_size
    grid_BYX = cls_BN.reshape(-1, img_BHWC.shape[1] // p, img_BHWC.shape[2] // p)
    return _min_max(resize_bicubic(grid_BYX, (canvas, canvas)))


def attention_map(model, params, img_BHWC: jax.Array, canvas: int) -> jax.Array:
    """Where the class token looks, [B, canvas, canvas] in [0, 1] (CLIPasso's `interpret`).

    `model` is a clipjax CLIP with a ViT image tower; `img_BHWC` is CLIP-normalised. The
    reference computes a relevance rollout beside this and ignores it; so does this.
    """
    return _attention_map(model, params, jnp.asarray(img_BHWC, jnp.float32), canvas)


def xdog(image: np.ndarray, sigma: float = 0.8, k: float = 10.0, gamma: float = 0.98,
         phi: float = 200.0, eps: float = -0.1) -> np.ndarray:
    """XDoG drawing of an [H, W, 3] or [H, W] image, [H, W] float32: 1 on paper, 0 on lines.

    A sharp Gaussian minus gamma times a k-times wider one, soft-thresholded (1 below eps,
    1 + tanh(phi x) above), min-max normalised and binarised at Otsu's threshold. Ink falls
    on dark regions and on the dark side of edges. The numbers are CLIPasso's, whose input
    is the CLIP-normalised image; they depend on that scale.
    """
    gray = np.asarray(image, np.float64)
    if gray.ndim == 3:
        gray = rgb2gray(gray)  # 0.2125 R + 0.7154 G + 0.0721 B, any range
    dog = gaussian_filter(gray, sigma) - gamma * gaussian_filter(gray, sigma * k)
    soft = np.where(dog < eps, 1.0, 1.0 + np.tanh(phi * dog))
    soft -= soft.min()
    if soft.max() == 0:  # a flat image has no lines
        return np.ones(gray.shape, np.float32)
    soft /= soft.max()
    return (soft >= threshold_otsu(soft)).astype(np.float32)


def saliency(attn_HW, xdog_HW, mask_HW=None, temperature: float = TEMPERATURE) -> np.ndarray:
    """Start probabilities [H, W] (float64, sum 1): softmax(v / temperature) over v > 0, else 0.

    v = attn x (1 - xdog drawing), i.e. attention on the drawing's lines, times `mask_HW`
    when given (1 on the object). The reference instead whitens the image outside its
    U²-Net mask before computing attention and XDoG; a user mask here plays that part.
    """
    v_HW = np.asarray(attn_HW, np.float64) * (1.0 - np.asarray(xdog_HW, np.float64))
    if mask_HW is not None:
        if np.shape(mask_HW) != v_HW.shape:
            raise ValueError(f"The mask is {np.shape(mask_HW)} but the attention map is "
                             f"{v_HW.shape}; resize the mask to the canvas.")
        v_HW = v_HW * np.asarray(mask_HW, np.float64)
    positive = v_HW > 0
    if not positive.any():
        raise ValueError("No pixel has positive attention on an XDoG line (inside the mask); "
                         "check that the mask covers the object and the image is not blank.")
    logits = v_HW[positive] / temperature
    e = np.exp(logits - logits.max())
    prob_HW = np.zeros_like(v_HW)
    prob_HW[positive] = e / e.sum()
    return prob_HW


def sample_starts(key: jax.Array, prob_HW, num: int) -> jax.Array:
    """`num` distinct pixels drawn with probability prob_HW, without replacement: [num, 2] int32
    (x, y) = (column, row), the reference's start (the pixel's top-left corner in raster.py)."""
    prob_HW = np.asarray(prob_HW)
    available = int((prob_HW > 0).sum())
    if num > available:
        raise ValueError(f"Asked for {num} stroke starts but only {available} pixels have "
                         "positive probability; ask for fewer strokes or loosen the mask.")
    return _draw(key, jnp.asarray(prob_HW, jnp.float32), num)


@functools.partial(jax.jit, static_argnums=2)  # one compile, not one per primitive
def _draw(key: jax.Array, prob_HW: jax.Array, num: int) -> jax.Array:
    w = prob_HW.shape[1]
    flat_S = jax.random.choice(key, prob_HW.size, (num,), replace=False, p=prob_HW.reshape(-1))
    return jnp.stack([flat_S % w, flat_S // w], axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames="points")
def init_strokes(key: jax.Array, starts_S2: jax.Array, canvas: int, radius: float = RADIUS,
                 points: int = 4) -> jax.Array:
    """Control points [S, points, 2] in pixels: each stroke a random walk from its start.

    As the reference's get_path: in canvas units every step adds radius x (U[0, 1) - 0.5) to
    each coordinate of the previous point, so point j lies within j x radius/2 x canvas px
    of the start. Widths are not drawn here (raster.CLIPASSO_WIDTH).
    """
    steps_SP2 = radius * (jax.random.uniform(key, (starts_S2.shape[0], points - 1, 2)) - 0.5)
    walk_SP2 = jnp.cumsum(steps_SP2, axis=1) * canvas
    start_S12 = jnp.asarray(starts_S2, jnp.float32)[:, None]
    return jnp.concatenate([start_S12, start_S12 + walk_SP2], axis=1)


def initial_strokes(key: jax.Array, model, params, img_HWC, num_strokes: int = 16,
                    mask_HW=None, temperature: float = TEMPERATURE,
                    radius: float = RADIUS) -> tuple[jax.Array, np.ndarray]:
    """CLIPasso's initial strokes for one CLIP-normalised image [H, H, 3] on an H x H canvas.

    Returns the control points [num_strokes, 4, 2] in pixels and the start probabilities
    [H, H] they were drawn from (for plotting). The canvas is the image: CLIPasso draws at
    224 on the 224 px image ViT-B/32 sees.
    """
    img_HWC = np.asarray(img_HWC, np.float32)
    h, w = img_HWC.shape[:2]
    if h != w:
        raise ValueError(f"The image is {h}x{w}; CLIPasso's canvas is square: resize or crop it "
                         "to the model's image size first.")
    attn_HW = np.asarray(attention_map(model, params, img_HWC[None], h)[0])
    prob_HW = saliency(attn_HW, xdog(img_HWC), mask_HW, temperature)
    start_key, walk_key = jax.random.split(key)
    starts_S2 = sample_starts(start_key, prob_HW, num_strokes)
    return init_strokes(walk_key, starts_S2, h, radius), prob_HW
