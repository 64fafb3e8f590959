"""CLIPasso: the joint augmentation, the loss, the stopping rule, the seeds, the command.

A random 32 px RN-tiny tower, a 32 px canvas and 4 strokes; the loop's shapes are shared by
the one-device run, the 8-device run and the command, so each compiles once or twice.
"""

import argparse
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipjax
from clipjax.heads import clipasso, raster

CANVAS, STROKES = 32, 4
SETTINGS = clipasso.Settings(strokes=STROKES, iterations=11, eval_every=10)
MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], np.float32)  # OpenAI CLIP's
STD = np.asarray([0.26862954, 0.26130258, 0.27577711], np.float32)


@pytest.fixture(scope="module")
def rn():
    """(tower, {"visual": params}): only the image tower is initialised, and all a run needs."""
    import flax.linen as nn

    tower = clipasso.tower_of(
        clipjax.create_model("RN-tiny", vision={"image_size": 32}).config)
    params = jax.jit(tower.init)(jax.random.key(0), jnp.zeros((1, CANVAS, CANVAS, 3)))
    return tower, {"visual": nn.meta.unbox(params["params"])}


@pytest.fixture(scope="module")
def photo():
    from clipjax.data import synthetic

    ex = synthetic.render(0, "held_out", np.arange(1), CANVAS)
    return ex.image_BHWC.astype(np.float32) / 255.0  # [1, 32, 32, 3]


@pytest.fixture(scope="module")
def start():
    rng = np.random.default_rng(0)
    return rng.uniform(6, 26, (1, 3, STROKES, 4, 2)).astype(np.float32)


@pytest.fixture(scope="module")
def one_device(rn, photo, start):
    tower, params = rn
    return clipasso.optimise(tower, params["visual"], photo, start, SETTINGS)[0]


# --- augmentation ----------------------------------------------------------------------------


def test_augmentation_warps_sketch_and_photo_alike():
    rng = np.random.default_rng(1)
    a, b = (jnp.asarray(rng.uniform(size=(CANVAS, CANVAS, 3)), jnp.float32) for _ in range(2))
    key = jax.random.key(3)
    pair = clipasso.augment(key, jnp.stack([a, a.copy()]), CANVAS)
    np.testing.assert_array_equal(pair[0], pair[1])
    # The warp depends on the key alone: warping b beside a changes nothing of a's.
    apart = clipasso.augment(key, jnp.stack([a, b]), CANVAS)
    np.testing.assert_array_equal(apart[0], pair[0])
    assert not np.allclose(clipasso.augment(jax.random.key(4), a[None], CANVAS)[0], pair[0])


