"""Which torch calls DeepLIFT replaces or follows, and how to read their arguments.

Used by :mod:`.deeplift` (the call handler) and :mod:`._deeplift_parts` (RevealCancel's
positive and negative parts): the max-pooling spellings and their parsers, the layers whose
terms RevealCancel separates, and the names of the calls that are linear in the input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..rectifiers import _arg


def _max_pool(nd: int, with_indices: Callable[..., Any], dispatch: bool) -> Callable[..., Any]:
    """Parse ``max_pool{nd}d(input, kernel_size, stride, padding, dilation, ceil_mode[, ri])``.

    ``torch.max_poolNd`` (``dispatch=False``) has no ``return_indices`` and writes "stride =
    kernel" as an empty list.
    """

    def parse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Callable, int, bool]:
        x = _arg(args, kwargs, 0, "input", None)
        kernel = _arg(args, kwargs, 1, "kernel_size", None)
        stride = _arg(args, kwargs, 2, "stride", None)
        if stride is not None and not isinstance(stride, int) and len(stride) == 0:
            stride = None
        padding = _arg(args, kwargs, 3, "padding", 0)
        dilation = _arg(args, kwargs, 4, "dilation", 1)
        ceil_mode = bool(_arg(args, kwargs, 5, "ceil_mode", False))
        indices = bool(_arg(args, kwargs, 6, "return_indices", False)) if dispatch else False

        def pool(t: Tensor) -> tuple[Tensor, Tensor]:
            return with_indices(t, kernel, stride, padding, dilation, ceil_mode)

        return x, pool, nd, indices

    return parse


def _adaptive_max_pool(nd: int, with_indices: Callable[..., Any]) -> Callable[..., Any]:
    def parse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Callable, int, bool]:
        x = _arg(args, kwargs, 0, "input", None)
        size = _arg(args, kwargs, 1, "output_size", None)
        indices = bool(_arg(args, kwargs, 2, "return_indices", False))

        def pool(t: Tensor) -> tuple[Tensor, Tensor]:
            return with_indices(t, size)

        return x, pool, nd, indices

    return parse


_POOLS: dict[Any, Callable[..., Any]] = {}
for _nd, _fn, _wi, _torch in (
    (1, F.max_pool1d, F.max_pool1d_with_indices, torch.max_pool1d),
    (2, F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d),
    (3, F.max_pool3d, F.max_pool3d_with_indices, torch.max_pool3d),
):
    _POOLS[_fn] = _max_pool(_nd, _wi, True)
    _POOLS[_wi] = _max_pool(_nd, _wi, True)
    _POOLS[_torch] = _max_pool(_nd, _wi, False)
for _nd, _afn, _awi in (
    (1, F.adaptive_max_pool1d, F.adaptive_max_pool1d_with_indices),
    (2, F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices),
    (3, F.adaptive_max_pool3d, F.adaptive_max_pool3d_with_indices),
):
    _POOLS[_afn] = _adaptive_max_pool(_nd, _awi)
    _POOLS[_awi] = _adaptive_max_pool(_nd, _awi)

# Layers whose positive and negative contributions RevealCancel separates: (input, weight,
# bias) first, the other arguments passed on unchanged.
_LAYERS = {
    F.linear: "linear",
    F.conv1d: "conv1d",
    F.conv2d: "conv2d",
    F.conv3d: "conv3d",
    F.conv_transpose1d: "conv_transpose1d",
    F.conv_transpose2d: "conv_transpose2d",
    F.conv_transpose3d: "conv_transpose3d",
}

# Linear in each input-dependent argument (the others constant): their gradient is the
# linear rule. Named as ``func.__name__``.
_LINEAR = frozenset(
    """
    conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d linear add __add__
    __radd__ __iadd__ add_ sub __sub__ __rsub__ __isub__ sub_ neg __neg__ neg_ positive __pos__
    cat concat concatenate stack hstack vstack dstack reshape view view_as flatten unflatten
    permute transpose transpose_ t swapaxes movedim contiguous clone __getitem__ __setitem__
    narrow select index_select gather take squeeze unsqueeze squeeze_ unsqueeze_ expand
    expand_as repeat tile broadcast_to chunk split split_with_sizes unbind tensor_split roll
    flip fliplr flipud rot90 mean sum nansum cumsum trace diagonal tril triu avg_pool1d
    avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d pad
    interpolate upsample upsample_nearest upsample_bilinear pixel_shuffle pixel_unshuffle
    channel_shuffle native_channel_shuffle unfold fold dropout dropout1d dropout2d dropout3d
    alpha_dropout feature_alpha_dropout to float double half bfloat16 type type_as cpu cuda
    real
    """.split()  # noqa: SIM905 (a word list reads better than 130 quoted strings)
)
# Linear when at most one operand depends on the input (a product with a constant).
_PRODUCTS = frozenset(
    """
    mul __mul__ __rmul__ __imul__ mul_ multiply matmul __matmul__ __rmatmul__ mm bmm einsum
    tensordot outer inner dot vdot kron baddbmm addmm addbmm bilinear
    """.split()  # noqa: SIM905 (a word list reads better than 130 quoted strings)
)
# Linear in the numerator only.
_DIVISIONS = frozenset(("div", "__truediv__", "__itruediv__", "div_", "divide", "true_divide"))
# Calls that read a tensor without computing a floating tensor from it.
_INERT = frozenset(
    """
    size dim numel __len__ __iter__ __bool__ __format__ __repr__ __hash__ __eq__ __ne__ __lt__
    __le__ __gt__ __ge__ eq ne lt le gt ge argmax argmin argsort isfinite isnan isinf equal
    allclose isclose any all item tolist shape data_ptr stride is_contiguous requires_grad_
    untyped_storage storage_offset element_size nonzero __get__
    """.split()  # noqa: SIM905 (a word list reads better than 130 quoted strings)
)


def _name(func: Any) -> str:
    return str(getattr(func, "__name__", None) or func)


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    """Return the tensors among a call's arguments, also in lists and tuples (``torch.cat``)."""
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, list | tuple):
            found.extend(v for v in value if isinstance(v, Tensor))
    return found


def _outputs(result: Any) -> list[Tensor]:
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, list | tuple):
        return [r for r in result if isinstance(r, Tensor)]
    return []
