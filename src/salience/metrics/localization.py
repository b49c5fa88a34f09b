"""Localization metrics: whether a map points at the object.

Conventions shared by every function here:

- **Maps** are ``(N, H, W)`` floating tensors (``(N, 1, H, W)`` is squeezed), or an
  :class:`~salience.Attribution`, whose :meth:`~salience.Attribution.saliency` is used.
  NaN or infinite values are an error.
- **Boxes** are ``(N, 4)`` tensors ``(x0, y0, x1, y1)`` in pixels, **half-open**: a box covers
  the columns ``x0 <= x < x1`` and the rows ``y0 <= y < y1``, like the slice
  ``map[y0:y1, x0:x1]``. Its area is ``(x1 - x0) * (y1 - y0)`` (no ``+ 1``, unlike the
  inclusive Pascal VOC convention). A box inside a ``W x H`` image has
  ``0 <= x0 <= x1 <= W`` and ``0 <= y0 <= y1 <= H``. ``x`` is the column, ``y`` the row.
- **Masks** are ``(N, H, W)`` bool tensors.
- Every result is computed on the maps' device, batched; targets are moved there.
- A map that carries no usable signal (no positive value for :func:`box_from_map` and
  :func:`pointing_energy`) scores as a failure, never as NaN, and a warning names the samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .._checks import warn
from ..attribution import Attribution

__all__ = [
    "box_from_map",
    "iou",
    "localization_error",
    "pointing_energy",
    "pointing_game",
]


# --------------------------------------------------------------------------- checks


def _samples(flags: Tensor) -> str:
    """Format the indices where ``flags`` is true, at most ten of them."""
    idx = flags.nonzero().flatten().tolist()
    shown = ", ".join(str(i) for i in idx[:10])
    return shown + (", ..." if len(idx) > 10 else "")


def _as_maps(maps: Tensor | Attribution, name: str = "map") -> Tensor:
    """Return ``maps`` as a finite floating ``(N, H, W)`` tensor, else raise."""
    if isinstance(maps, Attribution):
        maps = maps.saliency()
    if not isinstance(maps, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (N, H, W) or an Attribution, "
            f"got {type(maps).__name__}"
        )
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim != 3:
        raise ValueError(
            f"{name} must have shape (N, H, W) or (N, 1, H, W), got {tuple(maps.shape)}"
        )
    if not maps.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {maps.dtype}")
    if maps.shape[0] == 0 or maps.shape[1] == 0 or maps.shape[2] == 0:
        raise ValueError(f"{name} of shape {tuple(maps.shape)} is empty")
    bad = ~torch.isfinite(maps).flatten(1).all(dim=1)
    if bad.any():
        raise ValueError(f"{name} holds NaN or infinite values in samples {_samples(bad)}")
    return maps


def _as_boxes(boxes: Tensor, name: str, n: int | None = None) -> Tensor:
    """Return ``boxes`` if it is a finite, well-ordered ``(N, 4)`` tensor, else raise."""
    if not isinstance(boxes, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (N, 4), got {type(boxes).__name__}"
        )
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"{name} must have shape (N, 4) as (x0, y0, x1, y1), got {tuple(boxes.shape)}"
        )
    if n is not None and boxes.shape[0] != n:
        raise ValueError(f"{name} holds {boxes.shape[0]} boxes for {n} samples")
    if boxes.dtype == torch.bool or boxes.is_complex():
        raise TypeError(f"{name} must be a real tensor, got dtype {boxes.dtype}")
    if boxes.is_floating_point():
        bad = ~torch.isfinite(boxes).all(dim=1)
        if bad.any():
            raise ValueError(f"{name} holds NaN or infinite coordinates in rows {_samples(bad)}")
    flipped = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if flipped.any():
        raise ValueError(
            f"{name} rows {_samples(flipped)} have x1 < x0 or y1 < y0: boxes are "
            "(x0, y0, x1, y1) with x1 >= x0 and y1 >= y0"
        )
    return boxes


def _check_inside(boxes: Tensor, height: int, width: int, name: str) -> None:
    """Raise if a box leaves the ``width x height`` image."""
    outside = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > width) | (boxes[:, 3] > height)
    if outside.any():
        i = int(outside.nonzero()[0])
        raise ValueError(
            f"{name} rows {_samples(outside)} leave the {width}x{height} (W x H) image, e.g. "
            f"{boxes[i].tolist()}: boxes must satisfy 0 <= x0 <= x1 <= W and 0 <= y0 <= y1 <= H"
        )


def _as_mask(target: Tensor, maps: Tensor) -> Tensor:
    """Turn a box ``(N, 4)`` or mask ``(N, H, W)`` target into a non-empty bool mask."""
    n, h, w = maps.shape
    if not isinstance(target, Tensor):
        raise TypeError(
            f"target must be an (N, 4) box tensor or an (N, H, W) bool mask, "
            f"got {type(target).__name__}"
        )
    target = target.to(maps.device)
    if target.ndim == 2:
        boxes = _as_boxes(target, "target", n)
        if boxes.is_floating_point() and not torch.equal(boxes, boxes.round()):
            raise ValueError(
                "target boxes must have whole-pixel coordinates to select pixels; "
                "round them first (boxes are half-open: x0 <= x < x1, y0 <= y < y1)"
            )
        _check_inside(boxes, h, w, "target")
        boxes = boxes.long()
        cols = torch.arange(w, device=maps.device)
        rows = torch.arange(h, device=maps.device)
        in_x = (cols >= boxes[:, 0:1]) & (cols < boxes[:, 2:3])  # (N, W)
        in_y = (rows >= boxes[:, 1:2]) & (rows < boxes[:, 3:4])  # (N, H)
        mask = in_y[:, :, None] & in_x[:, None, :]
    elif target.ndim in (3, 4):
        if target.ndim == 4 and target.shape[1] == 1:
            target = target[:, 0]
        if target.dtype != torch.bool:
            raise TypeError(
                f"a target mask must be a bool tensor, got dtype {target.dtype}; "
                "pass mask.bool() (or mask > 0.5)"
            )
        if tuple(target.shape) != (n, h, w):
            raise ValueError(
                f"target mask of shape {tuple(target.shape)} does not match the maps' "
                f"shape {(n, h, w)}"
            )
        mask = target
    else:
        raise ValueError(
            f"target must be an (N, 4) box tensor or an (N, H, W) bool mask, "
            f"got shape {tuple(target.shape)}"
        )
    empty = ~mask.flatten(1).any(dim=1)
    if empty.any():
        raise ValueError(f"target region is empty (zero area) in samples {_samples(empty)}")
    return mask


# --------------------------------------------------------------------------- boxes


def _components(fg: Tensor, connectivity: int) -> Tensor:
    """Label the connected components of the bool ``(N, H, W)`` foreground ``fg``.

    Returns a long ``(N, H, W)`` tensor: background is ``-1``; each foreground pixel holds the
    row-major flat index (within its map) of the first pixel of its component.

    Union-find, vectorized: every pixel starts as its own root; each round hooks the larger
    root of every edge between foreground neighbours onto the smallest root it touches, then
    compresses paths by pointer jumping, until no edge joins two roots. Roots only ever hook
    onto smaller indices, so the final root of a component is its first pixel.
    """
    n, h, w = fg.shape
    hw = h * w
    idx = torch.arange(n * hw, device=fg.device).view(n, h, w)
    steps = [(0, 1), (1, 0)] if connectivity == 4 else [(0, 1), (1, 0), (1, 1), (1, -1)]
    us, vs = [], []
    for dy, dx in steps:
        ys, yt = slice(0, h - dy), slice(dy, h)
        xs, xt = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        keep = fg[:, ys, xs] & fg[:, yt, xt]
        us.append(idx[:, ys, xs][keep])
        vs.append(idx[:, yt, xt][keep])
    u, v = torch.cat(us), torch.cat(vs)
    parent = idx.flatten()
    while True:
        ru, rv = parent[u], parent[v]
        joined = ru != rv
        if not joined.any():
            break
        ru, rv = ru[joined], rv[joined]
        parent = parent.scatter_reduce(
            0, torch.maximum(ru, rv), torch.minimum(ru, rv), reduce="amin"
        )
        while True:  # pointer jumping until every pixel names its root
            jumped = parent[parent]
            if torch.equal(jumped, parent):
                break
            parent = jumped
    labels = parent.view(n, h, w) - torch.arange(n, device=fg.device).view(n, 1, 1) * hw
    return torch.where(fg, labels, torch.full_like(labels, -1))


def box_from_map(
    map: Tensor | Attribution,
    threshold: float = 0.15,
    connectivity: Literal[4, 8] = 8,
) -> Tensor:
    """Return the box around the largest blob of each map, as CAM localizes objects.

    Definition (Zhou et al. 2016, "Learning Deep Features for Discriminative Localization",
    Sec. 3.1; Selvaraju et al. 2017, "Grad-CAM", Sec. 4.1): keep the pixels whose value is at
    least ``threshold`` times the map's maximum (``map >= threshold * map.max()``), take the
    largest connected component of those pixels, and return its tight bounding box. CAM's
    released code thresholds at 20 % of the maximum and labels components with MATLAB's
    ``bwlabel``, whose default is 8-connectivity; Grad-CAM thresholds at 15 %.

    Args:
        map: ``(N, H, W)`` (or ``(N, 1, H, W)``) maps, or an :class:`~salience.Attribution`.
        threshold: Fraction of each map's maximum, in ``[0, 1]``. A pixel exactly at
            ``threshold * max`` is kept.
        connectivity: ``8`` (default: diagonal neighbours connect, as ``bwlabel``) or ``4``.

    Returns:
        A long ``(N, 4)`` tensor of half-open boxes ``(x0, y0, x1, y1)`` on the maps' device:
        the component covers columns ``x0 <= x < x1`` and rows ``y0 <= y < y1``. Largest
        means most pixels; between equally large components the one whose first pixel comes
        first in row-major order wins. A map whose maximum is ``<= 0`` has no positive
        region: its box is the empty box ``(0, 0, 0, 0)`` (IoU 0 with any box, so it counts as
        a localization failure) and a warning names those samples.
    """
    maps = _as_maps(map)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a number in [0, 1], got {type(threshold).__name__}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"threshold must lie in [0, 1] (a fraction of the maximum), got {threshold}"
        )
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    n, h, w = maps.shape
    peak = maps.flatten(1).amax(dim=1)
    dead = peak <= 0
    if dead.any():
        warn(
            f"maps of samples {_samples(dead)} have no positive value: there is no region to "
            "box; returning the empty box (0, 0, 0, 0) for them",
        )
    fg = (maps >= threshold * peak[:, None, None]) & ~dead[:, None, None]
    labels = _components(fg, connectivity)
    # Component sizes, by representative pixel: index n * H*W + label.
    offset = torch.arange(n, device=maps.device)[:, None, None] * (h * w)
    flat = (labels + offset)[fg]
    sizes = torch.bincount(flat, minlength=n * h * w).view(n, h * w)
    largest = sizes.argmax(dim=1)  # first max = smallest representative index
    comp = (labels == largest[:, None, None]) & fg
    rows, cols = comp.any(dim=2), comp.any(dim=1)  # (N, H), (N, W)
    y0 = rows.int().argmax(dim=1)
    y1 = h - rows.flip(1).int().argmax(dim=1)
    x0 = cols.int().argmax(dim=1)
    x1 = w - cols.flip(1).int().argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).long()
    boxes[dead] = 0
    return boxes


def iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Return the intersection over union of paired boxes, ``(N,)``.

    Definition (Everingham et al. 2010, Pascal VOC; Russakovsky et al. 2015, ILSVRC):
    ``IoU(A, B) = |A ∩ B| / |A ∪ B|`` with half-open boxes ``(x0, y0, x1, y1)`` of area
    ``(x1 - x0) * (y1 - y0)``. Row ``i`` of ``boxes_a`` is compared with row ``i`` of
    ``boxes_b``. Boxes that only touch have IoU 0; two empty boxes have IoU 0 (no NaN).

    Args:
        boxes_a: ``(N, 4)`` boxes, integer or floating.
        boxes_b: ``(N, 4)`` boxes.

    Returns:
        A floating ``(N,)`` tensor in ``[0, 1]`` on the device of ``boxes_a``.
    """
    a = _as_boxes(boxes_a, "boxes_a")
    b = _as_boxes(boxes_b, "boxes_b", a.shape[0])
    dtype = a.dtype if a.is_floating_point() else torch.get_default_dtype()
    a = a.to(dtype)
    b = b.to(device=a.device, dtype=dtype)
    a, b = a.double(), b.double()  # areas in float64: a float32 area overflows past 1e19
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(a.dtype).tiny), 0.0).to(dtype)


