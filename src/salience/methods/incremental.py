"""Exact incremental inference for occlusion (Krypton; Nakandala, Kumar, Papakonstantinou 2019).

An occluded patch changes a convolutional layer's activations only inside the patch's
projection through the layers before it. Each occluded image is therefore computed from the
clean activations, recomputing at every *local* layer only the box of positions the patch
can reach, and the rest of the network (global pooling, linear heads, anything that mixes
globally) runs in full on the patched activations. It is the same forward pass computed in
another order: the result equals full recomputation to float rounding.

How (a first version). The model is traced with :mod:`torch.fx`. Starting from the image, a
node is *local* when it is a supported layer whose inputs are all local, and when its box
covers at most ``max_fraction`` of its map (Krypton's cut-off; by default 1: on
EfficientNet-Lite0 even whole-map boxes at the last stages run faster than the interpreted
rest of the graph, 10.9 s against 16.0 s with a cut-off of 0.5).

Supported: ``Conv2d`` and ``F.conv2d`` (zero padding, any stride, dilation,
groups), ``MaxPool2d`` and ``AvgPool2d`` (no ``ceil_mode``; average pooling counting the
padding), ``ZeroPad2d`` and ``ConstantPad2d`` (TensorFlow-style asymmetric "same" padding),
``BatchNorm2d`` in eval mode, elementwise activations, ``Dropout`` in eval mode, ``Identity``,
and the sum of two local tensors (residual connections). A local node used by a non-local one
is materialised (its clean activation with the box pasted in) and the rest of the graph runs
on it. Anything else — a model fx cannot trace, extra forward arguments, training mode,
forward hooks (they would not see full passes), no local convolution or pooling — falls back
to full forward passes, and the reason is reported.

Boxes: for each window, a box (start, size) per axis and per local node holds every position
whose value can differ from the clean one. All windows share one size per node (the largest;
a box is shifted inside the map where needed — recomputing unchanged positions is harmless),
so that the rows of a pass form one tensor.

Speed (:mod:`salience.methods._incremental_kernels`): on boxes, batch normalisation is
folded into the convolution before it, activations run in place, depthwise networks run
channels-last, and a box that is its input's box or the whole map needs no crop-and-paste
(Lite0, 729 windows, one thread: 10.8 s of CPU before these, 6.6 s after). These change
float rounding only (scores within 1e-6 relative of full recomputation on Lite0; bit for bit
on networks without depthwise convolutions and batch normalisation).

Krypton's approximate mode, projective-field thresholding, is the ``tau`` of
:func:`occlusion_scores` (:mod:`salience.methods._incremental_approx` adds drill-down).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .._containers import map_tensors, tensors_in
from ._incremental_kernels import _conv, _fused, _gather, _groups, _last, _pad, _paste, _shortcuts

__all__ = [
    "IncrementalPlan",
    "occlusion_scores",
    "pass_count",
    "plan_incremental",
    "record_pass",
    "windows_per_pass",
]

_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Mish,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.BatchNorm2d,
)
_ELEMENTWISE_FUNCTIONS: set[Any] = {
    F.relu,
    torch.relu,
    F.relu6,
    F.silu,
    F.gelu,
    torch.sigmoid,
    torch.tanh,
    F.hardswish,
}
_ADD = {operator.add, torch.add}
_CONV = {F.conv2d, torch.conv2d}


@dataclass(frozen=True)
class _Layer:
    """A supported node: how it maps boxes and how it runs on a crop or a box."""

    kind: str  # "window" (reads a neighbourhood), "elementwise" or "add"
    run: Callable[..., Tensor]
    inputs: tuple[fx.Node, ...]
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, bottom, left, right
    dilation: tuple[int, int] = (1, 1)
    pad_value: float = 0.0
    conv: tuple[Tensor, Tensor | None, Any, Any, int] | None = None  # weight, bias, ...


@dataclass
class IncrementalPlan:
    """A traced model and the supported nodes that may run box by box."""

    graph: fx.GraphModule
    image: fx.Node
    layers: dict[fx.Node, _Layer]
    order: list[fx.Node] = field(default_factory=list)
    output: Any = None  # the model's own output, whose structure fx does not keep

    def shaped(self, out: Any) -> Any:
        """Return the traced graph's output ``out`` in the structure of the model's output.

        fx returns a model's dict subclass (Hugging Face's ``ModelOutput``) or named tuple as
        its own immutable containers, on which the user's target would fail.
        """
        if self.output is None or isinstance(self.output, Tensor):
            return out
        values = tensors_in(out)
        if len(values) != len(tensors_in(self.output)):
            return out
        found = iter(values)
        return map_tensors(lambda _: next(found), self.output)


def plan_incremental(model: Any, has_args: bool) -> tuple[IncrementalPlan | None, str]:
    """Trace ``model`` and find its supported nodes, or say why it must run in full."""
    if has_args:
        return None, "the model takes extra forward arguments"
    if not isinstance(model, nn.Module):
        return None, "the model is not an nn.Module"
    if any(m.training for m in model.modules()):
        return None, "the model is in training mode"
    if _has_hooks(model):
        return None, "the model has forward hooks (they must see every full forward pass)"
    try:
        # Traced inside a wrapper: fx stores tensor constants as attributes of the root
        # module it traces, which must not be the user's model.
        graph = fx.symbolic_trace(_Root(model))
    except Exception as error:  # any tracing failure means: run in full
        return None, f"torch.fx cannot trace the model ({type(error).__name__})"
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None, "the model's forward takes more than the image"
    layers: dict[fx.Node, _Layer] = {}
    order = []
    for node in graph.graph.nodes:
        layer = _layer(graph, node)
        if layer is not None:
            layers[node] = layer
            order.append(node)
    if not any(layer.kind == "window" for layer in layers.values()):
        return None, "the model has no convolution or pooling that fx can see"
    return IncrementalPlan(graph, placeholders[0], layers, order), ""


class _Root(nn.Module):
    """The user's model as the submodule ``model`` of a root that fx may write to."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Any:
        return self.model(x)


