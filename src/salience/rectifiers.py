"""The modified backward rules at rectifiers, and every call they recognise as a rectifier.

DeconvNet (Zeiler & Fergus 2013) and guided backpropagation (Springenberg et al. 2014) change
the backward pass at rectifiers only. This module defines those rules as autograd functions
(:class:`Rectify`, and :class:`Activate` for other activations) and the table of calls they
replace (:data:`SITES`): how to read each call's arguments and decide whether it is a
rectifier. It installs nothing; :func:`salience.hooks.rectifier_rule` applies the rules, for
one block and one thread (and :func:`salience.hooks.ruled_forward`, what the methods call, puts
the same rules on PyTorch's own backward nodes of ``relu`` and ``hardtanh(0, t)`` where the
graph of the pass shows every rectifier as one of those).

A rectifier is every call computing ``max(x, 0)`` or a clip to ``[0, t]``, however it is
written: ``nn.ReLU`` (also ``inplace=True`` and one module reused several times in a forward),
``F.relu``, ``torch.relu``, ``Tensor.relu_``; the clipped rectifiers of mobile networks,
``nn.ReLU6``, ``F.relu6`` and ``F.hardtanh`` with a lower bound of 0; ``clamp``/``clip`` with
``min=0`` and no or a positive ``max`` (``t.clamp(min=0)``, ``torch.clamp(t, 0, 6)``, in place
too), ``clamp_min(0)``, ``F.threshold(t, 0, 0)`` and ``nn.Threshold(0, 0)``,
``torch.maximum``/``max``/``fmax`` of a tensor and zeros, and ``leaky_relu`` with slope 0. The
same functions with other bounds are not rectifiers and keep their gradient.

``activations=`` extends the rule to activations other than rectifiers (:data:`ACTIVATIONS`;
not the papers' method): at an activation ``f`` the guided backward becomes
``f'(x) * relu(s)`` and the DeconvNet one ``relu(s)``, for an incoming gradient ``s``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "RECTIFIER_SPELLINGS",
    "SITES",
    "Activate",
    "Activations",
    "RectifierRule",
    "Rectify",
    "Site",
    "resolve_activations",
    "returned",
]

RectifierRule = Literal["gradient", "deconvnet", "guided"]
"""The backward rule at rectifiers: the plain gradient, DeconvNet's or guided backprop's."""


def returned(ctx: Any, x: Tensor, out: Tensor, inplace: bool) -> Tensor:
    """Return what an autograd function that computed ``out`` from ``x`` hands to the model.

    ``out`` itself, or, when the model asked for its activation in place, ``out`` written
    into ``x`` (marked modified, so that autograd takes ``x``'s history to be this function).
    """
    if not inplace:
        return out
    x.copy_(out)
    ctx.mark_dirty(x)
    return x


Activations: TypeAlias = "str | Iterable[str]"
"""Where a rule applies: ``"rectifiers"`` (the papers' method), ``"all"`` (every activation
function salience knows, see :data:`ACTIVATIONS`) or a collection of activation names."""


# -- the rules -------------------------------------------------------------------------------


class Rectify(torch.autograd.Function):
    """``clamp(x, 0, upper)`` whose backward follows a modified rule.

    With ``s`` the incoming gradient and ``x`` the forward input:

    - ``"deconvnet"`` (Zeiler & Fergus 2013): ``relu(s)``, whatever the sign of the input;
    - ``"guided"`` (Springenberg et al. 2014): ``relu(s) * [0 < x < upper]``, the forward
      derivative times the positive part of the signal.

    The guided rule keeps what PyTorch's own backward of the call keeps, so that it works on
    every model the plain gradient works on: the output for ``relu`` (``keep_output``), which
    lets the model change the input in place afterwards; the input for ``hardtanh``,
    ``clamp``, ``threshold``, ``maximum``, ``leaky_relu``, which lets it change the output;
    and for those in place, a copy of the input. The forward mask is the same from either:
    ``0 < y < upper`` exactly where ``0 < x < upper``, for ``y = clamp(x, 0, upper)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, upper: float | None, inplace: bool, keep_output: bool, rule: str
    ) -> Tensor:
        """Return ``clamp(x, 0, upper)`` (in place into ``x`` with ``inplace``)."""
        ctx.rule = rule
        ctx.upper = upper
        ctx.copy = None
        guided = rule == "guided"
        if inplace:
            if guided and not keep_output:
                ctx.copy = x.detach().clone()
            out = x.clamp_(min=0.0, max=upper)
            ctx.mark_dirty(x)
        else:
            out = x.clamp(min=0.0, max=upper)
        if guided and ctx.copy is None:
            ctx.save_for_backward(out if keep_output or inplace else x)
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, None, None, None, None]:
        """Return the gradient of ``x`` under the rule: ``relu(s)``, masked when guided."""
        signal = grad.clamp(min=0.0)
        if ctx.rule == "guided":
            # The forward derivative, with PyTorch's own fused kernels: pass where 0 < x < upper.
            kept = ctx.copy if ctx.copy is not None else ctx.saved_tensors[0]
            if ctx.upper is None:
                signal = torch.ops.aten.threshold_backward(signal, kept, 0.0)
            else:
                signal = torch.ops.aten.hardtanh_backward(signal, kept, 0.0, ctx.upper)
        return signal, None, None, None, None


