r"""Input invariance: whether a map changes under an input shift that the model absorbs.

Kindermans et al. (*The (Un)reliability of Saliency Methods*, 2019, Sec. 2) build, from a
network :math:`f_1`, a *mean-shifted twin* :math:`f_2` whose first layer absorbs a constant
input shift :math:`m` in its bias:

.. math:: f_2(x + m) = f_1(x), \qquad W_2 = W_1, \quad b_2 = b_1 - W_1 m.

The two networks compute the same function of the same images; only the data are shifted. A
saliency method that is *input invariant* gives the same map for :math:`(f_1, x)` and
:math:`(f_2, x + m)`. The gradient is (the weights are the same); gradient x input and
Integrated Gradients with a zero baseline are not (the input, or the path from 0, changes);
Integrated Gradients is again invariant when its baseline is shifted alongside.

What :func:`mean_shift_twin` builds, exactly:

1. A deep copy of the model (the user's model is not modified).
2. A forward pass on the example inputs (forward hooks of :mod:`salience.hooks`) finds the
   **first layer**: the first ``nn.Conv1d/2d/3d`` or ``nn.Linear`` (or subclass) whose forward
   call returns. Before it the input may only go through modules that commute with a
   constant shift: ``nn.Identity``, ``nn.Flatten``, ``nn.Unflatten``, dropout in eval mode,
   reflection, replication or circular padding, and **constant (zero) padding**. Anything
   else (an activation, a normalization, a pooling) is refused with a message naming it.
3. **Padding.** Zero padding does not commute with a shift: the twin sees ``x + m`` with a
   border of zeros where the model saw ``x`` with a border of zeros, and ``W m`` is only
   partly present in the windows that overlap the border, so ``b - W m`` is wrong there.
   The twin therefore pads with ``value + m`` (per channel) where the model pads with
   ``value``: a ``ZeroPad2d``/``ConstantPad*d`` before the first layer is replaced by a
   module doing exactly that, and a convolution's own zero ``padding`` is moved into such a
   module (the convolution then runs unpadded). In coordinates of the original input the
   twin pads with zeros, exactly like the model. EfficientNet-Lite0's stem pads with a
   ``ZeroPad2d`` before its convolution (TensorFlow ``"SAME"`` padding): it gets this
   treatment and its twin is exact. Module names and parameter names do not change.
4. **Bias.** ``b_2 = b_1 - W_1 m`` (computed in float64; a layer without bias gets one).
   For a convolution ``W m`` sums each kernel against the per-channel shift; for a linear
   layer fed the flattened image, each weight against the shift of its pixel's channel.
5. **Verification.** ``twin(x + m)`` is compared with ``model(x)`` on the example inputs; a
   relative difference above ``1e-4`` (of the largest output) raises an error, naming the
   first layer: the input must reach the first layer only, through nothing else (a skip
   connection from the input, or a function applied in ``forward``, breaks the twin).

:func:`input_invariance` then runs each method on ``(model, x)`` and ``(twin, x + m)``, the
target resolved once on the model, and compares the two attributions per sample:

- ``change``: ``||A_2 - A_1|| / ||A_1||`` (L2 norms over all values of a sample);
- ``max_change``: ``max |A_2 - A_1| / max |A_1|``;
- ``rank_correlation``: Spearman rank correlation of the two saliency maps
  (:meth:`~salience.Attribution.saliency`);
- ``invariant``: ``change <= tolerance`` (default ``1e-2``).

Why a tolerance, and why the L2 norm: in exact arithmetic the twin is exact, and in float64
the gradient of EfficientNet-Lite0 and of its twin agree bit for bit. In float32, ``x + m``
is rounded, so pre-activations move by about ``1e-7``, and the few ReLU6 units that sit that
close to a kink switch: 81 of the 150,528 gradient values of the cat image move by more than
``1e-3`` of the largest (``max_change`` 4 %), while ``change`` is ``2e-3``. Methods that are
not invariant change by tens of percent or more for a shift of the size of the data
(gradient x input: 283 %), so ``1e-2`` separates the two by two orders of magnitude. Scale
the tolerance down with the shift: the change of gradient x input is proportional to it
(a shift of ``1e-2`` would change it by 2.8 % here).

References:
    Kindermans, Hooker, Adebayo, Alber, Schütt, Dähne, Erhan, Kim. The (Un)reliability of
    Saliency Methods. In: Explainable AI, LNCS 11700, Springer 2019, arXiv:1711.00867.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._forward import ForwardArgs, model_scope
from ..attribution import Attribution
from ..targets import TargetLike, resolve_target
from ._shift_twin import ShiftLike, _build_twin, _shifted
from .similarity import rank_correlation

__all__ = [
    "InputInvariance",
    "MethodInvariance",
    "input_invariance",
    "mean_shift_twin",
]


def mean_shift_twin(
    model: nn.Module,
    inputs: Tensor,
    shift: ShiftLike = 1.0,
    *,
    forward_args: ForwardArgs = None,
) -> nn.Module:
    """Return the mean-shifted twin of ``model``: ``twin(x + shift) == model(x)`` (Kindermans).

    A deep copy whose first layer absorbs the shift in its bias, ``b - W shift``; padding
    before the first layer pads with ``shift`` so that the twin is exact at the border too.
    See :mod:`salience.metrics.invariance` for exactly what is built and refused.

    Args:
        model: The model; it is not modified.
        inputs: Example ``(N, C, ...)`` inputs: a forward pass finds the first layer, and the
            twin is verified on them.
        shift: The constant added to the inputs: a number, or one per input channel.
        forward_args: Extra arguments of the model.

    Returns:
        The twin, a new ``nn.Module`` in the model's training mode.

    Raises:
        ValueError: the input passes through something other than padding, flattening or
            identity before the first layer, the first layer is a transposed convolution or
            pads inside its own forward, or the twin fails the verification.
        TypeError: a model that is not an ``nn.Module`` or cannot be deep-copied.
    """
    return _build_twin(model, inputs, shift, forward_args).model


# --------------------------------------------------------------------------- the check


@dataclass(frozen=True, eq=False)
class MethodInvariance:
    """How one method's attribution changes between a model and its mean-shifted twin.

    Attributes:
        method: The method's name.
        change: ``(N,)`` ``||A_twin - A|| / ||A||`` per sample (L2 norms; 0 when both are
            zero, inf when only the original is).
        max_change: ``(N,)`` ``max |A_twin - A| / max |A|`` per sample.
        rank_correlation: ``(N,)`` Spearman correlation of the two saliency maps (NaN for a
            constant map).
        invariant: ``(N,)`` bool, ``change <= tolerance``.
        tolerance: The tolerance.
        original: The attribution of the model on ``x``.
        shifted: The attribution of the twin on ``x + shift``.
    """

    method: str
    change: Tensor
    max_change: Tensor
    rank_correlation: Tensor
    invariant: Tensor
    tolerance: float
    original: Attribution
    shifted: Attribution

    @property
    def passed(self) -> bool:
        """``True`` when the attribution of every sample is invariant."""
        return bool(self.invariant.all())

    def verdict(self) -> str:
        """Return one line saying whether the method is input invariant."""
        worst = float(self.change.max())
        rank = float(self.rank_correlation.nanmean()) if self.change.numel() else math.nan
        if self.passed:
            return (
                f"{self.method}: invariant to the mean shift (relative change {worst:.1e} ≤ "
                f"{self.tolerance:g}): passes"
            )
        return (
            f"{self.method}: not invariant to the mean shift (the map changes by up to "
            f"{_percent(worst)}, rank correlation {rank:.2f}): fails"
        )

    def __repr__(self) -> str:
        return f"MethodInvariance({self.verdict()})"


def _relative(diff: Tensor, scale: Tensor) -> Tensor:
    """``diff / scale``; 0 where both are 0, inf where only ``scale`` is."""
    ratio = diff / scale.clamp(min=torch.finfo(torch.float64).tiny)
    zero = torch.where(diff > 0, torch.full_like(diff, math.inf), torch.zeros_like(diff))
    return torch.where(scale > 0, ratio, zero)


def _percent(v: float) -> str:
    return "inf" if math.isinf(v) else f"{100 * v:.3g} %"


@dataclass(frozen=True, eq=False)
class InputInvariance(Mapping[str, MethodInvariance]):
    """The result of :func:`input_invariance`, a mapping of method name to result.

    ``result["gradient"]`` is a :class:`MethodInvariance`.

    Attributes:
        methods: ``{method: MethodInvariance}`` in the order run.
        shift: The shift, ``()`` or ``(C,)`` float64.
        layer: The first layer, which absorbed the shift.
        padding: The padding modules (or convolutions) that pad with the shift in the twin.
        output_change: ``max |twin(x + shift) - model(x)| / max |model(x)|``, the twin's
            exactness.
    """

    methods: dict[str, MethodInvariance]
    shift: Tensor
    layer: str
    padding: tuple[str, ...]
    output_change: float

    def __getitem__(self, method: str) -> MethodInvariance:
        return self.methods[method]

    def __iter__(self) -> Iterator[str]:
        return iter(self.methods)

    def __len__(self) -> int:
        return len(self.methods)

    def table(self) -> list[dict[str, Any]]:
        """Return one row per method.

        Keys: ``method``, ``change`` and ``max_change`` (largest over the samples),
        ``rank_correlation`` (mean), ``invariant``.
        """
        return [
            {
                "method": name,
                "change": float(r.change.max()),
                "max_change": float(r.max_change.max()),
                "rank_correlation": float(r.rank_correlation.nanmean()),
                "invariant": r.passed,
            }
            for name, r in self.methods.items()
        ]

    def verdict(self) -> str:
        """One line per method."""
        return "\n".join(r.verdict() for r in self.methods.values())

    def __repr__(self) -> str:
        shift = self.shift.tolist()
        head = (
            f"InputInvariance(shift={shift}, layer={self.layer!r}, "
            f"twin exact to {self.output_change:.1e})"
        )
        return "\n".join([head, *("  " + r.verdict() for r in self.methods.values())])


def _shift_baseline(value: Any, shift: Tensor, x: Tensor, method: str) -> Any:
    s = shift.to(x.device, x.dtype)
    if s.ndim == 1:
        s = s.view(1, -1, *([1] * (x.ndim - 2)))
    if isinstance(value, str):
        if value == "zeros":
            return torch.zeros_like(x[:1]) + s
        if value in ("blur", "uniform"):
            return value  # computed from the (shifted) input: it moves with it
        raise ValueError(
            f"shift_baseline: {method}'s baseline {value!r} does not follow the input; pass it "
            "as a tensor to have it shifted"
        )
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value) + s
    if isinstance(value, Tensor):
        return value.to(x.device, x.dtype) + s
    raise TypeError(f"shift_baseline: cannot shift {method}'s baseline {value!r}")


def input_invariance(
    model: nn.Module,
    inputs: Tensor,
    methods: Sequence[str] = ("gradient", "input_x_gradient", "integrated_gradients"),
    target: TargetLike = None,
    *,
    shift: ShiftLike = 1.0,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    shift_baseline: bool = False,
    tolerance: float = 1e-2,
    forward_args: ForwardArgs = None,
) -> InputInvariance:
    """Input invariance (Kindermans et al.): each method on a model and on its mean-shifted twin.

    Runs every method on ``(model, inputs)`` and on ``(twin, inputs + shift)``, where
    ``twin = mean_shift_twin(model, inputs, shift)`` computes the same outputs, and compares
    the attributions; see :mod:`salience.metrics.invariance`.

    Example:
        >>> result = input_invariance(model, x, ["gradient", "input_x_gradient"])
        >>> print(result)  # doctest: +SKIP
        gradient: invariant to the mean shift (relative change 2.2e-03 ≤ 0.01): passes
        input_x_gradient: not invariant to the mean shift (...): fails

    Args:
        model: The model; it is not modified.
        inputs: ``(N, C, H, W)`` preprocessed images.
        methods: Registered method names.
        target: What to explain; resolved once on the model (``None``: its predicted class).
        shift: The constant added to the inputs: a number, or one per channel.
        options: ``{method: {option: value}}``.
        shift_baseline: Shift a method's ``baseline`` option (Integrated Gradients' reference
            point) along with the input on the twin: ``"zeros"`` becomes the shift, a number
            or tensor ``b`` becomes ``b + shift``. The paper's remedy: a reference that moves
            with the data makes Integrated Gradients invariant.
        tolerance: Largest relative L2 change (``change``) that counts as invariant; see
            :mod:`salience.metrics.invariance` for why it is not zero in float32.
        forward_args: Extra arguments of the model, passed to every method.

    Returns:
        An :class:`InputInvariance`, a mapping from method name to :class:`MethodInvariance`.

    Raises:
        ValueError: an unknown method or option, a model whose twin cannot be built (see
            :func:`mean_shift_twin`), a non-positive tolerance.
    """
    from ..registry import check_options, get_method

    if not (isinstance(tolerance, numbers.Real) and tolerance > 0):
        raise ValueError(f"tolerance must be a positive number, got {tolerance!r}")
    if isinstance(methods, str):
        methods = [methods]
    if not methods:
        raise ValueError("input_invariance needs at least one method")
    specs = {name: get_method(name) for name in methods}
    opts = {name: dict((options or {}).get(name, {})) for name in methods}
    for name, spec in specs.items():
        check_options(spec, opts[name])
        if forward_args is not None:
            if "forward_args" not in spec.options:
                raise ValueError(f"{name} takes no forward_args")
            opts[name]["forward_args"] = forward_args
    unknown = set(options or {}) - set(methods)
    if unknown:
        raise ValueError(f"options given for methods not run: {sorted(unknown)}")
    built = _build_twin(model, inputs, shift, forward_args)
    x = inputs.detach()
    with model_scope(model, x, forward_args=forward_args) as fwd, torch.no_grad():
        output = fwd(x.clone())
    resolved = resolve_target(target, output, x.shape[0])
    fixed = resolved.classes if resolved.classes is not None else target
    x_shifted = _shifted(x, built.shift)
    results: dict[str, MethodInvariance] = {}
    for name, spec in specs.items():
        twin_opts = dict(opts[name])
        if shift_baseline and "baseline" in spec.options:
            default = inspect.signature(spec.func).parameters["baseline"].default
            twin_opts["baseline"] = _shift_baseline(
                twin_opts.get("baseline", default), built.shift, x, name
            )
        original = spec.func(model, x, fixed, **opts[name])
        shifted = spec.func(built.model, x_shifted, fixed, **twin_opts)
        a = original.values.detach()
        b = shifted.values.detach()
        delta = (b - a).double().flatten(1)
        change = _relative(delta.norm(dim=1), a.double().flatten(1).norm(dim=1))
        max_change = _relative(delta.abs().amax(dim=1), a.double().flatten(1).abs().amax(dim=1))
        rank = rank_correlation(original.saliency(), shifted.saliency())
        results[name] = MethodInvariance(
            method=name,
            change=change,
            max_change=max_change,
            rank_correlation=rank,
            invariant=change <= tolerance,
            tolerance=float(tolerance),
            original=original,
            shifted=shifted,
        )
    return InputInvariance(
        methods=results,
        shift=built.shift,
        layer=built.layer,
        padding=built.padding,
        output_change=built.output_change,
    )
