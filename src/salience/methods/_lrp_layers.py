"""The LRP rules at a layer call, as autograd functions (used by :mod:`.lrp`).

In the gradient form of :mod:`.lrp`, a rule is a modified backward pass of one linear layer or
convolution call: :func:`rule_backward` computes it from the layer's input and output for every
rule of :mod:`.rules`; :class:`_Scale` (ε), :class:`_Deferred` (the rules that need the layer
output, applied when it is first read, so that a following BatchNorm can be folded in),
:class:`_Affine` (a BatchNorm on its own), :class:`_Pass` (activations) and :class:`_NoRule`
(an operation relevance must not reach) put them in the graph. :class:`_Direct` and
:class:`_Layer` describe a layer call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .lrp import _State

from .rules import AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, ZBox, ZPlus

STABILIZER = 1e-6
"""The ε added (sign-aware) to the denominators of the γ rule. The rules whose contributions
share the sign of their denominator (z⁺, αβ, w², flat, z^B) divide exactly, and give no
relevance where the denominator is 0 (all contributions are 0 there), so they conserve to
rounding."""


def _stab(d: Tensor, eps: float = STABILIZER) -> Tensor:
    """``d + eps * sign(d)``, with ``sign(0) = +1``."""
    return torch.where(d >= 0, d + eps, d - eps)


# -- what a layer call is --------------------------------------------------------------------


@dataclass
class _Direct:
    """How a layer input derives from the model input: zero paddings and reshapes, in order.

    Steps are ``("pad", pad)`` (``F.pad`` with zeros) and ``("reshape", shape_before,
    shape_after)`` (``flatten``, ``view``, ``reshape``).
    """

    steps: tuple[tuple[Any, ...], ...] = ()

    def then(self, *step: Any) -> _Direct:
        return _Direct((*self.steps, step))

    def apply(self, t: Tensor) -> Tensor:
        """Transform ``t`` (the model input's shape) as the model did, padding with zeros."""
        for step in self.steps:
            t = F.pad(t, step[1]) if step[0] == "pad" else t.reshape(step[2])
        return t

    def crop(self, t: Tensor) -> Tensor:
        """Undo :meth:`apply`: the entries of ``t`` that come from the model input."""
        for step in reversed(self.steps):
            if step[0] == "reshape":
                t = t.reshape(step[1])
                continue
            pad = step[1]
            index: list[slice] = [slice(None)] * t.ndim
            for k in range(len(pad) // 2):
                dim = t.ndim - 1 - k
                before, after = pad[2 * k], pad[2 * k + 1]
                index[dim] = slice(before, t.shape[dim] - after)
            t = t[tuple(index)]
        return t


@dataclass
class _Layer:
    """One call of a linear layer or convolution: ``fn(x, weight, bias)`` and its rule."""

    fn: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    x: Tensor
    weight: Tensor
    bias: Tensor | None
    rule: Rule
    name: str
    transposed: bool
    direct: _Direct | None
    folded: bool = False


# -- the rules at layers ---------------------------------------------------------------------


def _positive_negative(
    layer: _Layer,
    xx: Tensor,
    wp: Tensor,
    wn: Tensor,
    bp: Tensor | None,
    bn: Tensor | None,
    negative_inputs: bool,
    need_negative: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``fn(x⁺, wp, bp) + fn(x⁻, wn)`` and (if needed) ``fn(x⁺, wn, bn) + fn(x⁻, wp)``."""
    fn = layer.fn
    xp = xx.clamp(min=0) if negative_inputs else xx
    zp = fn(xp, wp, bp)
    zn = fn(xp, wn, bn) if need_negative else None
    if negative_inputs:
        xn = xx.clamp(max=0)
        zp = zp + fn(xn, wn, None)
        if zn is not None:
            zn = zn + fn(xn, wp, None)
    return zp, zn


def rule_backward(
    layer: _Layer,
    relevance: Tensor,
    z: Tensor,
    ones: Tensor | None = None,
    bounds: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Apply the input side of ``layer``'s rule for output relevance ``relevance`` (= ``z ⊙ c``).

    Returns ``c_in`` (``R_in / x``) for the rules that vanish at ``x = 0``, and ``R_in`` itself
    for the input-layer rules (``rule.input_layer``). ``ones`` marks the real inputs for w² and
    flat (zeros on padding); ``bounds`` are the z^B bounds, the input's shape.
    """
    rule, w, b, x = layer.rule, layer.weight, layer.bias, layer.x.detach()
    xx = layer.x.detach().requires_grad_(True)
    with torch.enable_grad():
        if isinstance(rule, ZPlus | AlphaBeta):
            alpha, beta = (1.0, 0.0) if isinstance(rule, ZPlus) else (rule.alpha, rule.beta)
            negative = bool((x < 0).any())
            wp, wn = w.clamp(min=0), w.clamp(max=0)
            zp, zn = _positive_negative(layer, xx, wp, wn, None, None, negative, bool(beta))
            outs, grads = [zp], [alpha * _safe(relevance, zp.detach())]
            if zn is not None:
                outs.append(zn)
                grads.append(-beta * _safe(relevance, zn.detach()))
            return _sum(torch.autograd.grad(outs, xx, grads))
        if isinstance(rule, Gamma):
            g = rule.gamma
            negative = bool((x < 0).any())
            wp, wn = w + g * w.clamp(min=0), w + g * w.clamp(max=0)
            bp = b + g * b.clamp(min=0) if b is not None else None
            bn = b + g * b.clamp(max=0) if b is not None else None
            zpos, zneg = _positive_negative(layer, xx, wp, wn, bp, bn, negative)
            assert zneg is not None
            positive = z >= 0
            zero = torch.zeros_like(relevance)
            sp = torch.where(positive, relevance / _stab(zpos.detach()), zero)
            sn = torch.where(positive, zero, relevance / _stab(zneg.detach()))
            return _sum(torch.autograd.grad([zpos, zneg], xx, [sp, sn]))
        if isinstance(rule, WSquare | Flat):
            v = (ones if ones is not None else torch.ones_like(x)).detach().requires_grad_(True)
            w2 = w * w if isinstance(rule, WSquare) else torch.ones_like(w)
            zw = layer.fn(v, w2, None)
            (g_,) = torch.autograd.grad(zw, v, _safe(relevance, zw.detach()))
            return v.detach() * g_
        if isinstance(rule, ZBox):
            assert bounds is not None
            low = bounds[0].detach().requires_grad_(True)
            high = bounds[1].detach().requires_grad_(True)
            zb = (
                layer.fn(xx, w, None)
                - layer.fn(low, w.clamp(min=0), None)
                - layer.fn(high, w.clamp(max=0), None)
            )
            gx, gl, gh = torch.autograd.grad(zb, (xx, low, high), _safe(relevance, zb.detach()))
            return x * gx + low.detach() * gl + high.detach() * gh
    raise TypeError(f"no implementation of rule {rule!r} at a layer")  # pragma: no cover


def _sum(grads: tuple[Tensor, ...]) -> Tensor:
    total = grads[0]
    for g in grads[1:]:
        total = total + g
    return total


def _safe(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den != 0``, else 0."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, 1.0), 0.0)


class _Scale(torch.autograd.Function):
    """The ε rule on a layer output ``z``: identity forward, ``c · z / (z + ε sign z)`` back.

    The layer's own backward then applies :math:`W^T`. The ratio is
    :math:`|z| / (|z| + ε)`, computed in the forward; ``z`` is returned itself (marked as
    modified, so no copy is made and the model may still change it in place). When the layer
    was folded with the BatchNorm after it, the rule applies at the BatchNorm output instead
    and this passes the signal through.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, layer: _Layer) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        assert isinstance(layer.rule, Epsilon)
        magnitude = z.abs()
        ratio = magnitude.div_(magnitude + layer.rule.epsilon)
        ctx.save_for_backward(ratio)
        ctx.mark_dirty(z)
        return z

    @staticmethod
    def backward(ctx: Any, c: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        if ctx.layer.folded:
            return c, None
        (ratio,) = ctx.saved_tensors
        return c * ratio, None


class _Deferred(torch.autograd.Function):
    """A layer under a rule with modified weights or inputs (z⁺, αβ, γ, w², flat, z^B).

    The forward returns the layer's output: ``z`` itself (marked as modified: its history
    becomes this function, and no copy is handed on), or ``compute()`` when ``z`` is ``None``;
    the backward evaluates the rule (:func:`rule_backward`) from ``x`` and a copy of the
    output. Input-layer rules hand their relevance to the state.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        z: Tensor | None,
        layer: _Layer,
        state: _State,
        compute: Callable[[], Tensor] | None,
    ) -> Tensor:
        ctx.layer, ctx.state = layer, state
        if z is None:
            assert compute is not None
            out = compute()
        else:
            ctx.mark_dirty(z)
            out = z
        ctx.save_for_backward(x, out.clone())
        return out

    @staticmethod
    def backward(ctx: Any, c: Tensor) -> tuple[Tensor | None, None, None, None, None]:  # type: ignore[override]
        layer: _Layer = ctx.layer
        state: _State = ctx.state
        if layer.folded:
            return None, None, None, None, None  # pragma: no cover - a folded output is unread
        x, z = ctx.saved_tensors
        layer = dataclasses.replace(layer, x=x)
        relevance = z * c
        rule = layer.rule
        if not rule.input_layer:
            return rule_backward(layer, relevance, z), None, None, None, None
        ones = bounds = None
        if isinstance(rule, WSquare | Flat) and layer.direct is not None:
            ones = layer.direct.apply(torch.ones_like(state.model_input))
        if isinstance(rule, ZBox):
            low, high = state.bounds(rule)
            if layer.direct is not None:
                low, high = layer.direct.apply(low), layer.direct.apply(high)
            elif low.shape != x.shape:
                raise ValueError(
                    f"the z^B rule at {layer.name!r} reads a tensor of shape {tuple(x.shape)}, "
                    "not the model input; its bounds cannot be placed there. Use z^B on the "
                    "input layer only"
                )
            bounds = (low, high)
        r_in = rule_backward(layer, relevance, z, ones=ones, bounds=bounds)
        if layer.direct is not None:
            state.collect(layer.direct.crop(r_in))
            return None, None, None, None, None
        return _safe(r_in, x), None, None, None, None


class _Affine(torch.autograd.Function):
    """A normalization taken as affine: forward ``compute()``, backward ``c · a``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, a: Tensor, compute: Callable[[], Tensor]
    ) -> Tensor:
        ctx.save_for_backward(a)
        return compute()

    @staticmethod
    def backward(ctx: Any, c: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (a,) = ctx.saved_tensors
        return c * a, None, None


class _Pass(torch.autograd.Function):
    """The Pass rule at an elementwise activation ``f``: backward ``c · f(x) / x``.

    ``fn`` is ``None`` for a rectifier ``clamp(x, 0, upper)``. At ``x = 0`` the ratio is
    ``f'(0)`` (0 for rectifiers).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        fn: Callable[[Tensor], Tensor] | None,
        upper: float | None,
        inplace: bool,
    ) -> Tensor:
        if fn is None:
            out = x.clamp(min=0.0, max=upper)
            # out / x is 1, upper / x above the clip, 0 below, and 0 / 0 = NaN -> 0 at x = 0.
            ratio = (out / x).nan_to_num_(nan=0.0)
        else:
            out = fn(x)
            zero = x == 0
            ratio = torch.where(zero, 0.0, out / torch.where(zero, 1.0, x))
            if bool(zero.any()):
                with torch.enable_grad():
                    t = torch.zeros_like(x).requires_grad_(True)
                    (slope,) = torch.autograd.grad(fn(t).sum(), t)
                ratio = torch.where(zero, slope, ratio)
        ctx.save_for_backward(ratio)
        if inplace:
            x.copy_(out)
            ctx.mark_dirty(x)
            return x
        return out

    @staticmethod
    def backward(ctx: Any, c: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (ratio,) = ctx.saved_tensors
        return c * ratio, None, None, None


class _NoRule(torch.autograd.Function):
    """Identity; raises in the backward if relevance reaches it (an operation without a rule)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, message: str) -> Tensor:  # type: ignore[override]
        ctx.message = message
        return t.clone()

    @staticmethod
    def backward(ctx: Any, c: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        if bool((c != 0).any()):
            raise ValueError(ctx.message)
        return c, None
