"""The maps the fragility attack compares: a method run on a batch, and its smooth twin.

:func:`_resolve_method` and :func:`_as_maps` run a registered method (or a callable) and read
its result as ``(N, H, W)`` maps; :func:`_differentiable_map` computes the same map through a
copy of every rectifier made smooth (softplus, Ghorbani et al. 2019, Sec. 4), so that the
attack can follow the map's gradient with respect to the input. Private to
:mod:`salience.metrics.fragility`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import all_finite, check_positive_int, input_gradient
from .._forward import Forward, ForwardArgs, _expand
from ..attribution import Attribution, Reduction
from ..hooks import call_rule, forward_hooks
from ..layers import find_layer
from ..methods.integrated import Quadrature, make_baseline, quadrature_nodes
from ..rectifiers import SITES
from ..registry import check_options, get_method
from ..targets import TargetLike, resolve_target

MethodLike: TypeAlias = "str | Callable[..., Attribution | Tensor]"
"""A registered method name, or ``method(model, inputs, target, **options)`` returning an
:class:`~salience.Attribution` or ``(N, H, W)`` maps."""


# The registered methods whose map the attack can differentiate, and their channel reduction.
_DIFFERENTIABLE: dict[str, Reduction] = {
    "gradient": "abs_max",
    "input_x_gradient": "sum",
    "integrated_gradients": "sum",
    "grad_cam": "none",
}


# --------------------------------------------------------------------------- running methods


@dataclass
class _Method:
    """A method resolved once: how to evaluate it, and how to differentiate its map."""

    name: str
    func: Callable[..., Any]
    options: dict[str, Any]
    registered: bool
    reduction: Reduction | None  # of the differentiable twin; None: a callable

    def maps(
        self, model: Any, x: Tensor, target: Any, args: ForwardArgs, allow_tf32: bool
    ) -> tuple[Tensor, Attribution | None]:
        """Return the ``(R, h, w)`` maps of ``x`` on the true model (detached)."""
        if self.registered:
            result = self.func(
                model, x, target, forward_args=args, allow_tf32=allow_tf32, **self.options
            )
        else:
            extra = {} if args is None else {"forward_args": args}
            result = self.func(model, x, target, **self.options, **extra)
        return _as_maps(result, x, self.name), result if isinstance(result, Attribution) else None


def _resolve_method(method: MethodLike, options: Mapping[str, Any] | None) -> _Method:
    opts = dict(options or {})
    if isinstance(method, str):
        spec = get_method(method)
        check_options(spec, opts)
        for key in ("forward_args", "allow_tf32"):
            if key in opts:
                raise TypeError(f"pass {key}= to the metric itself, not in method_options")
        return _Method(method, spec.func, opts, True, _DIFFERENTIABLE.get(method))
    if callable(method):
        name = getattr(method, "__name__", type(method).__name__)
        return _Method(name, method, opts, False, None)
    raise TypeError(
        f"method must be a registered method name or a callable, got {type(method).__name__}"
    )


def _as_maps(result: Any, x: Tensor, name: str) -> Tensor:
    if isinstance(result, Attribution):
        m = result.saliency()
    elif isinstance(result, Tensor):
        m = result[:, 0] if result.ndim == 4 and result.shape[1] == 1 else result
    else:
        raise TypeError(
            f"method {name!r} returned {type(result).__name__}; expected an Attribution or "
            "(N, H, W) maps"
        )
    if m.ndim != 3 or m.shape[0] != x.shape[0]:
        raise ValueError(
            f"method {name!r} gave maps of shape {tuple(m.shape)} for {x.shape[0]} inputs; "
            "expected (N, H, W)"
        )
    if not m.is_floating_point():
        m = m.double()
    if not all_finite(m):
        raise ValueError(f"method {name!r} gave maps with NaN or inf values")
    return m


def _chunk_args(fwd: Forward, ids: Tensor) -> ForwardArgs:
    """Return the extra forward arguments of the samples ``ids``, rows following their samples."""
    if not fwd.has_args:
        return None
    if fwd.kwargs:  # forward_args was a mapping: keyword arguments only
        return {k: _expand(v, ids, fwd.n) for k, v in fwd.kwargs.items()}
    return tuple(_expand(a, ids, fwd.n) for a in fwd.args)


def _chunk_target(target: Any, ids: Tensor) -> Any:
    return target[ids.to(target.device)] if isinstance(target, Tensor) else target


def _fixed_target(fwd: Forward, x: Tensor, target: TargetLike) -> tuple[Any, Tensor]:
    """Resolve the target once on the clean inputs; return it and the predicted labels."""
    with torch.no_grad():
        out = fwd(x.clone())
    if not (isinstance(out, Tensor) and out.ndim == 2 and out.shape[0] == x.shape[0]):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"these metrics keep track of the predicted class, so the model output must be "
            f"(N, classes) logits; got {shape}"
        )
    labels = out.argmax(1)
    if callable(target) and not isinstance(target, Tensor):
        return target, labels
    resolved = resolve_target(target, out, x.shape[0])
    if resolved.classes is None or resolved.classes.ndim != 1:
        raise ValueError("these metrics explain one class per sample: pass (N,) targets")
    return resolved.classes, labels


def _labels(fwd: Forward, x: Tensor, ids: Tensor, att: Attribution | None = None) -> Tensor:
    """Return the predicted classes of ``x``, from the method's own output when it has it."""
    out = att.output if att is not None else None
    if isinstance(out, Tensor) and out.ndim == 2 and out.shape[0] == x.shape[0]:
        return out.argmax(1)
    with torch.no_grad():
        return fwd(x.clone(), ids).argmax(1)