class Activate(torch.autograd.Function):
    """``f(x)`` for an activation other than a rectifier, with a rectifier rule's backward.

    The extension of guided backprop to smooth activations (not in the paper): the backward
    is ``f'(x) * relu(s)`` under ``"guided"``, ``relu(s)`` under ``"deconvnet"``. ``f'(x)``
    is recomputed with autograd from the saved input, so every elementwise ``f`` works.
    ``fn`` computes ``f`` out of place; an in-place call writes the result back into ``x``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, fn: Callable[[Tensor], Tensor], inplace: bool, rule: str
    ) -> Tensor:
        """Return ``fn(x)`` (written back into ``x`` with ``inplace``)."""
        ctx.fn = fn
        ctx.rule = rule
        ctx.copy = None
        out = fn(x)
        if rule == "guided":
            if inplace:
                ctx.copy = x.detach().clone()
            else:
                ctx.save_for_backward(x)
        return returned(ctx, x, out, inplace)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        """Return the gradient of ``x`` under the rule: ``f'(x) * relu(s)`` or ``relu(s)``."""
        signal = grad.clamp(min=0.0)
        if ctx.rule == "guided":
            x = ctx.copy if ctx.copy is not None else ctx.saved_tensors[0]
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                (signal,) = torch.autograd.grad(ctx.fn(leaf), leaf, signal)
        return signal, None, None, None


