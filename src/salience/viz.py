"""Pictures of attributions: heatmaps, overlays, the guided-backprop rendering, grids.

Methods return raw, signed, unnormalized maps; every normalization for display lives here:

- :func:`normalize` scales a map for display: signed maps to ``[-1, 1]`` symmetrically about
  zero (so that zero stays the centre of a diverging colormap), non-negative maps to
  ``[0, 1]``, both relative to a high percentile of ``|map|`` so that a few extreme pixels do
  not wash out the rest (Smilkov et al. 2017 clip at the 99th percentile).
- :func:`heatmap` colors a map; :func:`overlay` blends it over the image.
- :func:`guided_image` is the rendering of guided backpropagation and Guided Grad-CAM used in
  the papers' figures (Springenberg et al. 2015, Selvaraju et al. 2017).
- :func:`render` picks the usual picture for a method; :func:`grid` lays out titled panels.

Every function returns a ``PIL.Image.Image`` (save it with ``.save("map.png")``). matplotlib is
only imported when a colormap or a grid is drawn.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, TypeAlias

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .attribution import Attribution, Reduction

if TYPE_CHECKING:
    from matplotlib.colors import Colormap

__all__ = [
    "SIGNED_CMAP",
    "UNSIGNED_CMAP",
    "ImageLike",
    "MapLike",
    "Style",
    "grid",
    "guided_image",
    "heatmap",
    "normalize",
    "overlay",
    "render",
    "saliency_map",
    "to_png",
]

ImageLike: TypeAlias = "Image.Image | np.ndarray | Tensor | str | os.PathLike[str]"
"""An image to draw on: a PIL image, an ``H×W×3`` array (``uint8``, or float in ``[0, 1]``),
a ``(3, H, W)`` tensor in ``[0, 1]``, or a file path. For a normalized model input use
``model.to_image(x)`` first."""

MapLike: TypeAlias = "Attribution | Tensor | np.ndarray"
"""A map: an :class:`~salience.Attribution`, or an ``(H, W)``, ``(1, H, W)`` or ``(N, 1, H, W)``
tensor or array (multi-channel arrays need ``reduction=``)."""

Style = Literal["auto", "overlay", "heatmap", "rgb"]

SIGNED_CMAP = "RdBu_r"
"""Default colormap of signed maps: blue negative, white zero, red positive."""
UNSIGNED_CMAP = "jet"
"""Default colormap of non-negative maps, as in the Grad-CAM figures."""
GRADIENT_CMAP = "gray"
"""Colormap :func:`render` uses for gradient magnitudes, as in Simonyan et al.'s figures."""

_RGB_METHODS = frozenset({"guided_backprop", "deconvnet", "guided_grad_cam"})
# Relevance and contribution maps are drawn diverging around a white zero even when every value
# is positive (as the LRP and DeepLIFT papers do), so that "no relevance" is always white.
_SIGNED_METHODS = frozenset(
    {"lrp", "deeplift", "integrated_gradients", "input_x_gradient", "occlusion"}
)
# Maps drawn over the image with a sequential colormap, as their papers do (CAMs by reduction).
_OVERLAY_METHODS = frozenset({"rise"})
# Maps whose every value sits on a large positive level (RISE: the mean score of the masked
# images): drawn from their minimum, as the paper's figures are, or they would be one colour.
_FROM_MINIMUM = frozenset({"rise"})


# -- maps ------------------------------------------------------------------------------------


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)


def _reduce(values: np.ndarray, reduction: Reduction) -> np.ndarray:
    if reduction == "abs_max":
        return np.abs(values).max(axis=0)
    if reduction == "abs_sum":
        return np.abs(values).sum(axis=0)
    if reduction == "sum":
        return values.sum(axis=0)
    if reduction == "mean":
        return values.mean(axis=0)
    if values.shape[0] != 1:
        raise ValueError(
            f"a map with {values.shape[0]} channels needs a reduction "
            "('abs_max', 'sum' or 'abs_sum')"
        )
    return values[0]


