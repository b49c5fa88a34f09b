"""The images, and image patches, that excite a channel most (Zeiler & Fergus 2013, Fig. 2).

:func:`top_activating` streams over images (tensors, batches, PIL images, files or a folder),
keeping only the ``k`` whose strongest activation of the channel is largest, then projects
each of those activations back to pixels with :func:`~salience.features.reconstruct`. Memory
holds ``k`` images and one batch, whatever the number of images. :func:`top_grid` draws the
figure of the paper: each receptive-field patch beside its reconstruction.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .._checks import check_model, check_positive_int, warn
from .._forward import full_float32, kept_buffers
from .._io import ImageError, Progress, load_image
from ..hooks import forward_hooks
from ..layers import LayerLike, find_layer
from ..rectifiers import Activations
from .reconstruct import Reconstruction, receptive_field, reconstruct

__all__ = ["TopActivating", "top_activating", "top_grid"]

ImageSource = str | os.PathLike[str] | Iterable[Any]
"""A folder of image files, or an iterable of ``(C, H, W)`` / ``(N, C, H, W)`` tensors, PIL
images and image file paths."""

_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


@dataclass(frozen=True)
class TopActivating:
    """The ``k`` images that excite a channel most, best first, with their reconstructions.

    Attributes:
        layer: The dotted name of the layer.
        channel: The channel.
        labels: A label per image: its file name, or ``#i`` (its index in the stream).
        activations: ``(k,)`` the strongest activation of the channel in each image.
        images: ``(k, C, H, W)`` the images, as the model saw them, on the CPU.
        reconstruction: The DeconvNet projections, unit positions and receptive-field boxes
            (``projection`` is ``None`` when reconstructions were not asked for).
        seen: How many images were scanned.
        skipped: ``(label, reason)`` of every input that could not be used.
    """

    layer: str
    channel: int
    labels: list[str]
    activations: Tensor
    images: Tensor
    reconstruction: Reconstruction
    seen: int
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def boxes(self) -> Tensor:
        """``(k, 4)`` receptive-field boxes ``(top, left, bottom, right)``, half-open."""
        return self.reconstruction.box


def _recorder(outputs: list[Any]) -> Callable[[str, nn.Module, tuple[Any, ...], Any], Any]:
    """Make a forward hook that keeps each output and hands the model a copy.

    A later in-place operation (``ReLU(inplace=True)``) then cannot change what was recorded.
    """

    def record(_name: str, _module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        outputs.append(output)
        return output.clone() if isinstance(output, Tensor) else None

    return record


def _warn_skip(label: str, reason: str) -> None:
    warn(f"top_activating skipped {label}: {reason}")


def _files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and (p.is_file() and p.suffix.lower() in _SUFFIXES)
    )


def _items(
    images: ImageSource,
    preprocess: Callable[[Any], Tensor] | None,
    on_skip: Callable[[str, str], None],
    max_pixels: int | None,
) -> Iterable[tuple[str, Tensor]]:
    """Yield ``(label, (n, C, H, W) tensor)``; unusable inputs go to ``on_skip``."""
    if isinstance(images, str | os.PathLike):
        folder = Path(images)
        if not folder.is_dir():
            raise ValueError(f"{os.fspath(images)}: not a folder of images")
        source: Iterable[Any] = _files(folder)
    else:
        source = images
    index = 0
    for item in source:
        label = f"#{index}"
        try:
            if isinstance(item, Tensor):
                if item.ndim == 3:
                    item = item.unsqueeze(0)
                if item.ndim != 4 or not item.is_floating_point():
                    raise TypeError(
                        f"images must be float (C, H, W) images or (N, C, H, W) batches, got "
                        f"{item.dtype} of shape {tuple(item.shape)}"
                    )
                finite = torch.isfinite(item).flatten(1).all(1).tolist()
                if not all(finite):  # skip the bad images, keep the others of the batch
                    for i, ok in enumerate(finite):
                        if not ok:
                            on_skip(f"#{index + i}", "contains NaN or inf values")
                labels = [f"#{index + i}" for i in range(item.shape[0])]
                index += item.shape[0]
                for i, lab in enumerate(labels):
                    if finite[i]:
                        yield lab, item[i : i + 1]
                continue
            if isinstance(item, str | os.PathLike):
                label = Path(item).name
                picture = load_image(item, max_pixels=max_pixels)
            elif isinstance(item, Image.Image):
                picture = item
            else:
                raise TypeError(f"cannot read a {type(item).__name__} as an image")
            if preprocess is None:
                raise TypeError(
                    "image files and PIL images need a preprocess function (the model has no "
                    "preprocess method): pass preprocess="
                )
            x = preprocess(picture)
            index += 1
            yield label, x if x.ndim == 4 else x.unsqueeze(0)
        except ImageError as exc:
            index += 1
            on_skip(label, str(exc).removeprefix(f"{item}: "))
        except TypeError:
            raise
        except Exception as exc:
            index += 1
            on_skip(label, f"{type(exc).__name__}: {exc}")


def _count(images: ImageSource) -> int:
    """Images to expect, for the progress bar: 0 (unknown) for iterators, read only once."""
    if isinstance(images, str | os.PathLike):
        return len(_files(Path(images))) if Path(images).is_dir() else 0
    if isinstance(images, list | tuple):
        return sum(x.shape[0] if isinstance(x, Tensor) and x.ndim == 4 else 1 for x in images)
    return 0


def top_activating(
    model: nn.Module,
    images: ImageSource,
    layer: LayerLike,
    channel: int,
    k: int = 9,
    *,
    preprocess: Callable[[Any], Tensor] | None = None,
    batch_size: int = 16,
    reconstructions: bool = True,
    activations: Activations = "rectifiers",
    on_skip: Callable[[str, str], None] | None = None,
    max_pixels: int | None = None,
    progress: bool | None = False,
) -> TopActivating:
    """Find the ``k`` images that excite ``channel`` of ``layer`` most (Zeiler & Fergus 2013).

    Each image is scored by the strongest activation of the channel anywhere in its map; the
    stream is read once, in batches of ``batch_size``, keeping the best ``k`` (ties: the
    earlier image). For those, :func:`~salience.features.reconstruct` projects that activation
    back to pixels and gives its receptive field, the patch of the image the unit saw.

    Args:
        model: The model (eval mode), written in Python; with ``reconstructions`` it must use
            rectifiers (DeconvNet).
        images: A folder of image files (read with :func:`salience._io.load_image`, in name
            order), or an iterable of ``(C, H, W)`` / ``(N, C, H, W)`` tensors (preprocessed),
            PIL images and file paths.
        layer: The layer, a submodule or its dotted name; its output is an
            ``(N, K, h, w)`` map.
        channel: The channel of the layer.
        k: How many images to keep.
        preprocess: Turns a PIL image into a ``(1, C, H, W)`` input; default the model's
            ``preprocess`` method (see :mod:`salience.models`).
        batch_size: Images per forward pass.
        reconstructions: Compute the DeconvNet projections (else only the receptive fields,
            and ``reconstruction.projection`` is ``None``).
        activations: Where the DeconvNet rule applies (see :func:`reconstruct`).
        on_skip: Called with ``(label, reason)`` for an input that cannot be read or
            preprocessed; the scan goes on. Default: a warning.
        max_pixels: Largest image file read (see :func:`salience._io.load_image`); ``None``:
            Pillow's decompression-bomb threshold.
        progress: Progress bar on stderr: ``True``, ``False``, or ``None`` for a terminal only.

    Returns:
        A :class:`TopActivating`, best first (fewer than ``k`` when fewer images were read).

    Raises:
        ValueError: no usable image, a non-spatial or unknown layer, a channel outside the
            layer, images of different sizes, or a model with no rectifier (with
            ``reconstructions``).
        TypeError: an input of an unknown kind, or images to preprocess with no
            ``preprocess``.
    """
    check_model(model)
    check_positive_int("k", k)
    check_positive_int("batch_size", batch_size)
    if isinstance(channel, bool) or not isinstance(channel, int) or channel < 0:
        raise ValueError(f"channel must be a non-negative int, got {channel!r}")
    name, module = find_layer(model, layer)
    own = getattr(model, "preprocess", None)
    if preprocess is None and callable(own):
        preprocess = own
    skipped: list[tuple[str, str]] = []

    def skip(label: str, reason: str) -> None:
        skipped.append((label, reason))
        (on_skip or _warn_skip)(label, reason)

    best: list[tuple[float, int, str, Tensor]] = []  # (value, order, label, image)
    seen = 0
    pending: list[tuple[str, Tensor]] = []
    shape: tuple[int, ...] | None = None

    def flush(bar: Progress) -> None:
        nonlocal seen
        if not pending:
            return
        x = torch.cat([t for _, t in pending])
        outputs: list[Any] = []

        with torch.no_grad(), forward_hooks([(name, module)], _recorder(outputs)):
            model(x)
        if not outputs:
            raise ValueError(f"layer {name!r} did not run in the forward pass of the model")
        a = outputs[-1]
        if not isinstance(a, Tensor) or a.ndim != 4:
            shape_text = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise ValueError(
                f"layer {name!r} is not spatial: its output is {shape_text}; "
                "top_activating needs an (N, C, h, w) feature map"
            )
        if channel >= a.shape[1]:
            raise ValueError(
                f"channel {channel} is out of range: layer {name!r} has {a.shape[1]} channels"
            )
        scores = a[:, channel].flatten(1).amax(1).float().cpu()
        for (label, t), score in zip(pending, scores.tolist(), strict=True):
            best.append((score, seen, label, t.detach().cpu()))
            seen += 1
        best.sort(key=lambda e: (-e[0], e[1]))
        del best[k:]
        bar.update(len(pending))
        pending.clear()

    with (
        full_float32(),
        kept_buffers(model),
        Progress(_count(images), f"top {name}:{channel}", enabled=progress) as bar,
    ):
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        for label, x in _items(images, preprocess, skip, max_pixels):
            if shape is not None and tuple(x.shape[1:]) != shape:
                raise ValueError(
                    f"{label}: image of size {tuple(x.shape[1:])}, but the earlier ones are "
                    f"{shape}: resize them to one size (a model's preprocess does)"
                )
            shape = tuple(x.shape[1:])
            pending.append((label, x.to(device)))
            if len(pending) >= batch_size:
                flush(bar)
            bar.update(0)
        flush(bar)
    if not best:
        raise ValueError(
            "no usable image"
            + (f": all {len(skipped)} inputs were skipped" if skipped else " was given")
        )
    stacked = torch.cat([e[3] for e in best]).to(device)
    if reconstructions:
        rec = reconstruct(model, stacked, name, channel, activations=activations)
    else:
        rec = _positions_only(model, stacked, name, module, channel)
    return TopActivating(
        layer=name,
        channel=channel,
        labels=[e[2] for e in best],
        activations=torch.tensor([e[0] for e in best]),
        images=stacked.cpu(),
        reconstruction=rec,
        seen=seen,
        skipped=skipped,
    )


def _positions_only(
    model: nn.Module, x: Tensor, name: str, module: nn.Module, channel: int
) -> Reconstruction:
    outputs: list[Tensor] = []

    with torch.no_grad(), kept_buffers(model), forward_hooks([(name, module)], _recorder(outputs)):
        model(x)
    a = outputs[-1]
    best, flat = a[:, channel].flatten(1).max(1)
    w = a.shape[-1]
    ys, xs = flat // w, flat % w
    chosen = torch.full_like(ys, channel)
    units = torch.stack([chosen, ys, xs], 1).cpu()
    return Reconstruction(
        projection=None,
        layer=name,
        channel=chosen.cpu(),
        position=torch.stack([ys, xs], 1).cpu(),
        activation=best.cpu(),
        box=receptive_field(model, x, name, units),
        layer_calls=len(outputs),
    )


def _pixels(image: Tensor, to_image: Callable[[Tensor], Any] | None) -> np.ndarray:
    if to_image is not None:
        return np.asarray(to_image(image))
    array = image.detach().float().cpu().numpy()
    lo, hi = float(array.min()), float(array.max())
    array = (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
    array = (255 * array).round().astype(np.uint8)
    return array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))


def _projection_pixels(projection: Tensor, percentile: float = 99.5) -> np.ndarray:
    """Render a signed projection: grey for zero, scaled by a high percentile of its magnitude.

    The few strongest pixels are clipped (as in the contrast normalization of Zeiler &
    Fergus's figures), so that the pattern stays visible beside one sharp peak.
    """
    array = projection.detach().float().cpu().numpy()
    scale = float(np.percentile(np.abs(array), percentile)) if array.size else 0.0
    array = np.clip(0.5 + 0.5 * array / scale, 0, 1) if scale > 0 else np.full_like(array, 0.5)
    array = (255 * array).round().astype(np.uint8)
    return array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))


def top_grid(
    result: TopActivating,
    to_image: Callable[[Tensor], Any] | None = None,
    *,
    title: str | None = None,
    ncols: int | None = None,
) -> Image.Image:
    """Draw each receptive-field patch beside its reconstruction (Zeiler & Fergus, Fig. 2).

    Args:
        result: What :func:`top_activating` returned (with reconstructions).
        to_image: Turns a ``(C, H, W)`` input into an ``H×W×3`` ``uint8`` picture (a model's
            ``to_image``); default: scaled to the image's own range.
        title: Title over the figure; default the layer and channel.
        ncols: Pairs per row; default 3 (or fewer images).

    Returns:
        An RGB image: pairs of panels "patch" and "reconstruction", best first.
    """
    from ..viz import grid

    rec = result.reconstruction
    if rec.projection is None:
        raise ValueError(
            "this result has no reconstructions (top_activating(reconstructions=False))"
        )
    panels: list[np.ndarray] = []
    titles: list[str] = []
    for i, label in enumerate(result.labels):
        top, left, bottom, right = (int(v) for v in rec.box[i])
        picture = _pixels(result.images[i], to_image)
        panels.append(np.ascontiguousarray(picture[top:bottom, left:right]))
        panels.append(_projection_pixels(rec.projection[i, :, top:bottom, left:right]))
        titles += [f"{label} ({float(result.activations[i]):.3g})", "reconstruction"]
    pairs = ncols or min(3, len(result.labels))
    heading = title if title is not None else f"{result.layer}, channel {result.channel}"
    sheet = grid(panels, titles, ncols=2 * pairs, panel_size=1.6, fontsize=7)
    return with_heading(sheet, heading) if heading else sheet


def with_heading(picture: Image.Image, text: str, size: int = 14) -> Image.Image:
    """Add a white strip with ``text`` centred over ``picture``."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    strip = int(bottom - top) + size
    out = Image.new("RGB", (picture.width, picture.height + strip), "white")
    out.paste(picture, (0, strip))
    x = max((picture.width - (right - left)) // 2, 0)
    ImageDraw.Draw(out).text((x, size // 2 - top), text, fill="black", font=font)
    return out