def _has_hooks(model: nn.Module) -> bool:
    from torch.nn.modules import module as module_globals

    if any(
        getattr(module_globals, g, None)
        for g in ("_global_forward_hooks", "_global_forward_pre_hooks")
    ):
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or getattr(m, "_forward_hooks_with_kwargs", None)
        for m in model.modules()
    )


def _attr(graph: fx.GraphModule, node: Any) -> Any:
    """Return the value of a ``get_attr`` node (a weight), or ``node`` if it is a constant."""
    if isinstance(node, fx.Node):
        if node.op != "get_attr":
            raise LookupError
        value: Any = graph
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value
    return node


def _layer(graph: fx.GraphModule, node: fx.Node) -> _Layer | None:
    args = node.args
    if node.op == "call_function":
        if (
            node.target in _ELEMENTWISE_FUNCTIONS
            and len(args) == 1
            and isinstance(args[0], fx.Node)
        ):
            fn, kwargs = node.target, {k: v for k, v in node.kwargs.items() if k != "inplace"}
            return _Layer("elementwise", lambda t: fn(t, **kwargs), (args[0],))  # type: ignore[operator]
        if node.target in _ADD and len(args) == 2 and not node.kwargs:
            if all(isinstance(a, fx.Node) for a in args):
                return _Layer("add", torch.add, (args[0], args[1]))  # type: ignore[arg-type]
            return None
        if node.target in _CONV and not node.kwargs and isinstance(args[0], fx.Node):
            try:
                weight, bias = (
                    _attr(graph, args[1]),
                    _attr(graph, args[2] if len(args) > 2 else None),
                )
            except LookupError:
                return None
            stride, padding, dilation, groups = (list(args[3:]) + [1, 0, 1, 1][len(args) - 3 :])[:4]
            if isinstance(padding, str) or not isinstance(groups, int):
                return None
            ph, pw = _two(padding)
            return _Layer(
                "window",
                _conv(weight, bias, stride, dilation, groups),
                (args[0],),
                conv=(weight, bias, stride, dilation, groups),
                kernel=(int(weight.shape[2]), int(weight.shape[3])),
                stride=_two(stride),
                pad=(ph, ph, pw, pw),
                dilation=_two(dilation),
            )
        return None
    if node.op != "call_module" or node.kwargs or len(args) != 1:
        return None
    (source,) = args
    if not isinstance(source, fx.Node):
        return None
    module = graph.get_submodule(str(node.target))
    if isinstance(module, nn.BatchNorm2d) and module.running_mean is None:
        return None  # normalises with the batch's statistics: not elementwise
    if isinstance(module, _ELEMENTWISE_MODULES):
        return _Layer("elementwise", module, (source,))
    if isinstance(module, nn.ZeroPad2d | nn.ConstantPad2d):
        left, right, top, bottom = (int(v) for v in module.padding)
        return _Layer(
            "window",
            lambda t: t,
            (source,),
            pad=(top, bottom, left, right),
            pad_value=float(module.value),
        )
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None
        ph, pw = _two(module.padding)
        return _Layer(
            "window",
            _conv(module.weight, module.bias, module.stride, module.dilation, module.groups),
            (source,),
            conv=(module.weight, module.bias, module.stride, module.dilation, module.groups),
            kernel=_two(module.kernel_size),
            stride=_two(module.stride),
            pad=(ph, ph, pw, pw),
            dilation=_two(module.dilation),
        )
    if isinstance(module, nn.MaxPool2d):
        if module.ceil_mode or module.return_indices:
            return None
        k, d = _two(module.kernel_size), _two(module.dilation)
        s = _two(module.stride or module.kernel_size)
        ph, pw = _two(module.padding)
        return _Layer(
            "window",
            lambda t: F.max_pool2d(t, k, s, 0, d),
            (source,),
            kernel=k,
            stride=s,
            pad=(ph, ph, pw, pw),
            dilation=d,
            pad_value=-math.inf,
        )
    if isinstance(module, nn.AvgPool2d):
        ph, pw = _two(module.padding)
        if module.ceil_mode or (not module.count_include_pad and (ph, pw) != (0, 0)):
            return None
        k, s = _two(module.kernel_size), _two(module.stride or module.kernel_size)
        divisor = module.divisor_override
        return _Layer(
            "window",
            lambda t: F.avg_pool2d(t, k, s, 0, divisor_override=divisor),
            (source,),
            kernel=k,
            stride=s,
            pad=(ph, ph, pw, pw),
        )
    return None


