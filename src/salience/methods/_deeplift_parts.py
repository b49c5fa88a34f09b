"""RevealCancel's positive and negative parts of an activation's input, through linear calls.

Shrikumar et al. 2017 (Sec. 3.5.1 and 3.5.3) split the input difference of an activation fed
by a dense or convolutional layer, ``dz`` with ``z = sum_i w_i x_i + b``, into ``dz+`` and
``dz-``, the sums of the terms ``w_i dx_i`` that are positive and negative (``dx_i`` the
input's whole difference from the reference). Between that layer and the activation a modern
network puts more linear calls, which the paper does not cover: eval-mode BatchNorm, residual
sums, concatenation, padding, pooling, reshapes. salience carries the two parts through them:

- a convolution or linear layer (the paper's rule): ``P = W+ dx+ + W- dx-`` and
  ``N = W- dx+ + W+ dx-``, the terms grouped by sign, with ``dx`` its input's difference
  from the value it had in the reference pass, whatever computed that input;
- a *neuron* (an activation or max-pooling output, the model input) used without a layer, as
  an identity skip: its difference split by sign, ``(dv+, dv-)``: the terms ``1 * dv_i`` that a
  layer reading it would see (a skip is a layer with an identity kernel);
- a sum or difference (residual additions): the sums of the operands' parts (a negative
  coefficient swaps them), so each branch brings its own terms;
- a product by a constant ``c`` (eval-mode BatchNorm's scale too): ``(c+ P + c- N, c- P + c+ N)``;
- a map with non-negative coefficients (concatenation, reshapes, selection, padding, average
  pooling, nearest/linear interpolation): the map applied to each part.

These carry what kundajelab/deeplift (the paper's code) does for BatchNormalization, pooling
and concatenation, and reduce to the paper's rule when the layer feeds the activation
directly. ``P + N = dz`` always, so summation-to-delta stays exact. The parts are computed
only when an activation asks for them (memoised), and they are differentiable functions of
the input: RevealCancel's backward sends ``m+`` and ``m-`` through them, which gives the
paper's linear-rule multipliers, including its ``0.5 w_i`` to each part where a term is
exactly zero (``dx_i = 0``, :class:`_SignSplit`). Any other call (a product of two
input-dependent tensors, LayerNorm, softmax...) leaves its output without parts, and an
activation fed by it raises.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from ._deeplift_ops import _LAYERS, _arg, _name, _outputs

Pair = tuple[Tensor, Tensor]


class _SignSplit(torch.autograd.Function):
    """``(d+, d-)``, whose backward gives ``d == 0`` half of each part's gradient.

    The paper (Sec. 3.5.1): where a term is zero, its multiplier to ``dy+`` and to ``dy-`` is
    ``0.5 w_i`` each; ``clamp`` would pass the whole gradient of both parts.
    """

    @staticmethod
    def forward(ctx: Any, d: Tensor) -> Pair:  # type: ignore[override]
        """Return the positive and negative parts of ``d``."""
        # the share of the positive part: 1 where d > 0, 0 where d < 0, 1/2 where d == 0
        ctx.save_for_backward(torch.sign(d).add_(1.0).mul_(0.5))
        return d.clamp(min=0), d.clamp(max=0)

    @staticmethod
    def backward(ctx: Any, g_pos: Tensor, g_neg: Tensor) -> Tensor:  # type: ignore[override]
        """``g+`` where ``d > 0``, ``g-`` where ``d < 0``, their mean where ``d == 0``."""
        (share,) = ctx.saved_tensors
        return torch.addcmul(g_neg, share, g_pos - g_neg)


class _Parts:
    """The lazily computed parts ``(P, N)`` of one tensor (checked by identity and version)."""

    __slots__ = ("ref", "thunk", "value", "version")

    def __init__(self, tensor: Tensor, thunk: Callable[[], Pair]) -> None:
        self.ref = weakref.ref(tensor)
        self.version = tensor._version
        self.thunk = thunk
        self.value: Pair | None = None

    def of(self, t: Tensor) -> bool:
        return self.ref() is t and self.version == t._version

    def get(self) -> Pair:
        if self.value is None:
            self.value = self.thunk()
            self.thunk = _done
        return self.value


def _done() -> Pair:  # pragma: no cover - never called: get() memoises
    raise AssertionError


def _difference(d: Tensor) -> Callable[[], Pair]:
    return lambda: _SignSplit.apply(d)


def _scale(pair: Pair, c: Tensor | float) -> Pair:
    """Return the parts of ``c * t`` from those of ``t``, for a constant ``c`` of any sign."""
    pos, neg = pair
    if isinstance(c, Tensor):
        c_pos, c_neg = c.clamp(min=0), c.clamp(max=0)
        return pos * c_pos + neg * c_neg, neg * c_pos + pos * c_neg
    if c == 1:
        return pos, neg
    return (c * pos, c * neg) if c >= 0 else (c * neg, c * pos)


_SUMS = {
    **dict.fromkeys(("add", "__add__", "__radd__", "__iadd__", "add_"), (1, "alpha")),
    **dict.fromkeys(("sub", "__sub__", "__isub__", "sub_", "subtract"), (1, "-alpha")),
    "__rsub__": (-1, 1),
    "rsub": ("-alpha", 1),
}
_SIGNS = {"neg": -1, "__neg__": -1, "negative": -1, "positive": 1, "__pos__": 1}
_MULS = frozenset(("mul", "__mul__", "__rmul__", "__imul__", "mul_", "multiply"))
_DIVS = frozenset(("div", "__truediv__", "__itruediv__", "div_", "divide", "true_divide"))
_MATMULS = frozenset(("matmul", "__matmul__", "__rmatmul__", "mm", "bmm"))
_CATS = frozenset(("cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack"))
# Maps of one tensor with non-negative coefficients (selections, sums, means, averages).
_SAME = frozenset(
    """
    reshape view view_as reshape_as flatten unflatten permute transpose t swapaxes movedim
    contiguous clone __getitem__ narrow select index_select gather take squeeze unsqueeze expand
    expand_as repeat tile broadcast_to chunk split split_with_sizes unbind tensor_split roll
    flip fliplr flipud rot90 mean sum nansum cumsum trace diagonal tril triu avg_pool1d
    avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d pad
    interpolate upsample upsample_nearest upsample_bilinear pixel_shuffle pixel_unshuffle
    channel_shuffle native_channel_shuffle unfold fold dropout dropout1d dropout2d dropout3d
    alpha_dropout feature_alpha_dropout to float double half bfloat16 type type_as
    """.split()  # noqa: SIM905 (a word list reads better than quoted strings)
)
_POSITIVE_MODES = frozenset(("nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area"))


class NoSplit(Exception):
    """An operand of a linear call has no parts: the call's output gets none either."""


