"""Image loading and the resize / center-crop / normalize pipeline, and its inverse."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeAlias

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

__all__ = [
    "IMAGENET_INCEPTION_MEAN",
    "IMAGENET_INCEPTION_STD",
    "ImageInput",
    "deprocess_image",
    "preprocess_image",
    "resize_center_crop",
    "to_rgb",
]

ImageInput: TypeAlias = Image.Image | str | os.PathLike | np.ndarray
"""What the pipeline accepts: a PIL image, a path to an image file, or an ``H×W[×C]`` array."""

IMAGENET_INCEPTION_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Mean of the "Inception" normalization used by EfficientNet-Lite: pixels go to ``[-1, 1]``."""
IMAGENET_INCEPTION_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Standard deviation of the "Inception" normalization."""

_WHITE = (255, 255, 255, 255)


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _sixteen_bit_to_8(values: np.ndarray) -> np.ndarray:
    """Map ``[0, 65535]`` to ``[0, 255]`` (65535 / 257 = 255 exactly)."""
    scaled = np.clip(values.astype(np.float64), 0, 65535) / 257.0
    return np.round(scaled).astype(np.uint8)


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited over white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16"):
        return Image.fromarray(_sixteen_bit_to_8(np.asarray(image))).convert("RGB")
    if mode == "I":  # 32-bit integers; in practice 16-bit data (or 8-bit data widened)
        values = np.asarray(image)
        if values.size and values.max() > 255:
            gray = _sixteen_bit_to_8(values)
        else:
            gray = np.clip(values, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":  # floats: [0, 1] when they fit, else [0, 255]
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        gray = np.round(np.clip(np.nan_to_num(values) * scale, 0, 255)).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        return _composite_on_white(image)
    return image.convert("RGB")


def _array_to_pil(array: np.ndarray) -> Image.Image:
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        hint = ""
        if a.ndim == 3 and a.shape[0] in (1, 3, 4):
            hint = " (channels-first? transpose to H×W×C, e.g. array.transpose(1, 2, 0))"
        raise ValueError(
            f"expected an image array of shape H×W, H×W×3 or H×W×4, got {a.shape}{hint}"
        )
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = _sixteen_bit_to_8(a)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ValueError("image array has NaN or infinite values")
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(
                f"a float image array must hold values in [0, 1], got [{lo:.4g}, {hi:.4g}]"
            )
        a = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min(initial=0)), int(a.max(initial=0))
        if lo < 0 or hi > 255:
            raise ValueError(
                f"an integer image array of dtype {a.dtype} must hold values in [0, 255], "
                f"got [{lo}, {hi}]; use uint16 for 16-bit images"
            )
        a = a.astype(np.uint8)
    else:
        raise TypeError(f"unsupported image array dtype {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a))


def to_rgb(image: ImageInput) -> Image.Image:
    """Load or convert an image to an 8-bit RGB PIL image.

    Args:
        image: A PIL image in any mode; a path to an image file (EXIF orientation is applied);
            or a numpy array ``H×W``, ``H×W×1``, ``H×W×3`` or ``H×W×4``, of dtype ``uint8``,
            ``uint16`` (16-bit, scaled to 8 bits), ``bool``, or float with values in ``[0, 1]``.

    Returns:
        An RGB image. Grayscale and palette images are expanded, 16-bit and 32-bit images are
        scaled to 8 bits, and transparent pixels are composited over white.

    Raises:
        TypeError: For an unsupported input type.
        ValueError: For an array of unsupported shape or out-of-range values.
        OSError: When a file cannot be opened or decoded (the message names the file).
    """
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        with Image.open(path) as opened:
            transposed = ImageOps.exif_transpose(opened)
            rgb = _pil_to_rgb(transposed if transposed is not None else opened)
            rgb.load()
            return rgb if rgb is not opened else rgb.copy()
    if isinstance(image, np.ndarray):
        return _pil_to_rgb(_array_to_pil(image))
    raise TypeError(f"expected a PIL image, a path or a numpy array, got {type(image).__name__}")


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def resize_center_crop(
    image: ImageInput, size: int | Sequence[int] = 224, resize: int = 256
) -> Image.Image:
    """Resize the shorter side to ``resize`` (bilinear) and center-crop ``size``.

    This is the usual ImageNet evaluation crop (as in ``torchvision.transforms``:
    ``Resize(resize)`` then ``CenterCrop(size)``).

    Args:
        image: Anything :func:`to_rgb` accepts.
        size: Crop size, an int or ``(height, width)``.
        resize: Length of the shorter side after resizing; at least the crop size.

    Returns:
        The cropped RGB image, ``size`` pixels.

    Raises:
        ValueError: ``resize`` below the crop size, or an image whose resized form would pass
            Pillow's pixel limit (an extreme aspect ratio).
    """
    height, width = _size_hw(size)
    if resize < max(height, width):
        raise ValueError(f"resize ({resize}) must be at least the crop size {(height, width)}")
    rgb = to_rgb(image)
    w, h = rgb.size
    if w <= h:
        new_w, new_h = resize, int(resize * h / w)
    else:
        new_w, new_h = int(resize * w / h), resize
    limit = Image.MAX_IMAGE_PIXELS
    if limit and new_w * new_h > limit:  # a tiny file of an extreme aspect ratio (3000 x 1)
        raise ValueError(
            f"a {w}x{h} image resized to a shorter side of {resize} would be {new_w}x{new_h} "
            f"pixels, over Pillow's limit of {limit}: crop it to a usual aspect ratio first"
        )
    if (new_w, new_h) != (w, h):
        rgb = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = round((new_h - height) / 2.0)
    left = round((new_w - width) / 2.0)
    return rgb.crop((left, top, left + width, top + height))


def preprocess_image(
    image: ImageInput,
    size: int | Sequence[int] = 224,
    resize: int = 256,
    mean: Sequence[float] = IMAGENET_INCEPTION_MEAN,
    std: Sequence[float] = IMAGENET_INCEPTION_STD,
) -> Tensor:
    """Turn an image into a normalized ``(1, 3, height, width)`` float32 tensor.

    :func:`resize_center_crop`, then pixels scaled to ``[0, 1]`` and normalized per channel as
    ``(x - mean) / std``. With the defaults (mean = std = 0.5) the values lie in ``[-1, 1]``,
    the input range of EfficientNet-Lite.

    Args:
        image: A PIL image, a path, or a numpy array (see :func:`to_rgb`).
        size: Crop size, an int or ``(height, width)``.
        resize: Shorter side after resizing, before cropping.
        mean: Per-channel mean, for pixels in ``[0, 1]``.
        std: Per-channel standard deviation, for pixels in ``[0, 1]``.

    Returns:
        A CPU tensor of shape ``(1, 3, height, width)``.
    """
    crop = resize_center_crop(image, size=size, resize=resize)
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0)
    x = pixels.permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((x - m) / s).unsqueeze(0).contiguous()


def deprocess_image(
    tensor: Tensor,
    mean: Sequence[float] = IMAGENET_INCEPTION_MEAN,
    std: Sequence[float] = IMAGENET_INCEPTION_STD,
) -> np.ndarray:
    """Invert :func:`preprocess_image` normalization: tensor back to an ``H×W×3`` uint8 array.

    Args:
        tensor: A ``(3, H, W)`` or ``(1, 3, H, W)`` normalized image, on any device.
        mean: The mean used to normalize it.
        std: The standard deviation used to normalize it.

    Returns:
        The image as ``uint8`` pixels, values clipped to ``[0, 255]``.
    """
    t = tensor.detach()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) or (1, 3, H, W) tensor, got {tuple(tensor.shape)}")
    t = t.to("cpu", torch.float32)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = ((t * s + m).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).numpy().copy()
