"""Argument checks shared by every method: bad input gets an error that names the problem."""

from __future__ import annotations

import contextlib
import copy
import math
import operator
import os
import sys
import warnings
from collections.abc import Iterable
from types import FrameType
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm

# Frames a warning skips to reach the user's line: salience, and the torch and contextlib code
# that calls back into it (autograd functions, hooks, ``with`` blocks).
_INTERNAL = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
    os.path.abspath(contextlib.__file__),
)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointing at the caller's line outside salience.

    However deep in salience (a method called by a metric, by :func:`salience.explain`, by the
    batch runner) the warning is raised, it names the user's line that led to it.
    """
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level + 1)


# Modules whose forward depends on the training flag (spectral norm: a power iteration that
# moves the weight at every pass in training mode).
_TRAINING_DEPENDENT = (
    nn.modules.batchnorm._NormBase,
    nn.modules.dropout._DropoutNd,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    _SpectralNorm,
)


def _depends_on_training(m: nn.Module) -> bool:
    if not m.training:
        return False
    if isinstance(m, _TRAINING_DEPENDENT):
        return True
    hooks = m._forward_pre_hooks  # the legacy spectral_norm is a hook of its module
    return bool(hooks) and any(isinstance(h, SpectralNorm) for h in hooks.values())


is_training = operator.attrgetter("training")
"""``module.training``, to ``map`` over a model's modules (a loop in C: a generator over
EfficientNet-Lite0's 185 modules takes four times as long)."""