# --------------------------------------------------------------------------- the smooth twin


class _Softplus:
    """The call rule that computes the attack direction: rectifiers become softplus."""

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.count = 0

    def __call__(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        parse = SITES.get(func)
        if parse is None:
            return NotImplemented
        try:
            site = parse(args, kwargs)
        except (TypeError, ValueError, IndexError, KeyError, RuntimeError):
            return NotImplemented
        if site is None or site.fn is not None or not isinstance(site.x, Tensor):
            return NotImplemented  # not a rectifier (smooth activations stay as they are)
        self.count += 1
        x = site.x
        src = x.clone() if site.inplace else x
        y = F.softplus(src, beta=self.beta)
        if site.upper is not None:
            y = y - F.softplus(src - site.upper, beta=self.beta)
        if site.inplace:
            return x.copy_(y)
        return y


def _differentiable_map(
    meth: _Method,
    fwd: Forward,
    z: Tensor,
    target: Any,
    ids: Tensor,
    layer: str | None,
    rule: _Softplus,
) -> Tensor:
    """Return the ``(R, h, w)`` map of ``z`` on the smooth twin, in the graph of ``z``."""
    model = fwd.model
    opts = meth.options
    if not meth.registered:
        args = _chunk_args(fwd, ids)
        extra = {} if args is None else {"forward_args": args}
        with call_rule(model, rule, method="fragility"):
            result = meth.func(model, z, target, **opts, **extra)
        return _as_maps(result, z, meth.name)
    score = opts.get("score", "logit")
    if meth.name in ("gradient", "input_x_gradient"):
        with call_rule(model, rule, method="fragility"):
            out = fwd(z.clone(), ids)
        scores = resolve_target(target, out, z.shape[0], score=score).scores(out)
        g = _grad(scores, z)
        values = g if meth.name == "gradient" else z * g
    elif meth.name == "integrated_gradients":
        values = _ig(fwd, z, target, ids, opts, score, rule)
    else:  # grad_cam
        values = _grad_cam(fwd, z, target, ids, opts, score, layer, rule)
    assert meth.reduction is not None
    return Attribution(
        values=values, target=None, scores=values.new_zeros(()), method=meth.name,
        reduction=meth.reduction,
    ).saliency()  # fmt: skip


def _grad(scores: Tensor, wrt: Tensor) -> Tensor:
    return input_gradient(scores.sum(), wrt, create_graph=True)


def _ig(
    fwd: Forward,
    z: Tensor,
    target: Any,
    ids: Tensor,
    opts: Mapping[str, Any],
    score: Any,
    rule: _Softplus,
) -> Tensor:
    if opts.get("tolerance") is not None:
        raise ValueError(
            "fragility attacks integrated_gradients with a fixed quadrature: the adaptive "
            "path (tolerance=) cannot be differentiated; pass steps= (small: the attack "
            "differentiates through every step) instead"
        )
    steps = check_positive_int("steps", opts.get("steps") or 50)
    quadrature: Quadrature = opts.get("quadrature") or "gausslegendre"
    base = make_baseline(
        z,
        opts.get("baseline", "zeros"),
        blur_sigma=opts.get("blur_sigma"),
        seed=opts.get("seed", 0),
        model=fwd.model,
    )
    alphas, weights = quadrature_nodes(quadrature, steps)
    alphas = alphas.to(z.device, z.dtype)
    weights = weights.to(z.device, z.dtype)
    r = z.shape[0]
    path = base[None] + alphas.view(-1, 1, 1, 1, 1) * (z - base)[None]  # (S, R, C, H, W)
    rows = ids.repeat(steps)
    with call_rule(fwd.model, rule, method="fragility"):
        out = fwd(path.reshape(steps * r, *z.shape[1:]), rows)
    resolved = resolve_target(target, out[:r].detach(), r, score=score)
    scores = resolved.scores(out, torch.arange(r, device=z.device).repeat(steps))
    (g,) = torch.autograd.grad(scores.sum(), path, create_graph=True, materialize_grads=True)
    avg = (g * weights.view(-1, 1, 1, 1, 1)).sum(0)
    return (z - base) * avg


def _grad_cam(
    fwd: Forward,
    z: Tensor,
    target: Any,
    ids: Tensor,
    opts: Mapping[str, Any],
    score: Any,
    layer: str | None,
    rule: _Softplus,
) -> Tensor:
    model = fwd.model
    if layer is None or not isinstance(model, nn.Module):
        raise ValueError("grad_cam needs an nn.Module with a named layer")
    name, module = find_layer(model, layer)
    seen: list[Tensor] = []

    def keep(_name: str, _module: nn.Module, _args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            seen.append(output)

    with forward_hooks([(name, module)], keep), call_rule(model, rule, method="fragility"):
        out = fwd(z.clone(), ids)
    if not seen:
        raise ValueError(f"layer {name!r} did not run in the forward pass")
    raw = seen[-1]
    reshape = opts.get("reshape")
    act = reshape(raw) if reshape is not None else raw
    if act.ndim != 4:
        raise ValueError(
            f"fragility attacks grad_cam at a convolutional (N, C, h, w) layer; {name!r} gives "
            f"{tuple(act.shape)}: pass method_options={{'layer': ..., 'reshape': ...}}"
        )
    scores = resolve_target(target, out, z.shape[0], score=score).scores(out)
    if not (scores.requires_grad and raw.requires_grad):
        raise ValueError(f"the explained score does not depend on layer {name!r} through autograd")
    (g,) = torch.autograd.grad(scores.sum(), raw, create_graph=True, materialize_grads=True)
    g = reshape(g) if reshape is not None else g
    if opts.get("counterfactual", False):
        g = -g
    cam = (g.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True)
    if opts.get("relu", True):
        cam = cam.clamp(min=0)
    if opts.get("upsample", True) and tuple(cam.shape[-2:]) != tuple(z.shape[-2:]):
        cam = F.interpolate(cam, size=tuple(z.shape[-2:]), mode="bilinear", align_corners=False)
    return cam
