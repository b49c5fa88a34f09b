"""A benchmark with ground truth: synthetic images whose labelled object is known exactly.

Each image is ``64 x 64`` RGB in ``[0, 1]`` and holds:

- a **cluttered background**: a random base colour, smooth low-frequency colour noise, a faint
  sinusoidal grating, fine pixel noise and 2 to 5 random strokes (line segments 1 to 2.5 pixels
  wide, random colours);
- one **target object**, of side 20 to 30 pixels, whose shape is the image's **label**, one of
  :data:`CLASSES`: ``disc``, ``square``, ``triangle``, ``cross``, ``ring``, ``stripes`` (a
  square patch of stripes in two colours);
- 0 to 2 **distractors**: small objects (side 8 to 12 pixels) of *other* classes, distinct from
  the label and from each other, never touching the target.

What defines the label, unambiguously: the class of the one large object. Distractors are
other classes' shapes at less than 2/3 of the smallest target side, so the question "which
object is the label" always has one answer, and a map that highlights objects in general (or
the strokes, or the distractors) rather than the one the model used for its decision fails the
pointing game. Objects are drawn without anti-aliasing, in flat colours at a distance of at
least 0.45 (RGB, Euclidean) from the background's base colour; their masks are exact, and each
box is the tight bounding box of its mask, half-open ``(x0, y0, x1, y1)`` as in
:mod:`salience.metrics.localization`.

Determinism: sample ``i`` of seed ``s`` is drawn from NumPy's PCG64 seeded with
``SeedSequence([s, i])``, so it is the same whether generated alone, in a batch, or through
:class:`SyntheticShapes` in any order. The shipped model (:func:`salience.models.synthetic_cnn`)
was trained on seed 1 only; seed 0 (the default) and every other seed are held out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CLASSES",
    "DISTRACTOR_SIDE",
    "IMAGE_SIZE",
    "TARGET_SIDE",
    "TRAIN_SEED",
    "SyntheticSet",
    "SyntheticShapes",
    "generate",
]

CLASSES: tuple[str, ...] = ("disc", "square", "triangle", "cross", "ring", "stripes")
"""The class names, in label order."""

IMAGE_SIZE = 64
"""Side of the square images, in pixels."""

TARGET_SIDE = (20, 30)
"""Smallest and largest side of the target object's drawing box, in pixels (inclusive)."""

DISTRACTOR_SIDE = (8, 12)
"""Smallest and largest side of a distractor's drawing box, in pixels (inclusive)."""

TRAIN_SEED = 1
"""The seed the shipped model was trained on; every other seed is held out."""

_MAX_DISTRACTORS = 2
_MIN_CONTRAST = 0.45
_GAP = 2  # pixels between a distractor's box and any other object's box


@dataclass(frozen=True, eq=False)
class SyntheticSet:
    """A batch of synthetic images and their ground truth (see :mod:`salience.metrics.synthetic`).

    Attributes:
        images: ``(N, 3, H, W)`` float32 in ``[0, 1]``.
        labels: ``(N,)`` long, the target object's class (index into :data:`CLASSES`).
        boxes: ``(N, 4)`` long, the target's tight half-open box ``(x0, y0, x1, y1)``.
        masks: ``(N, H, W)`` bool, the target's pixels.
        distractor_labels: ``(N, 2)`` long, the distractors' classes, ``-1`` where absent.
        distractor_boxes: ``(N, 2, 4)`` long, the distractors' tight boxes, zeros where absent.
        seed: The seed the samples were drawn from.
        start: Index of the first sample within the seed's sequence.
    """

    images: Tensor
    labels: Tensor
    boxes: Tensor
    masks: Tensor
    distractor_labels: Tensor
    distractor_boxes: Tensor
    seed: int
    start: int = 0

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return (
            f"SyntheticSet(samples={len(self)}, seed={self.seed}, start={self.start}, "
            f"size={tuple(self.images.shape[-2:])}, classes={len(CLASSES)})"
        )


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def generate(n: int, seed: int = 0, *, start: int = 0) -> SyntheticSet:
    """Draw ``n`` synthetic images with their label, box and mask, deterministically.

    Args:
        n: Number of images, ``>= 1``.
        seed: The seed, ``>= 0``. Seed :data:`TRAIN_SEED` (1) is the shipped model's
            training data; use any other seed (default 0) to evaluate it.
        start: Index of the first sample in the seed's sequence: ``generate(n, s, start=k)``
            holds samples ``k .. k + n - 1`` of seed ``s``.

    Returns:
        A :class:`SyntheticSet` on the CPU.

    Raises:
        TypeError: ``n``, ``seed`` or ``start`` is not an int.
        ValueError: ``n < 1``, or a negative ``seed`` or ``start``.
    """
    n = _check_int("n", n, 1)
    seed = _check_int("seed", seed, 0)
    start = _check_int("start", start, 0)
    samples = [_sample(seed, start + i) for i in range(n)]
    return SyntheticSet(
        images=torch.from_numpy(np.stack([s[0] for s in samples])),
        labels=torch.tensor([s[1] for s in samples], dtype=torch.long),
        boxes=torch.tensor(np.stack([s[2] for s in samples]), dtype=torch.long),
        masks=torch.from_numpy(np.stack([s[3] for s in samples])),
        distractor_labels=torch.tensor(np.stack([s[4] for s in samples]), dtype=torch.long),
        distractor_boxes=torch.tensor(np.stack([s[5] for s in samples]), dtype=torch.long),
        seed=seed,
        start=start,
    )