def _two(value: Any) -> tuple[int, int]:
    if isinstance(value, tuple | list):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps the outputs of the nodes asked for."""

    def __init__(self, graph: fx.GraphModule, keep: set[fx.Node]) -> None:
        super().__init__(graph)
        self.keep = keep
        self.kept: dict[fx.Node, Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.keep:
            self.kept[n] = out
        return out


@dataclass(frozen=True)
class _Box:
    """Per-window box starts ``(P,)`` on each axis, and the box size shared by all windows."""

    y: Tensor
    x: Tensor
    height: int
    width: int


def _box1(
    start: Tensor, length: int, size: int, out: int, k: int, s: int, p: int, d: int
) -> tuple[Tensor, int]:
    """Return the outputs a changed input range ``[start, start + length)`` reaches.

    One axis; output ``o`` reads the inputs ``o s - p .. o s - p + d (k - 1)``.
    """
    end = (start + length).clamp(max=size)
    lo = torch.div(start + p - d * (k - 1) + s - 1, s, rounding_mode="floor").clamp(min=0)
    hi = (torch.div(end - 1 + p, s, rounding_mode="floor") + 1).clamp(max=out)
    n = min(max(int((hi - lo).max()), 1), out)
    return lo.clamp(min=0, max=out - n), n


def _union1(a: Tensor, la: int, b: Tensor, lb: int, out: int) -> tuple[Tensor, int]:
    lo = torch.minimum(a, b)
    hi = torch.maximum(a + la, b + lb)
    n = min(int((hi - lo).max()), out)
    return lo.clamp(max=out - n), n


def _cap1(start: Tensor, length: int, out: int, tau: float) -> tuple[Tensor, int]:
    """Projective-field thresholding (Krypton): at most ``ceil(tau * out)`` positions, centred.

    An approximation for ``tau < 1``: the positions cut off keep their clean values. With
    ``tau = 1`` (or a box already small enough) the box is returned unchanged.
    """
    cap = max(1, math.ceil(tau * out - 1e-9))
    if length <= cap:
        return start, length
    centre = start + (length - cap) // 2
    return centre.clamp(min=0, max=out - cap), cap


def windows_per_pass(windows: int, n: int, most: int, callable_target: bool) -> int:
    """Occluded windows per pass of ``most`` rows, each pass also holding the clean rows.

    A callable target sees whole copies of the batch (``n`` rows per window); class targets
    run one sample per pass.
    """
    return max(1, most // n - 1) if callable_target else max(1, min(most - 1, windows))


def pass_count(windows: int, n: int, most: int, callable_target: bool) -> int:
    """How many passes ``windows`` windows of ``n`` samples take, box by box or in full."""
    passes = -(-windows // windows_per_pass(windows, n, most, callable_target))
    return passes if callable_target else n * passes


def occlusion_scores(
    plan: IncrementalPlan,
    score_rows: Callable[[Any, Tensor], Tensor],
    callable_target: bool,
    x: Tensor,
    base: Tensor,
    starts_y: Tensor,
    starts_x: Tensor,
    window: tuple[int, int],
    most: int,
    tick: Callable[[], None],
    max_fraction: float = 1.0,
    *,
    tau: float = 1.0,
    stats: dict[str, Any] | None = None,
) -> tuple[tuple[Tensor, Tensor, Tensor] | None, list[str]]:
    """Clean scores ``(N, K)``, occluded scores and drops ``(P, N, K)``, box by box.

    ``score_rows(output, samples)`` reads the target scores of model outputs whose rows come
    from ``samples``. Returns ``(None, [])`` when no convolution or pooling is worth running
    box by box (the caller then runs full passes), else the scores (see :func:`record_pass`)
    and the names of the nodes run box by box. Runs under :func:`torch.inference_mode`;
    returns normal tensors.

    ``tau < 1`` is Krypton's projective-field thresholding, an *approximation*: each local
    node recomputes at most ``ceil(tau * size)`` positions per axis, centred on the patch's
    projection, and keeps clean activations outside. ``tau = 1`` is exact. ``stats``, if
    given, receives ``"recomputed"`` (activations recomputed per window, summed over the
    local nodes) and ``"recomputed_exact"`` (the same without thresholding).
    """
    n, _, h, w = x.shape
    wh, ww = window
    device = x.device
    windows = starts_y.shape[0]
    with torch.inference_mode():
        # The first box: the window moved inside the image (it holds every hidden pixel).
        first_y = starts_y.clamp(max=h - wh)
        first_x = starts_x.clamp(max=w - ww)
        # Clean activations, one sample at a time (a sample's do not depend on its batch).
        # A callable target reads whole copies of the batch: its clean run takes them all.
        keep = set(plan.order)
        outputs, kept = [], []
        for part in [x] if callable_target else [x[i : i + 1] for i in range(n)]:
            recorder = _Recorder(plan.graph, keep)
            outputs.append(recorder.run(part))
            kept.append(recorder.kept)
        clean = {node: torch.cat([k[node] for k in kept]) for node in kept[0]}
        clean[plan.image] = x

        boxes = _boxes(plan, clean, _Box(first_y, first_x, wh, ww), max_fraction, tau)
        local = [node for node in plan.order if node in boxes]
        if not any(plan.layers[node].kind == "window" for node in local):
            return None, []
        if stats is not None:
            stats["recomputed"] = _count(boxes, clean, local)
            if tau < 1:
                exact = _boxes(plan, clean, boxes[plan.image], max_fraction, 1.0)
                exact_local = [node for node in plan.order if node in exact]
                stats["recomputed_exact"] = _count(exact, clean, exact_local)
            else:
                stats["recomputed_exact"] = stats["recomputed"]
        frontier = [
            node for node in (plan.image, *local) if any(user not in boxes for user in node.users)
        ]
        # Channels-last where depthwise convolutions run box by box (see _conv).
        last = any(_groups(plan.layers[node]) > 1 for node in local)
        if last:
            clean = {node: _last(value) for node, value in clean.items()}
        padded = {
            node: _pad(clean[plan.layers[node].inputs[0]], plan.layers[node])
            for node in local
            if plan.layers[node].kind == "window"
        }

        shortcut = _shortcuts(plan, clean, boxes, local)
        runs = _fused(plan, local, frontier, last)
        samples = torch.arange(n, device=device)
        per = windows_per_pass(windows, n, most, callable_target)
        if callable_target:  # whole copies of the batch, window-major
            groups = [(samples, s, min(windows, s + per)) for s in range(0, windows, per)]
        else:  # one sample per pass, split the same way for every sample
            groups = [
                (samples[i : i + 1], s, min(windows, s + per))
                for i in range(n)
                for s in range(0, windows, per)
            ]
        found: tuple[Tensor, Tensor, Tensor] | None = None
        for group, start, stop in groups:
            win = torch.arange(start, stop, device=device).repeat_interleave(group.numel())
            ids = group.repeat(stop - start)
            # The occluded image inside the first box.
            y0, x0 = first_y[win], first_x[win]
            rows = (y0[:, None] + torch.arange(wh, device=device)) >= starts_y[win, None]
            cols = (x0[:, None] + torch.arange(ww, device=device)) >= starts_x[win, None]
            hidden = rows[:, None, :, None] & cols[:, None, None, :]
            values: dict[fx.Node, Tensor] = {
                plan.image: torch.where(
                    hidden, _gather(base, ids, y0, x0, wh, ww), _gather(x, ids, y0, x0, wh, ww)
                )
            }
            for node in local:
                layer, box = plan.layers[node], boxes[node]
                by, bx = box.y[win], box.x[win]
                if layer.kind == "window":
                    src = layer.inputs[0]
                    k, s, d = layer.kernel, layer.stride, layer.dilation
                    ih = (box.height - 1) * s[0] + d[0] * (k[0] - 1) + 1
                    iw = (box.width - 1) * s[1] + d[1] * (k[1] - 1) + 1
                    if shortcut[node] == "same":  # the source's box is the crop: no copy
                        crop = values[src]
                    elif shortcut[node] == "whole":  # whole maps: pad, one copy
                        crop = _pad(values[src], layer)[:, :, :ih, :iw]
                    else:
                        cy, cx = by * s[0], bx * s[1]  # the crop's start, padded coordinates
                        crop = _gather(padded[node], ids, cy, cx, ih, iw)
                        sb = boxes[src]
                        oy, ox = sb.y[win] + layer.pad[0] - cy, sb.x[win] + layer.pad[2] - cx
                        _paste(crop, values[src], oy, ox)
                    values[node] = runs.get(node, layer.run)(crop)
                elif layer.kind == "add":
                    terms = []
                    for src, same in zip(layer.inputs, shortcut[node], strict=True):
                        if same:
                            terms.append(values[src])
                            continue
                        part = _gather(clean[src], ids, by, bx, box.height, box.width)
                        sb = boxes[src]
                        _paste(part, values[src], sb.y[win] - by, sb.x[win] - bx)
                        terms.append(part)
                    values[node] = layer.run(terms[0], terms[1])
                else:
                    values[node] = runs.get(node, layer.run)(values[layer.inputs[0]])
            # The pass also holds the clean images (first rows): drops subtract scores of the
            # same pass, so a window that cannot reach the score gives exactly 0.
            everyone = torch.cat([group, ids])
            env: dict[fx.Node, Any] = {node: None for node in local}
            for node in frontier:
                box = boxes[node]
                if (box.height, box.width) == tuple(clean[node].shape[-2:]):
                    env[node] = torch.cat([clean[node][group], values[node]])
                    continue
                full = clean[node][everyone].clone()
                _paste(full[group.numel() :], values[node], box.y[win], box.x[win])
                env[node] = full
            env.setdefault(plan.image, None)
            out = fx.Interpreter(plan.graph).run(None, initial_env=env)
            scores = score_rows(plan.shaped(out), everyone).reshape(everyone.numel(), -1)
            which = torch.cat([torch.zeros_like(group), win + 1])
            found = record_pass(found, scores, everyone, which, n, windows)
            tick()
    names = [
        str(node.target).removeprefix("model.") if node.op == "call_module" else node.name
        for node in local
    ]
    assert found is not None
    return (found[0].clone(), found[1].clone(), found[2].clone()), names


def _boxes(
    plan: IncrementalPlan,
    clean: dict[fx.Node, Tensor],
    first: _Box,
    max_fraction: float,
    tau: float,
) -> dict[fx.Node, _Box]:
    """Boxes, node by node, from the image's box ``first``.

    A node is local if it is supported, its inputs are local and its box covers at most
    ``max_fraction`` of its map; ``tau < 1`` thresholds the boxes (see :func:`_cap1`).
    """
    boxes: dict[fx.Node, _Box] = {plan.image: first}
    for node in plan.order:
        layer = plan.layers[node]
        if node not in clean or not all(a in boxes for a in layer.inputs):
            continue
        if clean[node].ndim != 4:
            continue
        out_h, out_w = clean[node].shape[-2:]
        if layer.kind == "window":
            src = boxes[layer.inputs[0]]
            in_h, in_w = clean[layer.inputs[0]].shape[-2:]
            k, s, p, d = layer.kernel, layer.stride, layer.pad, layer.dilation
            by, bh = _box1(src.y, src.height, in_h, out_h, k[0], s[0], p[0], d[0])
            bx, bw = _box1(src.x, src.width, in_w, out_w, k[1], s[1], p[2], d[1])
        elif layer.kind == "add":
            a, b = boxes[layer.inputs[0]], boxes[layer.inputs[1]]
            if clean[layer.inputs[0]].shape != clean[layer.inputs[1]].shape:
                continue  # broadcasting: not a residual sum
            by, bh = _union1(a.y, a.height, b.y, b.height, out_h)
            bx, bw = _union1(a.x, a.width, b.x, b.width, out_w)
        else:
            src = boxes[layer.inputs[0]]
            by, bh, bx, bw = src.y, src.height, src.x, src.width
        if bh * bw > max_fraction * out_h * out_w:
            continue
        if tau < 1 and layer.kind != "elementwise":
            by, bh = _cap1(by, bh, out_h, tau)
            bx, bw = _cap1(bx, bw, out_w, tau)
        boxes[node] = _Box(by, bx, bh, bw)
    return boxes


def _count(boxes: dict[fx.Node, _Box], clean: dict[fx.Node, Tensor], local: list[fx.Node]) -> int:
    """Activations recomputed per window: box area times channels, summed over ``local``."""
    return sum(boxes[node].height * boxes[node].width * clean[node].shape[1] for node in local)


def record_pass(
    found: tuple[Tensor, Tensor, Tensor] | None,
    part: Tensor,
    samples: Tensor,
    windows: Tensor,
    n: int,
    count: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Store one pass's scores ``(R, K)``: rows of window 0 are the clean images.

    ``found`` is ``(clean (N, K), occluded (P, N, K), drop (P, N, K))`` (allocated on the
    first call); each drop subtracts from the clean score of the same pass.
    """
    k = part.shape[1]
    if found is None:
        found = (part.new_empty(n, k), part.new_empty(count, n, k), part.new_empty(count, n, k))
    clean, occluded, drop = found
    is_clean = windows == 0
    reference = part.new_empty(n, k)
    reference[samples[is_clean]] = part[is_clean]
    clean[samples[is_clean]] = part[is_clean]
    rows = ~is_clean
    occluded[windows[rows] - 1, samples[rows]] = part[rows]
    drop[windows[rows] - 1, samples[rows]] = reference[samples[rows]] - part[rows]
    return found