def saliency_map(
    attribution: MapLike,
    *,
    index: int = 0,
    target: int = 0,
    reduction: Reduction | None = None,
) -> np.ndarray:
    """Return the ``(H, W)`` float32 map of one sample, reduced over channels.

    Args:
        attribution: An :class:`~salience.Attribution` (reduced as its method's paper does, see
            :meth:`~salience.Attribution.saliency`), or a tensor/array ``(H, W)``,
            ``(C, H, W)`` or ``(N, C, H, W)``.
        index: The sample of a batch.
        target: For a CAM of ``K`` targets per sample (``(N, K, H, W)``), which one.
        reduction: How to reduce several channels; by default the attribution's own, and for
            a plain array with more than one channel it is required.

    Raises:
        ValueError: The map has no spatial axes, the index is out of range, or a
            multi-channel array has no reduction.
    """
    if isinstance(attribution, Attribution):
        values = _numpy(attribution.values)
        red = reduction or attribution.reduction
        if values.ndim != 4:
            raise ValueError(f"values of shape {values.shape} are not (N, C, H, W) maps")
        if red == "none" and values.shape[1] > 1:
            if not 0 <= target < values.shape[1]:
                raise ValueError(f"target {target} out of range: {values.shape[1]} maps")
            values = values[:, target : target + 1]
    else:
        values = _numpy(attribution)
        red = reduction or "none"
        if values.ndim == 2:
            values = values[None, None]
        elif values.ndim == 3:
            values = values[None]
        if values.ndim != 4:
            raise ValueError(
                f"expected an (H, W), (C, H, W) or (N, C, H, W) map, got {values.shape}"
            )
    if not -values.shape[0] <= index < values.shape[0]:
        raise ValueError(f"index {index} out of range for a batch of {values.shape[0]}")
    return _reduce(values[index], red).astype(np.float32, copy=False)


def normalize(
    saliency: Tensor | np.ndarray,
    *,
    signed: bool | None = None,
    percentile: float | None = 99.0,
) -> np.ndarray:
    """Scale a map for display, keeping zero at zero.

    A signed map is divided by the ``percentile`` of ``|map|`` and clipped to ``[-1, 1]``; a
    non-negative one is divided by the ``percentile`` of the map and clipped to ``[0, 1]``.
    Nothing is shifted: zero attribution stays zero (white in a diverging colormap, the bottom
    of a sequential one). An all-zero map stays zero.

    Args:
        saliency: A map of any shape.
        signed: Treat the map as signed. ``None`` decides from the data: signed when it has
            negative values (beyond rounding, 1e-6 of the largest magnitude). ``False`` clips
            negative values to zero (take ``abs`` first to show magnitudes).
        percentile: The percentile of the magnitudes that maps to the end of the color scale;
            ``None`` or ``100`` uses the maximum.

    Returns:
        A float32 array of the same shape, in ``[-1, 1]`` (signed) or ``[0, 1]``.
    """
    raw = _numpy(saliency).astype(np.float64)
    m = _finite(raw)
    magnitude = np.abs(m)
    if signed is None:
        signed = _is_signed(raw)
    if percentile is not None and not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    pool = magnitude if signed else np.clip(m, 0, None)
    if not pool.size:
        scale = 0.0
    elif percentile is None:
        scale = float(pool.max())
    else:
        scale = float(np.percentile(pool, percentile))
    if scale <= 0:
        scale = float(pool.max()) if pool.size else 0.0
    low = -1.0 if signed else 0.0
    norm = np.clip(m / scale, low, 1.0) if scale > 0 else np.zeros(m.shape)
    norm[raw == np.inf] = 1.0  # beyond the scale: its end
    norm[raw == -np.inf] = low
    return norm.astype(np.float32)


def _finite(m: np.ndarray) -> np.ndarray:
    """Return ``m`` with its NaN and infinite values as 0, warning about them."""
    finite = np.isfinite(m)
    if finite.all():
        return m
    nan = int(np.isnan(m).sum())
    warnings.warn(
        f"the map holds {nan} NaN and {m.size - int(finite.sum()) - nan} infinite value(s) "
        "(the method's gradient or score is not finite there): NaN is drawn as zero, "
        "infinite values at the ends of the colour scale",
        RuntimeWarning,
        stacklevel=3,
    )
    return np.where(finite, m, 0.0)


def _is_signed(m: np.ndarray) -> bool:
    """Whether ``m`` has negative values beyond rounding (1e-6 of its largest magnitude)."""
    finite = m[np.isfinite(m)]
    peak = float(np.abs(finite).max()) if finite.size else 0.0
    low = float(finite.min()) if finite.size else 0.0
    return bool((m == -np.inf).any()) or low < -1e-6 * peak