class SyntheticShapes(torch.utils.data.Dataset):
    """The synthetic benchmark as a map-style dataset: item ``i`` is sample ``i`` of ``seed``.

    Items are ``(image, label, box, mask)``: ``(3, 64, 64)`` float32, a long scalar, a long
    ``(4,)`` box and a bool ``(64, 64)`` mask, equal to the rows of :func:`generate`.

    Args:
        length: Number of items, ``>= 1``.
        seed: The seed (see :func:`generate`).
    """

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length = _check_int("length", length, 1)
        self.seed = _check_int("seed", seed, 0)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} is out of range for {self.length} items")
        image, label, box, mask, _, _ = _sample(self.seed, int(index) % self.length)
        return (
            torch.from_numpy(image),
            torch.tensor(label, dtype=torch.long),
            torch.tensor(box, dtype=torch.long),
            torch.from_numpy(mask),
        )

    def __repr__(self) -> str:
        return f"SyntheticShapes(length={self.length}, seed={self.seed})"


# --------------------------------------------------------------------------- drawing

_GRID_Y, _GRID_X = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64) + 0.5  # centres


def shape_mask(kind: str, x0: int, y0: int, side: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Return the bool ``(size, size)`` mask of a shape drawn in the box at ``(x0, y0)``.

    The shape fills the ``side x side`` drawing box whose top-left pixel is ``(x0, y0)``;
    a pixel belongs to it when its centre does. In box units ``u, v`` in ``[0, 1)``: ``disc``
    ``(u-1/2)^2 + (v-1/2)^2 <= 1/4``; ``square`` and ``stripes`` the whole box; ``triangle``
    ``|u - 1/2| <= v / 2`` (apex up); ``cross`` ``|u - 1/2| <= 1/6`` or ``|v - 1/2| <= 1/6``;
    ``ring`` the disc minus the disc of radius ``0.55 / 2``.

    Raises:
        ValueError: an unknown ``kind``.
    """
    if size == IMAGE_SIZE:
        gy, gx = _GRID_Y, _GRID_X
    else:
        gy, gx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    u = (gx - x0) / side
    v = (gy - y0) / side
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    r2 = (u - 0.5) ** 2 + (v - 0.5) ** 2
    if kind == "disc":
        return inside & (r2 <= 0.25)
    if kind in ("square", "stripes"):
        return inside
    if kind == "triangle":
        return inside & (np.abs(u - 0.5) <= v / 2)
    if kind == "cross":
        return inside & ((np.abs(u - 0.5) <= 1 / 6) | (np.abs(v - 0.5) <= 1 / 6))
    if kind == "ring":
        return inside & (r2 <= 0.25) & (r2 >= 0.275**2)
    raise ValueError(f"unknown shape {kind!r}; expected one of {', '.join(CLASSES)}")


def _colour(rng: np.random.Generator, away_from: np.ndarray) -> np.ndarray:
    """Draw a random RGB colour at least ``_MIN_CONTRAST`` from ``away_from``."""
    while True:
        c = rng.uniform(0.0, 1.0, 3)
        if np.linalg.norm(c - away_from) >= _MIN_CONTRAST:
            return c


def _upsample_matrix(k: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """``(size, k)`` linear interpolation from ``k`` control points spanning the image."""
    pos = (np.arange(size) + 0.5) / size * (k - 1)
    low = np.clip(np.floor(pos).astype(int), 0, k - 2)
    frac = pos - low
    m = np.zeros((size, k))
    m[np.arange(size), low] = 1 - frac
    m[np.arange(size), low + 1] = frac
    return m


_UP = _upsample_matrix(6)


def _background(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return the ``(3, H, W)`` cluttered background and its base colour."""
    base = rng.uniform(0.2, 0.8, 3)
    smooth = np.einsum("hk,ckl,wl->chw", _UP, rng.normal(0.0, 0.12, (3, 6, 6)), _UP)
    angle, period = rng.uniform(0, np.pi), rng.uniform(4.0, 12.0)
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(2 * np.pi * (np.cos(angle) * _GRID_X + np.sin(angle) * _GRID_Y) / period + phase)
    grating = rng.uniform(0.0, 0.06) * wave * rng.choice([-1.0, 1.0], 3)[:, None, None]
    fine = rng.normal(0.0, 0.04, (3, IMAGE_SIZE, IMAGE_SIZE))
    image = base[:, None, None] + smooth + grating + fine
    for _ in range(int(rng.integers(2, 6))):
        a, b = rng.uniform(0, IMAGE_SIZE, 2), rng.uniform(0, IMAGE_SIZE, 2)
        width = rng.uniform(1.0, 2.5)
        d = b - a
        t = ((_GRID_X - a[0]) * d[0] + (_GRID_Y - a[1]) * d[1]) / max(float(d @ d), 1e-9)
        t = np.clip(t, 0, 1)
        dist2 = (_GRID_X - a[0] - t * d[0]) ** 2 + (_GRID_Y - a[1] - t * d[1]) ** 2
        stroke = dist2 <= (width / 2) ** 2
        image[:, stroke] = rng.uniform(0.0, 1.0, 3)[:, None]
    return np.clip(image, 0.0, 1.0), base


def _paint(
    image: np.ndarray,
    rng: np.random.Generator,
    kind: str,
    x0: int,
    y0: int,
    side: int,
    base: np.ndarray,
) -> np.ndarray:
    """Draw a flat-coloured shape onto ``image`` in place; return its mask."""
    mask = shape_mask(kind, x0, y0, side)
    colour = _colour(rng, base)
    image[:, mask] = colour[:, None]
    if kind == "stripes":
        second = _colour(rng, base)
        while np.linalg.norm(second - colour) < _MIN_CONTRAST:
            second = _colour(rng, base)
        width = max(2, side // 5)
        along = _GRID_Y - y0 if rng.integers(2) else _GRID_X - x0  # horizontal or vertical
        odd = (np.floor(along / width).astype(int) % 2 == 1) & mask
        image[:, odd] = second[:, None]
    return mask


def _tight_box(mask: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])


def _apart(box: Sequence[int], others: Sequence[Sequence[int]]) -> bool:
    """Whether ``box`` keeps ``_GAP`` pixels from every box in ``others``."""
    x0, y0, x1, y1 = box
    return all(
        x1 + _GAP <= o[0] or o[2] + _GAP <= x0 or y1 + _GAP <= o[1] or o[3] + _GAP <= y0
        for o in others
    )


def _sample(
    seed: int, index: int
) -> tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw sample ``index`` of ``seed``: image, label, box, mask, distractor labels, boxes."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))
    image, base = _background(rng)
    label = int(rng.integers(len(CLASSES)))
    side = int(rng.integers(TARGET_SIDE[0], TARGET_SIDE[1] + 1))
    x0, y0 = (int(v) for v in rng.integers(1, IMAGE_SIZE - side, 2))
    placed = [(x0, y0, x0 + side, y0 + side)]
    others = [c for c in range(len(CLASSES)) if c != label]
    count = int(rng.integers(0, _MAX_DISTRACTORS + 1))
    kinds = rng.choice(others, size=count, replace=False)
    d_labels = np.full(_MAX_DISTRACTORS, -1)
    d_boxes = np.zeros((_MAX_DISTRACTORS, 4), dtype=np.int64)
    slot = 0
    for kind in kinds:
        d_side = int(rng.integers(DISTRACTOR_SIDE[0], DISTRACTOR_SIDE[1] + 1))
        for _ in range(100):
            dx, dy = (int(v) for v in rng.integers(1, IMAGE_SIZE - d_side, 2))
            box = (dx, dy, dx + d_side, dy + d_side)
            if _apart(box, placed):
                placed.append(box)
                mask = _paint(image, rng, CLASSES[int(kind)], dx, dy, d_side, base)
                d_labels[slot] = int(kind)
                d_boxes[slot] = _tight_box(mask)
                slot += 1
                break
    mask = _paint(image, rng, CLASSES[label], x0, y0, side, base)
    return (
        image.astype(np.float32),
        label,
        _tight_box(mask),
        mask,
        d_labels,
        d_boxes,
    )
