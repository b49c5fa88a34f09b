"""The mean-shifted twin of a model, built for :func:`salience.metrics.input_invariance`.

``twin(x + shift) == model(x)``: a deep copy whose first layer absorbs the shift in its bias,
``b - W shift``, and whose padding before that layer pads with the shift (Kindermans et al.,
see :mod:`salience.metrics.invariance` for exactly what is built and refused). Public through
:func:`salience.metrics.mean_shift_twin`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import all_finite, check_inputs, copy_model
from .._forward import ForwardArgs, model_scope
from ..hooks import forward_hooks

ShiftLike = float | Sequence[float] | Tensor
"""A constant shift: a number, or one number per input channel."""

TWIN_TOLERANCE = 1e-4
"""Largest relative output difference ``|twin(x + m) - model(x)| / max |model(x)|`` accepted."""

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_PASS_THROUGH = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
    nn.modules.padding._CircularPadNd,
)
_DROPOUT = (nn.modules.dropout._DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout)
_CONSTANT_PAD = nn.modules.padding._ConstantPadNd


class _ShiftPad(nn.Module):
    """Constant padding with one value per channel: ``value[c]`` around channel ``c``."""

    value: Tensor

    def __init__(self, padding: Sequence[int], value: Tensor) -> None:
        super().__init__()
        self.padding = tuple(int(p) for p in padding)
        self.register_buffer("value", value, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Pad ``x`` (``(N, C, ...)``) with ``value`` per channel."""
        out = F.pad(x, self.padding)
        inside = F.pad(torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device),
                       self.padding)  # fmt: skip
        value = self.value.to(x.dtype).view(1, -1, *([1] * (x.ndim - 2)))
        return out + (1 - inside) * value

    def extra_repr(self) -> str:
        return f"padding={self.padding}, value={self.value.tolist()}"


class _ShiftPadConv1d(nn.Conv1d):
    """A ``Conv1d`` whose zero padding became ``shift_pad`` (padding with the input shift)."""

    shift_pad: _ShiftPad

    def forward(self, x: Tensor) -> Tensor:
        """Pad with the shift, then convolve unpadded."""
        return self._conv_forward(self.shift_pad(x), self.weight, self.bias)


class _ShiftPadConv2d(nn.Conv2d):
    """A ``Conv2d`` whose zero padding became ``shift_pad`` (padding with the input shift)."""

    shift_pad: _ShiftPad

    def forward(self, x: Tensor) -> Tensor:
        """Pad with the shift, then convolve unpadded."""
        return self._conv_forward(self.shift_pad(x), self.weight, self.bias)


class _ShiftPadConv3d(nn.Conv3d):
    """A ``Conv3d`` whose zero padding became ``shift_pad`` (padding with the input shift)."""

    shift_pad: _ShiftPad

    def forward(self, x: Tensor) -> Tensor:
        """Pad with the shift, then convolve unpadded."""
        return self._conv_forward(self.shift_pad(x), self.weight, self.bias)


_SHIFT_PAD_CONV: dict[type, type] = {
    nn.Conv1d: _ShiftPadConv1d,
    nn.Conv2d: _ShiftPadConv2d,
    nn.Conv3d: _ShiftPadConv3d,
}


@dataclass(frozen=True)
class _Twin:
    model: nn.Module
    shift: Tensor  # (C,) float64, or () for a scalar shift
    layer: str
    padding: tuple[str, ...]
    output_change: float


def _as_shift(shift: ShiftLike, inputs: Tensor) -> Tensor:
    channels = inputs.shape[1]
    if isinstance(shift, numbers.Real) and not isinstance(shift, bool):
        s = torch.tensor(float(shift), dtype=torch.float64)
    elif isinstance(shift, Tensor) or (isinstance(shift, Sequence) and not isinstance(shift, str)):
        s = torch.as_tensor(shift, dtype=torch.float64).detach().cpu().flatten()
        if s.numel() == 1:
            s = s.reshape(())
        elif s.numel() != channels:
            raise ValueError(
                f"shift must be a number or one number per input channel ({channels}); got "
                f"{s.numel()} values"
            )
    else:
        raise TypeError(f"shift must be a number or a sequence of numbers, got {shift!r}")
    if not all_finite(s):
        raise ValueError(f"shift must be finite, got {s.tolist()}")
    return s


def _per_channel(shift: Tensor, channels: int) -> Tensor:
    return shift.expand(channels).clone() if shift.ndim == 0 else shift