def _coeffs_numpy(start, end):
    """torchvision's _get_perspective_coeffs: output (end) points -> input (start) points."""
    a = np.zeros((8, 8))
    rhs = np.zeros(8)
    for i, ((x, y), (u, v)) in enumerate(zip(end, start)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        rhs[2 * i], rhs[2 * i + 1] = u, v
    return np.append(np.linalg.solve(a, rhs), 1.0).reshape(3, 3)


def test_perspective_moves_a_marker_where_the_homography_says():
    size = CANVAS
    start, end = (np.asarray(p, np.float64) for p in
                  clipasso.perspective_corners(jax.random.key(7), size, 0.5))
    bound = int(0.5 * (size // 2)) + 1  # torchvision's corner ranges
    assert (end[[0, 3], 0] < bound).all() and (end[[1, 2], 0] >= size - bound).all()
    assert (end[[0, 1], 1] < bound).all() and (end[[2, 3], 1] >= size - bound).all()
    h = _coeffs_numpy(start, end)
    r, c = 13, 17
    image = np.zeros((size, size, 1), np.float32)
    image[r, c] = 1.0
    out = np.asarray(clipasso.warp_perspective(
        jnp.asarray(image), clipasso.homography(jnp.asarray(end, jnp.float32),
                                                jnp.asarray(start, jnp.float32), size)))[..., 0]
    # Where numpy's inverse map puts the marker's centre (pixel centres at i + 0.5).
    q = np.linalg.solve(h, [c + 0.5, r + 0.5, 1.0])
    qx, qy = q[0] / q[2] - 0.5, q[1] / q[2] - 0.5
    oy, ox = np.unravel_index(np.argmax(out), out.shape)
    assert abs(ox - qx) < 1 and abs(oy - qy) < 1
    # The brightest output pixel holds the bilinear weight of its mapped centre.
    p = h @ [ox + 0.5, oy + 0.5, 1.0]
    dx, dy = p[0] / p[2] - (c + 0.5), p[1] / p[2] - (r + 0.5)
    np.testing.assert_allclose(out[oy, ox], (1 - abs(dx)) * (1 - abs(dy)), atol=2e-3)


def _resize_numpy(x, out):
    """torch's bilinear resize (align_corners=False, edges clamped), upsampling."""
    n = x.shape[0]
    src = np.clip((np.arange(out) + 0.5) * n / out - 0.5, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    f = src - lo
    rows = x[lo] * (1 - f)[:, None, None] + x[hi] * f[:, None, None]
    return rows[:, lo] * (1 - f)[None, :, None] + rows[:, hi] * f[None, :, None]


def test_resized_crop_is_a_crop_of_side_scale_then_bilinear():
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(CANVAS, CANVAS, 3)).astype(np.float32)
    # No distortion leaves the perspective the identity, so only the crop remains.
    out = np.asarray(clipasso.augment(jax.random.key(5), jnp.asarray(x)[None], CANVAS,
                                      distortion=0.0)[0])
    side = round(math.sqrt(0.8) * CANVAS)  # RandomResizedCrop(scale=(0.8, 0.8), ratio=(1, 1))
    matches = [(t, l) for t in range(CANVAS - side + 1) for l in range(CANVAS - side + 1)
               if np.allclose(_resize_numpy(x[t:t + side, l:l + side], CANVAS), out, atol=1e-5)]
    assert len(matches) == 1


# --- the stopping rule, the loss, the loop ---------------------------------------------------


def test_stopping_rule_fires_on_a_plateau_and_not_before():
    assert clipasso.stop_index([5.0, 4.0, 3.0, 3.0 + 5e-6, 3.0 - 5e-6, 2.0]) == 4
    assert clipasso.stop_index([5.0, 4.0, 3.0, 2.0, 1.0]) is None
    assert clipasso.stop_index([3.0, 3.0, 2.0, 2.0]) is None  # the improvement disarmed it
    assert clipasso.stop_index([3.0, 3.0, 2.0, 2.0, 2.0]) == 4
    # A rise neither arms nor disarms (painterly_rendering.py keeps `terminate`).
    assert clipasso.stop_index([3.0, 4.0, 3.0, 5.0, 3.0]) == 4
    assert clipasso.stop_index([3.0, 4.0, 5.0, 6.0]) is None


def _loss_numpy(fc_s, maps_s, fc_p, maps_p) -> float:
    """CLIPConvLoss with RN101's defaults: MSE of layer2 and layer3 (weights 0,0,1,1,0) plus
    0.1 x (1 - cos) of the embeddings, each averaged over the views."""
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    conv = sum(np.mean((f64(maps_s[k]) - f64(maps_p[k])) ** 2) for k in ("layer2", "layer3"))
    a, b = f64(fc_s), f64(fc_p)
    cos_V = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return conv + 0.1 * np.mean(1 - cos_V)


def test_loss_equals_numpy_from_the_feature_maps(rn, photo, start):
    tower, params = rn
    evaluate, _ = clipasso.step_fns(tower, clipasso.untraced(SETTINGS), CANVAS)
    state = clipasso.init_state(start[0], SETTINGS)
    photos = jnp.asarray(np.repeat(photo, 3, 0))
    _, loss_R, canvas_RHW = evaluate(params["visual"], state, photos, 0, 1e-5)
    assert np.asarray(canvas_RHW).min() < 0.5 < np.asarray(canvas_RHW).max()  # strokes on white
    # The training loss of row 0: the pair and its 4 joint warps, and those views.
    key = jax.random.key(9)

    def train_loss(strokes):
        loss, _, sketch_HW = clipasso.row_loss(tower, params["visual"], strokes, photos[0], key,
                                               CANVAS, SETTINGS)
        return loss, clipasso.views(key, raster.to_rgb(sketch_HW), photos[0], CANVAS, SETTINGS)

    loss, (sketch_V, photo_V) = jax.jit(train_loss)(
        {"points": jnp.asarray(start[0, 0]), "opacity": jnp.ones(STROKES)})
    sketch = np.repeat(np.asarray(canvas_RHW)[..., None], 3, -1)
    assert sketch_V.shape[0] == 5 and np.allclose(sketch_V[0], (sketch[0] - MEAN) / STD, atol=1e-5)
    # Every image through the tower at once: 3 sketches, 3 photos, 5 + 5 views.
    batch = np.concatenate([(sketch - MEAN) / STD, np.repeat((photo - MEAN) / STD, 3, 0),
                            sketch_V, photo_V])
    fc, maps = tower.apply({"params": params["visual"]}, batch, return_features=True)
    part = lambda lo, hi: (fc[lo:hi], {k: v[lo:hi] for k, v in maps.items()})  # noqa: E731
    for r in range(3):
        np.testing.assert_allclose(loss_R[r], _loss_numpy(*part(r, r + 1), *part(3 + r, 4 + r)),
                                   rtol=1e-4)
    np.testing.assert_allclose(loss, _loss_numpy(*part(6, 11), *part(11, 16)), rtol=1e-4)


def test_sketching_lowers_the_loss_and_keeps_the_best_seed(one_device):
    losses_KT = one_device.losses_KT
    assert losses_KT.shape == (3, 2)  # evaluations at iterations 0 and 10
    assert (losses_KT[:, 1] < losses_KT[:, 0]).all()
    best_K = np.nanmin(losses_KT, 1)
    assert one_device.seed == int(np.argmin(best_K))
    np.testing.assert_allclose(one_device.loss, best_K.min(), rtol=1e-6)
    assert one_device.best_iteration == 10 * int(np.nanargmin(losses_KT[one_device.seed]))
    assert not np.allclose(one_device.points_S42, one_device.start_points_S42)


def test_seeds_sharded_over_8_devices_equal_one_device(rn, photo, start):
    """Two steps: float rounding differs between the layouts, and Adam at lr 1 on a random
    tower multiplies a difference by 3-10 a step (1e-7 becomes 2e-2 in 10 steps)."""
    from clipjax import sharding

    tower, params = rn
    s = dataclasses.replace(SETTINGS, iterations=3, eval_every=1)
    mesh = sharding.create_mesh()
    assert sharding.batch_size(mesh) == 8  # 3 seeds padded to 8 rows, one a device
    one = clipasso.optimise(tower, params["visual"], photo, start, s)[0]
    out = clipasso.optimise(tower, params["visual"], photo, start, s, mesh=mesh)[0]
    np.testing.assert_allclose(out.losses_KT, one.losses_KT, rtol=1e-5)
    np.testing.assert_allclose(out.points_S42, one.points_S42, atol=1e-4)
    assert out.seed == one.seed and out.best_iteration == one.best_iteration == 2


# --- the command -------------------------------------------------------------------------------


def _parser():
    from clipjax.heads import sketch_cli

    parser = argparse.ArgumentParser(prog="clipjax")
    sketch_cli.register(parser.add_subparsers(dest="command"))
    return parser


def _write_checkpoint(path, arch, params, **overrides):
    from clipjax import weights
    from clipjax.models import variants

    config = variants.with_overrides(variants.get_config(arch), overrides) if overrides else \
        variants.get_config(arch)
    weights.write(weights.Weights(params, arch, config, "test"), path)
    return str(path)


def test_sketch_command_writes_svg_and_png_and_reports_a_missing_image(rn, photo, tmp_path,
                                                                      capsys):
    from PIL import Image

    _, params = rn
    ckpt = _write_checkpoint(tmp_path / "rn.safetensors", "RN-tiny",
                             jax.tree.map(np.asarray, params), vision={"image_size": 32})
    image = tmp_path / "shape.png"
    Image.fromarray(np.uint8(photo[0] * 255)).save(image)
    args = _parser().parse_args([
        "sketch", str(tmp_path / "missing.png"), str(image), "--checkpoint", ckpt,
        "--strokes", str(STROKES), "--iterations", "3", "--eval-every", "1",
        "--out", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="1 of 2 images could not be sketched"):
        args.fn(args)
    assert "missing.png does not exist" in capsys.readouterr().err
    svg = (tmp_path / "out" / "shape.svg").read_text()
    paths = re.findall(r'd="M ([-\d.e]+) ([-\d.e]+) C', svg)
    assert len(paths) == STROKES
    png = np.asarray(Image.open(tmp_path / "out" / "shape.png"))
    assert png.shape == (CANVAS, CANVAS) and png.min() < 128 and png.max() == 255
    # The SVG draws what the PNG shows (resvg, an independent renderer).
    import io

    import resvg_py

    drawn = np.asarray(Image.open(io.BytesIO(bytes(resvg_py.svg_to_bytes(
        svg_string=svg, background="white")))).convert("L"))
    ink_svg, ink_png = drawn < 128, png < 128
    assert (ink_svg & ink_png).sum() > 0.8 * (ink_svg | ink_png).sum()


def test_sketch_command_names_a_checkpoint_of_the_wrong_tower(rn, tmp_path):
    _, params = rn
    rn_ckpt = _write_checkpoint(tmp_path / "rn.safetensors", "RN-tiny",
                                jax.tree.map(np.asarray, params), vision={"image_size": 32})
    vit_ckpt = _write_checkpoint(tmp_path / "vit.safetensors", "ViT-tiny",
                                 {"visual": {"proj": np.zeros((64, 32), np.float32)}})
    image = tmp_path / "x.png"
    image.write_bytes(b"not an image")
    run = lambda *a: (lambda args: args.fn(args))(_parser().parse_args(["sketch", *a]))  # noqa
    with pytest.raises(ValueError, match=r"--checkpoint .*vit.safetensors holds ViT-tiny, whose "
                       "image tower is not a ResNet"):
        run(str(image), "--checkpoint", vit_ckpt)
    with pytest.raises(ValueError, match="--saliency-checkpoint .*rn.safetensors holds RN-tiny.*"
                       "not a ViT"):
        run(str(image), "--checkpoint", rn_ckpt, "--saliency-checkpoint", rn_ckpt)
