"""What a method explains: one resolver for every method.

A target says which scalar per sample is differentiated (or perturbed):

- ``None``: the predicted class of each sample (argmax of the model output);
- an ``int``: that class for every sample;
- a sequence or 1-D integer tensor of ``N`` ints: one class per sample;
- for the CAM methods (``multi=True``), an ``(N, K)`` integer tensor: ``K`` classes per
  sample, explained together;
- a callable ``output -> Tensor[N]``: any differentiable score, e.g. a segmentation class
  summed over a mask (:func:`mask_target`), a caption token's log-probability, a VQA answer.

Class targets need an output of shape ``(N, classes)``. The ``score`` option turns the logits
into probabilities or log-probabilities first; it applies to class targets only. A model with
**one output** (``(N, 1)``, a binary classifier's logit) has no softmax to take: a softmax over
one class is always 1, so ``"probability"`` is the sigmoid of the logit and
``"log_probability"`` its log-sigmoid there, the probability of the positive class.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._containers import map_tensors, tensors_in

__all__ = ["Score", "TargetLike", "class_target", "mask_target", "resolve_target"]

TargetLike: TypeAlias = "int | Sequence[int] | Tensor | Callable[[Tensor], Tensor] | None"
Score = Literal["logit", "probability", "log_probability"]
_SCORES = ("logit", "probability", "log_probability")


@dataclass(frozen=True)
class ResolvedTarget:
    """A target fixed against a batch of ``n`` samples.

    ``classes`` is ``(n,)`` long for class targets (``(n, K)`` for ``K`` targets per sample),
    ``None`` for a callable. :meth:`scores`
    evaluates the same target on the output of any number of rows whose sample of origin is
    known, so that Integrated Gradients and SmoothGrad can batch steps and noise draws.
    """

    n: int
    classes: Tensor | None
    fn: Callable[[Tensor], Tensor] | None
    score: Score = "logit"
    batched: tuple[bool, ...] | None = None  # a structured output's per-sample tensors

    def scores(self, output: Tensor, sample_ids: Tensor | None = None) -> Tensor:
        """Return the explained score of each row of ``output``: ``(R,)``, or ``(R, K)``.

        Args:
            output: Model output for ``R`` rows.
            sample_ids: ``(R,)`` the sample each row belongs to. ``None`` means the rows are
                whole copies of the batch in order (row ``r`` is sample ``r % n``). A callable
                target always needs whole copies: it is applied ``n`` rows at a time.
        """
        if self.fn is not None:
            rows = None if sample_ids is None else int(sample_ids.numel())
            return _call_grouped(self.fn, output, self.n, rows, self.batched)
        rows = _rows(output)
        assert self.classes is not None
        _check_class_output(output, rows)
        if sample_ids is None:
            if rows % self.n:
                raise RuntimeError(f"{rows} rows are not whole copies of a batch of {self.n}")
            classes = self.classes
            if rows != self.n:
                classes = classes.repeat(rows // self.n, *([1] * (classes.ndim - 1)))
        else:
            classes = self.classes[sample_ids.to(self.classes.device)]
        logits = output.float() if output.dtype in (torch.float16, torch.bfloat16) else output
        binary = logits.shape[1] == 1  # one logit: a softmax over it is constant
        if self.score == "probability":
            logits = torch.sigmoid(logits) if binary else torch.softmax(logits, dim=1)
        elif self.score == "log_probability":
            logits = F.logsigmoid(logits) if binary else torch.log_softmax(logits, dim=1)
        picked = logits.gather(1, classes.to(output.device).view(rows, -1))
        return (picked.squeeze(1) if self.classes.ndim == 1 else picked).to(output.dtype)


def resolve_target(
    target: TargetLike,
    output: Tensor | object,
    n: int,
    *,
    score: Score = "logit",
    multi: bool = False,
) -> ResolvedTarget:
    """Check ``target`` against the model ``output`` of ``n`` samples and fix it.

    ``multi=True`` also accepts an ``(N, K)`` integer tensor, ``K`` classes per sample, for
    methods that explain several targets at once.

    Raises:
        ValueError: a class out of range, a wrong number of classes, an output that is not
            ``(N, classes)`` for a class target, or an unknown ``score``.
        TypeError: a target of an unsupported type.
    """
    if score not in _SCORES:
        raise ValueError(f"unknown score {score!r}; expected one of {', '.join(_SCORES)}")
    if callable(target) and not isinstance(target, Tensor):
        if score != "logit":
            raise ValueError(
                f"score={score!r} applies to class targets; a callable target defines its own "
                "score (apply softmax inside it if you need probabilities)"
            )
        # which tensors of a structured output hold one row per sample (logits, not a CLIP
        # model's text embeddings): only those are cut into copies of the batch later
        batched = None
        if not isinstance(output, Tensor):
            batched = tuple(t.ndim > 0 and t.shape[0] == n for t in tensors_in(output))
        resolved = ResolvedTarget(n=n, classes=None, fn=target, batched=batched)
        resolved.scores(output)  # type: ignore[arg-type]  # validates shape now
        return resolved
    if not isinstance(output, Tensor):
        raise ValueError(
            f"the model returned {type(output).__name__}, not a tensor of logits; pass a "
            f"callable target that picks the score from it, e.g. target=lambda out: "
            f"{_logits_in(output)}[:, 3]"
        )
    _check_class_output(output, n)
    num_classes = output.shape[1]
    if target is None:
        classes = output.detach().argmax(dim=1)
    elif _is_index(target):
        # one class for all: checked here, made on the output's device (no copy, no read back)
        index = int(target)  # type: ignore[arg-type]  # an Integral: checked above
        if not 0 <= index < num_classes:
            raise ValueError(
                f"target class {index} is out of range: the model has {num_classes} classes "
                f"(valid: 0..{num_classes - 1})"
            )
        classes = torch.full((n,), index, dtype=torch.long, device=output.device)
    else:
        classes = _as_classes(target, n, multi)
        span = _span_read_early(target)
        if span is not None:  # read at the start of the call: no wait for the pass here
            if span[0] < 0 or span[1] >= num_classes:
                raise ValueError(
                    f"target class {span[0] if span[0] < 0 else span[1]} is out of range: the "
                    f"model has {num_classes} classes (valid: 0..{num_classes - 1})"
                )
        else:
            bad = (classes < 0) | (classes >= num_classes)
            if bad.any():
                raise ValueError(
                    f"target class {classes[bad][0].item()} is out of range: the model has "
                    f"{num_classes} classes (valid: 0..{num_classes - 1})"
                )
    return ResolvedTarget(n=n, classes=classes.to(output.device), fn=None, score=score)


def class_target(index: int) -> Callable[[Tensor], Tensor]:
    """Return a callable target that picks logit ``index`` of an ``(N, classes)`` output."""

    def pick(output: Tensor) -> Tensor:
        return output[:, index]

    return pick


def mask_target(
    class_index: int | Tensor, mask: Tensor | None = None
) -> Callable[[Tensor], Tensor]:
    """Return a target for dense outputs ``(N, classes, H, W)``: a class summed over a mask.

    This is how segmentation networks are explained (Vinogradova et al. 2020): the score is
    ``sum_{h,w} mask[h, w] * output[:, class_index, h, w]``. ``mask`` is ``(H, W)``,
    ``(N, H, W)`` or ``None`` for the whole image. For a model that returns the dense tensor
    inside a dict (torchvision's segmentation models: ``{"out": ...}``), pick it first:
    ``target=lambda out: mask_target(c, mask)(out["out"])``.

    Raises:
        ValueError: a negative class, a mask that is not 2-D or 3-D; when the target is
            evaluated, a class beyond the output's or a mask of another size.
        TypeError: a class that is not an int (or a one-element integer tensor: an argmax), a
            mask that is not a tensor.
    """
    if (
        isinstance(class_index, Tensor)
        and class_index.numel() == 1
        and not (class_index.is_floating_point() or class_index.dtype == torch.bool)
    ):
        class_index = int(class_index)  # an argmax
    if not _is_index(class_index):
        raise TypeError(f"mask_target needs an int class index, got {type(class_index).__name__}")
    if class_index < 0:
        raise ValueError(f"mask_target needs a class index >= 0, got {class_index}")
    if mask is not None and not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a tensor (H, W) or (N, H, W), got {type(mask).__name__}")
    if mask is not None and mask.ndim not in (2, 3):
        raise ValueError(f"mask must be (H, W) or (N, H, W), got shape {tuple(mask.shape)}")

    def score(output: Tensor) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"mask_target needs the dense output tensor (N, classes, H, W); the model "
                f"returned {type(output).__name__}: pick the tensor first, e.g. "
                f"target=lambda out: mask_target({class_index}, mask)({_logits_in(output)})"
            )
        if output.ndim < 3:
            raise ValueError(
                f"mask_target needs a dense output (N, classes, H, W); got {tuple(output.shape)}"
            )
        classes = output.shape[1]
        if class_index >= classes:
            raise ValueError(
                f"mask_target class {class_index} is out of range: the output has {classes} "
                f"classes (valid: 0..{classes - 1})"
            )
        plane = output[:, class_index]
        if mask is None:
            return plane.flatten(1).sum(1)
        if mask.shape[-2:] != plane.shape[1:] or (
            mask.ndim == 3 and mask.shape[0] not in (1, len(plane))
        ):
            expected = f"{tuple(plane.shape[1:])} or {tuple(plane.shape)}"
            raise ValueError(
                f"the mask of shape {tuple(mask.shape)} does not fit the output's class planes: "
                f"expected {expected}"
            )
        return (plane * mask.to(plane.device, plane.dtype)).flatten(1).sum(1)

    return score


def _logits_in(output: object) -> str:
    """Return how to reach the logits of a structured ``output``, as an expression on ``out``."""
    if isinstance(output, Mapping):
        keys = [k for k, v in output.items() if isinstance(v, Tensor)] or list(output)
        key = "logits" if "logits" in keys else keys[0] if keys else "logits"
        return f"out[{key!r}]"
    if isinstance(getattr(output, "logits", None), Tensor):
        return "out.logits"
    if hasattr(output, "_fields"):  # a named tuple
        fields = list(output._fields)
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        fields = [f.name for f in dataclasses.fields(output)]
    else:
        fields = []
    if fields:
        tensors = [f for f in fields if isinstance(getattr(output, f, None), Tensor)]
        return f"out.{(tensors or fields)[0]}"
    if isinstance(output, tuple | list):
        return "out[0]"
    return "out.logits"


def _rows(output: object) -> int:
    if isinstance(output, Tensor):
        if output.ndim == 0:
            raise ValueError("the model output is a scalar; expected a batch (N, ...)")
        return int(output.shape[0])
    raise ValueError(f"cannot count rows of a {type(output).__name__} model output")


def _check_class_output(output: Tensor, n: int) -> None:
    if output.ndim != 2:
        raise ValueError(
            f"class targets need a model output of shape (N, classes); got "
            f"{tuple(output.shape)}. For dense or structured outputs pass a callable target, "
            "e.g. salience.targets.mask_target(class_index, mask)"
        )
    if output.shape[0] != n:
        raise ValueError(f"the model returned {output.shape[0]} rows for a batch of {n}")


def _as_classes(target: object, n: int, multi: bool = False) -> Tensor:
    if isinstance(target, bool):
        raise TypeError("target must be a class index, not a bool")
    if _is_index(target):  # int, numpy.int64, ...
        return torch.full((n,), int(target), dtype=torch.long)  # type: ignore[call-overload]
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
            raise TypeError(f"target tensor must hold integer class indices, got {target.dtype}")
        classes = target.reshape(-1) if target.ndim == 0 else target
        if classes.ndim != 1 and not (multi and classes.ndim == 2 and classes.shape[1] > 0):
            several = " or (N, K) for K targets per sample" if multi else ""
            raise ValueError(
                f"target tensor must be (N,) class indices{several}, got shape "
                f"{tuple(target.shape)}"
            )
        classes = classes.long()
        if target.ndim == 0:
            classes = classes.expand(n).clone()
    elif isinstance(target, np.ndarray):
        classes = _as_classes(torch.as_tensor(target), n, multi)
    elif isinstance(target, Sequence) and not isinstance(target, str | bytes):
        if not all(_is_index(t) for t in target):
            raise TypeError(f"target sequence must hold ints, got {list(target)[:5]!r}")
        classes = torch.tensor([int(t) for t in target], dtype=torch.long)
    else:
        raise TypeError(
            "target must be None, an int, a sequence or tensor of N ints, or a callable "
            f"output -> Tensor[N]; got {type(target).__name__}"
        )
    if classes.shape[0] != n:
        raise ValueError(f"got {classes.shape[0]} target classes for a batch of {n} inputs")
    return classes


def _is_index(value: object) -> bool:
    """Tell whether ``value`` is an integer but not a bool: ``int``, ``numpy.int64``, ..."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# -- the range of a target tensor on a device, read before the call's first pass -------------

_SPAN: contextvars.ContextVar[tuple[Tensor, int, int, int, int] | None] = contextvars.ContextVar(
    "salience_target_span", default=None
)
"""The target tensor read early, its version and storage then, its smallest and largest class."""


_EARLY_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
"""Integer dtypes whose smallest and largest values every backend reads (wider unsigned ones
are left to the check after the pass)."""


@contextlib.contextmanager
def span_read_early(target: object) -> Iterator[None]:
    """Read the smallest and largest class of a target tensor on a device, before the passes.

    Checking the classes against the model's output (:func:`resolve_target`) reads them back
    from the device: after the forward pass, that makes the host wait for the whole pass
    before it can start the backward one. Read at the start of the call (one transfer), the
    wait is for nothing the call queued. Integer tensors off the CPU only (elsewhere a read
    costs nothing). The span is used if the same tensor is checked with the same version and
    storage; a write the version counter does not see (through ``.data``) is not seen here
    either. A method called by another with the same target reads nothing again.
    """
    span = _SPAN.get()
    if (
        not isinstance(target, Tensor)
        or target.dtype not in _EARLY_DTYPES
        or target.numel() == 0
        or not _on_a_device(target)
        or target.is_inference()
        or (span is not None and _same_state(span, target))
    ):
        yield
        return
    low, high = torch.stack(torch.aminmax(target.detach())).tolist()
    token = _SPAN.set((target, target._version, target.data_ptr(), low, high))
    try:
        yield
    finally:
        _SPAN.reset(token)


def _same_state(span: tuple[Tensor, int, int, int, int], target: Tensor) -> bool:
    return span[0] is target and span[1] == target._version and span[2] == target.data_ptr()


def _on_a_device(t: Tensor) -> bool:
    """Whether reading ``t`` back waits for a device (tests patch this on the CPU)."""
    return t.device.type != "cpu"


def _span_read_early(target: object) -> tuple[int, int] | None:
    """``(smallest, largest)`` class of ``target`` if :func:`span_read_early` read it."""
    span = _SPAN.get()
    if span is None or not isinstance(target, Tensor) or not _same_state(span, target):
        return None
    return span[3], span[4]


def _call_grouped(
    fn: Callable[[Tensor], Tensor],
    output: object,
    n: int,
    rows: int | None = None,
    batched: tuple[bool, ...] | None = None,
) -> Tensor:
    """Apply a user's target to whole copies of the batch, ``n`` rows at a time.

    ``rows``: how many the pass ran (``None``: one copy of the batch). One copy is handed to
    the target as it is (a sequence-first ``(T, N, V)`` output, a CLIP model's text
    embeddings). Of several copies, the tensors whose first axis has the pass's rows are cut,
    in a structured output (a dict, a tuple, a dataclass...) too, so that a target written for
    one batch (``lambda out: out.logits.gather(1, labels[:, None])[:, 0]``) sees one batch at a
    time; anything else (anchors, a loss) is passed whole. ``batched`` (from the output of one
    copy) says which tensors hold one row per sample: a CLIP model's text embeddings are not
    cut, even when there are as many prompts as the pass has rows.

    Raises:
        ValueError: several copies but no tensor with their rows first: the output cannot be
            cut into batches.
    """
    rows = n if rows is None else rows
    if rows % n:
        raise RuntimeError(f"{rows} rows are not whole copies of a batch of {n}")
    if rows == n:
        value = fn(output)  # type: ignore[arg-type]  # a structured output, passed as it is
        _check_scores(value, n)
        return value
    tensors = tensors_in(output)
    if batched is None or len(batched) != len(tensors):
        batched = (True,) * len(tensors)
    cuts = [b and t.ndim > 0 and t.shape[0] == rows for b, t in zip(batched, tensors, strict=True)]
    if not any(cuts):
        raise ValueError(
            f"this method runs {rows // n} copies of the batch in one pass, and no tensor of "
            f"the model output has their {rows} rows first (a sequence-first output?): a "
            "callable target needs the batch on the first axis of the output here"
        )

    parts = []
    for start in range(0, rows, n):
        order = iter(cuts)

        def cut(t: Tensor, start: int = start, order: Iterator[bool] = order) -> Tensor:
            per_sample = next(order, False) and t.ndim > 0 and t.shape[0] == rows
            return t[start : start + n] if per_sample else t

        value = fn(map_tensors(cut, output))
        _check_scores(value, n)
        parts.append(value)
    return torch.cat(parts)


def _check_scores(value: object, n: int) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"the target callable returned {type(value).__name__}, not a tensor")
    if value.ndim != 1 or value.shape[0] != n:
        raise ValueError(
            f"the target callable must return one score per sample, shape ({n},); "
            f"got {tuple(value.shape)}"
        )
