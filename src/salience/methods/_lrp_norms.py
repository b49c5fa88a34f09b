r"""Normalization layers in :mod:`.lrp`: BatchNorm folding (canonization), linearized norms.

A BatchNorm that reads a convolution's or linear layer's output is folded into it for the call
(:func:`batch_norm`): the layer's rule applies to the folded weights
:math:`a W`, :math:`a b + \beta - a \mu` (:math:`a = \gamma / \sqrt{\sigma^2 + \epsilon}`),
computed on the side, never written into the model. LayerNorm, GroupNorm and RMSNorm are
linearized (:func:`linearized_norm`).
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._lrp_calls import _arg, _grad_tensor
from ._lrp_layers import _Affine, _Layer
from .rules import Epsilon, Zero

if TYPE_CHECKING:
    from .lrp import _State

__all__ = ["batch_norm", "bn_scale", "linearized_norm"]


def batch_norm(state: _State, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = _arg(args, kwargs, 0, "input", None)
    if not _grad_tensor(x) or _of_parameters(x, state.params):
        return NotImplemented  # (no relevance passes a weight: nothing to count)
    mean = _arg(args, kwargs, 1, "running_mean", None)
    var = _arg(args, kwargs, 2, "running_var", None)
    weight = _arg(args, kwargs, 3, "weight", None)
    training = bool(_arg(args, kwargs, 5, "training", False))
    # With running statistics the BatchNorm is affine and its own backward is c · a;
    # with batch statistics (training) they are taken as constants (_Affine).
    constant = not training and mean is not None and var is not None

    def compute() -> Tensor:
        return func(*args, **kwargs)

    def affine() -> Tensor:
        if constant:
            return compute()
        return _Affine.apply(x, bn_scale(x, args, kwargs)[0], compute)

    prev = state._find(state._layers, x)
    foldable = (
        prev is not None and not prev.folded and not prev.read and _out_channels(prev) == x.shape[1]
    )
    if not foldable:
        state.flush([x])
        state.counts["BatchNorm (affine, LRP-0)"] += 1
        return affine()
    assert prev is not None
    state._pending.pop(id(x), None)  # folded: the layer's rule goes after the BatchNorm
    prev.folded = True
    state.canonized += 1
    if isinstance(prev.rule, Zero) or (isinstance(prev.rule, Epsilon) and prev.rule.epsilon == 0):
        return affine()  # LRP-0 on the folded layer is its gradient: nothing to do
    owner = state.owner(weight) if isinstance(weight, Tensor) else None
    name = f"{prev.name}+{owner[0] if owner else 'functional batch_norm'}"
    if isinstance(prev.rule, Epsilon):
        record = prev.but(name=name, folded=False)
    else:
        # The rule of the layer applies to W' = a W, b' = a b + shift.
        a, shift = bn_scale(x, args, kwargs)
        a = a.flatten()

        def fold(prev: _Layer = prev, a: Tensor = a, shift: Tensor = shift) -> tuple[Tensor, Any]:
            # made by the rule in the backward pass: the folded weights live only meanwhile;
            # on a layer folded already (two BatchNorms in a row), on top of that fold
            weight, bias = prev.weights()
            return _scale_outputs(prev, a, weight), shift + (a * bias if bias is not None else 0.0)

        record = prev.but(fold=fold, name=name, folded=False)
    # The rule goes on the BatchNorm output (the folded layer's output) when it is read.
    out = affine()
    state._pending[id(out)] = (weakref.ref(out), record)
    state.remember(out, record)
    return out


_LEAF: type = torch._C._functions.AccumulateGrad  # type: ignore[attr-defined]


def _of_parameters(t: Tensor, params: Any, most: int = 16) -> bool:
    """Whether ``t`` is computed from the model's parameters alone, within ``most`` steps.

    timm's weight standardization (``StdConv2d``, ``ScaledStdConv2d``) normalizes a
    convolution's weight with ``F.batch_norm``: no BatchNorm of the network, and not one the
    relevance passes (the rules read the weight as it is). A tensor whose graph reaches more
    steps, or a leaf other than a parameter (the input), is taken as an activation.
    """
    if t.grad_fn is None:
        return id(t) in params
    pending, seen = [t.grad_fn], {t.grad_fn}
    while pending:
        for node, _ in pending.pop().next_functions:
            if node is None or node in seen:
                continue
            if type(node) is _LEAF:
                if id(node.variable) not in params:  # type: ignore[attr-defined]
                    return False
                continue
            seen.add(node)
            if len(seen) > most:
                return False
            pending.append(node)
    return True


def _out_channels(layer: _Layer) -> int | None:
    """Return the number of output channels of a layer call (``None``: unknown geometry)."""
    if not layer.transposed:
        return layer.weight.shape[0]
    if layer.conv is None:
        return None
    return layer.weight.shape[1] * layer.conv[5]


def _scale_outputs(layer: _Layer, a: Tensor, w: Tensor) -> Tensor:
    """Return ``w``, the layer's weight, with output channel ``o`` scaled by ``a[o]``.

    A convolution's or linear layer's weight is ``[out, in / groups, ...]``; a transposed
    convolution's is ``[in, out / groups, ...]``, its output channel ``g * out / groups + j``
    being column ``j`` of the rows of group ``g``.
    """
    if not layer.transposed:
        return w * a.view([a.numel()] + [1] * (w.ndim - 1))
    assert layer.conv is not None
    groups = layer.conv[5]
    per_group = w.shape[1]
    grouped = w.reshape(groups, w.shape[0] // groups, per_group, *w.shape[2:])
    scale = a.view(groups, 1, per_group, *([1] * (w.ndim - 2)))
    return (grouped * scale).reshape(w.shape)


def bn_scale(x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Return a BatchNorm call's scale ``a`` (shaped to broadcast on ``x``) and shift."""
    mean = _arg(args, kwargs, 1, "running_mean", None)
    var = _arg(args, kwargs, 2, "running_var", None)
    weight = _arg(args, kwargs, 3, "weight", None)
    bias = _arg(args, kwargs, 4, "bias", None)
    training = bool(_arg(args, kwargs, 5, "training", False))
    eps = float(_arg(args, kwargs, 7, "eps", 1e-5))
    with torch.no_grad():
        if training or mean is None or var is None:
            dims = [d for d in range(x.ndim) if d != 1]
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
        a = torch.rsqrt(var + eps)
        if weight is not None:
            a = a * weight
        shift = -mean * a
        if bias is not None:
            shift = shift + bias
    view = [1] * x.ndim
    view[1] = a.numel()
    return a.view(view), shift


