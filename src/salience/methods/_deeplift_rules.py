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

from .. import _performance
from ..rectifiers import Site, returned

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
    lo_abs: Tensor | None = None,
) -> Tensor:
    """``dy / dx``, the secant of ``f`` between ``lo`` and ``hi = lo + dx``, computed safely.

    It falls back to ``f'`` at the midpoint where ``|dx|`` is below ``_SMALL`` relative to
    the operands: the ratio of two float differences would be rounding noise there, while the
    midpoint derivative is the same secant to second order. ``hi=None`` stands for
    ``lo + dx``; ``lo_abs`` is ``|lo|`` if already computed. ``dy`` is overwritten.
    (Rectifiers at Rescale take the exact :func:`_rectifier_secant`.)
    """
    if hi is None:
        hi = lo + dx
    small = dx.abs() <= hi.abs().add_(lo.abs() if lo_abs is None else lo_abs).mul_(_SMALL)
    m = dy.div_(dx)  # inf or NaN where dx == 0: small there, replaced below
    if not _performance.worth_a_sync(small) or bool(small.any()):
        m = torch.where(small, _slope(f, (hi + lo) / 2, rectifier, upper), m)
    return m


def _rectifier_secant(y: Tensor, y0: Tensor, dx: Tensor, upper: float | None) -> Tensor:
    """``(y - y0) / dx`` for ``y = clamp(x, 0, upper)``, exact; ``f'(x)`` where ``dx == 0``.

    The ratio is exact whenever ``dx != 0`` (differences of the same floats, ``|dy| <=
    |dx|``, so ``m`` is in ``[0, 1]``); where ``dx == 0`` it is 0/0 and becomes the
    derivative, the paper's fallback, read from ``y`` (``0 < y < upper`` exactly where
    ``0 < x < upper``). Float operations only, in place where possible: on a CPU they are
    several times faster than boolean masks, and fresh allocations cost as much as a pass.
    ``dx`` is a temporary: it is overwritten.
    """
    m = torch.sub(y, y0).div_(dx)
    # a NaN sum means some 0/0: ties (dead channels...)
    if not _performance.worth_a_sync(m) or bool(torch.isnan(m.sum())):
        m.nan_to_num_(nan=-1.0)  # -1 at the ties, m >= 0 elsewhere
        # into dx, a temporary no longer needed: fresh memory costs as much as a pass
        if upper is None:
            tie = torch.ops.aten.threshold_backward.grad_input(m, y, 0.0, grad_input=dx)
        else:
            tie = torch.ops.aten.hardtanh_backward.grad_input(m, y, 0.0, upper, grad_input=dx)
        # -tie is f'(x) at the ties and <= 0 elsewhere: the maximum picks the right one
        # (torch.fmax on NaNs would save a pass, but is twice slower on a CPU)
        torch.maximum(m, tie.neg_(), out=m)
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
        scratch: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Return ``f(x)`` (written back into ``x`` when ``inplace``) and keep the multiplier.

        ``x0`` is the reference input of the call and ``y0 = f(x0)``, both from the reference
        pass. ``scratch(x)`` returns a reusable buffer shaped like ``x``.
        """
        # dx is needed only until the multiplier is computed: a rectifier's goes to scratch
        dx = torch.sub(x, x0, out=scratch(x)) if rectifier and scratch is not None else x - x0
        hi = None if inplace else x
        if inplace:
            y = x.clamp_(min=0.0, max=upper) if rectifier else x.copy_(f(x))
            ctx.mark_dirty(x)
        else:
            y = f(x)
        if rectifier:
            ctx.save_for_backward(_rectifier_secant(y, y0, dx, upper))
        else:
            ctx.save_for_backward(_secant(f, torch.sub(y, y0), dx, x0, hi, rectifier, upper))
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """Return ``grad * m``."""
        (m,) = ctx.saved_tensors
        return grad * m, None, None, None, None, None, None, None


class _RevealCancel(torch.autograd.Function):
    """``f(y)`` whose backward sends ``grad * m+`` to ``P`` and ``grad * m-`` to ``N``.

    ``P`` and ``N`` are the positive and negative parts of ``y - y0`` (paper, Sec. 3.5.3):
    ``dy+ = 1/2 (f(y0 + P) - f(y0)) + 1/2 (f(y0 + N + P) - f(y0 + N))``,
    ``dy- = 1/2 (f(y0 + N) - f(y0)) + 1/2 (f(y0 + P + N) - f(y0 + P))``, ``m+ = dy+ / P``,
    ``m- = dy- / N``, so that ``m+ P + m- N = f(y0 + P + N) - f(y0)``, which is
    ``f(y) - f(y0)`` up to rounding (``y0 + P + N`` is ``y`` computed another way). With
    ``P = 0`` exactly, ``dy+`` is exactly 0. No gradient goes to ``y`` itself: the input
    difference of the function reaches the input through ``P`` and ``N``. ``f0 = f(y0)``
    comes from the reference pass.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        y: Tensor,
        pos: Tensor,
        neg: Tensor,
        y0: Tensor,
        f0: Tensor,
        f: Callable[[Tensor], Tensor],
        rectifier: bool,
        upper: float | None,
        inplace: bool,
    ) -> Tensor:
        """Return ``f(y)`` (into ``y`` when ``inplace``) and keep ``m+`` and ``m-``."""
        out = f(y)
        at_pos, at_neg = y0 + pos, y0 + neg
        fp, fn = f(at_pos), f(at_neg)
        both = f(at_neg + pos)
        up = (fp - f0).add_(both).sub_(fn).mul_(0.5)  # exactly 0 where pos == 0
        down = (fn - f0).add_(both).sub_(fp).mul_(0.5)
        lo_abs = y0.abs()
        ctx.save_for_backward(
            _secant(f, up, pos, y0, at_pos, rectifier, upper, lo_abs),
            _secant(f, down, neg, y0, at_neg, rectifier, upper, lo_abs),
        )
        return returned(ctx, y, out, inplace)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """Return ``grad * m+`` for ``P`` and ``grad * m-`` for ``N``."""
        m_pos, m_neg = ctx.saved_tensors
        return None, grad * m_pos, grad * m_neg, None, None, None, None, None, None


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
        # t = (dy - dx[j]) / (dx[i] - dx[j]) = a / (a + b), with a = x[i] - x[j] and
        # b = x0[j] - x0[i], both >= 0 exactly in floats (maxima), so t is in [0, 1]
        a = y - flat_x.gather(-1, j.flatten(-spatial)).view_as(y)
        b = y0 - flat_x0.gather(-1, i.flatten(-spatial)).view_as(y)
        t = a.div_(a + b).nan_to_num_(nan=1.0)  # 0 / 0: the same maximum, or equal shares
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
        share = grad * t
        out.scatter_add_(-1, i.flatten(-s), share.flatten(-s))
        out.scatter_add_(-1, j.flatten(-s), (grad - share).flatten(-s))
        return out.view(ctx.shape), None, None, None, None, None
