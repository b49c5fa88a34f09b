"""The gradient family: vanilla gradient, gradient x input, DeconvNet, guided backprop, SmoothGrad.

Every method differentiates one score per sample (see :mod:`salience.targets`) with
``torch.autograd.grad`` with respect to a private copy of the inputs: parameter ``.grad``, the
user's autograd graph and the input tensor are never touched, and buffers are restored.

Every method also takes ``forward_args=`` (extra arguments passed to the model with the
image) and ``allow_tf32=`` (TF32 is off during the call by default); see
:mod:`salience._forward`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_positive_int, input_gradient, warn, warn_zero_maps
from .._chunks import BatchSize, Chunker, add_rows
from .._containers import map_tensors
from .._forward import Forward, ForwardArgs, model_scope
from ..attribution import Attribution, Reduction
from ..hooks import ruled_forward
from ..rectifiers import Activations, RectifierRule, resolve_activations
from ..registry import register
from ..targets import ResolvedTarget, Score, TargetLike, resolve_target

__all__ = ["deconvnet", "gradient", "guided_backprop", "input_x_gradient", "smoothgrad"]


def backprop(
    forward: Forward,
    inputs: Tensor,
    target: TargetLike,
    *,
    score: Score = "logit",
    rule: RectifierRule = "gradient",
    activations: Activations = "rectifiers",
    method: str | None = None,
    report: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor, Tensor, ResolvedTarget]:
    """One forward and one backward pass: ``d score / d inputs`` under a rectifier rule.

    ``activations`` and ``method`` (the name errors use) go to
    :func:`~salience.hooks.ruled_forward`; under a rule other than ``"gradient"``, what it
    modified is added to ``report`` (``rectifiers``, ``activations_modified``).

    Returns:
        ``(grad, output, scores, resolved_target)``; ``output`` and ``scores`` are detached.
    """
    x = inputs.detach().requires_grad_(True)  # a new leaf; the user's tensor is not touched
    with torch.enable_grad():
        # a copy for the model, which may modify its input in place
        output = _ruled_forward(forward, x.clone, None, rule, activations, method, report)
        # The rule belongs to the model: a ReLU inside a callable target keeps its gradient.
        resolved = resolve_target(target, output, x.shape[0], score=score)
        scores = resolved.scores(output)
        grad = _grad(scores, x)
    return grad, map_tensors(Tensor.detach, output), scores.detach(), resolved


def score_gradient(
    forward: Forward,
    leaf: Tensor,
    target: ResolvedTarget,
    sample_ids: Tensor,
    *,
    offset: Tensor | None = None,
    rule: RectifierRule = "gradient",
    activations: Activations = "rectifiers",
    method: str | None = None,
    report: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """Scores of the rows ``offset + leaf`` (or of ``leaf``) and their gradient w.r.t. ``leaf``.

    The model sees a non-leaf tensor, so it may change its input in place. ``sample_ids``
    says which sample each row comes from (see :meth:`ResolvedTarget.scores`). ``rule``,
    ``activations``, ``method`` and ``report`` are as in :func:`backprop`.

    Returns:
        ``(scores, grad)``, the scores detached.
    """
    with torch.enable_grad():
        output = _ruled_forward(
            forward,
            lambda: leaf.clone() if offset is None else offset + leaf,
            sample_ids,
            rule,
            activations,
            method,
            report,
        )
        scores = target.scores(output, sample_ids)
        return scores.detach(), _grad(scores, leaf)


def _ruled_forward(
    forward: Forward,
    rows: Callable[[], Tensor],
    sample_ids: Tensor | None,
    rule: RectifierRule,
    activations: Activations,
    method: str | None,
    report: dict[str, Any] | None,
) -> Any:
    """Run the model on ``rows()`` under ``rule``; what the rule modified goes to ``report``.

    ``rows`` makes the rows afresh at each call (:func:`~salience.hooks.ruled_forward` may run
    the pass twice, and the model may change its input in place); ``sample_ids``: as for
    :class:`~salience._forward.Forward` (``None``: the rows are the batch).
    """
    output, extras = ruled_forward(
        forward.model,
        lambda: forward(rows(), sample_ids),
        rule,
        activations=activations,
        method=method,
        modules=forward.modules,
    )
    if extras is not None and report is not None:
        report.update(extras)
    return output


def clean_rows_ride_along(device: torch.device, target: TargetLike) -> bool:
    """Whether a batched method runs its clean inputs in its first pass, not in one of their own.

    SmoothGrad and Integrated Gradients need the model's output on the clean inputs (the
    target, the scores they report, IG's completeness gap), then run many rows with a
    backward. Off the CPU a pass costs its kernel launches more than its rows at small
    batches: the clean rows ride in the first pass (one pass fewer; their gradient is computed
    and dropped). On the CPU a row costs its arithmetic, and a clean row costs less without a
    backward: a no-grad pass of its own. A callable target reads the model output as a whole,
    which the first pass cannot split: a pass of its own too.
    """
    return device.type != "cpu" and not (callable(target) and not isinstance(target, Tensor))


def score_gradient_with_clean(
    forward: Forward,
    leaf: Tensor,
    sample_ids: Tensor,
    clean: Tensor,
    target: TargetLike,
    *,
    score: Score,
    offset: Tensor | None = None,
    rule: RectifierRule = "gradient",
    activations: Activations = "rectifiers",
    method: str | None = None,
    report: dict[str, Any] | None = None,
) -> tuple[ResolvedTarget, Tensor, Tensor, Tensor]:
    """:func:`score_gradient` with the clean rows ``clean`` in the same forward pass.

    ``clean`` holds whole copies of the batch of ``n`` inputs (the inputs first; IG's
    baseline after them); the class target is resolved on the first copy's output (see
    :func:`clean_rows_ride_along`).

    Returns:
        ``(resolved target, output of the clean rows, scores, grad)``, all but the target
        detached; the scores and the gradient are those of the rows ``offset + leaf``.
    """
    n, k = forward.n, clean.shape[0]
    copies = torch.arange(n, device=sample_ids.device).repeat(k // n)
    with torch.enable_grad():
        points = leaf if offset is None else offset + leaf  # cat copies: the model may edit it
        output = _ruled_forward(
            forward,
            lambda: torch.cat([clean, points]),
            torch.cat([copies, sample_ids]),
            rule,
            activations,
            method,
            report,
        )
        rows = k + sample_ids.shape[0]
        if not (isinstance(output, Tensor) and output.ndim > 0 and output.shape[0] == rows):
            resolve_target(target, output, rows, score=score)  # says what a class target needs
            raise AssertionError("unreachable: resolve_target accepts only (rows, classes)")
        resolved = resolve_target(target, output[:n], n, score=score)
        scores = resolved.scores(output[k:], sample_ids)
        return resolved, output[:k].detach(), scores.detach(), _grad(scores, leaf)


def _grad(scores: Tensor, wrt: Tensor) -> Tensor:
    """``d sum(scores) / d wrt``, or a clear error when the scores do not depend on it."""
    grad = input_gradient(scores.sum(), wrt)
    if wrt.is_contiguous() and not grad.is_contiguous():
        grad = grad.contiguous()  # the layout of the input (compiled code may choose another)
    return grad


def _result(
    method: str,
    values: Tensor,
    output: Tensor,
    scores: Tensor,
    resolved: ResolvedTarget,
    reduction: Reduction,
    extras: dict[str, Any] | None = None,
) -> Attribution:
    warn_zero_maps(
        method,
        values,
        "the explained score does not change with any input pixel here (saturated or dead "
        "units, or a constant target)",
    )
    return Attribution(
        values=values,
        target=resolved.classes,
        scores=scores,
        method=method,
        output=output,
        extras=extras or {},
        reduction=reduction,
    )


@register("gradient")
def gradient(
    model: nn.Module,
    inputs: Tensor,
    target: TargetLike = None,
    *,
    score: Score = "logit",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
) -> Attribution:
    r"""Vanilla gradient saliency (Simonyan et al. 2013): the gradient of the score.

    .. math:: M = \frac{\partial S_c(x)}{\partial x}

    :meth:`Attribution.saliency` takes ``max_channels |M|``, as in the paper (Eq. 10).

    Args:
        model: Any differentiable PyTorch model.
        inputs: ``(N, C, H, W)`` preprocessed images.
        target: What to explain; see :mod:`salience.targets`.
        score: Differentiate the ``"logit"`` (the paper's choice), ``"probability"`` or
            ``"log_probability"`` of the class.
        forward_args: Extra arguments for the model after the image: a tuple (positional), a
            dict (keyword) or a tensor. Tensors with the batch size as first axis follow the
            image's rows. For a VQA model, ``forward_args=(question,)``.
        allow_tf32: Let CUDA compute convolutions and matmuls in TF32 (faster, about 1e-3
            relative error per layer); by default the call computes in full float32.

    References:
        Simonyan, Vedaldi, Zisserman. Deep Inside Convolutional Networks: Visualising Image
        Classification Models and Saliency Maps. ICLR Workshop 2014, arXiv:1312.6034.
    """
    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as fwd:
        grad, output, scores, resolved = backprop(fwd, inputs, target, score=score)
    return _result("gradient", grad, output, scores, resolved, "abs_max")


@register("input_x_gradient")
def input_x_gradient(
    model: nn.Module,
    inputs: Tensor,
    target: TargetLike = None,
    *,
    score: Score = "logit",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
) -> Attribution:
    r"""Gradient x input (Shrikumar et al. 2016): the input times the gradient of the score.

    .. math:: A = x \odot \frac{\partial S_c(x)}{\partial x}

    For a bias-free piecewise-linear network, ``A`` sums to the score. The saliency map sums
    the signed attributions over channels.

    References:
        Shrikumar, Greenside, Shcherbina, Kundaje. Not Just a Black Box: Learning Important
        Features Through Propagating Activation Differences. arXiv:1605.01713, 2016.
    """
    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as fwd:
        grad, output, scores, resolved = backprop(fwd, inputs, target, score=score)
    return _result("input_x_gradient", inputs.detach() * grad, output, scores, resolved, "sum")


def _rectified(
    method: str,
    rule: RectifierRule,
    model: nn.Module,
    inputs: Tensor,
    target: TargetLike,
    score: Score,
    activations: Activations,
    forward_args: ForwardArgs,
    allow_tf32: bool,
) -> Attribution:
    """DeconvNet or guided backprop: one pass under ``rule``, with what the rule modified."""
    resolve_activations(activations)  # a bad option fails before any forward pass
    report: dict[str, Any] = {}
    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as fwd:
        grad, output, scores, resolved = backprop(
            fwd,
            inputs,
            target,
            score=score,
            rule=rule,
            activations=activations,
            method=method,
            report=report,
        )
    return _result(method, grad, output, scores, resolved, "abs_max", report)


@register("deconvnet")
def deconvnet(
    model: nn.Module,
    inputs: Tensor,
    target: TargetLike = None,
    *,
    score: Score = "logit",
    activations: Activations = "rectifiers",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
) -> Attribution:
    r"""DeconvNet (Zeiler & Fergus 2013): back-propagate only positive signal through ReLUs.

    At every rectifier the backward pass is :math:`R_l = \max(R_{l+1}, 0)`, whatever the sign
    of the forward input. Applies to every rectifier however the network writes it: ReLU,
    ReLU6 and hardtanh(0, t) of mobile networks, ``clamp(min=0)``, ``clamp(0, t)``,
    ``clamp_min(0)``, ``threshold(0, 0)``, ``maximum(x, 0)``, ``leaky_relu`` with slope 0 (see
    :mod:`salience.rectifiers`).

    A model that runs no rectifier (GELU, SiLU, Hardswish only: ViT, ConvNeXt,
    EfficientNet-B0) is an error: the result would be exactly the plain gradient.

    Args:
        model: Any differentiable PyTorch model written in Python (not TorchScript).
        inputs: ``(N, C, H, W)`` preprocessed images.
        target: What to explain; see :mod:`salience.targets`.
        score: See :func:`gradient`.
        activations: Where the rule applies. ``"rectifiers"`` (the paper's method); ``"all"``
            or a collection of names such as ``{"gelu", "silu", "hardswish"}`` (see
            :data:`salience.rectifiers.ACTIVATIONS`) also back-propagates ``max(R_{l+1}, 0)`` at
            those activations. That extension is **not** the paper's method.
        forward_args: Extra arguments for the model (see :func:`gradient`).
        allow_tf32: Let CUDA use TF32 (faster, less exact); off by default.

    Returns:
        An :class:`Attribution` whose ``extras["rectifiers"]`` is the number of rectifier calls
        the rule modified in the forward pass (those the output depends on, where the rule is
        put on their backward nodes: see :mod:`salience.hooks`), and
        ``extras["activations_modified"]`` the calls of other activations modified (by name;
        empty unless ``activations`` asks).

    Raises:
        ValueError: the model runs no rectifier (nor an activation named in
            ``activations``); the message names the activations it uses.
        TypeError: a TorchScript model, whose rectifiers cannot be reached.

    References:
        Zeiler, Fergus. Visualizing and Understanding Convolutional Networks. ECCV 2014,
        arXiv:1311.2901.
    """
    return _rectified(
        "deconvnet",
        "deconvnet",
        model,
        inputs,
        target,
        score,
        activations,
        forward_args,
        allow_tf32,
    )


@register("guided_backprop")
def guided_backprop(
    model: nn.Module,
    inputs: Tensor,
    target: TargetLike = None,
    *,
    score: Score = "logit",
    activations: Activations = "rectifiers",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
) -> Attribution:
    r"""Guided backpropagation (Springenberg et al. 2014): gradient and DeconvNet masks together.

    At every rectifier :math:`R_l = [f_l > 0] \cdot [R_{l+1} > 0] \cdot R_{l+1}`. For a
    clipped rectifier such as ReLU6 the forward mask is its derivative,
    :math:`[0 < f_l < 6]`. Applies to every rectifier however the network writes it (see
    :func:`deconvnet`), and works on every model the plain gradient works on, also one that
    changes a rectifier's input or output in place afterwards.

    A model that runs no rectifier (GELU, SiLU, Hardswish only: ViT, ConvNeXt,
    EfficientNet-B0) is an error: the result would be exactly the plain gradient.

    Args:
        model: Any differentiable PyTorch model written in Python (not TorchScript).
        inputs: ``(N, C, H, W)`` preprocessed images.
        target: What to explain; see :mod:`salience.targets`.
        score: See :func:`gradient`.
        activations: Where the rule applies. ``"rectifiers"`` (the paper's method); ``"all"``
            or a collection of names such as ``{"gelu", "silu", "hardswish"}`` (see
            :data:`salience.rectifiers.ACTIVATIONS`) also applies the guided rule at those
            activations: :math:`R_l = f'(x) \cdot \max(R_{l+1}, 0)`, the activation's own
            derivative times the positive part of the signal. That extension, used for
            transformers and EfficientNets by some libraries, is **not** the paper's method.
        forward_args: Extra arguments for the model (see :func:`gradient`).
        allow_tf32: Let CUDA use TF32 (faster, less exact); off by default.

    Returns:
        An :class:`Attribution` with ``extras["rectifiers"]`` and
        ``extras["activations_modified"]`` as in :func:`deconvnet`.

    Raises:
        ValueError: the model runs no rectifier (nor an activation named in
            ``activations``); the message names the activations it uses.
        TypeError: a TorchScript model, whose rectifiers cannot be reached.

    References:
        Springenberg, Dosovitskiy, Brox, Riedmiller. Striving for Simplicity: The All
        Convolutional Net. ICLR Workshop 2015, arXiv:1412.6806.
    """
    return _rectified(
        "guided_backprop",
        "guided",
        model,
        inputs,
        target,
        score,
        activations,
        forward_args,
        allow_tf32,
    )


SmoothVariant = Literal["mean", "squared", "vargrad"]
# The methods SmoothGrad can smooth, and the rectifier rule each back-propagates with.
_SMOOTH_BASES: dict[str, RectifierRule] = {
    "gradient": "gradient",
    "input_x_gradient": "gradient",
    "deconvnet": "deconvnet",
    "guided_backprop": "guided",
}


@register("smoothgrad")
def smoothgrad(
    model: nn.Module,
    inputs: Tensor,
    target: TargetLike = None,
    *,
    base: str = "gradient",
    samples: int = 50,
    noise_level: float = 0.15,
    variant: SmoothVariant = "mean",
    seed: int = 0,
    batch_size: BatchSize = "auto",
    score: Score = "logit",
    activations: Activations = "rectifiers",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
) -> Attribution:
    r"""SmoothGrad (Smilkov et al. 2017): average a gradient map over noisy copies of the input.

    .. math:: \hat M(x) = \frac1n \sum_{k=1}^n M(x + \epsilon_k),\quad
              \epsilon_k \sim \mathcal N(0, \sigma^2),\quad
              \sigma = \text{noise\_level} \cdot (x_{max} - x_{min})

    ``variant="squared"`` averages :math:`M^2` (SmoothGrad², Hooker et al. 2019) and
    ``"vargrad"`` takes the variance (Adebayo et al. 2018). The target is resolved once, on the
    clean input. Noise draws are seeded and shared by the samples of a batch, so a batch gives
    the same maps as its samples one by one, and the chunking (``batch_size`` rows per
    forward pass) does not change the result.

    Args:
        model: Any differentiable PyTorch model.
        inputs: ``(N, C, H, W)`` preprocessed images.
        target: What to explain, resolved on the clean input; see :mod:`salience.targets`.
        base: The gradient method to smooth: ``"gradient"``, ``"input_x_gradient"``,
            ``"deconvnet"`` or ``"guided_backprop"``.
        samples: Number of noisy copies ``n`` (the paper uses 50).
        noise_level: ``sigma`` as a fraction of each input's value range (paper: 10-20 %).
        variant: ``"mean"``, ``"squared"`` or ``"vargrad"``.
        seed: Seed of the noise, drawn on the inputs' device in float32 whatever the inputs'
            dtype: the same seed gives the same maps on the same device, in any precision (not
            across devices, whose generators differ).
        batch_size: Rows per forward pass, or ``"auto"``: from the device (the CPU: a few
            rows; CUDA: what fits in free memory, see :mod:`salience._chunks`).
        score: See :func:`gradient`.
        activations: For the ``"deconvnet"`` and ``"guided_backprop"`` bases, where their rule
            applies; see :func:`guided_backprop`. Those bases raise, as they do alone, on a
            model that runs no rectifier, and record ``extras["rectifiers"]`` and
            ``extras["activations_modified"]`` (the calls modified in one forward pass).
        forward_args: Extra arguments for the model, expanded with each noisy copy.
        allow_tf32: Let CUDA use TF32 (faster, less exact); off by default.

    References:
        Smilkov, Thorat, Kim, Viégas, Wattenberg. SmoothGrad: removing noise by adding noise.
        arXiv:1706.03825, 2017.
    """
    check_choice("SmoothGrad base", base, tuple(_SMOOTH_BASES))
    check_choice("SmoothGrad variant", variant, ("mean", "squared", "vargrad"))
    check_positive_int("samples", samples)
    if not (isinstance(noise_level, int | float) and noise_level >= 0):
        raise ValueError(f"noise_level must be a non-negative number, got {noise_level!r}")
    if resolve_activations(activations) and _SMOOTH_BASES[base] == "gradient":
        raise ValueError(
            f"activations= applies to the deconvnet and guided_backprop bases, not to {base!r}"
        )
    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as fwd:
        return _smoothgrad(
            fwd,
            inputs,
            target,
            base,
            samples,
            noise_level,
            variant,
            seed,
            batch_size,
            score,
            activations=activations,
        )


def _smoothgrad(
    forward: Forward,
    inputs: Tensor,
    target: TargetLike,
    base: str,
    samples: int,
    noise_level: float,
    variant: SmoothVariant,
    seed: int,
    batch_size: BatchSize,
    score: Score,
    *,
    activations: Activations = "rectifiers",
) -> Attribution:
    n = inputs.shape[0]
    chunker = Chunker(
        inputs, batch_size, backward=True, owner=forward.model, kind=f"smoothgrad/{base}"
    )

    x = inputs.detach()
    resolved: ResolvedTarget | None = None
    output: Any = None
    if not (clean_rows_ride_along(x.device, target) and not chunker.probing):
        with torch.no_grad():
            output = forward(x.clone())
        resolved = resolve_target(target, output, n, score=score)

    # The noise is drawn on the inputs' device, not on the host and copied (50 noise images
    # of 3 x 224 x 224 are 7.5 million draws): the same seed gives the same noise on the same
    # device, not across devices. Always in float32, then cast: the same seed gives the same
    # noise whatever the inputs' dtype (a float64 draw is another random stream).
    generator = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.randn(
        (samples, *x.shape[1:]), generator=generator, dtype=torch.float32, device=x.device
    )
    noise = noise.to(dtype=x.dtype)
    value_range = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(n, 1, 1, 1)
    sigma = noise_level * value_range
    flat = (value_range.flatten() == 0).nonzero().flatten().tolist()
    if noise_level > 0 and flat:
        warn(
            f"SmoothGrad: input sample(s) {flat[:10]} are constant (value range 0), so the "
            "noise, noise_level x range, is 0 and their map is the plain gradient, not a "
            "smoothed one; pass images with some contrast",
        )

    total = samples * n
    unit = n if resolved is not None and resolved.fn is not None else 1  # callables: copies
    # VarGrad subtracts two close moments: accumulate those in float64.
    acc_dtype = torch.float64 if variant == "vargrad" else x.dtype
    acc = torch.zeros((n, *x.shape[1:]), dtype=acc_dtype, device=x.device)
    acc_sq = torch.zeros_like(acc) if variant != "mean" else None
    rule = _SMOOTH_BASES[base]
    report: dict[str, Any] = {}  # what the rule modified, in the first forward pass
    for part in chunker.passes(total, unit):  # a pass that runs out of memory is redone
        with part as (start, stop):
            rows = torch.arange(start, stop, device=x.device)
            draw, sample = rows // n, rows % n
            # Differentiate with respect to the noise: the same gradient as with respect to the
            # noisy input, which stays a non-leaf that the model may change in place.
            shift = (sigma[sample] * noise[draw]).requires_grad_(True)
            options: dict[str, Any] = {
                "offset": x[sample],
                "rule": rule,
                "activations": activations,
                "method": f"smoothgrad with base={base!r}",
                "report": report if start == 0 else None,
            }
            found = None
            if resolved is None:  # the clean inputs ride in this first pass
                found, clean, _, values = score_gradient_with_clean(
                    forward, shift, sample, x, target, score=score, **options
                )
            else:
                _, values = score_gradient(forward, shift, resolved, sample, **options)
            if base == "input_x_gradient":
                values = values * (x[sample] + shift.detach())
            values = values.to(acc_dtype)
            # In a fixed order on every device; both sums are added only once both are made.
            squares = () if acc_sq is None else ((acc_sq, values * values),)
            add_rows(acc, values, start, *squares)
            if found is not None:
                resolved, output = found, clean

    assert resolved is not None
    clean_scores = resolved.scores(output)
    mean = acc / samples
    if variant == "mean":
        smoothed = mean
    elif variant == "squared":
        assert acc_sq is not None
        smoothed = acc_sq / samples
    else:
        assert acc_sq is not None
        smoothed = (acc_sq / samples - mean * mean).clamp(min=0.0)
    reduction: Reduction = (
        "abs_max" if base in ("gradient", "deconvnet", "guided_backprop") else "sum"
    )
    if variant != "mean":
        reduction = "sum"  # already non-negative: sum over channels
    return Attribution(
        values=smoothed.to(inputs.dtype),
        target=resolved.classes,
        scores=clean_scores.detach(),
        method="smoothgrad",
        output=output,
        extras={
            "base": base,
            "variant": variant,
            "samples": samples,
            "sigma": sigma.flatten(),
            **report,
        },
        reduction=reduction,
    )
