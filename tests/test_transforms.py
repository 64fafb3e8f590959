"""Preprocessing parity with OpenCLIP's eval transform on real photographs, and decode errors."""

import functools
import io

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from clipjax.data import sources, stages, transforms
from reference import open_clip, torchvision_transforms

SIZES = (224, 288, 336)


def _photos() -> dict[str, Image.Image]:
    """Real photographs from scikit-image, cropped to portrait, landscape, odd and small shapes."""
    astronaut, chelsea = skdata.astronaut(), skdata.chelsea()
    coffee, rocket = skdata.coffee(), skdata.rocket()
    crops = {
        "astronaut_512x512": astronaut,
        "chelsea_300x451": chelsea,
        "coffee_400x600": coffee,
        "rocket_427x640": rocket,
        # Portrait crops whose margins are odd at some sizes, so the crop offset lands on a
        # half pixel and round-half-to-even decides it (rocket covers the other parity).
        "astronaut_portrait_512x257": astronaut[:, 120:377],
        "rocket_portrait_427x181": rocket[:, 230:411],
        # Very wide strip: the long side is several times the target.
        "coffee_strip_97x600": coffee[150:247],
        # Smaller than every target size: the reference upsamples the shortest side.
        "chelsea_small_131x157": chelsea[60:191, 140:297],
    }
    return {name: Image.fromarray(np.ascontiguousarray(x)) for name, x in crops.items()}


PHOTOS = _photos()


@pytest.fixture(scope="module")
def reference_transforms():
    oc = open_clip()
    return {size: oc.image_transform(size, is_train=False) for size in SIZES}


def _reference_HWC(reference_transforms, image: Image.Image, size: int) -> np.ndarray:
    return reference_transforms[size](image).numpy().transpose(1, 2, 0)


def _max_diff(ours_HWC: np.ndarray, ref_HWC: np.ndarray) -> float:
    return float(np.max(np.abs(ours_HWC.astype(np.float64) - ref_HWC)))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=1)  # lossless for every mode here
    return buf.getvalue()


@functools.cache
def _photo_png(name: str) -> bytes:
    return _png(PHOTOS[name])


def _pipeline_HWC(png: bytes, size: int) -> np.ndarray:
    """What an evaluation pass of the data pipeline gives for an image stored as a PNG."""
    prepare = stages.Prepare(image_size=size, train=False, context_length=77, has_text=False,
                             has_label=False, max_pixels=sources.DEFAULT_MAX_PIXELS)
    return transforms.normalize_uint8(prepare({"key": "k", "image": png})["image"])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_matches_open_clip_on_photos(reference_transforms, name, size):
    """Bit-identical: the same float32 numbers as OpenCLIP, not merely within a grey level,
    both from eval_transform and from the pipeline that every evaluator reads through."""
    image = PHOTOS[name]
    ours_HWC = transforms.eval_transform(image, size)
    ref_HWC = _reference_HWC(reference_transforms, image, size)
    assert ours_HWC.shape == ref_HWC.shape == (size, size, 3)
    assert ours_HWC.dtype == ref_HWC.dtype == np.float32
    print(f"{name} @ {size}: max |diff| = {_max_diff(ours_HWC, ref_HWC):.3g}")
    np.testing.assert_array_equal(ours_HWC, ref_HWC)
    np.testing.assert_array_equal(_pipeline_HWC(_photo_png(name), size), ref_HWC)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1"])
