"""Which torch calls :mod:`.lrp` treats how, and how it reads their arguments.

The tables name the calls the LRP handler intercepts while the model runs (layers, products,
reshapes, nonlinear functions without a rule, linear operations, metadata reads);
:func:`_conv_params` reads a convolution call's geometry for the rules' backward
(:func:`._lrp_layers._input_grad`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..rectifiers import SITES, Site, _activation, _arg

_LAYERS: dict[Any, tuple[type[nn.Module], bool]] = {
    F.linear: (nn.Linear, False),
    torch.conv1d: (nn.Conv1d, False),
    torch.conv2d: (nn.Conv2d, False),
    torch.conv3d: (nn.Conv3d, False),
    torch.conv_transpose1d: (nn.ConvTranspose1d, True),
    torch.conv_transpose2d: (nn.ConvTranspose2d, True),
    torch.conv_transpose3d: (nn.ConvTranspose3d, True),
}
_PRODUCTS: dict[Any, str] = {
    torch.mul: "mul",
    Tensor.mul: "mul",
    Tensor.__mul__: "mul",
    Tensor.__rmul__: "mul",
    torch.matmul: "matmul",
    Tensor.matmul: "matmul",
    Tensor.__matmul__: "matmul",
    torch.bmm: "matmul",
    Tensor.bmm: "matmul",
    torch.mm: "matmul",
    Tensor.mm: "matmul",
}
_RESHAPES = {
    torch.flatten,
    Tensor.flatten,
    Tensor.view,
    Tensor.reshape,
    torch.reshape,
    Tensor.contiguous,
}
_SOFTMAX = {torch.softmax, F.softmax, Tensor.softmax}
_NONLINEAR: dict[Any, str] = {
    torch.exp: "exp",
    Tensor.exp: "exp",
    torch.log: "log",
    Tensor.log: "log",
    torch.sqrt: "sqrt",
    Tensor.sqrt: "sqrt",
    torch.rsqrt: "rsqrt",
    Tensor.rsqrt: "rsqrt",
    torch.reciprocal: "reciprocal",
    Tensor.reciprocal: "reciprocal",
    torch.log_softmax: "log_softmax",
    F.log_softmax: "log_softmax",
    Tensor.log_softmax: "log_softmax",
    torch.logsumexp: "logsumexp",
    Tensor.logsumexp: "logsumexp",
    torch.var: "var",
    Tensor.var: "var",
    torch.std: "std",
    Tensor.std: "std",
    torch.norm: "norm",
    Tensor.norm: "norm",
    torch.linalg.vector_norm: "vector_norm",
    torch.square: "square",
    Tensor.square: "square",
}

_SMOOTH = (
    "sin", "cos", "tan", "asin", "acos", "atan", "arcsin", "arccos", "arctan", "sinh", "cosh",
    "asinh", "acosh", "atanh", "arcsinh", "arccosh", "arctanh", "expm1", "exp2", "log1p",
    "log2", "log10", "erf", "erfc", "erfinv", "lgamma", "digamma", "logit", "sinc", "i0",
    "sign", "sgn", "round", "floor", "ceil", "trunc", "frac", "fmod", "remainder",
    "floor_divide", "atan2", "arctan2", "hypot", "xlogy", "cumprod", "prod", "cdist",
    "ndtr", "ndtri", "log_ndtr", "erfcx", "i0e", "i1", "i1e", "logaddexp", "logaddexp2",
    "xlog1py", "entr", "gammaln", "multigammaln", "polygamma", "mvlgamma", "cosine_similarity",
    "pairwise_distance", "pdist", "dist", "logcumsumexp",
)  # fmt: skip
"""Elementwise (and a few reducing) functions that are neither linear nor an activation: no
LRP rule. (``abs``, ``maximum``, ``where``, ``hardshrink`` and a clamp by input-dependent
bounds route or rescale the gradient elementwise so that ``x · c`` is the output's relevance:
they pass it as they are, as max pooling does.)"""
for _name in _SMOOTH:
    for _owner in (torch, Tensor, torch.special):
        for _spelled in (_name, f"{_name}_"):
            _func = getattr(_owner, _spelled, None)
            if callable(_func):
                _NONLINEAR.setdefault(_func, _name)
for _func, _name in (
    (F.normalize, "normalize"),  # (Python functions the mode sees as one call)
    (F.cosine_similarity, "cosine_similarity"),
    (F.pairwise_distance, "pairwise_distance"),
    (F.local_response_norm, "local_response_norm"),
    (F.softmin, "softmin"),
    (F.softshrink, "softshrink"),
    (F.glu, "glu"),
    (F.lp_pool1d, "lp_pool1d"),
    (F.lp_pool2d, "lp_pool2d"),
    (getattr(F, "lp_pool3d", None), "lp_pool3d"),
    (torch.exp_, "exp"),
    (Tensor.exp_, "exp"),
    (Tensor.log_, "log"),
    (Tensor.sqrt_, "sqrt"),
    (Tensor.rsqrt_, "rsqrt"),
    (Tensor.reciprocal_, "reciprocal"),
    (Tensor.square_, "square"),
):
    if _func is not None:
        _NONLINEAR.setdefault(_func, _name)

_POWERS = {
    torch.pow,
    Tensor.pow,
    Tensor.pow_,
    Tensor.__pow__,
    Tensor.__ipow__,
    Tensor.__rpow__,  # (a number to an input-dependent power)
    torch.float_power,
    Tensor.float_power,
}
_DIVISIONS = {
    torch.div,
    Tensor.div,
    Tensor.div_,
    Tensor.__truediv__,
    Tensor.__itruediv__,
    Tensor.__rtruediv__,
    torch.true_divide,
    Tensor.true_divide,
}
_DIVIDING_BY_SELF = {Tensor.__rtruediv__}
"""Divisions whose divisor is their first argument (``1 / t`` calls ``t.__rtruediv__(1)``)."""
_IN_PLACE = {
    f
    for f in (*_NONLINEAR, *_POWERS, *_DIVISIONS)
    if (name := getattr(f, "__name__", "")).endswith("_") and not name.startswith("__")
} | {Tensor.__itruediv__, Tensor.__ipow__}
"""The in-place spellings: the tensor they change takes the no-rule mark itself (``t.sin_()``
as a statement leaves the returned tensor unused)."""


def _clip(inplace: bool, out_of_place: Any) -> Any:
    """Parse a clamp that is no rectifier (``clamp(-1, 1)``): an activation, as ``Hardtanh``.

    ``None`` for a bound that depends on the input: ``clamp(x, max=y)`` is ``minimum(x, y)``,
    which routes the gradient (see :data:`_SMOOTH`).
    """
    parse = _activation("Clamp", out_of_place, inplace=inplace, out_of_place=out_of_place)

    def site(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Site | None:
        bounds = (_arg(args, kwargs, 1, "min", None), _arg(args, kwargs, 2, "max", None))
        if any(isinstance(b, Tensor) and b.requires_grad for b in bounds):
            return None
        return parse(args, kwargs)

    return site


_CLIPS: dict[Any, Any] = {
    torch.clamp: _clip(False, torch.clamp),
    Tensor.clamp: _clip(False, Tensor.clamp),
    torch.clip: _clip(False, torch.clip),
    Tensor.clip: _clip(False, Tensor.clip),
    torch.clamp_min: _clip(False, torch.clamp_min),
    Tensor.clamp_min: _clip(False, Tensor.clamp_min),
    torch.clamp_: _clip(True, torch.clamp),
    Tensor.clamp_: _clip(True, Tensor.clamp),
    torch.clip_: _clip(True, torch.clip),
    Tensor.clip_: _clip(True, Tensor.clip),
    torch.clamp_min_: _clip(True, torch.clamp_min),
    Tensor.clamp_min_: _clip(True, Tensor.clamp_min),
    torch.clamp_max: _clip(False, torch.clamp_max),
    Tensor.clamp_max: _clip(False, Tensor.clamp_max),
    torch.clamp_max_: _clip(True, torch.clamp_max),
    Tensor.clamp_max_: _clip(True, Tensor.clamp_max),
}
"""The clamps the rectifier tables parse: with other bounds they take the Pass rule."""
_OPAQUE = {
    F.multi_head_attention_forward,
    F.bilinear,
    torch.einsum,
    torch.addmm,
    torch.baddbmm,
    torch.lstm,
    torch.gru,
    torch.rnn_tanh,
    torch.rnn_relu,
}


_LINEAR_OPS = {
    torch.add,
    Tensor.add,
    Tensor.__add__,
    Tensor.__radd__,
    Tensor.__iadd__,
    torch.sub,
    Tensor.sub,
    Tensor.__sub__,
    Tensor.__rsub__,
    torch.neg,
    Tensor.neg,
    Tensor.__neg__,
    torch.cat,
    torch.concat,
    torch.stack,
    Tensor.expand,
    Tensor.expand_as,
    Tensor.transpose,
    torch.transpose,
    Tensor.permute,
    torch.permute,
    Tensor.unsqueeze,
    Tensor.squeeze,
    Tensor.repeat,
    Tensor.__getitem__,
    Tensor.to,
    Tensor.type_as,
    Tensor.clone,
}
_METADATA = {
    Tensor.dim,
    Tensor.size,
    Tensor.numel,
    Tensor.stride,
    Tensor.is_contiguous,
    Tensor.is_floating_point,
    Tensor.is_complex,
    Tensor.__len__,
    Tensor.shape.__get__,  # type: ignore[attr-defined]
    Tensor.ndim.__get__,  # type: ignore[attr-defined]
    Tensor.dtype.__get__,  # type: ignore[attr-defined]
    Tensor.device.__get__,  # type: ignore[attr-defined]
    Tensor.requires_grad.__get__,  # type: ignore[attr-defined]
    Tensor.is_cuda.__get__,  # type: ignore[attr-defined]
    Tensor.grad_fn.__get__,  # type: ignore[attr-defined, union-attr]
}
"""Calls that only read a tensor's metadata: they do not put a pending rule in place."""
_COVERED = (
    set(_LAYERS)
    | set(SITES)
    | set(_PRODUCTS)
    | _DIVISIONS
    | _RESHAPES
    | _LINEAR_OPS
    | {F.batch_norm, F.layer_norm, F.group_norm}
    | ({F.rms_norm} if hasattr(F, "rms_norm") else set())
)
"""Calls whose use of a parameter has a rule (a layer, a norm, a scale, a bias, a token)."""


