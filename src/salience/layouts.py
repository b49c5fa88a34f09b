"""How a layer output is read as a spatial map, and the evidence for reading it one way.

Layer methods (the CAM family) read the output of an inner layer as a map ``(N, K, h, w)``.
This module holds the vocabulary for how (:class:`Layout`), the evidence that decides it (what
a module computes, :func:`axis_of`; which grids fit the input, :func:`fits` and
:func:`patch_grid`), and the check of a user's ``reshape=`` (:func:`check_reshape`). How the
evidence is gathered over a forward pass and weighed, and which layer is taken by default, is
:mod:`salience.layers`.

**Layouts.** A layer output is read as a map ``(N, K, h, w)`` in one of three layouts
(:class:`Layout`), each a pure re-indexing (so that the same conversion applies to the
gradient, as for ``reshape=``):

- ``"NCHW"``: a convolutional feature map ``(N, C, h, w)``, read as it is;
- ``"NHWC"``: a channels-last map ``(N, h, w, C)`` (Swin, ConvNeXt blocks), permuted;
- ``"tokens"``: a token sequence ``(N, s + h*w, C)`` (ViT, DeiT, register tokens): the ``s``
  leading special tokens (class, distillation, register tokens; at most
  :data:`MAX_SPECIAL_TOKENS`) are dropped and the patch tokens folded into the ``h x w`` grid,
  row by row. Special tokens are assumed to come **first**, as in ViT, DeiT and timm's
  register-token models; a model that appends them at the end needs ``reshape=``.

A fourth kind, ``"custom"``, stands for a ``reshape=`` function of the user, checked by
:func:`check_reshape` to be a re-indexing as well.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch
from torch import Tensor, nn

__all__ = [
    "MAX_SPECIAL_TOKENS",
    "Axis",
    "Layout",
    "Reshape",
    "axis_of",
    "check_reshape",
    "fits",
    "patch_grid",
]

Reshape: TypeAlias = "Callable[[Tensor], Tensor]"
"""``reshape=``: turns a layer output into ``(N, K, h, w)`` by re-indexing it alone."""

MAX_SPECIAL_TOKENS = 32
"""The most leading special tokens (class, distillation, register tokens) a sequence may have:
a ViT with 16 register tokens has 17."""


@dataclass(frozen=True)
class Layout:
    """How a layer output is read as a spatial map ``(N, K, h, w)``.

    Attributes:
        kind: ``"NCHW"`` (as it is), ``"NHWC"`` (channels last, permuted), ``"tokens"``
            (``(N, special + h*w, C)``: special tokens dropped, patch tokens folded row by row
            into ``grid``) or ``"custom"`` (a ``reshape=`` function of the user).
        grid: ``(h, w)``.
        special: Leading special tokens dropped (tokens only).
    """

    kind: Literal["NCHW", "NHWC", "tokens", "custom"]
    grid: tuple[int, int] | None = None
    special: int = 0

    def to_map(self, t: Tensor) -> Tensor:
        """Return ``t`` as ``(N, K, h, w)``: a view that only selects and rearranges elements."""
        if self.kind == "NCHW":
            return t
        if self.kind == "NHWC":
            return t.permute(0, 3, 1, 2)
        if self.kind == "tokens" and self.grid is not None:
            return t[:, self.special :].unflatten(1, self.grid).permute(0, 3, 1, 2)
        raise ValueError(f"a {self.kind} layout has no conversion of its own")

    def reshape_source(self) -> str:
        """Return the conversion as the ``reshape=`` argument that does it, as source text."""
        if self.kind == "NHWC":
            return "lambda t: t.permute(0, 3, 1, 2)"
        if self.kind == "tokens" and self.grid is not None:
            h, w = self.grid
            drop = f"[:, {self.special}:]" if self.special else ""
            return f"lambda t: t{drop}.unflatten(1, ({h}, {w})).permute(0, 3, 1, 2)"
        return "lambda t: t"

    def __str__(self) -> str:
        if self.kind == "tokens" and self.grid is not None:
            grid = f"{self.grid[0]}x{self.grid[1]}"
            return f"tokens {self.special}+{grid}" if self.special else f"tokens {grid}"
        return self.kind


def fits(a: int, b: int, size: tuple[int, int]) -> bool:
    """Whether ``(a, b)`` is a grid of the ``size`` input: ``(H / s, W / s)`` within one cell.

    Strictly within: ``(3, 1)`` is no grid of a square input (it would take ``s = H / 2``,
    one cell off on both axes), and is the shape of an attention pool's ``(heads, queries)``.
    """
    height, width = size
    if a < 1 or b < 1 or a * b < 2 or a > height or b > width:
        return False
    low = max(height / (a + 1), width / (b + 1))
    high = min(height / (a - 1) if a > 1 else math.inf, width / (b - 1) if b > 1 else math.inf)
    return low < high


def patch_grid(count: int, size: tuple[int, int], *, exact: bool = False) -> tuple[int, int] | None:
    """Return a grid ``(h, w)`` of ``count`` square patches of one integer size ``p``.

    ``exact``: ``p`` divides both sides (``h = H / p``, ``w = W / p``, as a ViT needs); else
    both sides rounded the same way, down (a patch convolution without padding) or up (an input
    padded to whole patches). A grid that rounds one side down and the other up fits no patch
    size: 20 tokens are no ``4 x 5`` grid of a 64² input.
    """
    height, width = size
    if count < 2:
        return None
    guess = math.sqrt(height * width / count)
    for p in range(max(1, math.floor(guess) - 1), math.ceil(guess) + 2):
        if exact:
            grids = [(height // p, width // p)] if height % p == 0 == width % p else []
        else:
            grids = [(height // p, width // p), (-(-height // p), -(-width // p))]
        for h, w in grids:
            if h * w == count and h >= 1 and w >= 1:
                return h, w
    return None


# -- what a module computes --------------------------------------------------------------------

Axis: TypeAlias = "Literal['first', 'last'] | None"
"""Which end of a tensor holds the channels: ``"first"`` (``(N, C, ...)``), ``"last"``
(``(N, ..., C)``) or ``None`` (unknown)."""

_CHANNELS_FIRST: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.LPPool1d,
    nn.LPPool2d,
    nn.FractionalMaxPool2d,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.ConstantPad2d,
    nn.ZeroPad2d,
    nn.ReflectionPad2d,
    nn.ReplicationPad2d,
    nn.ChannelShuffle,
)
_STOCK_NORMS = tuple(
    cls.forward for cls in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if cls is not None
)


def is_channels_first(module: nn.Module) -> bool:
    """Tell whether ``module`` produces channels-first maps by what it is (a convolution, ...)."""
    return _axis_of_type(type(module)) == "first"  # type: ignore[arg-type]  # classes hash


@functools.cache
def _axis_of_type(cls: type) -> Axis:
    # Once per class: the layer search asks for every module call of every forward pass, and
    # an isinstance against the whole tuple costs more than the rest of its bookkeeping.
    if issubclass(cls, _CHANNELS_FIRST):
        return "first"
    if issubclass(cls, nn.Linear):
        return "last"
    return None


def axis_of(module: nn.Module, output: Tensor) -> Axis:
    """Which end of ``output`` holds the channels, from what ``module`` is (``None``: unknown)."""
    axis = _axis_of_type(type(module))  # type: ignore[arg-type]  # classes hash
    if axis is not None:
        return axis
    # an instance attribute in every norm we know; a class attribute or property otherwise
    shape = module.__dict__.get("normalized_shape")
    if shape is None and hasattr(type(module), "normalized_shape"):
        shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, tuple | list | torch.Size) and len(shape) == 1 and output.ndim >= 3:
        c = int(shape[0])
        last, first = output.shape[-1] == c, output.shape[1] == c
        if last and not first:
            return "last"
        if first and not last:
            return "first"  # a LayerNorm2d that permutes around nn.LayerNorm
        if last and type(module).forward in _STOCK_NORMS:
            return "last"
    return None


# -- reshape= ----------------------------------------------------------------------------------


def check_reshape(reshape: Reshape, raw: Tensor, layer: str) -> None:
    """Check that ``reshape`` only selects and rearranges elements of the layer output.

    CAM gradients are taken with respect to the layer output and rearranged by the same
    ``reshape``; that is the gradient with respect to the reshaped map only when ``reshape``
    is a re-indexing (slicing, ``reshape``, ``permute``), not arithmetic. The check applies
    ``reshape`` to a tensor of element indices.

    Raises:
        ValueError: the result is not ``(N, K, h, w)`` or is not a re-indexing.
    """
    probe = torch.arange(raw.numel(), dtype=torch.float64, device=raw.device).view(raw.shape)
    out = reshape(probe)
    if not isinstance(out, Tensor) or out.ndim != 4 or out.shape[0] != raw.shape[0]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"reshape turned the output {tuple(raw.shape)} of layer {layer!r} into {shape}; "
            f"it must return a spatial feature map (N, K, h, w) with N = {raw.shape[0]}"
        )
    flat = out.flatten()
    shifted = reshape(probe * 3 + 7)  # a re-indexing commutes with elementwise maps
    index_map = (
        bool((flat == flat.round()).all())
        and bool(((flat >= 0) & (flat < raw.numel())).all())
        and torch.unique(flat).numel() == flat.numel()
        and isinstance(shifted, Tensor)
        and shifted.shape == out.shape
        and torch.equal(shifted, out * 3 + 7)
    )
    if not index_map:
        raise ValueError(
            "reshape must only select and rearrange elements of the layer output (slicing, "
            "reshape, permute), because the same function is applied to its gradient; it "
            "computes new values or repeats elements"
        )