def test_matches_open_clip_on_other_modes(reference_transforms, mode):
    # The reference resizes before converting to RGB, so alpha must vary for the test to
    # see PIL's premultiplied resize (scikit-image's logo is fully opaque): add a ramp.
    if mode in ("L", "1"):
        image = Image.fromarray(skdata.camera()[:, 40:400]).convert(mode)
    elif mode in ("LA", "RGBA"):
        rgb_HWC = skdata.astronaut()[:, 60:460]
        alpha_HW = np.broadcast_to(np.linspace(0, 255, 400).astype(np.uint8), rgb_HWC.shape[:2])
        rgba_HWC = np.concatenate([rgb_HWC, alpha_HW[..., None]], axis=-1)
        image = Image.fromarray(rgba_HWC, "RGBA").convert(mode)
    else:
        image = PHOTOS["chelsea_300x451"].convert(mode)
    ours_HWC = transforms.eval_transform(image, 224)
    ref_HWC = _reference_HWC(reference_transforms, image, 224)
    print(f"mode {mode}: max |diff| = {_max_diff(ours_HWC, ref_HWC):.3g}")
    np.testing.assert_array_equal(ours_HWC, ref_HWC)
    if mode != "CMYK":  # PNG has no CMYK
        np.testing.assert_array_equal(_pipeline_HWC(_png(image), 224), ref_HWC)


@pytest.mark.parametrize("hw", [(7, 9), (224, 225), (300, 301), (501, 224), (100, 640)])
def test_resize_and_crop_geometry_match_torchvision(hw):
    T = torchvision_transforms()
    image = PHOTOS["rocket_427x640"].resize(hw[::-1])
    ours = transforms.resize_shortest_side(image, 224)
    ref = T.Resize(224, interpolation=T.InterpolationMode.BICUBIC)(image)
    assert ours.size == ref.size
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    # Cropping the unresized image also covers the zero-padding branch for small inputs.
    for x in (image, ours):
        np.testing.assert_array_equal(
            np.asarray(transforms.center_crop(x, 224)), np.asarray(T.CenterCrop(224)(x))
        )


def test_normalize_constant_image_matches_hand_computation():
    rgb = (12, 200, 255)
    out_HWC = transforms.eval_transform(Image.new("RGB", (50, 70), rgb), 32)
    expected_C = (np.asarray(rgb) / 255.0 - np.asarray(transforms.CLIP_MEAN)) / np.asarray(
        transforms.CLIP_STD
    )
    assert out_HWC.shape == (32, 32, 3) and out_HWC.dtype == np.float32
    np.testing.assert_allclose(out_HWC, np.broadcast_to(expected_C, out_HWC.shape), atol=1e-6)
    # Float input is taken as already in [0, 1].
    np.testing.assert_allclose(
        transforms.normalize(np.full((2, 2, 3), 0.5)),
        np.broadcast_to((0.5 - np.asarray(transforms.CLIP_MEAN)) / transforms.CLIP_STD, (2, 2, 3)),
        atol=1e-6,
    )


def test_preprocess_stacks_images_and_paths(tmp_path):
    path = tmp_path / "chelsea.png"
    PHOTOS["chelsea_300x451"].save(path)
    batch_BHWC = transforms.preprocess([PHOTOS["coffee_400x600"], str(path), path], 64)
    assert batch_BHWC.shape == (3, 64, 64, 3) and batch_BHWC.dtype == np.float32
    np.testing.assert_array_equal(batch_BHWC[1], batch_BHWC[2])
    np.testing.assert_array_equal(
        batch_BHWC[1], transforms.eval_transform(PHOTOS["chelsea_300x451"], 64)
    )
    assert transforms.preprocess([], 64).shape == (0, 64, 64, 3)


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    PHOTOS["astronaut_512x512"].save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize(
    "name,content",
    [
        ("garbage.jpg", b"this is not an image \x00\xff" * 20),
        ("empty.jpg", b""),
        ("truncated.jpg", _jpeg_bytes()[: len(_jpeg_bytes()) // 2]),
        ("missing.jpg", None),
    ],
    ids=["garbage", "empty", "truncated", "missing"],
)
def test_undecodable_files_raise_clear_error(tmp_path, name, content):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(transforms.ImageDecodeError, match=name):
        transforms.load_image(path)
    with pytest.raises(transforms.ImageDecodeError, match=name):
        transforms.preprocess([path], 32)