def _tensors(value: Any) -> list[Tensor]:
    """Return the tensors in ``value`` and in the tuples, lists and dicts it nests."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = tuple(value.values())
    elif not isinstance(value, tuple | list):
        return []
    found = []
    for v in value:
        if isinstance(v, Tensor):
            found.append(v)
        elif isinstance(v, tuple | list | dict):
            found.extend(_tensors(v))
    return found


def _conv_params(
    func: Any, transposed: bool, dims: int, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, ...] | None:
    """Return the geometry of a convolution call, for ``aten.convolution_backward``.

    ``(stride, padding, dilation, transposed, output_padding, groups)``; ``None`` for
    ``F.linear`` and for string padding (``"same"``).
    """
    if func is F.linear:
        return None

    def ints(value: Any) -> list[int]:
        return [int(v) for v in value] if isinstance(value, tuple | list) else [int(value)] * dims

    stride = _arg(args, kwargs, 3, "stride", 1)
    padding = _arg(args, kwargs, 4, "padding", 0)
    if isinstance(padding, str):
        return None
    if transposed:
        output_padding = _arg(args, kwargs, 5, "output_padding", 0)
        groups = _arg(args, kwargs, 6, "groups", 1)
        dilation = _arg(args, kwargs, 7, "dilation", 1)
    else:
        output_padding, dilation = 0, _arg(args, kwargs, 5, "dilation", 1)
        groups = _arg(args, kwargs, 6, "groups", 1)
    return (
        ints(stride),
        ints(padding),
        ints(dilation),
        transposed,
        ints(output_padding),
        int(groups),
    )


def _grad_tensor(t: Any) -> bool:
    return isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled()
