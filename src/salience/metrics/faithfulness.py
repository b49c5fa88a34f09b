"""Deletion and insertion curves: does a map rank first the pixels the model relies on.

Petsiuk, Das and Saenko (RISE, BMVC 2018, Sec. 4.1) judge a saliency map by perturbing the
image in the order the map ranks its pixels, most salient first:

- **deletion** replaces pixels by a *substrate* (the paper: zeros, a constant); a faithful map
  makes the score drop fast, so a **lower** area under the curve is better;
- **insertion** starts from the substrate (the paper: a blurred copy of the image) and puts
  the image's pixels back; a faithful map makes the score rise fast, so a **higher** area under
  the curve is better.

What is computed, exactly, for each sample ``i`` of ``inputs`` ``x`` (``(N, C, H, W)``) with
its map ``m_i`` (``(H, W)``) and substrate ``b_i`` (``(C, H, W)``):

1. **Ranking.** The ``P = H * W`` pixels are sorted by ``m_i`` in decreasing order, with a
   stable sort: pixels of equal saliency keep their row-major order (the one with the smaller
   ``h * W + w`` comes first). A pixel is perturbed in all its channels together.
2. **Counts.** Point ``s = 0, ..., steps`` of the curve perturbs the first
   ``c_s = floor(s * P / steps)`` pixels of the ranking: ``c_0 = 0`` (the image itself) and
   ``c_steps = P`` (every pixel). When ``steps`` divides ``P`` this is RISE's schedule of
   ``P / steps`` pixels per step (RISE: 224 pixels per step at 224 x 224, i.e. ``steps=224``).
3. **Images.** Deletion: ``x_i`` with its first ``c_s`` pixels set to ``b_i``'s values there.
   Insertion: ``b_i`` with its first ``c_s`` pixels set to ``x_i``'s values there.
4. **Curve.** ``curve[i, s]`` is the target score of that image: by default the softmax
   probability of the target class (the paper's choice; ``score=`` picks ``"logit"`` or
   ``"log_probability"`` instead, see :mod:`salience.targets`). The target is fixed once on
   the clean inputs: ``None`` is the class of the :class:`~salience.Attribution` given as
   ``saliency``, or else the predicted class.
5. **AUC.** ``fractions[s] = c_s / P`` (from 0 to 1) and ``auc[i]`` is the trapezoid rule
   of ``curve[i]`` over ``fractions``. It is not normalized by the score of the clean image.

All ``N * (steps + 1)`` perturbed images are built in tensor operations (no loop over pixels)
and run through the model ``batch_size`` rows at a time under ``torch.inference_mode()``, with
the same guarantees as the saliency methods: extra ``forward_args`` follow their rows, buffers
are restored, TF32 is off unless ``allow_tf32=True``; the inputs are never modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import torch
from torch import Tensor

from .._checks import all_finite, check_inputs, check_positive_int
from .._chunks import BatchSize, Chunker
from .._forward import ForwardArgs, model_scope
from .._io import Progress
from ..attribution import Attribution
from ..methods.perturbation import replacement_image
from ..targets import Score, TargetLike, resolve_target

__all__ = ["PerturbationCurve", "Substrate", "deletion", "insertion"]

Substrate: TypeAlias = "Literal['zeros', 'blur'] | float | Tensor"
"""What perturbed pixels are taken from: ``"zeros"``; ``"blur"``, a Gaussian blur of the
inputs (``blur_sigma``, mirrored borders, as Integrated Gradients' blur baseline); a number, a
constant image; or a tensor broadcastable to the inputs ``(N, C, H, W)``."""

_SUBSTRATES = ("zeros", "blur")


@dataclass(frozen=True, eq=False)
class PerturbationCurve:
    """A deletion or insertion curve per sample (see :mod:`salience.metrics.faithfulness`).

    Attributes:
        kind: ``"deletion"`` (lower AUC is better) or ``"insertion"`` (higher is better).
        curve: ``(N, steps + 1)`` the score after perturbing ``counts[s]`` pixels.
        fractions: ``(steps + 1,)`` float64 ``counts / (H * W)``, from 0 to 1.
        auc: ``(N,)`` trapezoid rule of ``curve`` over ``fractions``.
        target: ``(N,)`` the classes scored, or ``None`` for a callable target.
        counts: ``(steps + 1,)`` number of pixels perturbed at each point.
    """

    kind: str
    curve: Tensor
    fractions: Tensor
    auc: Tensor
    target: Tensor | None
    counts: Tensor

    def __repr__(self) -> str:
        n, points = self.curve.shape
        return (
            f"PerturbationCurve(kind={self.kind!r}, samples={n}, steps={points - 1}, "
            f"auc={[round(a, 4) for a in self.auc.tolist()[:8]]})"
        )


def deletion(
    model: Any,
    inputs: Tensor,
    saliency: Tensor | Attribution,
    target: TargetLike = None,
    *,
    steps: int = 100,
    substrate: Substrate = "zeros",
    score: Score = "probability",
    blur_sigma: float = 5.0,
    batch_size: BatchSize = "auto",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
    progress: bool | None = False,
) -> PerturbationCurve:
    """Return the deletion curve and AUC of saliency maps (Petsiuk et al. 2018): lower is better.

    The most salient pixels are replaced by ``substrate`` first; see
    :mod:`salience.metrics.faithfulness` for exactly what is computed.

    Args:
        model: The classifier, called as ``model(images, *forward_args)``.
        inputs: ``(N, C, H, W)`` images.
        saliency: ``(N, H, W)`` maps at the resolution of ``inputs`` (``(N, 1, H, W)`` is
            accepted), or an :class:`~salience.Attribution` (its :meth:`saliency`).
        target: What is scored; ``None``: the Attribution's classes, or the predicted class.
        steps: Number of perturbation steps; the curve has ``steps + 1`` points.
        substrate: What deleted pixels become (default zeros, as in the paper).
        score: ``"probability"`` (default, the paper's), ``"logit"`` or ``"log_probability"``;
            a callable target needs ``"logit"`` (it defines its own score).
        blur_sigma: Standard deviation in pixels of the ``"blur"`` substrate (RISE: 5).
        batch_size: Perturbed images per forward pass, or ``"auto"``: from the device (see
            :mod:`salience._chunks`).
        forward_args: Extra arguments of the model; per-sample tensors follow their rows.
        allow_tf32: Let cuDNN/CUDA use TF32 (off by default: full float32).
        progress: Show a progress bar on stderr (``None``: only on a terminal).

    Raises:
        ValueError: a map not of the input's size (e.g. a CAM at layer resolution: upsample
            it first), ``steps < 1``, an unknown or ill-shaped substrate, NaN in the map.
    """
    return _curve(
        "deletion", model, inputs, saliency, target, steps, substrate, score, blur_sigma,
        batch_size, forward_args, allow_tf32, progress,
    )  # fmt: skip


def insertion(
    model: Any,
    inputs: Tensor,
    saliency: Tensor | Attribution,
    target: TargetLike = None,
    *,
    steps: int = 100,
    substrate: Substrate = "blur",
    score: Score = "probability",
    blur_sigma: float = 5.0,
    batch_size: BatchSize = "auto",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
    progress: bool | None = False,
) -> PerturbationCurve:
    """Return the insertion curve and AUC of saliency maps (Petsiuk et al. 2018): higher is better.

    The curve starts from ``substrate`` (default: the blurred image, as in the paper) and the
    image's most salient pixels are put back first; see
    :mod:`salience.metrics.faithfulness` for exactly what is computed. The arguments are
    those of :func:`deletion`.
    """
    return _curve(
        "insertion", model, inputs, saliency, target, steps, substrate, score, blur_sigma,
        batch_size, forward_args, allow_tf32, progress,
    )  # fmt: skip


def _curve(
    kind: str,
    model: Any,
    inputs: Tensor,
    saliency: Tensor | Attribution,
    target: TargetLike,
    steps: int,
    substrate: Substrate,
    score: Score,
    blur_sigma: float,
    batch_size: BatchSize,
    forward_args: ForwardArgs,
    allow_tf32: bool,
    progress: bool | None,
) -> PerturbationCurve:
    check_inputs(inputs)
    steps = check_positive_int("steps", steps)
    x = inputs.detach()
    n, _, h, w = x.shape
    target = attribution_target(saliency, target)
    ranks = _ranks(_as_map(saliency, x), n, h, w)  # (N, P): position of each pixel
    pixels = h * w
    counts = torch.arange(steps + 1, dtype=torch.long) * pixels // steps
    fractions = counts.double() / pixels

    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as fwd:
        base = replacement_image(substrate, x, blur_sigma, name="substrate", choices=_SUBSTRATES)
        samples = torch.arange(n, device=x.device)
        chunker = Chunker(inputs, batch_size, owner=fwd.model, kind=f"{kind} curve")
        with torch.no_grad(), chunker.measure(n):  # the clean pass is the probe (CUDA)
            out = fwd(x.clone(), samples)
        resolved = resolve_target(target, out, n, score=score)
        # Rows are step-major (row r = step r // N of sample r % N): a pass holds whole copies
        # of the batch when a callable target needs them.
        total = n * (steps + 1)
        unit = n if resolved.fn is not None else 1
        row_sample = samples.repeat(steps + 1)
        row_count = counts.to(x.device).repeat_interleave(n)
        scores: Tensor | None = None
        label = f"{kind} curve"
        # inference mode: no autograd (~5 % faster than no_grad on Lite0); the curve is made
        # outside it, an ordinary tensor
        with torch.inference_mode(), Progress(total, label, enabled=progress) as bar:
            for chunk in chunker.passes(total, unit):  # one out of memory is redone
                with chunk as (start, stop):
                    ids = row_sample[start:stop]
                    done = (ranks[ids] < row_count[start:stop, None]).view(-1, 1, h, w)
                    if kind == "deletion":
                        images = torch.where(done, base[ids], x[ids])
                    else:
                        images = torch.where(done, x[ids], base[ids])
                    part = resolved.scores(fwd(images, ids), ids).detach()
                    if scores is None:  # written in place, pass by pass
                        with torch.inference_mode(False):
                            scores = torch.empty(total, dtype=part.dtype, device=part.device)
                    scores[start:stop] = part
                    bar.update(stop - start)
    assert scores is not None
    curve = scores.view(steps + 1, n).T.contiguous()
    auc = torch.trapezoid(curve.double(), fractions.to(curve.device), dim=1).to(curve.dtype)
    return PerturbationCurve(
        kind=kind,
        curve=curve,
        fractions=fractions,
        auc=auc,
        target=resolved.classes,
        counts=counts,
    )


def attribution_target(saliency: Any, target: TargetLike) -> TargetLike:
    """``target``, or when it is ``None`` the classes of an :class:`Attribution` given as map."""
    if (
        target is None
        and isinstance(saliency, Attribution)
        and saliency.target is not None
        and saliency.target.ndim == 1
    ):
        return saliency.target
    return target


def _as_map(saliency: Tensor | Attribution, x: Tensor) -> Tensor:
    """Return the ``(N, H, W)`` map, checked against the inputs ``x``."""
    if isinstance(saliency, Attribution):
        saliency = saliency.saliency()
    if not isinstance(saliency, Tensor):
        raise TypeError(
            f"saliency must be an (N, H, W) tensor or an Attribution, got {type(saliency).__name__}"
        )
    m = saliency.detach()
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    n, _, h, w = x.shape
    if m.ndim != 3 or m.shape[0] != n:
        raise ValueError(
            f"saliency must be (N, H, W) = ({n}, {h}, {w}) maps, one per input; got shape "
            f"{tuple(saliency.shape)}"
        )
    if m.shape[1:] != (h, w):
        raise ValueError(
            f"the saliency maps are {tuple(m.shape[1:])} but the inputs are {(h, w)}: pixels "
            "are ranked at the input resolution. Upsample a layer map (CAM) first, e.g. "
            "torch.nn.functional.interpolate(map[:, None], size=inputs.shape[-2:], "
            "mode='bilinear')[:, 0]"
        )
    if m.is_complex():
        raise TypeError(f"saliency maps must be real, got {m.dtype}")
    if not m.is_floating_point():  # bool masks, integer ranks
        m = m.double()
    if not all_finite(m):
        raise ValueError("the saliency maps contain NaN or inf values: they rank no pixels")
    return m.to(x.device)


def _ranks(m: Tensor, n: int, h: int, w: int) -> Tensor:
    """``(N, H*W)`` position of each pixel in its sample's ranking, most salient first.

    A stable sort keeps pixels of equal saliency in row-major order.
    """
    flat = m.reshape(n, h * w)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(h * w, device=order.device).expand(n, -1)
    return ranks.scatter_(1, order, positions)
