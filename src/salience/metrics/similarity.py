"""Similarity of two saliency maps: rank correlation, SSIM and HOG similarity.

The measures of Adebayo et al. (2018) for comparing a map with the map of a changed model
(:mod:`salience.metrics.sanity`), also used by input invariance and fragility. Each takes two
batches of maps ``(N, H, W)`` (or ``(N, P)`` for rank correlation) and returns ``(N,)``.

- :func:`rank_correlation`: Spearman's rho, ties at their average rank (as SciPy);
- :func:`ssim`: structural similarity (Wang, Bovik, Sheikh, Simoncelli 2004), Gaussian window
  ``sigma = 1.5`` as scikit-image's ``gaussian_weights=True``;
- :func:`hog_features` / :func:`hog_similarity`: histograms of oriented gradients (Dalal and
  Triggs 2005) with scikit-image's defaults (9 bins, 8-pixel cells, 3 x 3 blocks, L2-Hys),
  compared by Pearson correlation.

The last section builds the two maps of the sanity check (absolute and signed, the absolute
one normalized at its 99th percentile) and computes every measure between them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_positive_int

__all__ = ["hog_features", "hog_similarity", "rank_correlation", "ssim"]


def _rows(a: Tensor, b: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Return ``a`` and ``b`` as ``(N, P)`` float64 rows, checked."""
    for t, label in ((a, "a"), (b, "b")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {label} must be a tensor, got {type(t).__name__}")
    if a.shape != b.shape:
        raise ValueError(f"{name}: the maps differ in shape, {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim < 2 or a.numel() == 0:
        raise ValueError(
            f"{name}: expected (N, ...) maps, one row per sample; got {tuple(a.shape)}"
        )
    a2 = a.detach().reshape(a.shape[0], -1).double()
    b2 = b.detach().reshape(b.shape[0], -1).double().to(a2.device)
    if not (torch.isfinite(a2).all() and torch.isfinite(b2).all()):
        raise ValueError(f"{name}: the maps contain NaN or inf values")
    return a2, b2


def _pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row pair; NaN where a row is constant."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    r = (a * b).sum(dim=1) / den
    return torch.where(den > 0, r.clamp(-1.0, 1.0), torch.full_like(r, math.nan))


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks ``1..P`` of each row of ``x`` (``(N, P)``), ties sharing their average rank."""
    n, p = x.shape
    sorted_x, order = x.sort(dim=1, stable=True)
    new = torch.ones_like(sorted_x, dtype=torch.bool)
    new[:, 1:] = sorted_x[:, 1:] != sorted_x[:, :-1]
    group = new.long().cumsum(dim=1) - 1  # tie group of each sorted position
    position = torch.arange(p, device=x.device, dtype=torch.float64).expand(n, p)
    total = torch.zeros(n, p, dtype=torch.float64, device=x.device).scatter_add_(1, group, position)
    count = torch.zeros(n, p, dtype=torch.float64, device=x.device).scatter_add_(
        1, group, torch.ones_like(position)
    )
    mean = (total / count.clamp(min=1)).gather(1, group) + 1.0
    return torch.empty_like(mean).scatter_(1, order, mean)


def rank_correlation(a: Tensor, b: Tensor) -> Tensor:
    r"""Spearman rank correlation of ``a[i]`` and ``b[i]`` for each sample ``i``.

    .. math:: \rho = \mathrm{corr}(\mathrm{rank}(a), \mathrm{rank}(b))

    the Pearson correlation of the ranks, ties given their average rank (as
    ``scipy.stats.spearmanr``). Computed in float64 on the maps' device.

    Args:
        a: ``(N, ...)`` maps, one per sample (flattened per sample).
        b: Maps of the same shape.

    Returns:
        ``(N,)`` float64 correlations in ``[-1, 1]``; NaN where a map is constant (it has no
        ranking).

    Raises:
        ValueError: maps of different shapes, empty, or with NaN or inf values.
    """
    a2, b2 = _rows(a, b, "rank_correlation")
    return _pearson_rows(_average_ranks(a2), _average_ranks(b2))


def _gaussian_taps(sigma: float, radius: int, device: torch.device) -> Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    taps = torch.exp(-0.5 * (t / sigma) ** 2)
    return taps / taps.sum()


def ssim(
    a: Tensor,
    b: Tensor,
    *,
    data_range: float | None = None,
    sigma: float = 1.5,
    truncate: float = 3.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    r"""Mean structural similarity (Wang et al. 2004) of ``a[i]`` and ``b[i]`` per sample.

    With Gaussian-weighted local means :math:`\mu`, variances :math:`\sigma^2` and covariance
    :math:`\sigma_{ab}` (window of standard deviation ``sigma``, radius
    ``int(truncate * sigma + 0.5)``: 11 x 11 by default),

    .. math:: \mathrm{SSIM} = \frac{(2\mu_a\mu_b + C_1)(2\sigma_{ab} + C_2)}
              {(\mu_a^2 + \mu_b^2 + C_1)(\sigma_a^2 + \sigma_b^2 + C_2)},
              \quad C_1 = (k_1 L)^2,\ C_2 = (k_2 L)^2,

    averaged over every position where the window fits inside the map (no padding). This is
    ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=L)``, the settings of Wang et al.

    Args:
        a: ``(N, H, W)`` maps.
        b: ``(N, H, W)`` maps.
        data_range: ``L``, the range of values (1 for maps in ``[0, 1]``); ``None``: per sample,
            the range of ``a`` and ``b`` together (as Quantus does).
        sigma: Standard deviation of the window in pixels.
        truncate: Window radius in standard deviations.
        k1: Luminance constant.
        k2: Contrast constant.

    Returns:
        ``(N,)`` float64 similarities in ``[-1, 1]``, 1 for identical maps.

    Raises:
        ValueError: maps not ``(N, H, W)``, of different shapes, smaller than the window, or
            with NaN; a non-positive ``data_range`` or ``sigma``.
    """
    a2, b2 = _rows(a, b, "ssim")
    if a.ndim != 3:
        raise ValueError(f"ssim: expected (N, H, W) maps, got shape {tuple(a.shape)}")
    if not sigma > 0:
        raise ValueError(f"ssim: sigma must be positive, got {sigma!r}")
    n, h, w = a.shape
    radius = int(truncate * sigma + 0.5)
    size = 2 * radius + 1
    if h < size or w < size:
        raise ValueError(
            f"ssim: the maps are {h}x{w}, smaller than the {size}x{size} window "
            f"(sigma={sigma}); use a smaller sigma"
        )
    x = a2.view(n, 1, h, w)
    y = b2.view(n, 1, h, w)
    if data_range is None:
        both = torch.cat([a2, b2], dim=1)
        span = both.amax(dim=1) - both.amin(dim=1)
        span = torch.where(span > 0, span, torch.ones_like(span)).view(n, 1, 1, 1)
    else:
        if not data_range > 0:
            raise ValueError(f"ssim: data_range must be positive, got {data_range!r}")
        span = torch.tensor(float(data_range), dtype=torch.float64, device=x.device)
    taps = _gaussian_taps(sigma, radius, x.device)
    col, row = taps.view(1, 1, size, 1), taps.view(1, 1, 1, size)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(t, col), row)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1 = (k1 * span) ** 2
    c2 = (k2 * span) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return s.flatten(1).mean(dim=1)


def hog_features(
    maps: Tensor,
    *,
    orientations: int = 9,
    cell: int = 8,
    block: int = 3,
    eps: float = 1e-5,
) -> Tensor:
    r"""Histogram of oriented gradients (Dalal and Triggs 2005) of each map, batched.

    1. Gradients by central differences, ``g_y[r] = m[r+1] - m[r-1]`` (zero on the first and
       last row), ``g_x`` likewise along columns; magnitude ``|g|`` and unsigned orientation
       ``atan2(g_y, g_x)`` in ``[0, 180)`` degrees.
    2. Each pixel of the ``H // cell`` x ``W // cell`` cells (``cell`` x ``cell`` pixels; the
       remaining border rows and columns are dropped) adds its magnitude to the bin of its
       orientation, ``orientations`` bins of equal width.
    3. Each block of ``block`` x ``block`` cells (stride one cell) is L2-Hys normalized:
       ``v / sqrt(|v|^2 + eps^2)``, clipped at 0.2, normalized again.

    The descriptor is ``skimage.feature.hog(m, orientations, (cell, cell), (block, block),
    block_norm="L2-Hys")`` flattened in the same order (block row, block column, cell row,
    cell column, orientation).

    Args:
        maps: ``(N, H, W)`` maps.
        orientations: Number of orientation bins over 180 degrees.
        cell: Cell side in pixels.
        block: Block side in cells.
        eps: The normalization's regularizer.

    Returns:
        ``(N, F)`` float64 descriptors.

    Raises:
        ValueError: maps not ``(N, H, W)`` or smaller than one block of cells.
    """
    if not isinstance(maps, Tensor) or maps.ndim != 3:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"hog_features: expected (N, H, W) maps, got {shape}")
    orientations = check_positive_int("orientations", orientations)
    cell = check_positive_int("cell", cell)
    block = check_positive_int("block", block)
    m = maps.detach().double()
    n, h, w = m.shape
    rows, cols = h // cell, w // cell
    if rows < block or cols < block:
        raise ValueError(
            f"hog_features: {h}x{w} maps hold {rows}x{cols} cells of {cell} px, fewer than one "
            f"block of {block}x{block} cells; they need at least {block * cell}x{block * cell} px"
        )
    g_row = torch.zeros_like(m)
    g_col = torch.zeros_like(m)
    g_row[:, 1:-1, :] = m[:, 2:, :] - m[:, :-2, :]
    g_col[:, :, 1:-1] = m[:, :, 2:] - m[:, :, :-2]
    magnitude = torch.hypot(g_row, g_col)
    angle = torch.rad2deg(torch.atan2(g_row, g_col)) % 180.0
    bins = (angle * (orientations / 180.0)).floor().long().clamp(0, orientations - 1)
    hh, ww = rows * cell, cols * cell
    votes = torch.zeros(n, orientations, hh, ww, dtype=torch.float64, device=m.device)
    votes.scatter_(1, bins[:, None, :hh, :ww], magnitude[:, None, :hh, :ww])
    hist = votes.view(n, orientations, rows, cell, cols, cell).sum(dim=(3, 5))
    hist = hist.permute(0, 2, 3, 1)  # (N, rows, cols, orientations)
    blocks = hist.unfold(1, block, 1).unfold(2, block, 1)  # (N, br, bc, o, block, block)
    blocks = blocks.permute(0, 1, 2, 4, 5, 3).reshape(n, rows - block + 1, cols - block + 1, -1)
    out = blocks / torch.sqrt((blocks**2).sum(-1, keepdim=True) + eps**2)
    out = out.clamp(max=0.2)
    out = out / torch.sqrt((out**2).sum(-1, keepdim=True) + eps**2)
    return out.reshape(n, -1)


def hog_similarity(a: Tensor, b: Tensor, *, cell: int = 8, block: int = 3) -> Tensor:
    """Pearson correlation of the HOG descriptors (:func:`hog_features`) of ``a[i]`` and ``b[i]``.

    Args:
        a: ``(N, H, W)`` maps.
        b: ``(N, H, W)`` maps.
        cell: Cell side in pixels.
        block: Block side in cells.

    Two independent noise maps score slightly above 0 (uniform noise: 0.05 on average at
    96 x 96 px, 0.1 at 48 x 48): on a pixel grid some orientation bins are likelier than
    others in every image alike.

    Returns:
        ``(N,)`` float64 correlations; NaN where a descriptor is constant (a flat map).

    Raises:
        ValueError: maps of different shapes, with NaN, or too small for one block.
    """
    a2, b2 = _rows(a, b, "hog_similarity")
    if a.ndim != 3:
        raise ValueError(f"hog_similarity: expected (N, H, W) maps, got {tuple(a.shape)}")
    fa = hog_features(a2.view(a.shape), cell=cell, block=block)
    fb = hog_features(b2.view(a.shape), cell=cell, block=block)
    return _pearson_rows(fa, fb)


# ----------------------------------------------------------------- the sanity check's maps
# Adebayo et al.'s two maps of an attribution and every similarity between them
# (salience.metrics.sanity, step 5 and 6).


def _abs_map(values: Tensor) -> Tensor:
    """``sum_c |A_c|``: ``(N, H, W)``."""
    return values.detach().abs().sum(dim=1) if values.ndim == 4 else values.detach().abs()


def _signed_map(values: Tensor) -> Tensor:
    """``sum_c A_c``: ``(N, H, W)``."""
    return values.detach().sum(dim=1) if values.ndim == 4 else values.detach()


def _normalized(a: Tensor) -> Tensor:
    """Scale non-negative maps to ``[0, 1]``: ``(a - min) / (p99 - min)``, clipped."""
    flat = a.double().flatten(1)
    low = flat.amin(dim=1, keepdim=True)
    high = torch.quantile(flat, 0.99, dim=1, keepdim=True)
    top = flat.amax(dim=1, keepdim=True)
    high = torch.where(high > low, high, top)
    span = (high - low).clamp(min=torch.finfo(torch.float64).tiny)
    return ((flat - low) / span).clamp(0.0, 1.0).view(a.shape)


def _hog_cell(h: int, w: int) -> int:
    """Return the HOG cell side for ``h x w`` maps: 8 px (skimage's default), less if small."""
    return max(1, min(8, min(h, w) // 3))


def _measure(values: Tensor, reference: Mapping[str, Tensor], hog_cell: int) -> dict[str, Tensor]:
    """Every similarity of the maps of ``values`` to the reference maps."""
    a = _abs_map(values)
    norm = _normalized(a)
    side = min(norm.shape[-2:])
    # The 11 x 11 window of Wang et al.; maps smaller than that get the largest window inside.
    sigma = 1.5 if side >= 11 else max((side - 1) // 2, 1) / 3.5
    return {
        "spearman_abs": _pearson_rows(_ranks_of(a), reference["abs_ranks"]),
        "spearman": _pearson_rows(_ranks_of(_signed_map(values)), reference["signed_ranks"]),
        "ssim": ssim(norm, reference["norm"], data_range=1.0, sigma=sigma),
        "hog": hog_similarity(norm, reference["norm"], cell=hog_cell),
    }


def _ranks_of(maps: Tensor) -> Tensor:
    return _average_ranks(maps.detach().reshape(maps.shape[0], -1).double())


def _reference(values: Tensor) -> dict[str, Tensor]:
    a = _abs_map(values)
    return {
        "abs_ranks": _ranks_of(a),
        "signed_ranks": _ranks_of(_signed_map(values)),
        "norm": _normalized(a),
    }
