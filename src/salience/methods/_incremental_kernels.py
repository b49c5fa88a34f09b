"""Kernels of exact incremental inference: crops, pastes and faster runs of boxes.

Split from :mod:`salience.methods.incremental` (which plans the boxes and runs the passes):
the copies between clean activations and boxes, and the runs of local nodes made cheaper
without changing their numbers beyond float rounding — batch normalisation folded into
the convolution before it, activations in place, depthwise networks channels-last, and no
crop-and-paste where a box is its input's box or the whole map.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

if TYPE_CHECKING:
    from .incremental import IncrementalPlan, _Box, _Layer


def _conv(
    weight: Tensor,
    bias: Tensor | None,
    stride: Any,
    dilation: Any,
    groups: int,
    last: bool = False,
) -> Callable[[Tensor], Tensor]:
    """Return a convolution without padding (crops come padded), channels-last if ``last``.

    oneDNN runs depthwise convolutions on channels-last tensors about twice as fast on the CPU
    (Lite0: 1.7 ms against 3.7 ms for a 672-channel 5x5 depthwise layer at 14 x 14, batch
    10; 1x1 convolutions 1.1x). The same numbers up to float rounding; the weights are
    copied once per call of the method, the model is not touched.
    """
    fmt = torch.channels_last if last else torch.contiguous_format
    w = weight.detach().contiguous(memory_format=fmt)
    b = None if bias is None else bias.detach()

    def run(t: Tensor) -> Tensor:
        return F.conv2d(t.contiguous(memory_format=fmt), w, b, stride, 0, dilation, groups)

    return run


def _last(a: Tensor) -> Tensor:
    """Return ``a`` channels-last if it is a batch of maps (see :func:`_conv`)."""
    return a.contiguous(memory_format=torch.channels_last) if a.ndim == 4 else a


def _pad(a: Tensor, layer: _Layer) -> Tensor:
    """Pad ``a`` as ``layer`` pads its input, keeping ``a``'s memory format."""
    top, bottom, left, right = layer.pad
    if not (top or bottom or left or right):
        return a
    n, c, h, w = a.shape
    fmt = torch.channels_last if _is_last(a) else torch.contiguous_format
    size = (n, c, h + top + bottom, w + left + right)
    out = torch.empty(size, dtype=a.dtype, device=a.device, memory_format=fmt)
    out.fill_(layer.pad_value)
    out[:, :, top : top + h, left : left + w] = a
    return out


def _is_last(a: Tensor) -> bool:
    return a.ndim == 4 and a.is_contiguous(memory_format=torch.channels_last)


_INPLACE: dict[type, Callable[[nn.Module], Callable[[Tensor], Tensor]]] = {
    nn.ReLU: lambda m: torch.relu_,
    nn.ReLU6: lambda m: lambda t: F.hardtanh_(t, 0.0, 6.0),
    nn.Hardtanh: lambda m: lambda t: F.hardtanh_(t, m.min_val, m.max_val),  # type: ignore[arg-type]
    nn.SiLU: lambda m: lambda t: F.silu(t, inplace=True),
    nn.Hardswish: lambda m: lambda t: F.hardswish(t, inplace=True),
}


def _fused(
    plan: IncrementalPlan, local: list[fx.Node], frontier: list[fx.Node], last: bool
) -> dict[fx.Node, Callable[[Tensor], Tensor]]:
    """Cheaper runs of some local nodes on boxes, the same numbers to float rounding.

    A convolution whose only user is an eval-mode ``BatchNorm2d`` runs with the
    normalisation folded into its weights (computed in float64), and the normalisation
    becomes the identity; with ``last``, convolutions run channels-last (:func:`_conv`); an
    activation whose input nobody else reads (and that is not materialised) runs in place.
    Only on boxes: the clean activations come from the model.
    """
    runs: dict[fx.Node, Callable[[Tensor], Tensor]] = {}
    inside, edge = set(local), set(frontier)
    for node in local:
        layer = plan.layers[node]
        users = list(node.users)
        if layer.conv is not None and len(users) == 1 and users[0] in inside:
            bn = plan.layers[users[0]].run
            if isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and not bn.training:
                assert bn.running_mean is not None
                assert bn.running_var is not None
                weight, bias, stride, dilation, groups = layer.conv
                scale = torch.rsqrt(bn.running_var.double() + bn.eps)
                if bn.weight is not None:
                    scale = scale * bn.weight.double()
                shift = -bn.running_mean.double() * scale
                if bias is not None:
                    shift = shift + bias.double() * scale
                if bn.bias is not None:
                    shift = shift + bn.bias.double()
                folded = weight.double() * scale.view(-1, 1, 1, 1)
                runs[node] = _conv(
                    folded.to(weight.dtype),
                    shift.to(weight.dtype),
                    stride,
                    dilation,
                    groups,
                    last,
                )
                runs[users[0]] = _identity
        if layer.conv is not None and last and node not in runs:
            runs[node] = _conv(*layer.conv, last=True)
        # In place only on a fresh tensor: a convolution's output, or a normalisation's
        # (folded: the output of a convolution that only it reads).
        source = layer.inputs[0] if layer.inputs else None
        make = _INPLACE.get(type(layer.run))
        if (
            make is not None
            and source in inside
            and source not in edge
            and len(source.users) == 1
            and (
                plan.layers[source].conv is not None
                or isinstance(plan.layers[source].run, nn.BatchNorm2d)
            )
        ):
            runs[node] = make(layer.run)  # type: ignore[arg-type]
    return runs