def modules_of(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` once, ``model`` first: the modules ``model.modules()`` yields.

    Breadth first, from the ``_modules`` dicts, without the dotted names ``named_modules``
    builds on the way: half its time (44 against 96 µs for EfficientNet-Lite0's 185 modules),
    and every call of a method walks the model at least once.
    """
    found = [model]
    seen = {id(model)}
    append, see = found.append, seen.add
    for module in found:  # grows while it is read
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                see(id(child))
                append(child)
    return found


def copy_model(model: nn.Module, purpose: str) -> nn.Module:
    """Return a deep copy of ``model``, also of one whose modules hold computed tensors.

    The legacy ``torch.nn.utils.weight_norm`` and ``spectral_norm`` keep the weight they
    compute at each forward pass as a plain attribute of the module: after a pass with
    gradients (any saliency method's) it is part of an autograd graph, and ``copy.deepcopy``
    refuses such tensors. The copy gets them detached (the next forward pass of the copy
    computes them again from the parameters they come from).

    Raises:
        TypeError: the model still cannot be copied; ``purpose`` says why a copy is made
            (``"the sanity check randomizes a copy"``).
    """
    memo: dict[int, Any] = {}
    for module in modules_of(model):
        for value in vars(module).values():
            if isinstance(value, Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except Exception as error:
        raise TypeError(
            f"the model cannot be deep-copied ({type(error).__name__}: {error}); {purpose} "
            "and never your model"
        ) from error


def check_model(model: Any, modules: list[nn.Module] | None = None) -> None:
    """Reject things that are not callable models and warn on training mode.

    ``modules``: :func:`modules_of` the model if the caller has it (one walk of the model less).
    """
    if not callable(model):
        raise TypeError(f"model must be a callable nn.Module, got {type(model).__name__}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "saliency methods need autograd, but torch.inference_mode() is active; "
            "call them outside the inference_mode block"
        )
    if isinstance(model, nn.Module):
        if modules is None:
            modules = modules_of(model)
        if any(issubclass(kind, LazyModuleMixin) for kind in set(map(type, modules))):
            _refuse_uninitialized(model)
        # most models are in eval mode: one attribute read per module, no call
        if any(map(is_training, modules)) and any(map(_depends_on_training, modules)):
            training = [
                name or type(model).__name__
                for name, m in model.named_modules()
                if _depends_on_training(m)
            ]
            warn(
                f"the model is in training mode ({', '.join(training[:3])}"
                f"{', ...' if len(training) > 3 else ''}): BatchNorm, Dropout and spectral norm "
                "make the maps depend on the batch, on chance or on the pass (BatchNorm uses "
                "the statistics of the batch, spectral norm moves its weights at every pass; "
                "both are restored after the call). Call model.eval() first (salience leaves "
                "the flag as you set it)",
            )


def _refuse_uninitialized(model: nn.Module) -> None:
    """Raise for a model with lazy modules whose parameters or buffers are not made yet."""
    lazy = [
        name or type(model).__name__
        for name, m in model.named_modules()
        if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()  # type: ignore[misc]
    ]
    if lazy:
        raise ValueError(
            f"the model has lazy modules whose parameters or buffers are not made yet "
            f"({', '.join(lazy[:3])}{', ...' if len(lazy) > 3 else ''}): their first forward "
            "pass would make them, changing your model. Run the model once on an input "
            "(model(x)) before explaining it"
        )


def check_inputs(inputs: Any) -> Tensor:
    """Return ``inputs`` if it is a finite floating ``(N, C, H, W)`` tensor, else raise."""
    if not isinstance(inputs, Tensor):
        raise TypeError(
            f"inputs must be a torch.Tensor of shape (N, C, H, W), got {type(inputs).__name__}"
        )
    if inputs.ndim != 4:
        hint = " (add a batch axis with inputs.unsqueeze(0))" if inputs.ndim == 3 else ""
        raise ValueError(
            f"inputs must be a batch of images (N, C, H, W), got shape {tuple(inputs.shape)}{hint}"
        )
    if not inputs.is_floating_point():
        raise TypeError(
            f"inputs must be a floating point tensor (preprocessed images), got {inputs.dtype}"
        )
    if inputs.shape[0] == 0 or inputs.numel() == 0:
        raise ValueError(f"inputs are empty: shape {tuple(inputs.shape)}")
    if not all_finite(inputs):
        bad = (~torch.isfinite(inputs)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"inputs contain NaN or inf values (samples {bad[:10]})")
    return inputs


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite (no NaN, no inf).

    A sum is one float pass, where ``torch.isfinite(t).all()`` builds a bool tensor (ten
    times slower on a CPU: 0.35 ms against 0.03 ms for a 224² image here). A NaN or an
    infinity makes the sum NaN or infinite, and finite entries give a finite sum unless it
    overflows: only a non-finite sum is checked entry by entry. Half floats are summed in
    float64 (a 224² image of values near 1 overflows float16); float32 as it is (widening it
    copied the input first: 1.2 against 0.08 ms for 8 images of 224²; an overflow, from values
    beyond 1e33, only takes the slower check).
    """
    if t.numel() == 0 or not t.is_floating_point():
        return True
    wide = torch.float64 if t.dtype in (torch.float16, torch.bfloat16) else None
    if math.isfinite(float(t.sum(dtype=wide))):
        return True
    return bool(torch.isfinite(t).all())


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is a positive int, else raise a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise a ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of: {', '.join(choices)}")


def check_batch_size(value: Any, name: str = "batch_size") -> int | None:
    """Return ``value`` as rows per pass, or ``None`` for ``"auto"`` (``None`` is an alias).

    Raises:
        TypeError: ``value`` is neither an int nor a string (a float, a bool).
        ValueError: an int below 1, or a string other than ``"auto"``.
    """
    if value is None or (isinstance(value, str) and value == "auto"):
        return None
    if isinstance(value, str):
        raise ValueError(f"{name} must be a positive integer or 'auto', got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be a positive integer or 'auto', got {value!r} ({type(value).__name__})"
        )
    if value < 1:
        raise ValueError(f"{name} must be a positive integer or 'auto', got {value!r}")
    return value


CPU_IMAGES = 4
"""224 x 224 images per pass of the automatic chunk size on the CPU (see :func:`cpu_rows`)."""


def cpu_rows(inputs: Tensor, *, images: int = CPU_IMAGES) -> int:
    """Rows per pass of the automatic chunk size on the CPU (and devices other than CUDA).

    About ``images`` 3x224x224 images per pass (four), fewer for larger rows, at most 256.
    Small chunks keep their activations in cache. Measured on 2 CPU cores, EfficientNet-Lite0:
    Integrated Gradients with 50 steps took 2.47 / 1.86 / 1.79 s (batch 1) and 20.8 / 17.5 /
    14.8 s (batch 8) in chunks of 10 / 6 / 4 rows (Captum, 10 rows: 2.39 s and 18.6 s);
    forward-only passes too: Score-CAM 9.4–14.2 s with 10 rows against 5.8–11.3 s with 4,
    RISE (300 masks) 9.8–10.5 s against 6.7–8.6 s, occlusion with full passes 26–29 s against
    21–24 s (on a VGG-style net 4 rows are a little faster, on a quarter-width ResNet 13 %
    slower). Incremental occlusion passes are cheap per row and take ten (``images=10``).
    Memory stays bounded either way.
    """
    per_row = max(1, inputs[0].numel())
    return max(1, min(256, (images * 3 * 224 * 224) // per_row))


def even_chunks(total: int, most: int, unit: int = 1) -> int:
    """Rows per pass that split ``total`` rows into equal passes of at most ``most`` rows.

    50 rows with at most 8 per pass run as 7 passes of 8 rows or fewer, rather than six
    full passes and a nearly empty one. Passes hold whole groups of ``unit`` rows (a callable
    target sees whole copies of the batch), at least one group even when ``most < unit``.
    """
    groups = total // unit
    most_groups = max(1, most // unit)
    passes = -(-groups // most_groups)
    return -(-groups // passes) * unit


def not_differentiable(what: str = "explained score") -> ValueError:
    """Return the error for a score (or layer) that autograd does not connect to the inputs."""
    return ValueError(
        f"the {what} does not depend on the inputs through autograd (is the model or the "
        "target detached, or run under torch.no_grad inside forward?)"
    )


def input_gradient(score: Tensor, wrt: Tensor, **options: Any) -> Tensor:
    """Return ``d score / d wrt`` (``options`` go to :func:`torch.autograd.grad`).

    Raises:
        ValueError: the score does not depend on ``wrt`` through autograd, also where its
            graph holds other leaves (weights) but not ``wrt`` (:func:`not_differentiable`).
    """
    if not score.requires_grad:
        raise not_differentiable()
    (grad,) = torch.autograd.grad(score, wrt, allow_unused=True, **options)
    if grad is None:
        raise not_differentiable()
    return grad


def warn_zero_maps(method: str, values: Tensor, why: str, told: Iterable[int] = ()) -> None:
    """Warn when the map of a sample is zero everywhere, saying ``why`` that can happen.

    An all-zero map looks like "nothing matters" in a figure; it is rarely what the user
    asked, so it never goes by silently. ``told``: samples a warning of the method has named
    already.
    """
    if values.shape[1:].numel() == 0:  # (no indexing op: a launch saved)
        return
    flat = values.flatten(1)
    if flat.is_cpu and flat.numel() > 16384:
        # the CPU reduces large maps to a magnitude twice as fast as to a bool (NaN: not zero)
        empty = flat.abs().amax(1) == 0
        if not empty.any():
            return
    else:  # two launches and one read (the cost of a GPU at batch 1), where naming took five
        filled = flat.any(1)
        if filled.all():
            return
        empty = filled.logical_not()  # (any() of uint8 is uint8, where ~ flips bits)
    zero = empty.nonzero().flatten().tolist()
    if told:
        zero = sorted(set(zero) - set(told))
    if zero:
        warn(f"{method}: the map of sample(s) {zero[:10]} is zero everywhere {why}")