def _shifted(x: Tensor, shift: Tensor) -> Tensor:
    s = shift.to(x.device, x.dtype)
    if s.ndim == 1:
        s = s.view(1, -1, *([1] * (x.ndim - 2)))
    return x + s


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _absorb(
    layer: nn.Linear | nn.modules.conv._ConvNd, shift: Tensor, layer_input: Tensor, inputs: Tensor
) -> Tensor:
    """``W m`` of the first layer, float64, one value per output unit."""
    weight = layer.weight.detach().double().cpu()
    if isinstance(layer, nn.Linear):
        if shift.ndim == 0:
            return weight.sum(dim=1) * shift
        if layer_input.ndim != 2 or inputs.ndim < 2:
            raise ValueError(
                "a per-channel shift can be absorbed by a first linear layer only when it is fed "
                "the flattened input (N, C*H*W); use a scalar shift"
            )
        per_pixel = layer_input.shape[1] // shift.numel()
        if per_pixel * shift.numel() != layer_input.shape[1]:
            raise ValueError(
                f"the first linear layer takes {layer_input.shape[1]} features, not a whole number "
                f"per input channel ({shift.numel()}); use a scalar shift"
            )
        return weight @ shift.repeat_interleave(per_pixel)
    # convolution: weight (out, in / groups, *kernel)
    groups = layer.groups
    out_channels, in_per_group = weight.shape[:2]
    kernel_sum = weight.flatten(2).sum(dim=2)  # (out, in / groups)
    s = _per_channel(shift, in_per_group * groups).view(groups, 1, in_per_group)
    per_group = kernel_sum.view(groups, out_channels // groups, in_per_group)
    return (per_group * s).sum(dim=2).reshape(out_channels)


def _build_twin(
    model: nn.Module,
    inputs: Tensor,
    shift: ShiftLike,
    forward_args: ForwardArgs,
) -> _Twin:
    if not isinstance(model, nn.Module):
        raise TypeError(f"the mean-shift twin needs an nn.Module, got {type(model).__name__}")
    check_inputs(inputs)
    x = inputs.detach()
    s = _as_shift(shift, x)
    twin = copy_model(model, "the twin is built from a copy")

    events: list[tuple[str, nn.Module, Any]] = []
    found: list[str] = []

    def hook(name: str, module: nn.Module, args: Any, output: Any) -> None:
        if found:
            return
        first = args[0] if args else None
        events.append((name, module, first.detach() if isinstance(first, Tensor) else first))
        if isinstance(module, _LAYERS):
            found.append(name)

    # the modules a forward pass runs on the input (a parametrization runs when a layer reads
    # its weight: it computes the weight, not the input)
    watched = [(n, m) for n, m in twin.named_modules() if ".parametrizations." not in f".{n}."]
    with (
        model_scope(twin, x, forward_args=forward_args) as fwd,
        torch.no_grad(),
        forward_hooks(watched, hook),
    ):
        fwd(x.clone())
    if not found:
        raise ValueError(
            "the model's forward pass runs no nn.Conv1d/2d/3d or nn.Linear module: there is no "
            "first layer whose bias could absorb the shift"
        )
    layer_name = found[0]
    layer = twin.get_submodule(layer_name)
    assert isinstance(layer, nn.Linear | nn.modules.conv._ConvNd)  # one of _LAYERS
    layer_input = events[-1][2]
    channels = x.shape[1]
    shifted_pads: list[str] = []
    for name, module, _ in events[:-1]:
        if isinstance(module, _CONSTANT_PAD):
            value = torch.as_tensor(float(module.value), dtype=torch.float64)
            shift_pad = _ShiftPad(module.padding, value + _per_channel(s, channels))
            _set_module(twin, name, shift_pad.to(_device_of(layer)))
            shifted_pads.append(name)
            continue
        if isinstance(module, _PASS_THROUGH):
            continue
        if isinstance(module, _DROPOUT) and not module.training:
            continue
        kind = type(module).__name__
        raise ValueError(
            f"the input goes through {name or 'the model'!r} ({kind}) before the first layer "
            f"{layer_name!r}: a constant shift can only be absorbed by the first layer's bias "
            "when nothing but padding, flattening or identity comes before it"
        )
    if isinstance(layer, nn.modules.conv._ConvNd):
        if layer.transposed:
            raise ValueError(
                f"the first layer {layer_name!r} is a transposed convolution: the shift it sees "
                "depends on the output position, a bias cannot absorb it"
            )
        has_padding = layer.padding == "same" or any(int(p) for p in _padding(layer))
        if has_padding and layer.padding_mode == "zeros":
            cls = _SHIFT_PAD_CONV.get(type(layer))
            if cls is None:
                raise ValueError(
                    f"the first layer {layer_name!r} ({type(layer).__name__}) pads with zeros "
                    "inside its own forward: the twin would need to pad with the shift there. "
                    "Only plain nn.Conv1d/2d/3d and explicit padding modules are supported"
                )
            pad = list(layer._reversed_padding_repeated_twice)
            layer.padding = (0,) * len(layer.kernel_size)
            layer.__class__ = cls
            layer.shift_pad = _ShiftPad(pad, _per_channel(s, channels)).to(_device_of(layer))
            shifted_pads.append(layer_name)
    absorbed = _absorb(layer, s, layer_input, x)
    with torch.no_grad():
        old = layer.bias.detach().double().cpu() if layer.bias is not None else 0.0
        bias = (old - absorbed).to(layer.weight.device, layer.weight.dtype)
        layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)

    # Verification: the twin on shifted inputs computes the model's outputs.
    with torch.no_grad():
        with model_scope(model, x, forward_args=forward_args) as fwd:
            expected = fwd(x.clone())
        with model_scope(twin, x, forward_args=forward_args) as fwd:
            got = fwd(_shifted(x, s))
    if not (isinstance(expected, Tensor) and isinstance(got, Tensor)):
        raise TypeError("the model must return a tensor to verify its twin")
    scale = float(expected.detach().abs().max()) or 1.0
    change = float((got - expected).abs().max()) / scale
    if not change <= TWIN_TOLERANCE:
        raise ValueError(
            f"the mean-shift twin does not reproduce the model's outputs (largest difference "
            f"{change:.2e} of the largest output): the input must reach the first layer "
            f"{layer_name!r} and nothing else. A function applied to it in forward (e.g. a "
            "normalization written as x * a + b), a skip connection from the input, or a "
            "model in training mode (dropout) breaks the twin"
        )
    return _Twin(twin, s, layer_name, tuple(shifted_pads), change)


def _padding(layer: nn.modules.conv._ConvNd) -> tuple[int, ...]:
    return tuple(layer.padding) if not isinstance(layer.padding, str) else ()


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