def _groups(layer: _Layer) -> int:
    return 1 if layer.conv is None else int(layer.conv[4])


def _identity(t: Tensor) -> Tensor:
    return t


def _shortcuts(
    plan: IncrementalPlan,
    clean: dict[fx.Node, Tensor],
    boxes: dict[fx.Node, _Box],
    local: list[fx.Node],
) -> dict[fx.Node, Any]:
    """Where a node's input needs no crop-and-paste (the same for every window).

    A window layer whose source box is exactly its crop (1x1 convolutions, mostly) reads the
    source's values as they are (``"same"``); one whose boxes cover its whole input and
    output pads the source's values (``"whole"``). A sum reads the values of a term whose box
    is its own (``True``). Copies saved, the same numbers.
    """
    found: dict[fx.Node, Any] = {}
    for node in local:
        layer, box = plan.layers[node], boxes[node]
        if layer.kind == "window":
            src = boxes[layer.inputs[0]]
            in_h, in_w = clean[layer.inputs[0]].shape[-2:]
            out_h, out_w = clean[node].shape[-2:]
            k, s, d, p = layer.kernel, layer.stride, layer.dilation, layer.pad
            ih = (box.height - 1) * s[0] + d[0] * (k[0] - 1) + 1
            iw = (box.width - 1) * s[1] + d[1] * (k[1] - 1) + 1
            if (
                (src.height, src.width) == (ih, iw)
                and bool((src.y + p[0] == box.y * s[0]).all())
                and bool((src.x + p[2] == box.x * s[1]).all())
            ):
                found[node] = "same"
            elif (src.height, src.width, box.height, box.width) == (in_h, in_w, out_h, out_w):
                found[node] = "whole"
            else:
                found[node] = ""
        elif layer.kind == "add":
            found[node] = tuple(
                (boxes[a].height, boxes[a].width) == (box.height, box.width)
                and torch.equal(boxes[a].y, box.y)
                and torch.equal(boxes[a].x, box.x)
                for a in layer.inputs
            )
    return found


def _row_wise(device: torch.device) -> bool:
    """Whether crops and pastes go row by row (the CPU) or as one indexed copy (elsewhere).

    On the CPU a slice per row copies far less than an index grid, for the few rows of a
    pass. On a GPU the coordinates would have to come back to the host (a synchronisation per
    box layer) and each row would be a kernel launch: one gather or one masked write there.
    """
    return device.type == "cpu"


def _gather(a: Tensor, samples: Tensor, cy: Tensor, cx: Tensor, h: int, w: int) -> Tensor:
    """Crops ``a[samples[r], :, cy[r]:cy[r]+h, cx[r]:cx[r]+w]``: ``(R, C, h, w)``.

    The crops lie inside ``a``. Same memory format as ``a``.
    """
    fmt = torch.channels_last if _is_last(a) else torch.contiguous_format
    if not _row_wise(a.device):
        iy = cy[:, None] + torch.arange(h, device=a.device)
        ix = cx[:, None] + torch.arange(w, device=a.device)
        # advanced indices around a slice: (R, h, w, C), the channels-last order
        crops = a[samples[:, None, None], :, iy[:, :, None], ix[:, None, :]]
        return crops.permute(0, 3, 1, 2).contiguous(memory_format=fmt)
    rows = zip(samples.tolist(), cy.tolist(), cx.tolist(), strict=True)
    size = (samples.numel(), a.shape[1], h, w)
    out = torch.empty(size, dtype=a.dtype, device=a.device, memory_format=fmt)
    for r, (i, y, x) in enumerate(rows):
        out[r] = a[i, :, y : y + h, x : x + w]
    return out


def _paste(target: Tensor, values: Tensor, oy: Tensor, ox: Tensor) -> None:
    """``target[r, :, oy[r] + i, ox[r] + j] = values[r, :, i, j]`` where inside ``target``."""
    h, w = values.shape[-2:]
    height, width = target.shape[-2:]
    if not _row_wise(target.device):
        # Each target entry pulls the value that lands on it, if any: no host coordinates.
        iy = torch.arange(height, device=target.device) - oy[:, None]  # (R, height)
        ix = torch.arange(width, device=target.device) - ox[:, None]
        inside = ((iy >= 0) & (iy < h))[:, :, None] & ((ix >= 0) & (ix < w))[:, None, :]
        rows = torch.arange(values.shape[0], device=target.device)[:, None, None]
        pulled = values[rows, :, iy.clamp(0, h - 1)[:, :, None], ix.clamp(0, w - 1)[:, None, :]]
        target.copy_(torch.where(inside[:, None], pulled.permute(0, 3, 1, 2), target))
        return
    for r, (y, x) in enumerate(zip(oy.tolist(), ox.tolist(), strict=True)):
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + h, height), min(x + w, width)
        if y1 > y0 and x1 > x0:
            target[r, :, y0:y1, x0:x1] = values[r, :, y0 - y : y1 - y, x0 - x : x1 - x]
