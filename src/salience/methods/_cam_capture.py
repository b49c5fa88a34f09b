"""The capture every CAM shares: one forward pass, the layer's activation and the scores.

:func:`_capture` runs the model once with the layer recorded (the default layer chosen by
:mod:`salience.layers` when none is given), resolves the target and returns the activation
read as an ``(N, K, h, w)`` map with its layout; :func:`_gradients` differentiates the scores
with respect to it, :func:`_combine` weighs the channels and :func:`_result` builds the
:class:`~salience.attribution.Attribution`. The CAM family (:mod:`salience.methods.cam`) and
Score-CAM (:mod:`salience.methods.score_cam`) are built from these.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import not_differentiable, warn, warn_zero_maps
from .._containers import map_tensors, tensors_in
from .._forward import Forward
from ..attribution import Attribution
from ..hooks import scripted_modules
from ..layers import (
    Known,
    LayerLike,
    LayerRecord,
    find_layer,
    forget,
    reaches,
    recall,
    remember,
    search_layers,
)
from ..layouts import Layout, Reshape, check_reshape, is_channels_first
from ..targets import ResolvedTarget, Score, TargetLike, resolve_target

# -- capture: one forward pass, the layer's activation and the scores ---------------------------


@dataclass
class _Capture:
    """One forward pass: the layer activation, the model output and the explained scores."""

    layer: str
    calls: int
    call: int  # the call explained, from 1
    raw: Tensor  # the layer output, in the graph when gradients are on
    activation: Tensor  # (N, K, h, w): ``reshape(raw)``
    reshape: Reshape | None  # raw -> activation (and gradients alike); None: raw is the map
    layout: Layout  # how raw was read: NCHW, NHWC, tokens, or custom (the user's reshape=)
    output: Any  # detached model output
    resolved: ResolvedTarget
    scores: Tensor  # (N, T), in the graph when gradients are on
    multi: bool  # an (N, T) target: keep the target axis in ``scores``


def _capture(
    forward: Forward,
    inputs: Tensor,
    target: TargetLike,
    *,
    layer: LayerLike | None,
    reshape: Reshape | None,
    score: Score,
    grad: bool,
    _search_with_grad: bool = False,
    _whole_graph: bool = False,
    _recall: bool = True,
) -> _Capture:
    model = forward.model
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"CAM methods read an inner layer, so the model must be an nn.Module, got "
            f"{type(model).__name__}"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "CAM methods record a layer with forward hooks, which TorchScript models do not "
            "run; load the model as a Python nn.Module instead"
        )
    if type(model).__name__ == "OptimizedModule" and isinstance(
        getattr(model, "_orig_mod", None), nn.Module
    ):
        raise TypeError(
            "CAM methods record a layer with forward hooks, which the code torch.compile "
            "made does not run; pass the module it compiled (model._orig_mod), and for speed "
            "salience.performance(compile=True), which compiles the passes that need no hook"
        )
    if reshape is not None and not callable(reshape):
        raise TypeError(f"reshape must be a callable, got {type(reshape).__name__}")
    if reshape is not None and layer is None:
        raise ValueError(
            "reshape= applies to a layer you choose: pass layer= as well (the default layer is "
            "read as a map without it)"
        )
    n = inputs.shape[0]
    named = None if layer is None else find_layer(model, layer)
    _check_script(model, named, forward.modules)
    # The layer search hooks every module when the layer's type does not say its layout (or
    # none is named): what it found for this model and input shape is remembered, and later
    # calls hook that layer only (salience.layers.recall). Not with extra forward arguments,
    # which may change what the model computes.
    memo = reshape is None and not forward.args and not forward.kwargs
    asked = None if named is None else named[0]
    known = recall(model, asked, inputs, forward.modules) if memo and _recall else None
    if known is not None and named is None:
        named = find_layer(model, known.name)
    # Autograd is on for the gradient methods, and for a gradient-free method only to check that
    # the score depends on the patch tokens of a default token layer (see salience.layers). At
    # a layer given by name, a gradient method records the graph from that layer on only.
    late = grad and named is not None and not _whole_graph
    # with other inputs (a question), the default layer must be computed from the image:
    # autograd tells, a gradient-free method included
    _search_with_grad = _search_with_grad or (named is None and forward.has_args)
    track = (grad and not late) or _search_with_grad
    x = inputs.detach().clone()
    if track:
        x.requires_grad_(True)
    multi = isinstance(target, Tensor) and target.ndim == 2
    # a layout known before the pass (the user's reshape=, or remembered): only the layer is hooked
    given = Layout("custom") if reshape is not None else None if known is None else known.layout
    with (
        torch.set_grad_enabled(track),
        search_layers(
            model, inputs, named, graph_from_layer=late, layout=given, texts=_lengths(forward)
        ) as search,
    ):
        fed = x.clone() if track else x  # the model may modify its input in place
        search.seed(fed)
        output = forward(fed)
        resolved = resolve_target(target, output, n, score=score, multi=True)
        scores = resolved.scores(output)
        scores = scores if multi else scores.unsqueeze(1)  # (N, T), in the graph
    layout: Layout | None = None
    if named is None:
        choice = search.choose(output, scores if track else None, x if track else None)
        if choice.needs_gradients:
            return _capture(
                forward,
                inputs,
                target,
                layer=None,
                reshape=None,
                score=score,
                grad=grad,
                _search_with_grad=True,
            )
        record: LayerRecord = choice.record
        layout = choice.layout
        if memo and choice.structural and record.output is not None:
            found = Known(record.name, layout, tuple(record.output.shape))
            remember(model, None, inputs, found, forward.modules)
        changed = record.output is not None and record.output._version != record._version
        if changed:
            # the chosen map was changed in place later on: record it again, with a copy (a
            # map found with gradients for a method that runs without them is taken as found,
            # detached below: recording it again by name would take the module's last call,
            # another image's in a model that runs its backbone twice)
            return _capture(
                forward, inputs, target, layer=record.name, reshape=None, score=score, grad=grad
            )
    else:
        assert search.record is not None
        record = search.record
    out = record.output
    if known is not None and (
        out is None or tuple(out.shape) != known.shape or (late and not reaches(scores, out))
    ):
        # not what the search found before (the model took another path, or the score does
        # not reach this layer): search again
        forget(model, asked, inputs)
        return _capture(
            forward, inputs, target, layer=layer, reshape=reshape, score=score, grad=grad,
            _recall=False,
        )  # fmt: skip
    raw = record.activation()
    reached = scores.requires_grad and raw.requires_grad
    if late and not reached:
        # autograd was switched off again after the layer (a grad-mode block of the model,
        # torch.enable_grad() or no_grad(), began before it and ended after): the whole graph
        return _capture(
            forward, inputs, target, layer=layer, reshape=reshape, score=score, grad=grad,
            _whole_graph=True,
        )  # fmt: skip
    if grad and not reached:
        what = "explained score" if not scores.requires_grad else f"output of layer {record.name!r}"
        raise not_differentiable(what)
    if reshape is not None:
        check_reshape(reshape, raw, record.name)
        layout = Layout("custom")
    else:
        layout = layout or search.layer_layout()
        if memo and known is None and named is not None and not is_channels_first(named[1]):
            found = Known(named[0], layout, tuple(raw.shape))
            remember(model, named[0], inputs, found, forward.modules)
        reshape = None if layout.kind == "NCHW" else layout.to_map
    if not grad:
        raw, scores = raw.detach(), scores.detach()
    return _Capture(
        layer=record.name,
        calls=record.calls,
        call=record.call or record.calls,
        raw=raw,
        activation=raw if reshape is None else reshape(raw),
        reshape=reshape,
        layout=layout,
        output=map_tensors(Tensor.detach, output),  # a dict's too: no graph held past here
        resolved=resolved,
        scores=scores,
        multi=multi,
    )


def _gradients(cap: _Capture, *, sign: float = 1.0) -> Tensor:
    """Return ``d score_t / d A``: ``(N, T, K, h, w)``, one batched backward pass for ``T``."""
    scores = cap.scores
    t = scores.shape[1]
    with torch.enable_grad():  # also under the caller's torch.no_grad()
        if t == 1:
            (grad,) = torch.autograd.grad(scores.sum(), cap.raw, allow_unused=True)
            grads = None if grad is None else grad.unsqueeze(0)
        else:
            picks = torch.eye(t, dtype=scores.dtype, device=scores.device)
            picks = picks.unsqueeze(1).expand(t, scores.shape[0], t).contiguous()
            (grads,) = torch.autograd.grad(
                scores, cap.raw, grad_outputs=picks, is_grads_batched=True, allow_unused=True
            )
    if grads is None:
        raise ValueError(
            f"the explained score does not depend on layer {cap.layer!r}: it runs outside the "
            "path from the inputs to the output; pick a layer before the classifier"
        )
    if cap.reshape is not None:
        grads = torch.stack([cap.reshape(g) for g in grads])
    grads = grads.transpose(0, 1).detach()
    return -grads if sign < 0 else grads


def _combine(weights: Tensor, activation: Tensor, *, relu: bool, size: Any) -> Tensor:
    """Compute the shared kernel ``Up(ReLU(sum_k w_k * A_k))`` for ``T`` targets at once.

    Args:
        weights: ``(N, T, K, 1, 1)`` channel weights or ``(N, T, K, h, w)`` position weights.
        activation: ``(N, K, h, w)``.
        relu: Rectify the map (before resizing, as the papers do).
        size: ``(H, W)`` to resize to (bilinear), or ``None``.

    Returns:
        ``(N, T, H, W)``, or ``(N, T, h, w)`` without ``size``.
    """
    maps = (weights * activation.detach().unsqueeze(1)).sum(2)
    if relu:
        maps = maps.clamp(min=0)
    if size is not None and tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return maps


def _result(
    method: str,
    cap: _Capture,
    values: Tensor,
    extras: dict[str, Any] | None = None,
    *,
    relu: bool,
    why: str | None = None,
    told: Iterable[int] = (),
) -> Attribution:
    """Make the :class:`Attribution` of a CAM method; warn for a sample whose map is all zero.

    The warning says why that happens: ``why`` if given, else by ``relu`` (whether the map was
    rectified). ``told``: samples a warning of the method has named already.
    """
    if why is None and relu:
        why = (
            f"(at layer {cap.layer!r} the weighted channels sum to zero or less everywhere: "
            "no positive evidence for the class there, which the ReLU clears; relu=False shows "
            "the signed map, an earlier layer= may show evidence)"
        )
    elif why is None:
        why = f"(the channels of layer {cap.layer!r}, or their weights, are zero everywhere)"
    warn_zero_maps(method, values, why, told)
    scores = cap.scores.detach()
    return Attribution(
        values=values,
        target=cap.resolved.classes,
        scores=scores if cap.multi else scores[:, 0],
        method=method,
        output=cap.output,
        extras={
            "layer_calls": cap.calls,
            "layer_call": cap.call,
            "layout": str(cap.layout),
            **(extras or {}),
        },
        reduction="none",
        layer=cap.layer,
    )


def _size(inputs: Tensor, upsample: bool) -> tuple[int, int] | None:
    return (int(inputs.shape[-2]), int(inputs.shape[-1])) if upsample else None


def _lengths(forward: Forward) -> frozenset[int]:
    """Return the sequence lengths of the model's other inputs (its question, its caption).

    Token ids (and attention masks) ``(N, L)`` of integers, embedded sequences ``(N, L, D)``
    of floats; a boolean or float ``(N, P)`` mask of patches is no sequence of its own.
    """
    others = tensors_in((forward.args, forward.kwargs))
    return frozenset(
        t.shape[1]
        for t in others
        if t.shape[:1] == (forward.n,)
        and (
            (t.ndim == 2 and not t.is_floating_point() and t.dtype != torch.bool)
            or (t.ndim == 3 and t.is_floating_point())
        )
    )


def _check_script(
    model: nn.Module, named: tuple[str, nn.Module] | None, modules: list[nn.Module] | None
) -> None:
    """Refuse a layer inside TorchScript; warn that a default layer may come before some.

    Scripted modules run no hooks: a layer in one cannot be recorded, and a search that passes
    them over would take a layer before a scripted backbone without knowing (a scripted input
    normalization, or an auxiliary head that never runs, is harmless: a warning, not an error).
    """
    scripted = scripted_modules(model, modules)
    if not scripted:
        return
    if named is None:
        warn(
            f"the model holds TorchScript module {scripted[0]!r}, which runs no hooks: the "
            "default layer is searched among the Python modules only, and comes before it if "
            "it is a backbone. Pass layer= the layer to explain, or load the model as Python"
        )
        return
    inside = [s for s in scripted if named[0] == s or named[0].startswith(f"{s}.")]
    if inside:
        raise TypeError(
            f"layer {named[0]!r} is in TorchScript module {inside[0]!r}, which runs no hooks; "
            "pass a layer of the model's Python modules, or load the model as Python"
        )