def localization_error(
    maps_or_boxes: Tensor | Attribution,
    predicted: Tensor,
    true_class: Tensor,
    true_boxes: Tensor | Sequence[Tensor],
    top_k: int = 1,
    iou_threshold: float = 0.5,
    threshold: float = 0.15,
) -> Tensor:
    """Return the ILSVRC localization error of each sample, ``(N,)`` of 1.0 (wrong) / 0.0.

    Definition (Russakovsky et al. 2015, ILSVRC, Sec. 4.1; used by CAM, Zhou et al. 2016,
    and Grad-CAM, Selvaraju et al. 2017): a sample is correct when the true class is among
    its ``top_k`` predicted classes **and** its predicted box overlaps some ground-truth box
    of the sample with IoU ``>= iou_threshold``. The error is ``1 - correct``; its mean is
    the top-1 (``top_k=1``) or top-5 (``top_k=5``) localization error.

    Simplification: one box per sample (the box of its map, normally the map of the true or
    top-1 class), whereas ILSVRC scores one box per predicted class.

    Args:
        maps_or_boxes: ``(N, H, W)`` / ``(N, 1, H, W)`` maps or an Attribution, boxed with
            :func:`box_from_map` at ``threshold``; or ``(N, 4)`` predicted boxes (any 2-D
            tensor is taken for boxes).
        predicted: ``(N, k)`` predicted classes, best first (e.g. ``logits.topk(5).indices``),
            with ``k >= top_k``; ``(N,)`` is taken as ``(N, 1)``.
        true_class: ``(N,)`` true classes.
        true_boxes: ``(N, 4)`` ground-truth boxes, one per sample, or a sequence of ``N``
            tensors of shape ``(M_i, 4)``, ``M_i >= 1``, every box of the true class.
            With maps, boxes must lie inside the image.
        top_k: How many predictions count (1 and 5 in ILSVRC).
        iou_threshold: The IoU a box needs, in ``(0, 1]``; ILSVRC uses 0.5.
        threshold: Passed to :func:`box_from_map` when maps are given.

    Returns:
        A floating ``(N,)`` tensor of 1.0 (error) and 0.0 (correct) on the device of the maps
        or boxes.
    """
    if isinstance(maps_or_boxes, Tensor) and maps_or_boxes.ndim == 2:
        boxes = _as_boxes(maps_or_boxes, "maps_or_boxes")
        size = None
    else:
        maps = _as_maps(maps_or_boxes, "maps_or_boxes")
        boxes = box_from_map(maps, threshold=threshold)
        size = maps.shape[1:]
    n, device = boxes.shape[0], boxes.device
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must lie in (0, 1], got {iou_threshold}")
    if not isinstance(predicted, Tensor) or not isinstance(true_class, Tensor):
        raise TypeError("predicted and true_class must be torch.Tensors of class indices")
    if predicted.is_floating_point() or true_class.is_floating_point():
        raise TypeError(
            "predicted and true_class must hold integer class indices; for scores pass "
            "scores.topk(k).indices"
        )
    if predicted.ndim == 1:
        predicted = predicted[:, None]
    if predicted.ndim != 2 or predicted.shape[0] != n:
        raise ValueError(f"predicted must have shape (N={n}, k), got {tuple(predicted.shape)}")
    if predicted.shape[1] < top_k:
        raise ValueError(
            f"top_k={top_k} needs at least {top_k} predictions per sample, predicted has "
            f"{predicted.shape[1]}"
        )
    if tuple(true_class.shape) != (n,):
        raise ValueError(f"true_class must have shape (N={n},), got {tuple(true_class.shape)}")
    hit_class = (predicted[:, :top_k].to(device) == true_class.to(device)[:, None]).any(dim=1)

    if isinstance(true_boxes, Tensor):
        gts = _as_boxes(true_boxes, "true_boxes", n).to(device)
        if size is not None:
            _check_inside(gts, size[0], size[1], "true_boxes")
        best = iou(boxes, gts)
    else:
        if len(true_boxes) != n:
            raise ValueError(f"true_boxes holds {len(true_boxes)} entries for {n} samples")
        counts = []
        for i, g in enumerate(true_boxes):
            g = _as_boxes(g, f"true_boxes[{i}]")
            if g.shape[0] == 0:
                raise ValueError(f"true_boxes[{i}] is empty: every sample needs a box")
            if size is not None:
                _check_inside(g, size[0], size[1], f"true_boxes[{i}]")
            counts.append(g.shape[0])
        gts = torch.cat([g.to(device) for g in true_boxes])
        owner = torch.repeat_interleave(torch.tensor(counts, device=device))
        overlaps = iou(boxes[owner], gts)
        best = torch.zeros(n, dtype=overlaps.dtype, device=device)
        best = best.scatter_reduce(0, owner, overlaps, reduce="amax")
    correct = hit_class & (best >= iou_threshold)
    return (~correct).to(best.dtype)


