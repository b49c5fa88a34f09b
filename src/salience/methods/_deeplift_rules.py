"""DeepLIFT's rules as autograd functions (used by :mod:`.deeplift`).

Each replaces one call of the forward pass on the input: its forward is the call itself, its
backward carries the multiplier of the rule — :class:`_Rescale` (Rescale at an elementwise
activation: the secant slope between input and reference), :class:`_RevealCancel` (positive
and negative parts of the input difference apart, Shrikumar et al. 2017, Sec. 3.5.3) and
:class:`_MaxPool` (the exactly conserving max-pooling rule).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..rectifiers import Site

# Below this relative size of x - x0 the secant of a smooth activation is computed as its
# derivative at the midpoint (a second-order accurate value of the same secant): the ratio of
# two float32 differences would be rounding noise there.
_SMALL = 1e-5


def _activation(site: Site) -> Callable[[Tensor], Tensor]:
    """Return the out-of-place function computed at ``site``."""
    if site.fn is not None:
        return site.fn
    upper = site.upper
    return lambda t: t.clamp(min=0.0, max=upper)


def _slope(
    f: Callable[[Tensor], Tensor], at: Tensor, rectifier: bool, upper: float | None
) -> Tensor:
    """``f'(at)``: closed form for a rectifier ``clamp(x, 0, upper)``, autograd otherwise."""
    if rectifier:
        inside = at > 0
        if upper is not None:
            inside &= at < upper
        return inside.to(at.dtype)
    with torch.enable_grad():
        leaf = at.detach().requires_grad_(True)
        (slope,) = torch.autograd.grad(f(leaf).sum(), leaf)
    return slope


def _secant(
    f: Callable[[Tensor], Tensor],
    dy: Tensor,
    dx: Tensor,
    lo: Tensor,
    hi: Tensor | None,
    rectifier: bool,
    upper: float | None,
    *,
    fast: bool = False,
) -> Tensor:
    """``dy / dx``, the secant of ``f`` between ``lo`` and ``hi = lo + dx``, computed safely.

    For a rectifier ``clamp(x, 0, upper)`` and ``dy = f(hi) - f(lo)``, the ratio is exact
    whenever ``dx != 0`` (the differences are of the same floats, ``|dy| <= |dx|``); where
    ``dx == 0`` it is 0/0 and becomes the derivative ``f'(hi)``, the paper's fallback. This
    ``fast`` path divides ``dy`` in place. Otherwise (a smooth activation, or RevealCancel's
    parts) the secant falls back to ``f'`` at the midpoint where ``|dx|`` is below ``_SMALL``
    relative to the operands: the ratio of two float differences would be rounding noise
    there, while the midpoint derivative is the same secant to second order. ``hi=None``
    stands for ``lo + dx``.
    """
    if fast and rectifier:
        m = dy.div_(dx)
        if bool(torch.isnan(m.sum())):  # m is in [0, 1]: a NaN sum means some 0/0
            # Ties (dead channels, unchanged areas) get f'(lo), lo = hi there. Float ops only:
            # they are several times faster than boolean masks on a CPU.
            m.nan_to_num_(nan=-1.0)
            tie = m.clamp(max=0.0)  # -1 at the ties, 0 elsewhere
            ones = torch.ones((), dtype=m.dtype, device=m.device).expand_as(m)
            if upper is None:
                slope = torch.ops.aten.threshold_backward(ones, lo, 0.0)
            else:
                slope = torch.ops.aten.hardtanh_backward(ones, lo, 0.0, upper)
            m.clamp_(min=0.0).addcmul_(tie, slope, value=-1.0)
        return m
    if hi is None:
        hi = lo + dx
    small = dx.abs() <= _SMALL * (hi.abs() + lo.abs())
    m = dy / torch.where(small, torch.ones_like(dx), dx)
    if bool(small.any()):
        m = torch.where(small, _slope(f, (hi + lo) / 2, rectifier, upper), m)
    return m