# -- recognising the calls -------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """One call the mode recognised.

    A rectifier ``clamp(x, 0, upper)`` when ``fn`` is ``None``; otherwise an activation ``f``
    named ``name``, computed out of place by ``fn``.
    """

    x: Any
    name: str
    upper: float | None = None
    inplace: bool = False
    keep_output: bool = False
    fn: Callable[[Tensor], Tensor] | None = None


_Parser = Callable[[tuple[Any, ...], dict[str, Any]], "Site | None"]


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    """Argument ``i`` of a call, positional or by keyword (also read by LRP and DeepLIFT)."""
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0]
    return kwargs.get("input", kwargs.get("self"))


def _constant(bound: Any, x: Tensor) -> float | None:
    """Return the value of a bound that is one constant everywhere, or ``None``.

    A number, or a tensor that needs no gradient, holds a single value, broadcasts to ``x``
    without growing it and leaves the result in ``x``'s dtype.
    """
    if isinstance(bound, bool) or not isinstance(bound, int | float | Tensor):
        return None
    if not isinstance(bound, Tensor):
        return float(bound)
    if bound.requires_grad or bound.numel() == 0 or bound.is_complex():
        return None
    if torch.broadcast_shapes(x.shape, bound.shape) != x.shape:
        return None
    if torch.result_type(x, bound) != x.dtype:
        return None
    value = bound.reshape(-1)[0]
    if bound.numel() > 1 and not bool((bound == value).all()):
        return None
    return float(value)


def _rectifier(x: Any, upper: float | None, inplace: bool, keep_output: bool) -> Site | None:
    if upper is not None and not upper > 0.0:
        return None  # clamp(x, 0, 0) and the like: a constant, not a rectifier
    name = "ReLU" if upper is None else ("ReLU6" if upper == 6.0 else f"clamp(0, {upper:g})")
    return Site(x, name, upper=upper, inplace=inplace, keep_output=keep_output)


def _relu(inplace: bool) -> _Parser:
    def parse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Site | None:
        return _rectifier(_input(args, kwargs), None, inplace, True)

    return parse


def _f_relu(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Site | None:
    inplace = bool(_arg(args, kwargs, 1, "inplace", False))
    return _rectifier(_input(args, kwargs), None, inplace, True)


def _f_relu6(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Site | None:
    inplace = bool(_arg(args, kwargs, 1, "inplace", False))
    return _rectifier(_input(args, kwargs), 6.0, inplace, False)


def _clamp(inplace: bool) -> _Parser:
    """Parse ``clamp``/``clip`` (``min``, ``max``) and ``clamp_min`` (``min``)."""

    def parse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Site | None:
        x = _input(args, kwargs)
        if _constant(_arg(args, kwargs, 1, "min", None), x) != 0.0:
            return None
        upper = None
        bound = _arg(args, kwargs, 2, "max", None)
        if bound is not None:
            upper = _constant(bound, x)
            if upper is None:
                return None
        return _rectifier(x, upper, inplace, False)

    return parse


def _two_sided(inplace: bool, out_of_place: Callable[..., Any]) -> _Parser:
    """Parse ``clamp(x, lo, hi)`` with numbers ``lo < hi``, ``lo != 0``: ``Hardtanh``, spelled.

    (``lo = 0`` is a rectifier, read by :func:`_clamp` first.) A one-sided clamp with another
    bound (``clamp(min=1e-6)``, a guard before a division) is no activation.
    """
    parse = _activation("Hardtanh", out_of_place, inplace=inplace, out_of_place=out_of_place)

    def site(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Site | None:
        low, high = _arg(args, kwargs, 1, "min", None), _arg(args, kwargs, 2, "max", None)
        numbers = type(low) in (int, float) and type(high) in (int, float)
        return parse(args, kwargs) if numbers and low < high else None

    return site


def _maximum(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Site | None:
    """``maximum(x, 0)``, ``max(x, 0)``, ``fmax(x, 0)`` with a tensor of zeros, either side."""
    first, other = _input(args, kwargs), _arg(args, kwargs, 1, "other", None)
    if not (isinstance(first, Tensor) and isinstance(other, Tensor)):
        return None  # torch.max(x) or torch.max(x, dim): a reduction
    if _constant(other, first) == 0.0:
        return _rectifier(first, None, False, False)
    if _constant(first, other) == 0.0:
        return _rectifier(other, None, False, False)
    return None


# -- activations that are not rectifiers -----------------------------------------------------


def _activation(
    name: str,
    func: Callable[..., Any],
    *,
    inplace_at: int | None = None,
    inplace: bool = False,
    out_of_place: Callable[..., Any] | None = None,
) -> _Parser:
    """Parse a call of the activation ``func``; ``inplace_at``: position of its ``inplace``.

    ``inplace`` marks a function that always works in place; ``out_of_place`` is then its
    out-of-place twin, taking the same arguments.
    """
    target = out_of_place or func

    def parse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Site | None:
        x = _input(args, kwargs)
        rest = list(args[1:])
        options = {k: v for k, v in kwargs.items() if k not in ("input", "self")}
        in_place = inplace
        if inplace_at is not None:
            if len(args) > inplace_at:
                in_place = bool(args[inplace_at])
                rest = rest[: inplace_at - 1]
            else:
                in_place = bool(options.pop("inplace", False))

        def fn(t: Tensor) -> Tensor:
            return target(t, *rest, **options)

        return Site(x, name, inplace=in_place, fn=fn)

    return parse


def _piecewise(
    rectifier: Callable[[tuple[Any, ...], dict[str, Any]], Site | None], other: _Parser
) -> _Parser:
    """Parse a function that is a rectifier for some arguments, another activation otherwise."""

    def parse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Site | None:
        return rectifier(args, kwargs) or other(args, kwargs)

    return parse


def _hardtanh(inplace_default: bool) -> Callable[[tuple[Any, ...], dict[str, Any]], Any]:
    def parse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Site | None:
        if float(_arg(args, kwargs, 1, "min_val", -1.0)) != 0.0:
            return None
        upper = float(_arg(args, kwargs, 2, "max_val", 1.0))
        inplace = bool(_arg(args, kwargs, 3, "inplace", inplace_default))
        return _rectifier(_input(args, kwargs), upper, inplace, False)

    return parse


def _threshold(inplace_default: bool, inplace_at: int | None) -> Callable[..., Any]:
    def parse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Site | None:
        threshold = _arg(args, kwargs, 1, "threshold", None)
        value = _arg(args, kwargs, 2, "value", None)
        if threshold != 0 or value != 0:
            return None
        inplace = inplace_default
        if inplace_at is not None:
            inplace = bool(_arg(args, kwargs, inplace_at, "inplace", False))
        return _rectifier(_input(args, kwargs), None, inplace, False)

    return parse


def _leaky(inplace_default: bool) -> Callable[..., Any]:
    def parse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Site | None:
        if float(_arg(args, kwargs, 1, "negative_slope", 0.01)) != 0.0:
            return None
        inplace = bool(_arg(args, kwargs, 2, "inplace", inplace_default))
        # PyTorch keeps the input of leaky_relu, the output of leaky_relu_.
        return _rectifier(_input(args, kwargs), None, inplace, inplace)

    return parse


_RECTIFIERS: dict[Any, _Parser] = {
    F.relu: _f_relu,
    torch.relu: _relu(False),
    torch.relu_: _relu(True),
    Tensor.relu: _relu(False),
    Tensor.relu_: _relu(True),
    F.relu6: _f_relu6,
    F.hardtanh: _piecewise(_hardtanh(False), _activation("Hardtanh", F.hardtanh, inplace_at=3)),
    F.hardtanh_: _piecewise(
        _hardtanh(True), _activation("Hardtanh", F.hardtanh_, inplace=True, out_of_place=F.hardtanh)
    ),
    torch.clamp: _piecewise(_clamp(False), _two_sided(False, torch.clamp)),
    torch.clamp_: _piecewise(_clamp(True), _two_sided(True, torch.clamp)),
    Tensor.clamp: _piecewise(_clamp(False), _two_sided(False, Tensor.clamp)),
    Tensor.clamp_: _piecewise(_clamp(True), _two_sided(True, Tensor.clamp)),
    torch.clip: _piecewise(_clamp(False), _two_sided(False, torch.clip)),
    torch.clip_: _piecewise(_clamp(True), _two_sided(True, torch.clip)),
    Tensor.clip: _piecewise(_clamp(False), _two_sided(False, Tensor.clip)),
    Tensor.clip_: _piecewise(_clamp(True), _two_sided(True, Tensor.clip)),
    torch.clamp_min: _clamp(False),
    torch.clamp_min_: _clamp(True),
    Tensor.clamp_min: _clamp(False),
    Tensor.clamp_min_: _clamp(True),
    F.threshold: _piecewise(
        _threshold(False, 3), _activation("Threshold", F.threshold, inplace_at=3)
    ),
    torch.threshold: _piecewise(_threshold(False, None), _activation("Threshold", torch.threshold)),
    torch.threshold_: _piecewise(
        _threshold(True, None),
        _activation("Threshold", torch.threshold_, inplace=True, out_of_place=torch.threshold),
    ),
    torch.maximum: _maximum,
    Tensor.maximum: _maximum,
    torch.max: _maximum,
    Tensor.max: _maximum,
    torch.fmax: _maximum,
    Tensor.fmax: _maximum,
    F.leaky_relu: _piecewise(_leaky(False), _activation("LeakyReLU", F.leaky_relu, inplace_at=2)),
    F.leaky_relu_: _piecewise(
        _leaky(True),
        _activation("LeakyReLU", F.leaky_relu_, inplace=True, out_of_place=F.leaky_relu),
    ),
}
"""Every call that may be a rectifier, and how to read its arguments. For ``clamp`` the bound
names are ``min`` and ``max``, as in PyTorch. Functions that are rectifiers only for some
arguments (``hardtanh(0, t)``, ``threshold(0, 0)``, ``leaky_relu`` with slope 0) parse as
another activation otherwise; a ``clamp`` to ``[lo, hi]`` (numbers) is ``Hardtanh``, one with
a single other bound (a guard: ``clamp(min=1e-6)``) no activation at all."""


def _nn_inplace(name: str) -> list[Callable[..., Any]]:
    """``torch._C._nn.<name>_`` where this PyTorch has it (not every version has each)."""
    twin = getattr(torch._C._nn, f"{name}_", None)
    return [twin] if twin is not None else []


# (name, function, position of its ``inplace`` argument, in-place twins taking the same
# arguments). The mode sees the Python wrappers (``F.silu``), not what they call inside.
_OTHERS: list[tuple[str, Callable[..., Any], int | None, list[Callable[..., Any]]]] = [
    ("GELU", F.gelu, None, _nn_inplace("gelu")),
    ("SiLU", F.silu, 1, _nn_inplace("silu")),
    ("Hardswish", F.hardswish, 1, _nn_inplace("hardswish")),
    ("Mish", F.mish, 1, _nn_inplace("mish")),
    ("Hardsigmoid", F.hardsigmoid, 1, _nn_inplace("hardsigmoid")),
    ("ELU", F.elu, 2, [F.elu_]),
    ("SELU", F.selu, 1, [torch.selu_]),
    ("CELU", F.celu, 2, [torch.celu_]),
    ("RReLU", F.rrelu, 4, [torch.rrelu_]),
    ("PReLU", torch.prelu, None, []),
    ("Softplus", F.softplus, None, []),
    ("LogSigmoid", F.logsigmoid, None, []),
    ("Softsign", F.softsign, None, []),
    ("Tanhshrink", F.tanhshrink, None, []),
    ("Sigmoid", torch.sigmoid, None, [torch.sigmoid_, Tensor.sigmoid_]),
    ("Sigmoid", Tensor.sigmoid, None, []),
    ("Sigmoid", torch.special.expit, None, []),
    ("Tanh", torch.tanh, None, [torch.tanh_, Tensor.tanh_]),
    ("Tanh", Tensor.tanh, None, []),
]
_ACTIVATIONS: dict[Any, _Parser] = {}
for _name, _func, _at, _inplace_twins in _OTHERS:
    _ACTIVATIONS[_func] = _activation(_name, _func, inplace_at=_at)
    for _twin in _inplace_twins:
        _ACTIVATIONS[_twin] = _activation(_name, _twin, inplace=True, out_of_place=_func)

SITES: dict[Any, _Parser] = {**_ACTIVATIONS, **_RECTIFIERS}
"""Every call a rule may replace (a rectifier, or another activation), and how to read it: a
parser takes the call's ``(args, kwargs)`` and returns its :class:`Site`, or ``None`` when the
call is no activation (``clamp`` with other bounds, ``max`` as a reduction)."""

ACTIVATIONS: tuple[str, ...] = tuple(
    sorted({name for name, *_ in _OTHERS} | {"Hardtanh", "LeakyReLU", "Threshold"})
)
"""The activations other than rectifiers that ``activations=`` can name (case and ``_`` do not
matter: ``"leaky_relu"`` is ``"LeakyReLU"``; ``"swish"`` is ``"SiLU"``). ``Hardtanh``,
``LeakyReLU`` and ``Threshold`` are those with bounds or slope that make them no rectifier."""

RECTIFIER_SPELLINGS = (
    "ReLU, ReLU6, hardtanh(0, t), clamp(min=0), clamp(0, t), clamp_min(0), threshold(0, 0), "
    "maximum(x, 0), leaky_relu(slope=0)"
)
"""The rectifiers the rules recognise, as error messages name them."""


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


_BY_KEY: dict[str, str] = {_key(name): name for name in ACTIVATIONS} | {"swish": "SiLU"}


def resolve_activations(activations: Activations) -> frozenset[str]:
    """Return the names of the activations other than rectifiers that ``activations`` selects.

    Raises:
        ValueError: an unknown activation name.
        TypeError: neither a string nor a collection of strings.
    """
    if isinstance(activations, str):
        if activations == "rectifiers":
            return frozenset()
        if activations == "all":
            return frozenset(ACTIVATIONS)
        activations = [activations]
    if not isinstance(activations, Iterable):
        raise TypeError(
            "activations must be 'rectifiers', 'all' or a collection of activation names, got "
            f"{type(activations).__name__}"
        )
    chosen = set()
    for name in activations:
        if not isinstance(name, str):
            raise TypeError(f"activation names are strings, got {name!r}")
        if _key(name) in ("relu", "relu6"):
            continue  # a rectifier: the rule applies there anyway
        if _key(name) not in _BY_KEY:
            raise ValueError(
                f"unknown activation {name!r} in activations=; known: {', '.join(ACTIVATIONS)} "
                "(or 'all', or 'rectifiers' for none of them)"
            )
        chosen.add(_BY_KEY[_key(name)])
    return frozenset(chosen)
