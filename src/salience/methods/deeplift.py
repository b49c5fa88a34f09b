"""DeepLIFT (Shrikumar et al. 2017): multipliers of differences from a reference, back-propagated.

DeepLIFT explains the change of the score between a reference input ``x0`` and the input
``x``, ``S(x) - S(x0)``, as a sum of contributions ``(x - x0) * m``. The multiplier ``m`` is
back-propagated like a gradient ("chain rule for multipliers", the paper's Eq. 3), except at
nonlinearities, where the derivative is replaced by a ratio of differences:

- **linear operations** (convolutions, linear layers, additions, reshapes, average pooling,
  eval-mode BatchNorm, padding, concatenation, interpolation, products with a constant) keep
  their ordinary gradient: that *is* the paper's linear rule;
- **elementwise activations** (every rectifier spelling of :mod:`salience.rectifiers`, ReLU6 and
  clips, sigmoid, tanh, GELU, SiLU, Hardswish, ELU, ...): the Rescale rule
  ``m = (f(x) - f(x0)) / (x - x0)``, or RevealCancel (``rule="reveal_cancel"``, which
  follows the positive and negative parts of each activation's input through the linear calls
  before it: :mod:`._deeplift_parts`);
- **max-pooling**: a conserving rule of salience's own (see :class:`_MaxPool`).

Implementation: one forward pass on the reference records, call by call, the inputs of these
operations; one forward pass on the input replaces each of them by an autograd function whose
forward is the operation itself and whose backward applies the rule; then one
``torch.autograd.grad``. Both passes go through :func:`salience.hooks.call_rule`, a function
mode scoped to the call and the thread, so every spelling of an activation is seen and the
model is never changed.

Summation-to-delta (the paper's Eq. 1), ``sum(values) = S(x) - S(x0)``, then holds exactly, up
to float rounding, for every network built from these operations. Anything else that makes a
nonlinear function of the input (a product of two input-dependent tensors as in squeeze-and-
excitation or attention, softmax, LayerNorm, a division by an input-dependent tensor,
``exp``...) is back-propagated with its gradient, since the paper's rules do not cover it:
those operations are counted in ``extras["gradient_ops"]``, a warning names them, and
``extras["delta"]`` shows the gap it leaves.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._checks import check_choice, input_gradient, warn, warn_zero_maps
from .._forward import ForwardArgs, model_scope
from ..attribution import Attribution
from ..hooks import call_rule
from ..rectifiers import SITES, Site
from ..registry import register
from ..targets import Score, TargetLike, resolve_target
from ._deeplift_ops import (
    _DIVISIONS,
    _INERT,
    _LAYERS,
    _LINEAR,
    _POOLS,
    _PRODUCTS,
    _arg,
    _name,
    _outputs,
    _tensors,
)
from ._deeplift_parts import _Split
from ._deeplift_rules import _activation, _MaxPool, _Rescale, _RevealCancel
from .integrated import BaselineLike, make_baseline

__all__ = ["DeepLiftRule", "deeplift"]

DeepLiftRule = Literal["rescale", "reveal_cancel"]
# ``_name(func)`` by function, for the calls of the replay pass. Torch's functions and methods
# take no weak references; the dictionary is bounded in case a model makes functions at run
# time.
_names: dict[Any, str] = {}


def _func_name(func: Any) -> str:
    try:
        name = _names.get(func)
    except TypeError:  # unhashable
        return _name(func)
    if name is None:
        name = _name(func)
        if len(_names) < 4096:
            _names[func] = name
    return name


_RULES = ("rescale", "reveal_cancel")


# -- the two passes --------------------------------------------------------------------------


@dataclass
class _Step:
    """One call the rules replace, as the reference pass saw it."""

    kind: str  # "activation", "max_pool" or "layer"
    name: str
    shape: tuple[int, ...]
    x0: Tensor  # the call's input
    y0: Tensor | None = None  # its output (activations, max-pooling)
    index: Tensor | None = None  # the positions of the maxima (max-pooling)


@dataclass
class _Tracer:
    """The call handler of both passes: records on the reference, replaces on the input.

    ``phase`` is ``"record"`` or ``"replay"``; the replay pass walks the recorded steps in
    order and checks that it meets the same calls.
    """

    rule: str
    phase: str = "record"
    steps: list[_Step] = field(default_factory=list)
    # Recorded tensors the model also holds, with their versions when recorded: the model may
    # change them in place later, and then the reference pass runs again with private copies.
    watched: list[tuple[Tensor, int]] = field(default_factory=list)
    copy: bool = False
    cursor: int = 0
    nonlinearities: Counter[str] = field(default_factory=Counter)
    max_pools: int = 0
    gradient_ops: Counter[str] = field(default_factory=Counter)
    # Tensors computed from the input in the replay pass, by id (weak references: a freed
    # tensor's id, reused, is not mistaken for it).
    tainted: dict[int, weakref.ref[Tensor]] = field(default_factory=dict)
    # RevealCancel: the positive and negative parts of the tensors linear in the neurons.
    split: _Split | None = None
    buffer: Tensor | None = None  # scratch memory (see scratch()), and views of it by shape
    views: dict[Any, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rule == "reveal_cancel":
            self.split = _Split(self.is_tainted)

    # -- bookkeeping --

    def scratch(self, like: Tensor) -> Tensor:
        """Return a buffer shaped like ``like``, reused from call to call (temporaries only)."""
        key = (like.shape, like.dtype, like.device)
        view = self.views.get(key)
        if view is None:
            n, buffer = like.numel(), self.buffer
            if buffer is None or buffer.numel() < n or (buffer.dtype, buffer.device) != key[1:]:
                buffer = self.buffer = torch.empty(n, dtype=like.dtype, device=like.device)
                self.views.clear()
            view = self.views[key] = buffer[:n].view(like.shape)
        return view

    def keep(self, t: Tensor) -> Tensor:
        """Return ``t`` to record: itself, watched for in-place changes, or a private copy."""
        t = t.detach()
        if self.copy:
            return t.clone()
        self.watched.append((t, t._version))
        return t

    def stale(self) -> bool:
        """Whether the model changed a recorded tensor in place after it was recorded."""
        return any(t._version != version for t, version in self.watched)

    def restart(self) -> None:
        """Forget the reference pass, to record it again with private copies."""
        self.steps.clear()
        self.watched.clear()
        self.copy = True

    def taint(self, t: Tensor) -> None:
        self.tainted[id(t)] = weakref.ref(t)

    def is_tainted(self, t: Any) -> bool:
        held = self.tainted.get(id(t))
        return held is not None and held() is t

    def _reads_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether a call's arguments include a tensor computed from the input (fast path)."""
        tainted = self.tainted
        for value in (*args, *kwargs.values()) if kwargs else args:
            if isinstance(value, list | tuple):
                if any(self.is_tainted(v) for v in value):
                    return True
                continue
            held = tainted.get(id(value))
            if held is not None and held() is value:
                return True
        return False

    def _next(self, kind: str, name: str, x: Tensor) -> _Step:
        """Return the recorded step this replayed call corresponds to, checked."""
        k = self.cursor
        if k >= len(self.steps):
            raise RuntimeError(
                f"deeplift: the model ran more operations on the input than on the reference: "
                f"{name} on shape {tuple(x.shape)} (call {k + 1}) has no counterpart. DeepLIFT "
                "needs the same computation on both (is there data-dependent control flow in "
                "forward?); choose a reference that takes the same path"
            )
        step = self.steps[k]
        if (step.kind, step.name, step.shape) != (kind, name, tuple(x.shape)):
            raise RuntimeError(
                f"deeplift: the model ran different operations on the input than on the "
                f"reference: call {k + 1} is {name} on shape {tuple(x.shape)} for the input but "
                f"{step.name} on shape {step.shape} for the reference. DeepLIFT needs the same "
                "computation on both (is there data-dependent control flow in forward?); "
                "choose a reference that takes the same path"
            )
        self.cursor += 1
        return step

    def finish(self) -> None:
        """Check that the replay met every recorded call."""
        if self.cursor != len(self.steps):
            step = self.steps[self.cursor]
            raise RuntimeError(
                f"deeplift: the model ran fewer operations on the input than on the "
                f"reference: {step.name} on shape {step.shape} (call {self.cursor + 1}) never "
                "came. DeepLIFT needs the same computation on both (is there data-dependent "
                "control flow in forward?); choose a reference that takes the same path"
            )

    # -- the handler --

    def __call__(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.phase != "replay":
            return self._handle(func, args, kwargs)
        if not self._reads_input(args, kwargs):
            return self._handle(func, args, kwargs)
        # RevealCancel reads the operands' parts before the call: it may change them in place.
        plan = self.split.plan(func, args, kwargs) if self.split is not None else None
        result = self._handle(func, args, kwargs)
        handled = result is not NotImplemented
        if not handled:
            result = func(*args, **kwargs)
            self._classify(func, args, kwargs, result)
        outs = _outputs(result)
        for out in outs:
            self.taint(out)
        if _func_name(func) == "__setitem__" and isinstance(args[0], Tensor):
            self.taint(args[0])
            outs = [args[0]]
        if plan is not None and not handled:  # activations, pools and layers register their own
            plan(outs)
        return result

    def _classify(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        """Count a call not covered by the rules that computes nonlinearly from the input."""
        name = _func_name(func)
        if name in _INERT:
            return
        if func in _LAYERS:
            if self.is_tainted(_arg(args, kwargs, 1, "weight", None)):
                self.gradient_ops[f"{name} (input-dependent weight)"] += 1
            return
        if name in _LINEAR or not any(o.is_floating_point() for o in _outputs(result)):
            return
        if name == "batch_norm":
            training = bool(_arg(args, kwargs, 5, "training", False))
            if not training:
                return
            self.gradient_ops["batch_norm (training mode: batch statistics)"] += 1
            return
        dependent = [t for t in _tensors(args, kwargs) if self.is_tainted(t)]
        if name in _PRODUCTS:
            if len(dependent) <= 1:
                return
            self.gradient_ops[f"{name} (product of two input-dependent tensors)"] += 1
            return
        if name in _DIVISIONS:
            divisor = _arg(args, kwargs, 1, "other", None)
            if not (isinstance(divisor, Tensor) and self.is_tainted(divisor)):
                return
            self.gradient_ops[f"{name} (by an input-dependent tensor)"] += 1
            return
        self.gradient_ops[name] += 1

    def _handle(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        parse = SITES.get(func)
        if parse is not None:
            try:
                site = parse(args, kwargs)
            except (TypeError, ValueError, IndexError, KeyError, RuntimeError):
                site = None  # arguments PyTorch itself rejects: let it say so
            if site is not None and isinstance(site.x, Tensor) and site.x.is_floating_point():
                return self._activation(site)
            return NotImplemented
        pool = _POOLS.get(func)
        if pool is not None:
            try:
                x, fn, spatial, indices = pool(args, kwargs)
            except (TypeError, ValueError, IndexError, KeyError):
                return NotImplemented
            if isinstance(x, Tensor) and x.is_floating_point():
                return self._max_pool(x, fn, spatial, indices)
            return NotImplemented
        if self.split is not None and func in _LAYERS:
            return self._layer(func, args, kwargs)
        return NotImplemented

    def _activation(self, site: Site) -> Any:
        x: Tensor = site.x
        f = _activation(site)
        if self.phase == "record":
            if site.inplace:  # the input is overwritten: record a copy of it first
                x0 = x.detach().clone()
                y = x.clamp_(min=0.0, max=site.upper) if site.fn is None else x.copy_(f(x))
                self.steps.append(_Step("activation", site.name, tuple(x.shape), x0, self.keep(y)))
                return y
            y = f(x)
            self.steps.append(
                _Step("activation", site.name, tuple(x.shape), self.keep(x), self.keep(y))
            )
            return y
        step = self._next("activation", site.name, x)
        self.nonlinearities[site.name] += 1
        rectifier = site.fn is None
        if self.split is None or not self.is_tainted(x):
            return _Rescale.apply(
                x, step.x0, step.y0, f, rectifier, site.upper, site.inplace, self.scratch
            )
        held = self.split.get(x)
        if held is None:
            raise NotImplementedError(
                f"deeplift: rule='reveal_cancel' splits the input of each activation into the "
                f"sums of its positive and negative terms, which needs that input to be a linear "
                f"function (convolutions, linear layers, eval-mode BatchNorm, sums, products by "
                f"constants, concatenation, padding, average pooling, reshapes) of the previous "
                f"activations or the input. The {site.name} call {self.cursor} (input shape "
                f"{tuple(x.shape)}) is fed by {self.split.why(x)}, which is not linear in "
                "them: the paper defines no split there. Use rule='rescale' for this model"
            )
        pos, neg = held.get()
        assert step.y0 is not None  # recorded for every activation
        y = _RevealCancel.apply(
            x, pos, neg, step.x0, step.y0, f, rectifier, site.upper, site.inplace
        )
        self.split.neuron(y, step.y0)
        return y

    def _max_pool(
        self,
        x: Tensor,
        pool: Callable[[Tensor], tuple[Tensor, Tensor]],
        spatial: int,
        indices: bool,
    ) -> Any:
        name = f"max_pool{spatial}d"
        if self.phase == "record":
            y, i = pool(x)
            step = _Step("max_pool", name, tuple(x.shape), self.keep(x), self.keep(y))
            step.index = self.keep(i)
            self.steps.append(step)
            return (y, i) if indices else y
        step = self._next("max_pool", name, x)
        self.max_pools += 1
        y, i = _MaxPool.apply(x, step.x0, step.y0, step.index, pool, spatial)
        if self.split is not None:
            assert step.y0 is not None  # recorded for every max-pooling
            self.split.neuron(y, step.y0)
        return (y, i) if indices else y

    def _layer(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """RevealCancel: a conv / linear layer, whose output's parts :class:`_Split` tracks.

        The reference pass records the layer's input ``x0``; the paper's rule splits the terms
        ``w_i (x - x0)_i`` by sign (:meth:`_Split.layer`).
        """
        x = _arg(args, kwargs, 0, "input", None)
        weight = _arg(args, kwargs, 1, "weight", None)
        if not (isinstance(x, Tensor) and isinstance(weight, Tensor)):
            return NotImplemented
        name = _LAYERS[func]
        if self.phase == "record":
            self.steps.append(_Step("layer", name, tuple(x.shape), self.keep(x)))
            return NotImplemented
        step = self._next("layer", name, x)
        if self.is_tainted(weight):
            return NotImplemented  # a product of two input-dependent tensors
        y = func(*args, **kwargs)
        if self.is_tainted(x):
            assert self.split is not None
            self.split.layer(func, args, kwargs, y, step.x0)
        return y


# -- the method ------------------------------------------------------------------------------


@register("deeplift")
def deeplift(
    model: nn.Module,
    inputs: Tensor,
    target: TargetLike = None,
    *,
    baseline: BaselineLike = "zeros",
    rule: DeepLiftRule = "rescale",
    score: Score = "logit",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
) -> Attribution:
    r"""DeepLIFT (Shrikumar et al. 2017): contributions of the differences from a reference.

    .. math:: A = (x - x_0) \odot m, \qquad \sum_i A_i = S_c(x) - S_c(x_0)

    The multiplier :math:`m` is back-propagated by the chain rule, with the paper's rules:
    linear operations keep their gradient; at every elementwise activation :math:`f` the
    derivative is replaced by the Rescale multiplier
    :math:`\frac{f(y) - f(y_0)}{y - y_0}` (``rule="rescale"``, Sec. 3.5.2) or the two
    multipliers of RevealCancel (``rule="reveal_cancel"``, Sec. 3.5.3). Activations are found
    however the model writes them (``nn.ReLU``, ``F.relu``, ``ReLU6``, ``hardtanh``,
    ``clamp``, sigmoid, tanh, GELU, SiLU, Hardswish, ELU, ...: :mod:`salience.rectifiers`);
    Captum's ``DeepLift`` only sees ``nn`` modules of a few types and silently uses the
    gradient elsewhere (ReLU6, functional calls).

    **Max-pooling.** The paper's reference implementation (kundajelab/deeplift, whose only
    max-pooling mode is ``MaxPoolDeepLiftMode.gradient``) back-propagates max-pooling by its
    gradient, which does not conserve when the maximum moves between the reference and the
    input. salience sends each window's difference to the argmax of the input (share
    ``t``) and to the argmax of the reference (share ``1 - t``), with the ``t`` in
    ``[0, 1]`` that reproduces the window's output difference exactly; shares add up where
    windows overlap. Captum's rule (max-unpooling) overwrites where windows overlap and breaks
    summation-to-delta on SqueezeNet-style 3x3 stride-2 pooling; this one conserves.

    **What is exact.** On networks made of these activations, max-pooling and linear
    operations (convolutions, linear layers, eval-mode BatchNorm, additions, concatenation,
    padding, average pooling, reshapes, products with constants), ``sum(values)`` equals
    ``S(x) - S(x0)`` up to float rounding. Other nonlinear operations of the input (products
    of two input-dependent tensors, as in squeeze-and-excitation and attention; softmax,
    LayerNorm, divisions by the input, BatchNorm in training mode) are back-propagated by
    their gradient, as the paper has no rule for them: they are counted in
    ``extras["gradient_ops"]``, a warning names them, and ``extras["delta"]`` shows the gap.
    ``score="probability"`` puts a softmax after the logits: the paper explains logits.

    Args:
        model: Any differentiable PyTorch model written in Python (not TorchScript) that runs
            the same operations on the input and the reference.
        inputs: ``(N, C, H, W)`` preprocessed images.
        target: What to explain; see :mod:`salience.targets`. The class is resolved on the
            input, and the same class is scored on the reference.
        baseline: The reference ``x0``, as in :func:`~salience.integrated_gradients`:
            ``"zeros"`` (default), ``"black"``, ``"blur"``, ``"uniform"``, a number or a
            tensor broadcastable to ``inputs``.
        rule: ``"rescale"`` or ``"reveal_cancel"``. RevealCancel splits the input difference
            of each activation into the sums of its positive and negative terms, the terms
            of the linear function from the previous activations (or the input) that
            computes it, however it is written: convolutions and linear layers, eval-mode
            BatchNorm folded in, residual sums (each branch brings its own terms; an identity
            skip brings the difference of the activation it carries, split by sign),
            concatenation, padding, average pooling, products by constants
            (:mod:`._deeplift_parts`). An activation fed directly by an operation without a
            DeepLIFT rule (a product of two input-dependent tensors, LayerNorm, softmax...)
            raises ``NotImplementedError``.
        score: ``"logit"`` (the paper's choice), ``"probability"`` or ``"log_probability"``.
        forward_args: Extra arguments for the model, the same for the input and the reference
            (see :func:`salience.gradient`).
        allow_tf32: Let CUDA use TF32 (faster, less exact); off by default.

    Returns:
        An :class:`Attribution` (channels summed by :meth:`~Attribution.saliency`) with
        ``extras``: ``"delta"``, ``sum(values) - (S(x) - S(x0))`` per sample;
        ``"baseline"`` and ``"baseline_scores"``; ``"rule"``; ``"nonlinearities"``, the
        activation calls the rule replaced, by name; ``"max_pools"``, the max-pooling calls
        replaced; ``"gradient_ops"``, the nonlinear calls back-propagated by their gradient,
        by name (empty when the result is exact).

    Raises:
        RuntimeError: the model ran different operations on the input and the reference.
        NotImplementedError: ``rule="reveal_cancel"`` at an activation whose input is not a
            linear function of the previous activations; the message names the operation.
        TypeError: a TorchScript model.
        RuntimeError: a model that checkpoints part of its forward pass
            (``torch.utils.checkpoint``), which the backward pass recomputes outside the rules.

    References:
        Shrikumar, Greenside, Kundaje. Learning Important Features Through Propagating
        Activation Differences. ICML 2017, arXiv:1704.02685.
    """
    check_choice("rule", rule, _RULES)
    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as fwd:
        x = inputs.detach()
        base = make_baseline(x, baseline, model=model)
        tracer = _Tracer(rule)
        with torch.no_grad(), call_rule(model, tracer, method="deeplift", modules=fwd.modules):
            out0 = fwd(base.clone())
        if tracer.stale():  # the model changed recorded tensors in place: record copies
            tracer.restart()
            with torch.no_grad(), call_rule(model, tracer, method="deeplift", modules=fwd.modules):
                out0 = fwd(base.clone())
        tracer.copy = True  # the score's own records (below) are few and small
        leaf = x.clone().requires_grad_(True)
        with torch.enable_grad():
            tracer.phase = "replay"
            start = leaf.clone()  # the model may modify its input in place
            tracer.taint(start)
            if tracer.split is not None:
                tracer.split.neuron(start, base)
            with call_rule(model, tracer, method="deeplift", modules=fwd.modules):
                out = fwd(start)
            resolved = resolve_target(target, out, x.shape[0], score=score)
            # The score is part of what is explained: its operations go through the rules too.
            tracer.phase = "record"
            with torch.no_grad(), call_rule(model, tracer, method="deeplift", modules=fwd.modules):
                s0 = resolved.scores(out0)
            tracer.phase = "replay"
            with call_rule(model, tracer, method="deeplift", modules=fwd.modules):
                s = resolved.scores(out)
            tracer.finish()
            m = input_gradient(s.sum(), leaf)
    values = (x - base) * m
    delta = values.double().flatten(1).sum(1) - (s.detach().double() - s0.double())
    if tracer.gradient_ops:
        listed = ", ".join(f"{k} x {n}" for k, n in tracer.gradient_ops.most_common())
        change = (s.detach().double() - s0.double()).abs().clamp(min=1e-12)
        worst = float((delta.abs() / change).max())
        warn(
            f"deeplift: {sum(tracer.gradient_ops.values())} operation(s) of this model are not "
            f"covered by DeepLIFT's rules and were back-propagated with their gradient "
            f"({listed}); the attributions do not sum exactly to the change of the score "
            f"(largest gap {worst:.2%} of it; see extras['delta'])",
        )
    warn_zero_maps(
        "deeplift",
        values,
        "(the reference equals the input there, or the score does not change with it)",
    )
    return Attribution(
        values=values,
        target=resolved.classes,
        scores=s.detach(),
        method="deeplift",
        output=out,
        extras={
            "delta": delta.to(x.dtype),
            "baseline": base,
            "baseline_scores": s0.detach(),
            "rule": rule,
            "nonlinearities": dict(tracer.nonlinearities),
            "max_pools": tracer.max_pools,
            "gradient_ops": dict(tracer.gradient_ops),
        },
        reduction="sum",
    )