class _Rescale(torch.autograd.Function):
    """``f(x)`` whose backward multiplies by the Rescale multiplier ``(f(x)-f(x0))/(x-x0)``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        x0: Tensor,
        y0: Tensor,
        f: Callable[[Tensor], Tensor],
        rectifier: bool,
        upper: float | None,
        inplace: bool,
    ) -> Tensor:
        """Return ``f(x)`` (written back into ``x`` when ``inplace``) and keep the multiplier.

        ``x0`` is the reference input of the call and ``y0 = f(x0)``, both from the reference
        pass.
        """
        dx = x - x0
        hi = None if inplace else x
        if inplace:
            y = x.clamp_(min=0.0, max=upper) if rectifier else x.copy_(f(x))
            ctx.mark_dirty(x)
        else:
            y = f(x)
        ctx.save_for_backward(_secant(f, y - y0, dx, x0, hi, rectifier, upper, fast=True))
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """Return ``grad * m``."""
        (m,) = ctx.saved_tensors
        return grad * m, None, None, None, None, None, None


class _RevealCancel(torch.autograd.Function):
    """``f(y)`` whose backward sends ``grad * m+`` to ``P`` and ``grad * m-`` to ``N``.

    ``P`` and ``N`` are the positive and negative parts of ``y - y0`` (paper, Sec. 3.5.3):
    ``dy+ = 1/2 (f(y0 + P) - f(y0)) + 1/2 (f(y0 + N + P) - f(y0 + N))``,
    ``dy- = 1/2 (f(y0 + N) - f(y0)) + 1/2 (f(y0 + P + N) - f(y0 + P))``, ``m+ = dy+ / P``,
    ``m- = dy- / N``, so that ``m+ P + m- N = f(y0 + P + N) - f(y0)``, which is
    ``f(y) - f(y0)`` up to rounding (``y0 + P + N`` is ``y`` computed another way). With
    ``P = 0`` exactly, ``dy+`` is exactly 0. No gradient goes to ``y`` itself: the input
    difference of the function reaches the input through ``P`` and ``N``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        y: Tensor,
        pos: Tensor,
        neg: Tensor,
        y0: Tensor,
        f: Callable[[Tensor], Tensor],
        rectifier: bool,
        upper: float | None,
        inplace: bool,
    ) -> Tensor:
        """Return ``f(y)`` (into ``y`` when ``inplace``) and keep ``m+`` and ``m-``."""
        out = f(y)
        f0, fp, fn = f(y0), f(y0 + pos), f(y0 + neg)
        both = f(y0 + neg + pos)
        up = 0.5 * (fp - f0) + 0.5 * (both - fn)
        down = 0.5 * (fn - f0) + 0.5 * (both - fp)
        ctx.save_for_backward(
            _secant(f, up, pos, y0, y0 + pos, rectifier, upper),
            _secant(f, down, neg, y0, y0 + neg, rectifier, upper),
        )
        if inplace:
            y.copy_(out)
            ctx.mark_dirty(y)
            return y
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """Return ``grad * m+`` for ``P`` and ``grad * m-`` for ``N``."""
        m_pos, m_neg = ctx.saved_tensors
        return None, grad * m_pos, grad * m_neg, None, None, None, None, None


class _MaxPool(torch.autograd.Function):
    """Max-pooling with a conserving multiplier rule that is exact with overlapping windows.

    For one window, let ``i`` be the position of the maximum of ``x`` and ``j`` that of the
    reference ``x0``. Then ``dy = x[i] - x0[j]`` lies between ``dx[j]`` and ``dx[i]``:
    ``x0[i] <= x0[j]`` (``j`` maximises ``x0``) gives ``dy <= x[i] - x0[i] = dx[i]``, and
    ``x[j] <= x[i]`` (``i`` maximises ``x``) gives ``dy >= x[j] - x0[j] = dx[j]``. So
    ``dy = t dx[i] + (1 - t) dx[j]`` with ``t`` in ``[0, 1]``; the window sends multiplier
    ``t`` to ``i`` and ``1 - t`` to ``j`` (``t = 1`` when ``i = j`` or ``dx[i] = dx[j]``).
    Every window accounts for its own ``dy`` exactly, and where windows overlap their
    multipliers add up (scatter-add), so the rule conserves whatever the stride.

    ``pool(t)`` returns ``(values, indices)`` with indices into the flattened spatial axes,
    as PyTorch's ``*_with_indices`` functions do; ``spatial`` is their number.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        x0: Tensor,
        y0: Tensor,
        j: Tensor,
        pool: Callable[[Tensor], tuple[Tensor, Tensor]],
        spatial: int,
    ) -> tuple[Tensor, Tensor]:
        """Return ``pool(x)``: the pooled values and the indices of the maxima.

        ``(y0, j) = pool(x0)`` come from the reference pass.
        """
        y, i = pool(x)
        flat_x, flat_x0 = x.flatten(-spatial), x0.flatten(-spatial)
        dx_i = y - flat_x0.gather(-1, i.flatten(-spatial)).view_as(y)
        dx_j = flat_x.gather(-1, j.flatten(-spatial)).view_as(y) - y0
        spread = dx_i - dx_j  # >= 0, see the class documentation
        t = torch.where(spread > 0, (y - y0 - dx_j) / spread.clamp(min=1e-38), 1.0).clamp(0, 1)
        ctx.save_for_backward(i, j, t)
        ctx.shape = x.shape
        ctx.spatial = spatial
        ctx.mark_non_differentiable(i)
        return y, i

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _: Any) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """Scatter-add ``grad * t`` to the maxima of ``x``, ``grad * (1 - t)`` to those of x0."""
        i, j, t = ctx.saved_tensors
        s = ctx.spatial
        out = grad.new_zeros(ctx.shape).flatten(-s)
        out.scatter_add_(-1, i.flatten(-s), (grad * t).flatten(-s))
        out.scatter_add_(-1, j.flatten(-s), (grad * (1 - t)).flatten(-s))
        return out.view(ctx.shape), None, None, None, None, None