def linearized_norm(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], counts: Counter[str]
) -> Any:
    """LayerNorm, GroupNorm, RMSNorm with the standard deviation held constant."""
    x = _arg(args, kwargs, 0, "input", None)
    if not _grad_tensor(x):
        return NotImplemented
    if func is F.group_norm:
        groups = int(_arg(args, kwargs, 1, "num_groups", 1))
        weight = _arg(args, kwargs, 2, "weight", None)
        bias = _arg(args, kwargs, 3, "bias", None)
        eps = float(_arg(args, kwargs, 4, "eps", 1e-5))
        t = x.reshape(x.shape[0], groups, -1)
        centered = t - t.mean(-1, keepdim=True)
        sigma = torch.sqrt(t.detach().var(-1, unbiased=False, keepdim=True) + eps)
        y = (centered / sigma).reshape(x.shape)
        shape = [1] * x.ndim
        shape[1] = x.shape[1]
        if weight is not None:
            y = y * weight.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        counts["GroupNorm (linearized)"] += 1
        return y
    normalized = _arg(args, kwargs, 1, "normalized_shape", None)
    dims = tuple(range(-len(tuple(normalized)), 0))
    weight = _arg(args, kwargs, 2, "weight", None)
    if func is F.layer_norm:
        bias = _arg(args, kwargs, 3, "bias", None)
        eps = float(_arg(args, kwargs, 4, "eps", 1e-5))
        centered = x - x.mean(dims, keepdim=True)
        sigma = torch.sqrt(x.detach().var(dims, unbiased=False, keepdim=True) + eps)
        name = "LayerNorm (linearized)"
    else:
        bias = None
        eps_arg = _arg(args, kwargs, 3, "eps", None)
        eps = float(eps_arg) if eps_arg is not None else torch.finfo(x.dtype).eps
        centered = x
        sigma = torch.sqrt(x.detach().pow(2).mean(dims, keepdim=True) + eps)
        name = "RMSNorm (linearized)"
    y = centered / sigma
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    counts[name] += 1
    return y
