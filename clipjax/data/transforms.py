"""CLIP preprocessing in PIL and NumPy: OpenCLIP's evaluation transform, bit for bit, and the
training crop."""

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

# OpenAI CLIP's per-channel statistics, shared by every OpenCLIP eval transform.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# float32 constants so that normalize() rounds exactly as torch does on float32 tensors.
_MEAN_C = np.asarray(CLIP_MEAN, np.float32)
_STD_C = np.asarray(CLIP_STD, np.float32)

ImageOrPath = Image.Image | str | os.PathLike


class ImageDecodeError(ValueError):
    """An image file that is missing or cannot be decoded."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode the whole file at `path` into an RGB PIL image."""
    try:
        with Image.open(path) as image:
            # Image.open only parses the header; load() decodes the pixels so that a
            # truncated file fails here, where we can name it, not inside a later resize.
            image.load()
            return image.convert("RGB")
    except FileNotFoundError as e:
        raise ImageDecodeError(
            f"Image file {os.fspath(path)!r} does not exist; check the path or the dataset index."
        ) from e
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(
            f"Image file {os.fspath(path)!r} cannot be decoded ({type(e).__name__}: {e}); "
            "re-download it or remove it from the dataset."
        ) from e


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic-resize `image` so that its shorter side is `size`, keeping the aspect ratio."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    # The long side is truncated, not rounded, as torchvision computes it.
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    if new_size == image.size:
        return image
    # PIL's bicubic filter widens with the scale factor, so downsampling is antialiased.
    # PIL itself falls back to nearest for modes "1" and "P" and premultiplies alpha.
    return image.resize(new_size, Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the central `size` x `size` square, zero-padding first where `image` is smaller."""
    width, height = image.size
    if width < size or height < size:
        pad_w, pad_h = max(size - width, 0), max(size - height, 0)
        # The odd pixel of padding goes on the right and bottom, as in torchvision.
        border = (pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2)
        image = ImageOps.expand(image, border=border, fill=0)
        width, height = image.size
    # Python's round() (half to even) is what torchvision uses for the offsets; a
    # different rounding shifts the crop by one pixel for odd margins.
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def normalize(x_HWC: np.ndarray) -> np.ndarray:
    """Scale uint8 to [0, 1] (float input is taken as already scaled) and standardise."""
    x_HWC = np.asarray(x_HWC)
    if x_HWC.dtype == np.uint8:
        x_HWC = x_HWC.astype(np.float32) / np.float32(255)
    return (x_HWC.astype(np.float32) - _MEAN_C) / _STD_C


def eval_pixels(image: Image.Image, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: CLIP's evaluation resize and centre crop, before normalisation."""
    # Resize and crop in the input's own mode and convert to RGB last, the order of the
    # reference: it matters for palette images (nearest resize) and alpha (premultiplied).
    return rgb_array(center_crop(resize_shortest_side(image, size), size))


def eval_transform(image_or_path: ImageOrPath, size: int) -> np.ndarray:
    """Preprocess one image for CLIP evaluation into a [size, size, 3] float32 array."""
    if isinstance(image_or_path, Image.Image):
        image = image_or_path
    else:
        image = load_image(image_or_path)
    return normalize_uint8(eval_pixels(image, size))


def preprocess(images_or_paths: Sequence[ImageOrPath], size: int) -> np.ndarray:
    """Preprocess a batch of images or paths into a [B, size, size, 3] float32 array."""
    if len(images_or_paths) == 0:
        return np.zeros((0, size, size, 3), np.float32)
    return np.stack([eval_transform(x, size) for x in images_or_paths])


# CLIP's training augmentation (OpenCLIP's `image_transform(is_train=True)` default): a
# random resized crop covering 90-100% of the area, aspect ratio in [3/4, 4/3], bicubic.
TRAIN_SCALE = (0.9, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = TRAIN_SCALE,
                            ratio: tuple[float, float] = TRAIN_RATIO) -> tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height) of a random crop, drawn as torchvision draws it.

    Ten tries at an area fraction in `scale` and a log-uniform aspect ratio in `ratio`; a
    crop that does not fit falls back to the largest central crop whose ratio is in range.
    """
    area = width * height
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = np.exp(rng.uniform(log_lo, log_hi))
        crop_w = int(round(np.sqrt(target_area * aspect)))
        crop_h = int(round(np.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return left, top, crop_w, crop_h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_w, crop_h = int(round(height * ratio[1])), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def resized_crop(image: Image.Image, box: tuple[int, int, int, int], size: int) -> Image.Image:
    """The `box` (left, top, width, height) of `image`, bicubic-resized to `size` x `size`."""
    left, top, crop_w, crop_h = box
    return image.crop((left, top, left + crop_w, top + crop_h)).resize(
        (size, size), Image.Resampling.BICUBIC)


# normalize() of every uint8 value per channel: a lookup gives the same float32 bits at
# half the cost of the arithmetic, which the training pipeline pays for every pixel.
_LUT_C256 = normalize(np.arange(256, dtype=np.uint8)[:, None].repeat(3, axis=1)).T.copy()


def normalize_uint8(x_HWC: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """normalize() of a uint8 RGB array, bit for bit, by table lookup (into `out` if given)."""
    out_HWC = np.empty(x_HWC.shape, np.float32) if out is None else out
    for c in range(3):
        np.take(_LUT_C256[c], x_HWC[..., c], out=out_HWC[..., c])
    return out_HWC


def rgb_array(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] pixels of `image`, converted to RGB when it is in another mode."""
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
