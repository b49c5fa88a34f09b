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

from ..rectifiers import SITES, _arg

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
_POWERS = {torch.pow, Tensor.pow, Tensor.__pow__}
_DIVISIONS = {torch.div, Tensor.div, Tensor.__truediv__, torch.true_divide, Tensor.true_divide}
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
