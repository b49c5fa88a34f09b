r"""Projecting one activation back to pixels: the DeconvNet of Zeiler & Fergus (2013).

:func:`reconstruct` runs the model to a layer, keeps only the strongest activation of a channel
(or of the whole layer) and zeroes the rest, and maps that single activation back to the
input with the DeconvNet rules:

- at a rectifier, the backward signal is rectified, :math:`R_l = \max(R_{l+1}, 0)`, whatever
  the sign of the forward input (:func:`salience.hooks.rectifier_rule` with ``"deconvnet"``,
  which finds every spelling of a rectifier: ``nn.ReLU``, ``ReLU6``, ``clamp(min=0)``, ...);
- max pooling is undone through the *switches* of the forward pass, the positions of the
  maxima: that is exactly what autograd's max-pool backward does;
- convolutions are undone with their transposes (the same filters, flipped), which is what
  autograd's convolution backward does. Biases play no part, as in the paper.

The DeconvNet rule at rectifiers ignores the forward pass, so the image enters the projection
only through the max-pooling switches and through which unit is chosen. In a network without
max pooling (EfficientNet, MobileNet, most modern CNNs) the projection of a given unit is the
same for every image, up to the activation's value: it shows what the unit responds to, not
what it found in this image (guided backprop, :func:`salience.guided_backprop`, keeps the
forward gating).

The projection of a unit is non-zero only inside its **receptive field**, the pixels the unit
can see. :func:`receptive_field` measures that box on the model itself, with no knowledge of
its architecture: NaN propagates through every convolution, pooling, normalisation and
activation (``0 * NaN`` is NaN), so a unit becomes NaN exactly when a NaN pixel lies in its
receptive field. Setting the first (or last) ``m`` rows or columns of the input to NaN and
bisecting on ``m`` finds each edge of the box in :math:`\lceil \log_2 H \rceil` passes, run
without gradients and stopped at the layer. Convolutions run without cuDNN during the probe,
whose Winograd and FFT algorithms would spread a NaN over a whole tile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_inputs, check_model
from .._forward import ForwardArgs, model_scope
from ..hooks import forward_hooks, rectifier_rule, rule_left
from ..layers import LayerLike, find_layer
from ..rectifiers import Activations

__all__ = ["Reconstruction", "receptive_field", "reconstruct"]

_METHOD = "reconstruct (the DeconvNet projection of Zeiler & Fergus, which needs rectifiers)"
_PROBE_BATCH = 32  # NaN probes per forward pass


@dataclass(frozen=True)
class Reconstruction:
    """The DeconvNet projection of one activation per image, and where that activation is.

    Attributes:
        projection: ``(N, C, H, W)``, the projection in input space (``None`` only in a
            :func:`~salience.features.top_activating` result made without reconstructions).
        layer: The dotted name of the layer.
        channel: ``(N,)`` the channel of the projected activation.
        position: ``(N, 2)`` its ``(y, x)`` in the layer's map.
        activation: ``(N,)`` its value.
        box: ``(N, 4)`` its receptive field in input pixels, ``(top, left, bottom, right)``,
            half-open: the patch is ``image[..., top:bottom, left:right]``.
        layer_calls: How many times the layer ran in the forward pass (the last call is used).
    """

    projection: Tensor | None
    layer: str
    channel: Tensor
    position: Tensor
    activation: Tensor
    box: Tensor
    layer_calls: int = 1

    def patch(self, images: Tensor, index: int = 0) -> Tensor:
        """Crop the receptive field of image ``index`` from ``images`` ``(N, C, H, W)``."""
        top, left, bottom, right = (int(v) for v in self.box[index])
        return images[index, :, top:bottom, left:right]


class _Stop(Exception):
    """Raised by the probe hook once the layer has run: nothing after it is needed."""


def _spatial_error(name: str, output: Any) -> ValueError:
    shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
    return ValueError(
        f"layer {name!r} is not spatial: its output is {shape}, but a reconstruction needs an "
        "(N, C, h, w) feature map. Choose a convolution, pooling or activation layer before "
        "the global pooling"
    )


def _layer_output(
    model: Any, name: str, module: nn.Module, x: Tensor, call: int | None
) -> tuple[Tensor, int]:
    """Run the model on ``x`` and return the layer's output at ``call`` (default the last).

    With ``call`` given, the forward pass stops there.
    """
    outputs: list[Any] = []

    def record(_name: str, _module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        outputs.append(output)
        if call is not None and len(outputs) == call:
            raise _Stop
        return output.clone() if isinstance(output, Tensor) else None

    try:
        with forward_hooks([(name, module)], record):
            model(x)
    except _Stop:
        pass
    if not outputs:
        raise ValueError(f"layer {name!r} did not run in the forward pass of the model")
    return outputs[-1], len(outputs)


def _probe_nan(
    model: Any, name: str, module: nn.Module, images: Tensor, units: Tensor, call: int
) -> Tensor:
    """Whether each unit ``(c, y, x)`` of ``units`` (one per image) is NaN, ``(P,)`` bool."""
    flags = []
    # cuDNN may pick Winograd or FFT convolutions, which spread a NaN over a whole tile; on
    # the CPU, PyTorch runs oneDNN's direct convolution.
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=False):
        for start in range(0, len(images), _PROBE_BATCH):
            chunk = images[start : start + _PROBE_BATCH]
            try:
                out, _ = _layer_output(model, name, module, chunk, call)
            except ValueError:
                raise
            except Exception as exc:
                raise ValueError(
                    "the receptive field is measured by NaN propagation, but the model "
                    f"failed on an input with NaN pixels ({type(exc).__name__}: {exc})"
                ) from exc
            c, y, x = units[start : start + _PROBE_BATCH].unbind(1)
            rows = torch.arange(len(chunk), device=out.device)
            flags.append(out[rows, c.to(out.device), y.to(out.device), x.to(out.device)].isnan())
    return torch.cat(flags).cpu()


def _receptive_boxes(
    model: Any, name: str, module: nn.Module, base: Tensor, units: Tensor, call: int
) -> Tensor:
    """Bisect each edge of the receptive field of every unit ``(c, y, x)``; ``(P, 4)`` boxes."""
    _, _, height, width = base.shape
    p = len(units)
    # Edge searches: (unit, kind); kinds 0..3 = top, left, bottom, right.
    kinds = torch.arange(4).repeat(p)
    owner = torch.arange(p).repeat_interleave(4)
    size = torch.tensor([height, width, height, width])[kinds]
    # top/left: the smallest m in [1, size] such that NaN in the first m rows/cols reaches the
    # unit; bottom/right: the largest m in [0, size - 1] such that NaN from m on reaches it.
    lo = torch.where(kinds < 2, torch.ones_like(size), torch.zeros_like(size))
    hi = torch.where(kinds < 2, size, size - 1)

    def probes(ms: Tensor, which: Tensor) -> Tensor:
        x = base.expand(len(which), -1, -1, -1).clone()
        for row, (kind, m) in enumerate(zip(kinds[which].tolist(), ms.tolist(), strict=True)):
            if kind == 0:
                x[row, :, :m, :] = float("nan")
            elif kind == 1:
                x[row, :, :, :m] = float("nan")
            elif kind == 2:
                x[row, :, m:, :] = float("nan")
            else:
                x[row, :, :, m:] = float("nan")
        return x

    # The unit must see some pixel at all: the whole image NaN.
    whole = torch.full_like(base[:1], float("nan")).expand(p, -1, -1, -1)
    blind = ~_probe_nan(model, name, module, whole, units, call)
    if bool(blind.any()):
        raise ValueError(
            f"unit {tuple(units[int(blind.nonzero()[0])].tolist())} of layer {name!r} does not "
            "depend on any input pixel (NaN does not reach it), so it has no receptive field"
        )
    while True:
        active = (lo < hi).nonzero().flatten()
        if not len(active):
            break
        up = kinds[active] < 2
        mid = torch.where(up, (lo[active] + hi[active]) // 2, (lo[active] + hi[active] + 1) // 2)
        hit = _probe_nan(model, name, module, probes(mid, active), units[owner[active]], call)
        # top/left: hit -> the edge is below mid (hi = mid), else lo = mid + 1
        # bottom/right: hit -> the edge is at or after mid (lo = mid), else hi = mid - 1
        lo[active] = torch.where(
            up, torch.where(hit, lo[active], mid + 1), torch.where(hit, mid, lo[active])
        )
        hi[active] = torch.where(
            up, torch.where(hit, mid, hi[active]), torch.where(hit, hi[active], mid - 1)
        )
    edges = lo.view(p, 4).clone()
    edges[:, :2] -= 1  # first NaN row m reaches the unit -> the top row is m - 1
    edges[:, 2:] += 1  # half-open
    return edges


def receptive_field(
    model: nn.Module,
    inputs: Tensor,
    layer: LayerLike,
    units: Sequence[tuple[int, int, int]] | Tensor,
) -> Tensor:
    """Measure the receptive field of units of a layer on the model, by NaN propagation.

    A unit ``(c, y, x)`` of the layer's ``(N, C, h, w)`` output sees input pixel ``p`` when
    a NaN at ``p`` makes the unit NaN. Each edge of the box is found by bisection over the
    number of NaN rows (or columns) at that side of the image (see the module documentation).
    What it measures is the structural receptive field, independent of the weights and of the
    image (``inputs[0]`` serves as the probe's background, for models whose control flow
    depends on values).

    Args:
        model: The model (in eval mode).
        inputs: ``(N, C, H, W)``: the input size, and ``inputs[0]`` as background.
        layer: The layer, a submodule or its dotted name.
        units: ``(P, 3)`` units ``(channel, y, x)`` of the layer's map.

    Returns:
        ``(P, 4)`` integer boxes ``(top, left, bottom, right)``, half-open, clipped to the
        image.

    Raises:
        ValueError: an unknown or non-spatial layer, a unit outside the map, a unit no pixel
            reaches, or a model that fails on NaN inputs.
    """
    check_model(model)
    check_inputs(inputs)
    name, module = find_layer(model, layer)
    units = torch.as_tensor(units, dtype=torch.long).reshape(-1, 3)
    base = inputs[:1].detach()
    with model_scope(model, base):
        with torch.no_grad():
            output, calls = _layer_output(model, name, module, base.clone(), None)
        if not isinstance(output, Tensor) or output.ndim != 4:
            raise _spatial_error(name, output)
        shape = torch.tensor(output.shape[1:])
        bad = ((units < 0) | (units >= shape)).any(1)
        if bool(bad.any()):
            raise ValueError(
                f"unit {tuple(units[int(bad.nonzero()[0])].tolist())} is outside the "
                f"{tuple(output.shape[1:])} (channels, h, w) map of layer {name!r}"
            )
        return _receptive_boxes(model, name, module, base, units, calls)


def reconstruct(
    model: nn.Module,
    inputs: Tensor,
    layer: LayerLike,
    channel: int | None = None,
    *,
    activations: Activations = "rectifiers",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
) -> Reconstruction:
    r"""Project the strongest activation of a layer back to pixels (Zeiler & Fergus 2013).

    For each image, the layer's output :math:`A` ``(K, h, w)`` is computed; the strongest
    activation :math:`A_{c,y,x}` of ``channel`` (of any channel when ``channel`` is ``None``)
    is kept with its value, every other activation is set to zero, and the result is mapped to
    the input by the DeconvNet: rectified backward signal at every rectifier, max pooling
    undone through the forward switches, convolutions by their transposes. The projection
    shows which pixel pattern, and in which place, caused that activation; it is non-zero
    only inside the unit's receptive field (:func:`receptive_field`).

    A layer that runs several times in the forward pass is read at its last call.

    Args:
        model: A PyTorch model written in Python (not TorchScript) that uses rectifiers.
        inputs: ``(N, C, H, W)`` preprocessed images.
        layer: The layer, a submodule or its dotted name, whose output is an
            ``(N, K, h, w)`` map.
        channel: The channel whose strongest activation is projected; ``None``: the strongest
            activation of the layer.
        activations: Where the DeconvNet rule applies: ``"rectifiers"`` (the paper), or as in
            :func:`salience.deconvnet` (an extension to other activations, not the paper's).
        forward_args: Extra arguments for the model (see :func:`salience.gradient`).
        allow_tf32: Let CUDA use TF32 (faster, less exact); off by default.

    Returns:
        A :class:`Reconstruction`: the projection, the unit (channel, position, value) and its
        receptive field box in pixels.

    Raises:
        ValueError: a model with no rectifier (DeconvNet needs rectifiers; the message names
            the activations the model uses), a layer whose output is not an ``(N, K, h, w)``
            map, an unknown layer, or a channel outside the layer.
        TypeError: a TorchScript model, whose rectifiers cannot be reached.

    References:
        Zeiler, Fergus. Visualizing and Understanding Convolutional Networks. ECCV 2014,
        arXiv:1311.2901.
    """
    if channel is not None and (isinstance(channel, bool) or not isinstance(channel, int)):
        raise TypeError(f"channel must be an int or None, got {channel!r}")
    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as forward:
        name, module = find_layer(model, layer)
        n = inputs.shape[0]
        x = inputs.detach().requires_grad_(True)
        outputs: list[Any] = []

        def record(_name: str, _module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            outputs.append(output)
            return output.clone() if isinstance(output, Tensor) else None

        with torch.enable_grad():
            with (
                rectifier_rule(model, "deconvnet", activations=activations, method=_METHOD) as mode,
                forward_hooks([(name, module)], record),
            ):
                forward(x.clone())
                if outputs:  # the rectifiers below the layer the mode could not see: at nodes
                    assert mode is not None  # the deconvnet rule
                    rule_left(outputs[-1], mode, _METHOD)
            if not outputs:
                raise ValueError(f"layer {name!r} did not run in the forward pass of the model")
            a = outputs[-1]
            if not isinstance(a, Tensor) or a.ndim != 4 or a.shape[0] != n:
                raise _spatial_error(name, a)
            k, h, w = a.shape[1:]
            if channel is not None and not 0 <= channel < k:
                raise ValueError(f"channel {channel} is out of range: layer {name!r} has {k}")
            values = a.detach()
            rows = torch.arange(n, device=a.device)
            if channel is None:
                best, flat = values.flatten(1).max(1)
                chosen = flat // (h * w)
                flat = flat % (h * w)
            else:
                best, flat = values[:, channel].flatten(1).max(1)
                chosen = torch.full_like(flat, channel)
            ys, xs = flat // w, flat % w
            seed = torch.zeros_like(values)
            seed[rows, chosen, ys, xs] = best
            if not a.requires_grad:
                raise ValueError(
                    f"layer {name!r} does not depend on the inputs through autograd, so "
                    "nothing can be projected back"
                )
            # d(sum(A * seed)) / dx is the backward pass of the seed (the seed is a constant).
            (projection,) = torch.autograd.grad((a * seed).sum(), x, allow_unused=True)
        if projection is None:
            projection = torch.zeros_like(inputs)
        units = torch.stack([chosen, ys, xs], 1).cpu()
        boxes = torch.zeros((n, 4), dtype=torch.long)
        unique, inverse = units.unique(dim=0, return_inverse=True)
        found = _receptive_boxes(model, name, module, inputs[:1].detach(), unique, len(outputs))
        boxes = found[inverse]
    return Reconstruction(
        projection=projection.detach(),
        layer=name,
        channel=chosen.cpu(),
        position=torch.stack([ys, xs], 1).cpu(),
        activation=best.cpu(),
        box=boxes,
        layer_calls=len(outputs),
    )