def _colormap(name: str | Colormap) -> Colormap:
    if not isinstance(name, str):
        return name
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(
            f"unknown colormap {name!r}; see matplotlib.colormaps for the names"
        ) from None


def _colorize(norm: np.ndarray, cmap: str | Colormap, signed: bool) -> np.ndarray:
    """Map normalized values to ``H×W×3`` uint8 colors."""
    unit = (norm + 1.0) / 2.0 if signed else norm
    rgba = _colormap(cmap)(unit)
    return np.round(rgba[..., :3] * 255).astype(np.uint8)


def heatmap(
    attribution: MapLike,
    *,
    cmap: str | Colormap | None = None,
    signed: bool | None = None,
    percentile: float | None = 99.0,
    index: int = 0,
    target: int = 0,
    reduction: Reduction | None = None,
) -> Image.Image:
    """Color a map: a diverging colormap centred at zero if signed, a sequential one if not.

    Args:
        attribution: See :func:`saliency_map`.
        cmap: A matplotlib colormap or its name; default :data:`SIGNED_CMAP` for signed
            maps and :data:`UNSIGNED_CMAP` otherwise.
        signed: See :func:`normalize`.
        percentile: See :func:`normalize`.
        index: The sample of a batch.
        target: For several maps per sample, which one.
        reduction: See :func:`saliency_map`.

    Returns:
        An RGB image of the map's size.
    """
    m = saliency_map(attribution, index=index, target=target, reduction=reduction)
    if signed is None:
        signed = _is_signed(m)
    norm = normalize(m, signed=signed, percentile=percentile)
    colors = _colorize(norm, cmap or (SIGNED_CMAP if signed else UNSIGNED_CMAP), signed)
    return Image.fromarray(colors, mode="RGB")


def _as_rgb_array(image: ImageLike) -> np.ndarray:
    from salience.models import to_rgb

    if isinstance(image, Tensor):
        t = image.detach().to("cpu", torch.float32)
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 3):
            t = t.permute(1, 2, 0)
        array = t.numpy()
        if array.min() < -1e-3 or array.max() > 1 + 1e-3:
            raise ValueError(
                "an image tensor must hold values in [0, 1]; for a normalized model input "
                "use model.to_image(x)"
            )
        return np.asarray(to_rgb(np.clip(array, 0.0, 1.0)))
    return np.asarray(to_rgb(image))