# --------------------------------------------------------------------------- pointing


def pointing_game(
    map: Tensor | Attribution,
    target: Tensor,
    tolerance: float = 15,
) -> Tensor:
    """Return whether each map's maximum points at the target, ``(N,)`` of 1.0 / 0.0.

    Definition (Zhang et al. 2016, "Top-down Neural Attention by Excitation Backprop",
    Sec. 5.1): a hit is the map's maximal pixel lying within ``tolerance`` pixels of the
    target region; the pointing accuracy is ``hits.mean()``. Distance is Euclidean between
    pixel indices ``(row, column)``: the maximum at ``(i, j)`` hits when some target pixel
    ``(r, c)`` has ``sqrt((i - r)**2 + (j - c)**2) <= tolerance`` (``tolerance=0``: it must
    be inside). The paper uses 15 pixels on the input image.

    Ties: the first maximum in row-major order (smallest row, then smallest column), as
    ``torch.argmax`` on the flattened map. A constant map has no maximum to speak of; its
    first pixel is used and a warning names those samples.

    Args:
        map: ``(N, H, W)`` / ``(N, 1, H, W)`` maps or an :class:`~salience.Attribution`.
        target: ``(N, 4)`` half-open boxes ``(x0, y0, x1, y1)`` with whole-pixel coordinates
            inside the image, or an ``(N, H, W)`` bool mask. Empty regions are an error.
        tolerance: Pixels, ``>= 0``.

    Returns:
        A floating ``(N,)`` tensor of 1.0 (hit) and 0.0 (miss), in the maps' dtype.
    """
    maps = _as_maps(map)
    mask = _as_mask(target, maps)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise TypeError(f"tolerance must be a number of pixels, got {type(tolerance).__name__}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number of pixels >= 0, got {tolerance}")
    h, w = maps.shape[1:]
    flat = maps.flatten(1)
    constant = flat.amax(dim=1) == flat.amin(dim=1)
    if constant.any() and h * w > 1:
        warn(
            f"maps of samples {_samples(constant)} are constant: every pixel is a maximum; "
            "pointing at the first pixel (0, 0)",
        )
    peak = flat.argmax(dim=1)  # first maximum
    pi = torch.div(peak, w, rounding_mode="floor")
    pj = peak % w
    rows = torch.arange(h, device=maps.device)
    cols = torch.arange(w, device=maps.device)
    d2 = (rows[None, :, None] - pi[:, None, None]) ** 2 + (
        cols[None, None, :] - pj[:, None, None]
    ) ** 2
    inf = torch.iinfo(d2.dtype).max
    nearest = torch.where(mask, d2, torch.full_like(d2, inf)).flatten(1).amin(dim=1)
    reach = min(float(tolerance), float(h + w))  # no pixel is farther: 1e200 squared overflows
    hit = nearest.to(torch.float64) <= reach**2
    return hit.to(maps.dtype)