class _Split:
    """The parts of the tensors of the replay pass that are linear in the previous neurons.

    ``tainted(t)`` tells whether ``t`` was computed from the input. ``origin`` names, for a
    tainted tensor without parts, the call that broke the linear chain (for the error).
    """

    def __init__(self, tainted: Callable[[Tensor], bool]) -> None:
        self.tainted = tainted
        self.parts: dict[int, _Parts] = {}
        self.origin: dict[int, str] = {}

    def get(self, t: Tensor) -> _Parts | None:
        held = self.parts.get(id(t))
        return held if held is not None and held.of(t) else None

    def why(self, t: Tensor) -> str:
        return self.origin.get(id(t), "an operation with no DeepLIFT rule")

    def neuron(self, t: Tensor, t0: Tensor) -> None:
        """Register ``t``, a neuron with reference value ``t0``: its difference, split by sign."""
        self.parts[id(t)] = _Parts(t, _difference(t - t0))

    def _need(self, t: Any) -> _Parts | None:
        """Return an operand's parts: ``None`` for a constant, :class:`NoSplit` if it has none."""
        if not (isinstance(t, Tensor) and self.tainted(t)):
            return None
        held = self.get(t)
        if held is None:
            raise NoSplit(self.why(t))
        return held

    # -- layers --

    def layer(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], y: Tensor, x0: Tensor
    ) -> None:
        """Register the parts of ``y = func(x, W, b, ...)`` (a convolution or linear layer).

        The terms ``w_i dx_i`` grouped by sign, with ``dx = x - x0`` (``x0`` the input's value
        in the reference pass), computed now: the model may change ``x`` in place later.
        """
        x, weight = _arg(args, kwargs, 0, "input", None), _arg(args, kwargs, 1, "weight", None)
        held = _Parts(x, _difference(x - x0))
        rest = args[3:]
        options = {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}
        w = weight.detach()

        def thunk() -> Pair:
            pos, neg = held.get()
            w_pos, w_neg = w.clamp(min=0), w.clamp(max=0)

            def apply(t: Tensor, k: Tensor) -> Tensor:
                return func(t, k, None, *rest, **options)

            return apply(pos, w_pos) + apply(neg, w_neg), apply(pos, w_neg) + apply(neg, w_pos)

        self.parts[id(y)] = _Parts(y, thunk)

    # -- every other linear call --

    def plan(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Callable[[list[Tensor]], None] | None:
        """Before a call runs: a function registering the parts of its outputs, or ``None``.

        ``None`` when the call is not one this module follows; the outputs then get no parts
        and an ``origin``. Operands are read before the call, as it may change them in place.
        """
        name = _name(func)
        try:
            thunk = self._thunk(func, name, args, kwargs)
        except NoSplit as broken:
            why = str(broken)
            return lambda outs: self._broken(outs, why)
        except (TypeError, ValueError, IndexError, KeyError, RuntimeError):
            thunk = None  # arguments of a form not read here: no parts
        if thunk is None:
            return lambda outs: self._broken(outs, f"`{name}`")
        shared: list[tuple[Any, Any]] = []

        def nth(k: int) -> Callable[[], Pair]:
            def get() -> Pair:
                if not shared:
                    shared.append(thunk())
                pos, neg = shared[0]
                if isinstance(pos, Tensor):
                    return pos, neg
                return _outputs(pos)[k], _outputs(neg)[k]  # chunk, split, unbind...

            return get

        def register(outs: list[Tensor]) -> None:
            for k, out in enumerate(outs):
                self.parts[id(out)] = _Parts(out, nth(k))

        return register

    def _broken(self, outs: list[Tensor], why: str) -> None:
        for out in outs:
            self.origin[id(out)] = why
            self.parts.pop(id(out), None)

    def _thunk(
        self, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Callable[[], tuple[Any, Any]] | None:
        """Return a function computing the parts of the outputs; ``None`` if not linear."""
        if func in _LAYERS:
            return None  # an input-dependent weight (else the tracer calls layer())
        if name in _SUMS or name in _SIGNS:
            return self._sum(name, args, kwargs)
        if name == "batch_norm":
            return self._batch_norm(args, kwargs)
        if name in _MULS or name in _DIVS or name in _MATMULS:
            return self._product(func, name, args, kwargs)
        if name in _CATS:
            return self._cat(func, args, kwargs)
        if name in _SAME:
            return self._same(func, name, args, kwargs)
        return None

    def _sum(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[], Pair]:
        alpha = kwargs.get("alpha", 1)
        if not isinstance(alpha, Real):
            raise NoSplit(f"`{name}` with a tensor alpha")
        operands: list[tuple[Any, Any]]
        if name in _SIGNS:
            operands = [(args[0], _SIGNS[name])]
        else:
            coefs = [-alpha if c == "-alpha" else alpha if c == "alpha" else c for c in _SUMS[name]]
            other = _arg(args, kwargs, 1, "other", None)
            operands = list(zip((args[0], other), coefs, strict=True))
        held = []  # the operands computed from the input (at least one: the call was tainted)
        for t, c in operands:
            h = self._need(t)
            if h is not None:
                held.append((h, float(c)))
        shape = torch.broadcast_shapes(*(t.shape for t, _ in operands if isinstance(t, Tensor)))

        def thunk() -> Pair:
            pos, neg = _scale(held[0][0].get(), held[0][1])
            for h, c in held[1:]:
                p, n = _scale(h.get(), c)
                pos, neg = pos + p, neg + n
            return pos.broadcast_to(shape), neg.broadcast_to(shape)

        return thunk

    def _batch_norm(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable | None:
        """Eval-mode BatchNorm, ``a_c (x - mean_c) + b_c``: the product by ``a_c`` carries."""
        if bool(_arg(args, kwargs, 5, "training", False)):
            return None
        x = _arg(args, kwargs, 0, "input", None)
        held = self._need(x)
        var = _arg(args, kwargs, 2, "running_var", None)
        weight = _arg(args, kwargs, 3, "weight", None)
        eps = float(_arg(args, kwargs, 7, "eps", 1e-5))
        if held is None or not isinstance(var, Tensor) or self.tainted(var):
            return None
        scale = torch.rsqrt(var.detach() + eps)
        if weight is not None:
            scale = scale * weight.detach()
        scale = scale.view(1, -1, *([1] * (x.ndim - 2)))
        return lambda: _scale(held.get(), scale)

    def _product(
        self, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Callable | None:
        """Follow a product (elementwise or matrix) or quotient of one operand by a constant."""
        a, b = args[0], _arg(args, kwargs, 1, "other", None)
        if name == "__rmatmul__":
            a, b = b, a
        left = isinstance(a, Tensor) and self.tainted(a)
        if name in _DIVS and isinstance(b, Tensor) and self.tainted(b):
            raise NoSplit(f"`{name}` (a division by an input-dependent tensor)")
        if left and isinstance(b, Tensor) and self.tainted(b):
            raise NoSplit(f"`{name}` (a product of two input-dependent tensors)")
        x, c = (a, b) if left else (b, a)
        if name in _DIVS and kwargs.get("rounding_mode") is not None:
            return None
        if isinstance(c, Tensor):
            c = c.detach()
        elif isinstance(c, Real):
            c = float(c)
        else:
            return None
        if name in _DIVS:
            c = torch.reciprocal(c) if isinstance(c, Tensor) else 1.0 / c
        held = self._need(x)
        if held is None:
            return None
        if name not in _MATMULS:
            return lambda: _scale(held.get(), c)
        if not isinstance(c, Tensor):
            return None

        def thunk() -> Pair:
            pos, neg = held.get()
            c_pos, c_neg = c.clamp(min=0), c.clamp(max=0)

            def mm(t: Tensor, k: Tensor) -> Tensor:
                return torch.matmul(t, k) if left else torch.matmul(k, t)

            return mm(pos, c_pos) + mm(neg, c_neg), mm(pos, c_neg) + mm(neg, c_pos)

        return thunk

    def _cat(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable:
        seq = _arg(args, kwargs, 0, "tensors", None)
        if not isinstance(seq, list | tuple):
            raise NoSplit(f"`{_name(func)}`")
        held = [(self._need(t), t) for t in seq]
        rest = {k: v for k, v in kwargs.items() if k != "tensors"}

        def thunk() -> Pair:
            pairs = [
                h.get() if h is not None else (t.new_zeros(()).expand_as(t),) * 2 for h, t in held
            ]
            return (
                func([p for p, _ in pairs], *args[1:], **rest),
                func([n for _, n in pairs], *args[1:], **rest),
            )

        return thunk

    def _same(
        self, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Callable | None:
        """Follow a map with non-negative coefficients of its first argument: each part."""
        x = _arg(args, kwargs, 0, "input", None)
        others = [*args[1:], *(v for k, v in kwargs.items() if k != "input")]
        if not name.endswith("_as") and any(
            isinstance(t, Tensor) and self.tainted(t) for t in others
        ):
            return None
        if (
            name in ("interpolate", "upsample")
            and _arg(args, kwargs, 3, "mode", "nearest") not in _POSITIVE_MODES
        ):
            return None
        if "dropout" in name and bool(_arg(args, kwargs, 2, "training", True)):
            return None  # random masks, different in the reference pass
        held = self._need(x)
        if held is None:
            return None
        args = args[1:] if len(args) > 0 and args[0] is x else args
        kwargs = {k: v for k, v in kwargs.items() if k != "input"}
        if name == "pad":  # the parts are differences: padded with zeros whatever the value
            args = args[:2]
            kwargs = {k: v for k, v in kwargs.items() if k != "value"}

        def thunk() -> tuple[Any, Any]:
            pos, neg = held.get()
            return func(pos, *args, **kwargs), func(neg, *args, **kwargs)

        return thunk
