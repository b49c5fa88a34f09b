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
  ``m = (f(x) - f(x0)) / (x - x0)``, or RevealCancel (``rule="reveal_cancel"``);
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

import warnings
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, warn_zero_maps
from .._forward import ForwardArgs, model_scope
from ..attribution import Attribution
from ..hooks import call_rule
from ..rectifiers import SITES, Site
from ..registry import register
from ..targets import Score, TargetLike, resolve_target
from ._deeplift_rules import (
    _activation,
    _MaxPool,
    _Rescale,
    _RevealCancel,
)
from .integrated import BaselineLike, make_baseline

__all__ = ["DeepLiftRule", "deeplift"]

DeepLiftRule = Literal["rescale", "reveal_cancel"]
_RULES = ("rescale", "reveal_cancel")


# -- which calls are what --------------------------------------------------------------------


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


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
for _nd, _fn, _wi in (
    (1, F.adaptive_max_pool1d, F.adaptive_max_pool1d_with_indices),
    (2, F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices),
    (3, F.adaptive_max_pool3d, F.adaptive_max_pool3d_with_indices),
):
    _POOLS[_fn] = _adaptive_max_pool(_nd, _wi)
    _POOLS[_wi] = _adaptive_max_pool(_nd, _wi)

# Layers whose positive and negative contributions RevealCancel separates: (input, weight,
# bias) first, the other arguments passed on unchanged.
_LAYERS = {F.linear: "linear", F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d"}

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
    # Tensors computed from the input in the replay pass, by id (weak: freed tensors leave).
    tainted: weakref.WeakValueDictionary[int, Tensor] = field(
        default_factory=weakref.WeakValueDictionary
    )
    # RevealCancel: for a layer output (by id), its version and a function computing its
    # positive and negative parts (only if an activation asks for them).
    parts: dict[int, tuple[Tensor, int, Callable[[], tuple[Tensor, Tensor]]]] = field(
        default_factory=dict
    )

    # -- bookkeeping --

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
        self.tainted[id(t)] = t

    def is_tainted(self, t: Tensor) -> bool:
        return self.tainted.get(id(t)) is t

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
        result = self._handle(func, args, kwargs)
        if self.phase == "replay":
            inputs = _tensors(args, kwargs)
            if any(self.is_tainted(t) for t in inputs):
                if result is NotImplemented:
                    result = func(*args, **kwargs)
                    self._classify(func, args, kwargs, inputs, result)
                for out in _outputs(result):
                    self.taint(out)
                if _name(func) == "__setitem__" and isinstance(args[0], Tensor):
                    self.taint(args[0])
        return result

    def _classify(
        self,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        inputs: list[Tensor],
        result: Any,
    ) -> None:
        """Count a call not covered by the rules that computes nonlinearly from the input."""
        name = _name(func)
        outs = _outputs(result)
        if name in _INERT or not any(o.is_floating_point() for o in outs):
            return
        if name in _LINEAR:
            return
        if name == "batch_norm":
            training = bool(_arg(args, kwargs, 5, "training", False))
            if not training:
                return
            self.gradient_ops["batch_norm (training mode: batch statistics)"] += 1
            return
        dependent = [t for t in inputs if self.is_tainted(t)]
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
        if self.rule == "reveal_cancel":
            if func in _LAYERS:
                return self._layer(func, args, kwargs)
            if func is F.batch_norm and self.phase == "replay":
                return self._batch_norm(func, args, kwargs)
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
        if self.rule == "reveal_cancel" and self.is_tainted(x):
            held = self.parts.get(id(x))
            if held is None or held[0] is not x or held[1] != x._version:
                raise NotImplementedError(
                    f"deeplift: rule='reveal_cancel' separates positive and negative "
                    f"contributions at nonlinearities whose input is the output of a convolution "
                    f"or linear layer (optionally followed by an eval-mode BatchNorm), as in the "
                    f"paper. The {site.name} call {self.cursor} (input shape "
                    f"{tuple(x.shape)}) takes its input from another operation (a residual "
                    "addition, a concatenation, a pooling...), where the paper defines no such "
                    "split. Use rule='rescale' for this model"
                )
            pos, neg = held[2]()
            return _RevealCancel.apply(x, pos, neg, step.x0, f, rectifier, site.upper, site.inplace)
        return _Rescale.apply(x, step.x0, step.y0, f, rectifier, site.upper, site.inplace)

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
        return (y, i) if indices else y

    def _layer(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """RevealCancel: a conv / linear layer, with its output's positive and negative parts.

        For ``y = W x + b`` and ``d = x - x0`` (paper, Sec. 3.5.1, with ``W d`` split by the
        sign of each term ``w_i d_i``): ``P = W+ d+ + W- d-`` and ``N = W- d+ + W+ d-``, where
        ``W+``, ``d+`` are the positive parts and ``W-``, ``d-`` the negative ones. Their
        gradient with respect to ``x`` sends ``w_i`` to ``P`` when ``w_i d_i > 0``, to ``N``
        when ``w_i d_i < 0``: the paper's multipliers.
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
        y = func(*args, **kwargs)
        if not self.is_tainted(x):
            return y
        rest = list(args[3:])
        options = {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}
        d = x - step.x0  # computed now: the model may change x in place later
        w = weight.detach()

        def parts() -> tuple[Tensor, Tensor]:
            d_pos, d_neg = d.clamp(min=0), d.clamp(max=0)
            w_pos, w_neg = w.clamp(min=0), w.clamp(max=0)

            def apply(t: Tensor, k: Tensor) -> Tensor:
                return func(t, k, None, *rest, **options)

            pos = apply(d_pos, w_pos) + apply(d_neg, w_neg)
            neg = apply(d_pos, w_neg) + apply(d_neg, w_pos)
            return pos, neg

        self.parts[id(y)] = (y, y._version, parts)
        return y

    def _batch_norm(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """RevealCancel: carry the parts of a layer output through an eval-mode BatchNorm.

        BatchNorm in eval mode scales channel ``c`` by ``a_c = weight_c / sqrt(var_c + eps)``:
        fused into the layer before it, the sums of its positive and negative terms are
        ``a P`` and ``a N`` (swapped where ``a < 0``: RevealCancel's formulas are symmetric in
        the two parts, so they need not be reordered).
        """
        x = _arg(args, kwargs, 0, "input", None)
        training = bool(_arg(args, kwargs, 5, "training", False))
        held = self.parts.get(id(x)) if isinstance(x, Tensor) else None
        if training or held is None or held[0] is not x or held[1] != x._version:
            return NotImplemented
        y = func(*args, **kwargs)
        var = _arg(args, kwargs, 2, "running_var", None)
        weight = _arg(args, kwargs, 3, "weight", None)
        eps = float(_arg(args, kwargs, 7, "eps", 1e-5))
        scale = torch.rsqrt(var.detach() + eps)
        if weight is not None:
            scale = scale * weight.detach()
        scale = scale.view(1, -1, *([1] * (x.ndim - 2)))
        before = held[2]

        def parts() -> tuple[Tensor, Tensor]:
            pos, neg = before()
            return scale * pos, scale * neg

        self.parts[id(y)] = (y, y._version, parts)
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
            of each activation into the sums of positive and negative terms of the
            convolution or linear layer computing it (through an eval-mode BatchNorm, folded
            in); an activation fed by anything else (a residual addition, a concatenation)
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
        NotImplementedError: ``rule="reveal_cancel"`` at an activation that is not fed by a
            convolution or linear layer.
        TypeError: a TorchScript model.

    References:
        Shrikumar, Greenside, Kundaje. Learning Important Features Through Propagating
        Activation Differences. ICML 2017, arXiv:1704.02685.
    """
    check_choice("rule", rule, _RULES)
    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as fwd:
        x = inputs.detach()
        base = make_baseline(x, baseline, model=model)
        tracer = _Tracer(rule)
        with torch.no_grad(), call_rule(model, tracer, method="deeplift"):
            out0 = fwd(base.clone())
        if tracer.stale():  # the model changed recorded tensors in place: record copies
            tracer.restart()
            with torch.no_grad(), call_rule(model, tracer, method="deeplift"):
                out0 = fwd(base.clone())
        tracer.copy = True  # the score's own records (below) are few and small
        leaf = x.clone().requires_grad_(True)
        with torch.enable_grad():
            tracer.phase = "replay"
            start = leaf.clone()  # the model may modify its input in place
            tracer.taint(start)
            with call_rule(model, tracer, method="deeplift"):
                out = fwd(start)
            resolved = resolve_target(target, out, x.shape[0], score=score)
            # The score is part of what is explained: its operations go through the rules too.
            tracer.phase = "record"
            with torch.no_grad(), call_rule(model, tracer, method="deeplift"):
                s0 = resolved.scores(out0)
            tracer.phase = "replay"
            with call_rule(model, tracer, method="deeplift"):
                s = resolved.scores(out)
            tracer.finish()
            if not s.requires_grad:
                raise ValueError(
                    "the explained score does not depend on the inputs through autograd (is "
                    "the model or the target detached, or run under torch.no_grad inside "
                    "forward?)"
                )
            (m,) = torch.autograd.grad(s.sum(), leaf)
    values = (x - base) * m
    delta = values.double().flatten(1).sum(1) - (s.detach().double() - s0.double())
    if tracer.gradient_ops:
        listed = ", ".join(f"{k} x {n}" for k, n in tracer.gradient_ops.most_common())
        change = (s.detach().double() - s0.double()).abs().clamp(min=1e-12)
        worst = float((delta.abs() / change).max())
        warnings.warn(
            f"deeplift: {sum(tracer.gradient_ops.values())} operation(s) of this model are not "
            f"covered by DeepLIFT's rules and were back-propagated with their gradient "
            f"({listed}); the attributions do not sum exactly to the change of the score "
            f"(largest gap {worst:.2%} of it; see extras['delta'])",
            stacklevel=3,
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
        output=out.detach() if isinstance(out, Tensor) else out,
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