def overlay(
    image: ImageLike,
    attribution: MapLike,
    *,
    cmap: str | Colormap | None = None,
    alpha: float = 0.5,
    signed: bool | None = None,
    percentile: float | None = 99.0,
    index: int = 0,
    target: int = 0,
    reduction: Reduction | None = None,
) -> Image.Image:
    """Blend the colored map over the image: ``(1 - alpha) * image + alpha * heatmap``.

    The map is resized to the image (bilinear) when their sizes differ; pass the image the
    model saw (e.g. ``model.crop(image)``) so that the pixels line up.

    Args:
        image: See :data:`ImageLike`.
        attribution: See :func:`saliency_map`.
        cmap: See :func:`heatmap`.
        alpha: Opacity of the heatmap, in ``[0, 1]``.
        signed: See :func:`normalize`.
        percentile: See :func:`normalize`.
        index: The sample of a batch.
        target: For several maps per sample, which one.
        reduction: See :func:`saliency_map`.

    Returns:
        An RGB image of the image's size.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = _as_rgb_array(image)
    heat = heatmap(
        attribution,
        cmap=cmap,
        signed=signed,
        percentile=percentile,
        index=index,
        target=target,
        reduction=reduction,
    )
    height, width = base.shape[:2]
    if heat.size != (width, height):
        heat = heat.resize((width, height), Image.Resampling.BILINEAR)
    mixed = (1.0 - alpha) * base.astype(np.float32) + alpha * np.asarray(heat, dtype=np.float32)
    return Image.fromarray(np.round(mixed).clip(0, 255).astype(np.uint8), mode="RGB")


def guided_image(attribution: MapLike, *, std: float = 0.1, index: int = 0) -> Image.Image:
    """Render a 3-channel gradient as the guided-backprop images of the papers.

    The map of the sample is standardized over all its channels and pixels, scaled to the
    standard deviation ``std``, shifted to 0.5 and clipped to ``[0, 1]``:
    ``clip((g - mean(g)) / std(g) * 0.1 + 0.5, 0, 1)``, the rendering of guided
    backpropagation (Springenberg et al. 2015) and Guided Grad-CAM (Selvaraju et al. 2017) in
    their figures and code. Their code adds ``1e-5`` to ``std(g)``, which dims maps whose
    gradients are small; here the standardization is exact, so the picture does not depend on
    the scale of the gradient.

    Args:
        attribution: An attribution or tensor/array with 3 channels, ``(3, H, W)`` or
            ``(N, 3, H, W)``.
        std: Standard deviation of the result around 0.5.
        index: The sample of a batch.

    Returns:
        An RGB image of the map's size.
    """
    raw = attribution.values if isinstance(attribution, Attribution) else attribution
    values = _numpy(raw)
    if values.ndim == 3:
        values = values[None]
    if values.ndim != 4 or values.shape[1] != 3:
        raise ValueError(
            f"guided_image needs a 3-channel map (N, 3, H, W), got shape {values.shape}"
        )
    if not -values.shape[0] <= index < values.shape[0]:
        raise ValueError(f"index {index} out of range for a batch of {values.shape[0]}")
    raw = values[index].astype(np.float64)
    g = _finite(raw)
    spread = float(g.std())
    g = (g - g.mean()) / spread * std + 0.5 if spread > 0 else np.full_like(g, 0.5)
    g[raw == np.inf], g[raw == -np.inf] = 1.0, 0.0
    pixels = np.round(np.clip(g, 0.0, 1.0) * 255).astype(np.uint8)
    return Image.fromarray(pixels.transpose(1, 2, 0), mode="RGB")


def default_style(attribution: Attribution) -> Style:
    """Return the picture the papers show for ``attribution.method``.

    - ``"rgb"`` (:func:`guided_image`) for guided backprop, DeconvNet and Guided Grad-CAM;
    - ``"overlay"`` (jet, over the image) for the one-channel CAM maps and RISE (RISE drawn
      from its minimum: every value of its map sits on the mean masked score);
    - ``"heatmap"`` for pixel maps: gradient magnitudes in gray (Simonyan et al.), signed maps
      (Integrated Gradients, gradient × input, LRP, DeepLIFT, occlusion) in a diverging
      colormap with zero white, also when every value is positive.
    """
    if attribution.method in _RGB_METHODS and attribution.values.shape[1] == 3:
        return "rgb"
    if attribution.reduction == "none" or attribution.method in _OVERLAY_METHODS:
        return "overlay"
    return "heatmap"


def render(
    attribution: Attribution,
    image: ImageLike | None = None,
    *,
    style: Style = "auto",
    index: int = 0,
    target: int = 0,
    cmap: str | Colormap | None = None,
    alpha: float = 0.5,
    percentile: float | None = 99.0,
) -> Image.Image:
    """Draw one map the way its method is usually shown (see :func:`default_style`).

    Args:
        attribution: The result of a method.
        image: The image the model saw, for overlays; without it an overlay becomes a heatmap.
        style: ``"auto"``, ``"overlay"``, ``"heatmap"`` or ``"rgb"``.
        index: The sample of a batch.
        target: For several maps per sample, which one.
        cmap: Colormap for heatmaps and overlays; default depends on the style and the sign.
        alpha: Heatmap opacity of overlays.
        percentile: See :func:`normalize`.

    Returns:
        An RGB image.
    """
    chosen = default_style(attribution) if style == "auto" else style
    if chosen == "rgb":
        return guided_image(attribution, index=index)
    if chosen == "overlay" and image is not None:
        shown: MapLike = attribution
        if style == "auto" and attribution.method in _FROM_MINIMUM:
            m = saliency_map(attribution, index=index, target=target)
            shown, index, target = m - m.min(), 0, 0
        return overlay(
            image,
            shown,
            cmap=cmap,
            alpha=alpha,
            percentile=percentile,
            index=index,
            target=target,
        )
    if chosen not in ("overlay", "heatmap"):
        raise ValueError(f"unknown style {style!r}; expected auto, overlay, heatmap or rgb")
    if cmap is None and style == "auto" and attribution.reduction == "abs_max":
        cmap = GRADIENT_CMAP
    signed = True if style == "auto" and attribution.method in _SIGNED_METHODS else None
    return heatmap(
        attribution, cmap=cmap, signed=signed, percentile=percentile, index=index, target=target
    )


# -- figures ---------------------------------------------------------------------------------


def grid(
    images: Sequence[Image.Image | np.ndarray],
    titles: Sequence[str] | None = None,
    *,
    ncols: int | None = None,
    title: str | None = None,
    panel_size: float = 2.4,
    dpi: int = 100,
    fontsize: float = 9.0,
) -> Image.Image:
    """Lay out images side by side with titles, as one picture.

    Args:
        images: The panels (PIL images or ``H×W×3`` / ``H×W`` arrays).
        titles: One title per panel (may be empty strings), shown as written: a ``$`` in a
            file name is no mathematics.
        ncols: Panels per row; default all in one row up to 8, then rows of 8.
        title: A title over the whole figure.
        panel_size: Width and height of a panel, in inches.
        dpi: Pixels per inch of the result.
        fontsize: Font size of the panel titles, in points.

    Returns:
        An RGB image.
    """
    if not images:
        raise ValueError("grid needs at least one image")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(images)
    cols = min(n, ncols or 8)
    rows = -(-n // cols)
    head = 0.35 if title else 0.0
    fig = Figure(figsize=(cols * panel_size, rows * (panel_size + 0.3) + head), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    for i, picture in enumerate(images):
        ax = fig.add_subplot(rows, cols, i + 1)
        array = np.asarray(picture)
        ax.imshow(array, cmap="gray" if array.ndim == 2 else None, interpolation="antialiased")
        ax.set_axis_off()
        if titles is not None and titles[i]:
            ax.set_title(titles[i], fontsize=fontsize, usetex=False, parse_math=False)
    if title:
        fig.suptitle(title, fontsize=fontsize + 2, usetex=False, parse_math=False)
    fig.tight_layout(pad=0.3)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return Image.fromarray(rgba[..., :3].copy(), mode="RGB")


def to_png(image: Image.Image) -> bytes:
    """Encode a PIL image as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