def pointing_energy(map: Tensor | Attribution, target: Tensor) -> Tensor:
    """Return the fraction of each map's positive mass inside the target, ``(N,)``.

    Definition (Wang et al. 2020, "Score-CAM", Sec. 5.2, energy-based pointing game):
    ``sum(relu(map) * region) / sum(relu(map))``. Negative values are clipped to 0 first
    (CAM-family maps are non-negative already; for signed maps this measures the positive
    evidence). A map with no positive value scores 0.0 and a warning names those samples.

    Args:
        map: ``(N, H, W)`` / ``(N, 1, H, W)`` maps or an :class:`~salience.Attribution`.
        target: ``(N, 4)`` half-open boxes ``(x0, y0, x1, y1)`` with whole-pixel coordinates
            inside the image, or an ``(N, H, W)`` bool mask. Empty regions are an error.

    Returns:
        A floating ``(N,)`` tensor in ``[0, 1]``, in the maps' dtype.
    """
    maps = _as_maps(map)
    mask = _as_mask(target, maps)
    pos = maps.clamp(min=0).double()  # sums in float64: a float16 map's overflows
    total = pos.flatten(1).sum(dim=1)
    inside = (pos * mask).flatten(1).sum(dim=1)
    dead = total <= 0
    if dead.any():
        warn(f"maps of samples {_samples(dead)} have no positive mass; scoring them 0.0")
    energy = torch.where(dead, torch.zeros_like(total), inside / torch.where(dead, 1.0, total))
    return energy.to(maps.dtype)
