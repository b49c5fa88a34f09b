"""The LRP rules at a layer call, as autograd functions (used by :mod:`.lrp`).

In the gradient form of :mod:`.lrp`, a rule is a modified backward pass of one linear layer or
convolution call: :func:`rule_backward` computes it from the layer's input and output for every
rule of :mod:`.rules`, with the layer's own backward kernel (:func:`_input_grad`) rather
than a nested autograd pass; :class:`_Scale` (ε), :class:`_EpsilonPass` (ε and the rectifier
that reads the layer output), :class:`_Deferred` (the rules that need the layer output,
applied when it is first read, so that a following BatchNorm can be folded in),
:class:`_Affine` (a BatchNorm with batch statistics), :class:`_Pass` (activations) and
:class:`_NoRule` (an operation relevance must not reach) put them in the graph.
:class:`_Direct` and :class:`_Layer` describe a layer call.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .lrp import _State

from .. import _performance
from ..rectifiers import returned
from .rules import AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, ZBox, ZPlus

STABILIZER = 1e-6
"""The ε added to the denominators of the γ rule, with their sign (``d + ε σ``, where σ = ±1
is the sign of the layer output, +1 at 0). The rules whose contributions share the sign of
their denominator (z⁺, αβ, w², flat, z^B) divide exactly, and give no relevance where the
denominator is 0 (all contributions are 0 there), so they conserve to rounding."""


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
    conv: tuple[Any, ...] | None = None
    """``(stride, padding, dilation, transposed, output_padding, groups)`` of a convolution,
    for :func:`_input_grad`; ``None`` for a linear layer or a convolution with string
    padding."""
    linear: bool = False
    read: bool = False
    """Whether its rule was put on its output for a reader (then no BatchNorm folds it)."""
    fold: Callable[[], tuple[Tensor, Tensor | None]] | None = None
    """A BatchNorm folded in: returns the folded ``(weight, bias)``, made when the rule runs
    (:meth:`weights`), not in the forward pass: the folded copies of the weights then live
    only while the backward of their layer runs. Like every layer's rule, it reads the weight
    then: a model that changes a weight through ``.data`` after using it in the same pass
    gets the rule of the changed weight (a write that bumps the version is refused by
    autograd)."""

    def weights(self) -> tuple[Tensor, Tensor | None]:
        """Return the weight and bias the rule applies to (folded with a BatchNorm if any)."""
        if self.fold is None:
            return self.weight, self.bias
        return self.fold()

    def but(self, **changes: Any) -> _Layer:
        """Return a copy with ``changes`` (``dataclasses.replace``, without its overhead)."""
        new = copy.copy(self)
        for name, value in changes.items():
            setattr(new, name, value)
        return new


# -- the rules at layers ---------------------------------------------------------------------


def _input_grad(layer: _Layer, s: Tensor, w: Tensor, x: Tensor) -> Tensor:
    """``∂⟨s, fn(x, w)⟩ / ∂x``, the layer's backward with weight ``w``, without autograd."""
    if layer.linear:
        return s.matmul(w)
    if layer.conv is not None:
        stride, padding, dilation, transposed, output_padding, groups = layer.conv
        return torch.ops.aten.convolution_backward(
            s,
            x,
            w,
            None,
            stride,
            padding,
            dilation,
            transposed,
            output_padding,
            groups,
            [True, False, False],
        )[0]
    xx = x.detach().requires_grad_(True)  # pragma: no cover - string padding
    with torch.enable_grad():
        (g,) = torch.autograd.grad(layer.fn(xx, w, None), xx, s)
    return g


def _stacking(layer: _Layer) -> tuple[int, int] | None:
    """``(weight axis, input axis)`` on which inputs of ``layer`` stack into one call, or None.

    A linear layer or a convolution of one group is one matrix product over its input
    channels: ``fn([a, b], [wa, wb]) = fn(a, wa) + fn(b, wb)`` with both stacked on the input
    axis (a transposed convolution's weight has it first).
    """
    conv = layer.conv
    if layer.linear:
        return 1, -1
    if conv is not None and conv[5] == 1:
        return (0 if conv[3] else 1), 1
    return None


