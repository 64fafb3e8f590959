"""The pure-JAX Bézier rasteriser against NumPy references of its formula and against resvg."""

import io
import xml.etree.ElementTree as ET

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from clipjax.heads import raster


def _line(p0, p3) -> np.ndarray:
    """A straight stroke as a cubic with evenly spaced control points (its polyline is exact)."""
    p0, p3 = np.asarray(p0, np.float64), np.asarray(p3, np.float64)
    return np.stack([p0 + (p3 - p0) * k / 3 for k in range(4)]).astype(np.float32)


def _numpy_render_lines(ends_S22, widths_S, opacities_S, size, ss=2, tau=raster.SOFTNESS):
    """Straight strokes: exact segment distance, sigmoid coverage, Π(1 − o·c), 2 x 2 mean."""
    c = (np.arange(size * ss) + 0.5) / ss
    p_YX2 = np.stack(np.meshgrid(c, c, indexing="xy"), -1)
    trans = np.ones((size * ss, size * ss))
    for (a, b), w, o in zip(np.asarray(ends_S22, np.float64), widths_S, opacities_S):
        t = np.clip(((p_YX2 - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)
        d = np.linalg.norm(p_YX2 - (a + t[..., None] * (b - a)), axis=-1)
        trans *= 1 - o / (1 + np.exp(-(w / 2 - d) / tau))
    return trans.reshape(size, ss, size, ss).mean((1, 3))


def test_over_compositing_matches_numpy_and_crossing_is_a_quarter():
    ends = np.array([[[2, 8.25], [14, 8.25]], [[8.25, 2], [8.25, 14]]])
    pts = np.stack([_line(*e) for e in ends])
    img = np.asarray(raster.render(pts, jnp.array([3.0, 3.0]), jnp.array([0.5, 0.5]), 16))
    ref = _numpy_render_lines(ends, [3.0, 3.0], [0.5, 0.5], 16)
    np.testing.assert_allclose(img, ref, atol=2e-6)
    assert abs(img[8, 8] - 0.25) < 1e-3  # (1 − 0.5)(1 − 0.5): each stroke's "over" on white
    assert abs(img[8, 3] - 0.5) < 1e-3 and abs(img[3, 8] - 0.5) < 1e-3
    assert img[1, 1] > 0.999


def test_gradients_finite_everywhere_and_nonzero_on_the_canvas():
    pts = np.stack([
        np.array([[2, 3], [12, 1], [4, 14], [14, 13]], np.float32),  # over the canvas
        np.full((4, 2), 8.25, np.float32),  # degenerate: all four points on one sample centre
        np.full((4, 2), 5.0, np.float32),  # degenerate, between samples
        np.array([[-900, 40], [3000, -7], [-1e4, 1e4], [250, 250]], np.float32),  # far away
    ])
    weights = jax.random.uniform(jax.random.PRNGKey(0), (16, 16))
    grad = np.asarray(jax.grad(lambda p: jnp.sum(weights * raster.render(p, None, None, 16)))(pts))
    assert np.isfinite(grad).all()
    assert (np.abs(grad[0]) > 1e-6).all()  # every coordinate of the visible stroke moves the image
    assert (np.abs(grad[2]) > 1e-6).any()  # a dot still has a gradient (its centre)


def test_single_stroke_recovers_its_curve_and_reversal_draws_the_same():
    rng = np.random.default_rng(18)
    target = rng.uniform(6, 26, (1, 4, 2)).astype(np.float32)
    start = target + rng.normal(0, 3, target.shape).astype(np.float32)
    draw = lambda p: raster.render(p, None, None, 32, chunk_rows=None)  # chunking: tested below
    target_img = draw(target)
    np.testing.assert_allclose(np.asarray(draw(target[:, ::-1])), np.asarray(target_img), atol=1e-5)
    assert float(raster.chamfer(target, target[:, ::-1])) < 1e-5

    opt = optax.adam(0.5)

    def step(carry, _):
        p, state = carry
        g = jax.grad(lambda q: jnp.mean((draw(q) - target_img) ** 2))(p)
        updates, state = opt.update(g, state, p)
        return (optax.apply_updates(p, updates), state), None

    p = jnp.asarray(start)
    (p, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, 300))((p, opt.init(p)))
    before, after = float(raster.chamfer(start, target)), float(raster.chamfer(p, target))
    # Measured: 2.19 px before (one point 8.5 px off), 1e-6 px after (every control point
    # within 2e-6 px of the target's). Over seeds 0-19 of
    # this setup: 15 below 0.1 px, all below 0.5 px; the worst (0.41) is a local minimum,
    # a short curve folded into a cusp with its ends swapped.
    assert before > 2.0 and after < 0.01, (before, after)


def test_matches_resvg_of_the_written_svg(tmp_path):
    import resvg_py  # the test extra installs it: a missing renderer fails, not skips
    rng = np.random.default_rng(1)
    pts = (rng.uniform(12, 52, (6, 1, 2)) + rng.normal(0, 10, (6, 4, 2))).astype(np.float32)
    widths = np.array([3.0, 3.0, 3.0, 2.0, 4.0, 3.0], np.float32)
    opacities = np.array([1.0, 1.0, 0.6, 1.0, 1.0, 0.8], np.float32)
    path = tmp_path / "strokes.svg"
    raster.write_svg(str(path), pts, widths, opacities, 64)
    png = resvg_py.svg_to_bytes(svg_path=str(path))
    rgba = np.asarray(Image.open(io.BytesIO(bytes(png))).convert("RGBA"), np.float64) / 255
    ref = 1 - rgba[..., 3]  # black ink: the transparent SVG composited on white
    img = np.asarray(raster.render(pts, widths, opacities, 64))
    mad = np.abs(img - ref).mean()
    ours, theirs = img < 0.5, ref < 0.5
    iou = (ours & theirs).sum() / (ours | theirs).sum()
    # Measured: mean |difference| 0.0026, IoU of the inked pixels 0.979. The same strokes
    # 0.25 px off give 0.011 and 0.87; widths x 1.3 give 0.023 and 0.77.
    assert mad < 0.004 and iou > 0.95, (mad, iou)


def test_svg_has_pydiffvg_attributes_and_round_trips(tmp_path):
    import svgpathtools
    pts = np.array([[[1.5, 2.25], [10, 3], [7.125, 20], [30, 31]]], np.float32)
    text = raster.svg_string(pts, [3.0], [0.5], 32)
    root = ET.fromstring(text)
    assert root.get("width") == "32" and root.get("height") == "32"
    (node,) = [e for e in root.iter() if e.tag.endswith("path")]
    assert node.get("fill") == "none" and node.get("stroke") == "rgb(0, 0, 0)"
    assert node.get("stroke-linecap") == "round" and node.get("stroke-linejoin") == "round"
    assert float(node.get("stroke-width")) == 3.0 and float(node.get("stroke-opacity")) == 0.5
    (seg,) = svgpathtools.parse_path(node.get("d"))
    got = [(z.real, z.imag) for z in (seg.start, seg.control1, seg.control2, seg.end)]
    np.testing.assert_allclose(got, pts[0], atol=1e-4)


def test_chunked_equals_unchunked_and_vmap_equals_calls():
    rng = np.random.default_rng(0)
    pts_B342 = rng.uniform(0, 20, (3, 3, 4, 2)).astype(np.float32)
    w_3 = jnp.array([3.0, 1.5, 2.0])
    whole = raster.render(pts_B342[0], w_3, None, 20, chunk_rows=None)
    chunked = raster.render(pts_B342[0], w_3, None, 20, chunk_rows=3)  # 7 blocks, 1 padded row
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), atol=1e-6)

    def loss(p, chunk):
        return jnp.sum(jnp.linspace(0, 1, 400).reshape(20, 20) * raster.render(p, w_3, None, 20, chunk_rows=chunk))

    np.testing.assert_allclose(jax.grad(loss)(pts_B342[0], 3), jax.grad(loss)(pts_B342[0], None), rtol=1e-4, atol=1e-5)
    batched = jax.vmap(lambda p: raster.render(p, w_3, None, 20, chunk_rows=3))(pts_B342)
    for b in range(3):
        np.testing.assert_allclose(np.asarray(batched[b]), np.asarray(raster.render(pts_B342[b], w_3, None, 20, chunk_rows=3)), atol=1e-6)


def test_chamfer_and_sampling():
    line = _line([2, 5], [20, 5])[None]
    shifted = line + np.array([0, 2], np.float32)
    assert abs(float(raster.chamfer(line, shifted)) - 2.0) < 1e-5
    curve = raster.sample_curves(line, 7)
    np.testing.assert_allclose(np.asarray(curve[0, :, 0]), np.linspace(2, 20, 7), atol=1e-5)


def test_bad_shape_and_rgb_and_gif(tmp_path):
    with pytest.raises(ValueError, match="vmap"):
        raster.render(np.zeros((2, 3, 2)), None, None, 8)
    img = jnp.linspace(0, 1, 64).reshape(8, 8)
    rgb = raster.to_rgb(img)
    assert rgb.shape == (8, 8, 3) and bool((rgb[..., 2] == img).all())
    raster.gif([img, 1 - img], str(tmp_path / "a.gif"), 50)
    with Image.open(tmp_path / "a.gif") as g:
        assert g.n_frames == 2