# -- notebook display --------------------------------------------------------------------------

_REPR_PANELS = 8


def _repr_image(attribution: Attribution) -> Image.Image:
    """Draw what :class:`~salience.Attribution` shows in Jupyter (no input image needed)."""
    values = attribution.values
    if values.ndim != 4:
        raise ValueError("nothing to draw")
    n = values.shape[0]
    k = values.shape[1] if attribution.reduction == "none" else 1
    names = None
    if attribution.target is not None:
        names = attribution.target.reshape(n, -1).tolist()
    panels: list[Image.Image] = []
    titles: list[str] = []
    for i in range(n):
        for t in range(k):
            if len(panels) == _REPR_PANELS:
                break
            panels.append(render(attribution, index=i, target=t))
            label = f"sample {i}" if n > 1 else ""
            if names is not None:
                label = f"{label} class {names[i][t]}".strip()
            titles.append(label)
    if len(panels) == 1:
        picture = panels[0]
        if max(picture.size) < 160:  # tiny maps: enlarge, keeping the pixels visible
            factor = -(-160 // max(picture.size))
            picture = picture.resize(
                (picture.width * factor, picture.height * factor), Image.Resampling.NEAREST
            )
        return picture
    return grid(panels, titles, ncols=min(len(panels), 4), panel_size=2.0)


def _repr_png(attribution: Attribution) -> bytes | None:
    try:
        return to_png(_repr_image(attribution))
    except Exception:  # a display hook must never raise; Jupyter falls back to the text repr
        return None


def _repr_html(attribution: Attribution) -> str | None:
    import base64
    import html

    png = _repr_png(attribution)
    if png is None:
        return None
    data = base64.b64encode(png).decode("ascii")
    caption = html.escape(repr(attribution))
    return (
        f'<figure style="margin:0"><img src="data:image/png;base64,{data}" '
        f'alt="{html.escape(attribution.method)} map"/>'
        f'<figcaption style="font-family:monospace;font-size:85%">{caption}</figcaption></figure>'
    )