class _Signed:
    """A layer input split by sign, for the rules that weigh ``x⁺`` and ``x⁻`` apart.

    ``negative`` says whether ``x`` has negative entries (otherwise ``x = x⁺`` and one call of
    the layer does). When the layer is one matrix product (a linear layer, a convolution of one
    group), ``x⁺`` and ``x⁻`` are stacked on its input axis, ``[x⁺, x⁻]``, and the weights
    likewise, so that both signs take one call of twice the depth instead of two: fewer, better
    filled matrix products (the first convolution of a network reads three channels).
    """

    def __init__(self, layer: _Layer, x: Tensor) -> None:
        self.layer, self.x = layer, x
        # off the CPU a small input is taken as signed: x⁻ = 0 adds nothing, a read would stall
        self.negative = not _performance.worth_a_sync(x) or bool(x.amin() < 0)
        self.stacked: Tensor | None = None
        self.axis, self.dim = 1, 1  # the weight's and the input's axis of the stacking
        self._weights: dict[tuple[int, int], Tensor] = {}
        if not self.negative:
            return
        stacking = _stacking(layer)
        if stacking is not None:
            self.axis, dim = stacking
            size = x.shape[dim]
            shape = list(x.shape)
            shape[dim] = 2 * size
            both = x.new_empty(shape)
            torch.clamp(x, min=0, out=both.narrow(dim, 0, size))
            torch.clamp(x, max=0, out=both.narrow(dim, size, size))
            self.stacked, self.dim = both, dim

    def by_sign(self, w: Tensor, negative: bool) -> tuple[Tensor, Tensor]:
        """Return ``(w⁺, w⁻)`` (``w⁻`` is ``w⁺`` unless ``negative``).

        Where the inputs stack, both are written into the halves of the stacked weight
        (:meth:`_stack` finds it), instead of being made apart and concatenated: one pass
        over the weights less.
        """
        if self.stacked is None:
            wp = w.clamp(min=0)
            return wp, (w.clamp(max=0) if negative else wp)
        size = w.shape[self.axis]
        shape = list(w.shape)
        shape[self.axis] = 2 * size
        both = w.new_empty(shape)
        wp = torch.clamp(w, min=0, out=both.narrow(self.axis, 0, size))
        wn = torch.clamp(w, max=0, out=both.narrow(self.axis, size, size))
        self._weights[(id(wp), id(wn))] = both
        return wp, wn

    def _stack(self, wp: Tensor, wn: Tensor) -> Tensor:
        """``[wp, wn]`` on the weight's input axis (made once per pair)."""
        key = (id(wp), id(wn))
        if key not in self._weights:
            self._weights[key] = torch.cat((wp, wn), self.axis)
        return self._weights[key]

    def forward(self, wp: Tensor, wn: Tensor, bp: Tensor | None = None) -> Tensor:
        """Return ``fn(x⁺, wp, bp) + fn(x⁻, wn)`` (``fn(x, wp, bp)`` if not ``negative``)."""
        fn, x = self.layer.fn, self.x
        if not self.negative:
            return fn(x, wp, bp)
        if self.stacked is not None:
            return fn(self.stacked, self._stack(wp, wn), bp)
        return fn(x.clamp(min=0), wp, bp) + fn(x.clamp(max=0), wn, None)

    def backward(self, signals: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
        """Return the gradient of ``Σ ⟨s, forward(wp, wn)⟩`` over ``signals`` ``(s, wp, wn)``.

        Computed with the layer's backward (:func:`_input_grad`), with the derivatives of
        ``clamp`` as autograd takes them: ``x⁺`` passes where ``x >= 0``, ``x⁻`` where
        ``x <= 0``.
        """
        layer, x = self.layer, self.x
        if not self.negative:
            return _sum(tuple(_input_grad(layer, s, wp, x) for s, wp, _ in signals))
        if self.stacked is not None:
            both = _sum(
                tuple(
                    _input_grad(layer, s, self._stack(wp, wn), self.stacked)
                    for s, wp, wn in signals
                )
            )
            cp, cn = both.chunk(2, self.dim)
            return _by_sign(x, cp, cn)
        cp = _sum(tuple(_input_grad(layer, s, wp, x) for s, wp, _ in signals))
        cn = _sum(tuple(_input_grad(layer, s, wn, x) for s, _, wn in signals))
        return _by_sign(x, cp, cn)


def _by_sign(x: Tensor, cp: Tensor, cn: Tensor) -> Tensor:
    """``cp`` where ``x > 0``, ``cn`` where ``x < 0``, ``cp + cn`` where ``x = 0``, in ``cp``.

    The derivatives of ``clamp`` as autograd takes them (``x⁺`` passes where ``x >= 0``,
    ``x⁻`` where ``x <= 0``). ``cp`` and ``cn`` are fresh tensors of the caller's.
    """
    sign = x.sign()
    up = sign.add(1.0).clamp_(max=1.0)
    down = sign.neg_().add_(1.0).clamp_(max=1.0)
    return cp.mul_(up).addcmul_(cn, down)


def rule_backward(
    layer: _Layer,
    relevance: Tensor,
    z: Tensor,
    ones: Tensor | None = None,
    bounds: tuple[Tensor, Tensor] | None = None,
    rectified: bool = False,
) -> Tensor:
    """Apply the input side of ``layer``'s rule for output relevance ``relevance`` (= ``z ⊙ c``).

    Returns ``c_in`` (``R_in / x``) for the rules that vanish at ``x = 0``, and ``R_in`` itself
    for the input-layer rules (``rule.input_layer``). ``ones`` marks the real inputs for w² and
    flat (zeros on padding); ``bounds`` are the z^B bounds, the input's shape. ``relevance`` is
    the caller's own tensor: the rules divide it in place. ``rectified`` says that it is 0
    wherever ``z <= 0`` (a rectifier reads the layer's output): γ then needs one backward call.

    Every rule is computed without autograd: one forward of the layer with the modified
    weights (per sign of the inputs, stacked into one call where the layer allows it, see
    :func:`_stacking`), and its backward (:func:`_input_grad`) with the same weights.
    """
    rule, x = layer.rule, layer.x.detach()
    w, b = layer.weights()
    if isinstance(rule, ZPlus | AlphaBeta):
        # c_in = W⁺ᵀ (α R / z⁺) - W⁻ᵀ (β R / z⁻), per sign of the inputs.
        alpha, beta = (1.0, 0.0) if isinstance(rule, ZPlus) else (rule.alpha, rule.beta)
        signed = _Signed(layer, x)
        wp, wn = signed.by_sign(w, bool(signed.negative or beta))  # wn is read only then
        zp = signed.forward(wp, wn)
        if beta:
            sn = _safe(relevance, signed.forward(wn, wp)).mul_(-beta)
        sp = _safe_(relevance, zp)  # the last reader of relevance: divided in place
        if alpha != 1.0:
            sp = sp.mul_(alpha)
        signals = [(sp, wp, wn)]
        if beta:
            signals.append((sn, wn, wp))
        return signed.backward(signals)
    if isinstance(rule, Gamma):
        # With u = x⁺w⁺ + x⁻w⁻ + b⁺ >= 0 (one forward per sign of the inputs) and z the layer
        # output: z_pos = z + γ u (weights w + γw⁺ on x⁺, w + γw⁻ on x⁻, bias b + γb⁺) where
        # z >= 0, z_neg = (1 + γ) z - γ u (w + γw⁻ on x⁺, w + γw⁺ on x⁻, b + γb⁻) where z < 0.
        # With σ = ±1 the sign of z (+1 at 0), the denominator is d = z + γ min(z, 0) + γ σ u,
        # of sign σ, stabilized to d + ε σ. With q = R / d split into q_p (z >= 0) and q_n
        # (z < 0), the backward is c⁺ = wᵀ(q_p + (1+γ) q_n) + γ w⁺ᵀ(q_p - q_n),
        # c⁻ = wᵀ((1+γ) q_p + q_n) - γ w⁺ᵀ(q_p - q_n).
        g = rule.gamma
        signed = _Signed(layer, x)
        negative = signed.negative
        wp, wn = signed.by_sign(w, negative)
        u = signed.forward(wp, wn, b.clamp(min=0) if b is not None else None)
        if rectified:
            # A rectifier reads z: R = 0 wherever z <= 0, so q_n = 0 and the backward is one
            # call, c⁺ = (w + γw⁺)ᵀ q, c⁻ = (w + γw⁻)ᵀ q, with q = R / (z⁺ + γ u + ε) (the
            # denominator of z >= 0, positive everywhere, exact where R is not 0).
            q = relevance.div_(z.clamp(min=0).add_(u, alpha=g).add_(STABILIZER))
            return signed.backward([(q, w.add(wp, alpha=g), w.add(wn, alpha=g))])
        sigma = z.sign().add_(0.5).sign_()
        d = z.clamp(max=0).mul_(g).add_(z).addcmul_(sigma, u, value=g)
        q = relevance.div_(d.add_(sigma, alpha=STABILIZER))
        qp = sigma.add_(1.0).mul_(0.5).mul_(q)
        qn = q.sub_(qp)
        gd = _input_grad(layer, qp - qn, wp, x).mul_(g)
        cp = _input_grad(layer, qn.mul(1.0 + g).add_(qp), w, x).add_(gd)
        if not negative:
            return cp
        cn = _input_grad(layer, qp.mul_(1.0 + g).add_(qn), w, x).sub_(gd)
        return _by_sign(x, cp, cn)
    if isinstance(rule, ZBox):
        # z^B = fn(x, w) - fn(l, w⁺) - fn(h, w⁻); R = x ⊙ wᵀs - l ⊙ w⁺ᵀs - h ⊙ w⁻ᵀs, s = R / z^B.
        # One call of three times the depth where the layer stacks ([x, l, h], [w, -w⁺, -w⁻]).
        assert bounds is not None
        low, high = bounds[0].detach(), bounds[1].detach()
        inputs = (x, low, high)
        weights = (w, w.clamp(min=0).neg_(), w.clamp(max=0).neg_())
        stacking = _stacking(layer)
        if stacking is not None:
            axis, dim = stacking
            both, stacked = torch.cat(inputs, dim), torch.cat(weights, axis)
            s = _safe_(relevance, layer.fn(both, stacked, None))
            grads = _input_grad(layer, s, stacked, both).chunk(3, dim)
        else:
            zb = _sum(tuple(layer.fn(t, v, None) for t, v in zip(inputs, weights, strict=True)))
            s = _safe_(relevance, zb)
            grads = tuple(_input_grad(layer, s, v, t) for t, v in zip(inputs, weights, strict=True))
        return _sum(tuple(t * g for t, g in zip(inputs, grads, strict=True)))
    if isinstance(rule, WSquare | Flat):
        # R = v ⊙ Wᵀ(R / fn(v, W)), W = w² or 1, v the real inputs (1, 0 on padding)
        v = (ones if ones is not None else torch.ones_like(x)).detach()
        w2 = w * w if isinstance(rule, WSquare) else torch.ones_like(w)
        s = _safe_(relevance, layer.fn(v, w2, None))
        return v * _input_grad(layer, s, w2, v)
    raise TypeError(f"no implementation of rule {rule!r} at a layer")  # pragma: no cover


def zbox_bounds(inputs: Tensor, rule: ZBox) -> tuple[Tensor, Tensor]:
    """Return the z^B bounds, the input's shape (each sample's min/max for None)."""
    x = inputs.detach()
    flat = x.flatten(1)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    out = []
    for name, value, default in (
        ("low", rule.low, flat.amin(1).view(shape)),
        ("high", rule.high, flat.amax(1).view(shape)),
    ):
        t = default if value is None else torch.as_tensor(value, dtype=x.dtype, device=x.device)
        try:
            out.append(torch.broadcast_to(t, x.shape).to(x.dtype))
        except RuntimeError:
            raise ValueError(
                f"z^B bound {name}= of shape {tuple(t.shape)} does not broadcast to the "
                f"input shape {tuple(x.shape)}; pass a number or e.g. a (C, 1, 1) tensor"
            ) from None
    return out[0], out[1]


def _sum(grads: tuple[Tensor, ...]) -> Tensor:
    total = grads[0]
    for g in grads[1:]:
        total = total + g
    return total


def _safe(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den != 0``, else 0 (no gradient: ``num / 0`` is discarded)."""
    return _safe_(num / den, None)


def _safe_(num: Tensor, den: Tensor | None) -> Tensor:
    """:func:`_safe` in place on ``num`` (a fresh tensor of the caller's).

    The quotients of a zero denominator (``±inf``, and ``nan`` for ``0 / 0``) become 0: float
    passes only, where a mask of ``den != 0`` and ``torch.where`` cost four times as much on the
    CPU. Finite inputs give finite quotients, so nothing else is replaced.
    """
    if den is not None:
        num = num.div_(den)
    return num.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


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
    r"""A layer under a rule with modified weights or inputs (z⁺, αβ, γ, w², flat, z^B).

    The forward returns the layer's output: ``z`` itself (marked as modified: its history
    becomes this function, and no copy is handed on), or ``compute()`` when ``z`` is ``None``;
    the backward evaluates the rule (:func:`rule_backward`) from ``x`` and a copy of the
    output. Input-layer rules hand their relevance to the state.

    With ``rectify = (upper, inplace)`` it also applies the rectifier ``clamp(z, 0, upper)``
    that reads ``z`` and its Pass rule: the output is the rectifier's, and the relevance of
    ``z`` is :math:`\mathrm{clamp}(z, 0, t) \cdot c` (:math:`z \cdot c \cdot
    \mathrm{clamp}(z, 0, t) / z`). ``z`` is then saved without a copy (the model no longer
    holds it, unless the rectifier is in place, which copies it).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        z: Tensor | None,
        layer: _Layer,
        state: _State,
        compute: Callable[[], Tensor] | None,
        rectify: tuple[float | None, bool] | None = None,
    ) -> Tensor:
        ctx.layer, ctx.state, ctx.rectify = layer, state, rectify
        if rectify is not None:
            assert z is not None
            upper, inplace = rectify
            out = z.clamp(min=0.0, max=upper)
            ctx.save_for_backward(x, z.clone() if inplace else z)
            return returned(ctx, z, out, inplace)
        if z is None:
            assert compute is not None
            out = compute()
        else:
            ctx.mark_dirty(z)
            out = z
        ctx.save_for_backward(x, out.clone())
        return out

    @staticmethod
    def backward(ctx: Any, c: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:  # type: ignore[override]
        layer: _Layer = ctx.layer
        state: _State = ctx.state
        none = (None,) * 5
        if layer.folded:
            return (None, *none)  # pragma: no cover - a folded output is unread
        x, z = ctx.saved_tensors
        layer = layer.but(x=x)
        rectified = ctx.rectify is not None
        relevance = z.clamp(min=0.0, max=ctx.rectify[0]).mul_(c) if rectified else z * c
        rule = layer.rule
        if not rule.input_layer:
            return (rule_backward(layer, relevance, z, rectified=rectified), *none)
        ones = bounds = None
        if isinstance(rule, WSquare | Flat) and layer.direct is not None:
            ones = layer.direct.apply(torch.ones_like(state.model_input))
        if isinstance(rule, ZBox):
            low, high = zbox_bounds(state.inputs, rule)
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
            return (None, *none)
        return (_safe(r_in, x), *none)


class _EpsilonPass(torch.autograd.Function):
    r"""The ε rule on a layer output ``z`` and the Pass rule of the rectifier that reads it.

    Forward :math:`\mathrm{clamp}(z, 0, t)`; backward
    :math:`c \cdot \mathrm{clamp}(z, 0, t) / (\max(z, 0) + ε)`, the product of the ε ratio
    :math:`|z| / (|z| + ε)` and the Pass ratio :math:`\mathrm{clamp}(z, 0, t) / z` (0 for
    :math:`z \le 0`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, z: Tensor, epsilon: float, upper: float | None, inplace: bool
    ) -> Tensor:
        out = z.clamp(min=0.0, max=upper)
        den = (out if upper is None else z.clamp(min=0.0)) + epsilon
        # ε > 0 here: a layer under ε = 0 (LRP-0, its gradient) carries no rule to fuse
        ratio = torch.div(out, den, out=den)
        ctx.save_for_backward(ratio)
        return returned(ctx, z, out, inplace)

    @staticmethod
    def backward(ctx: Any, c: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (ratio,) = ctx.saved_tensors
        return c * ratio, None, None, None


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
            if not _performance.worth_a_sync(zero) or bool(zero.any()):
                with torch.enable_grad():
                    t = torch.zeros_like(x).requires_grad_(True)
                    (slope,) = torch.autograd.grad(fn(t).sum(), t)
                ratio = torch.where(zero, slope, ratio)
        ctx.save_for_backward(ratio)
        return returned(ctx, x, out, inplace)

    @staticmethod
    def backward(ctx: Any, c: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (ratio,) = ctx.saved_tensors
        return c * ratio, None, None, None


class _NoRule(torch.autograd.Function):
    """Identity; raises in the backward if relevance reaches it (an operation without a rule).

    ``inplace``: ``t`` was changed in place by the operation, and is marked itself (the
    caller may go on with ``t`` and drop what is returned).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, t: Tensor, message: str, inplace: bool = False
    ) -> Tensor:
        ctx.message = message
        if inplace:
            ctx.mark_dirty(t)
            return t
        return t.clone()

    @staticmethod
    def backward(ctx: Any, c: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        if bool((c != 0).any()):
            raise ValueError(ctx.message)
        return c, None, None
