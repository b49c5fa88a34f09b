"""Rank correlation of a saliency map with the occlusion map (Selvaraju et al. 2017).

Grad-CAM's faithfulness experiment (Selvaraju et al., Sec. 5) asks how well a map agrees
with what hiding parts of the image does to the score: the Spearman rank correlation,
per sample, between the map and the patch-occlusion map of Zeiler & Fergus
(:func:`salience.occlusion`). A map that ranks pixels as occlusion does gets 1, the reverse
ranking -1.

Spearman's coefficient is the Pearson correlation of the ranks, ties taking the mean of the
ranks they span (as ``scipy.stats.spearmanr``): occlusion maps are piecewise constant, so ties
are the rule. A map that is constant over the image has no ranking; its correlation is
``nan`` and a warning says so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import all_finite, check_inputs, warn
from .._chunks import BatchSize
from .._forward import ForwardArgs
from ..attribution import Attribution
from ..methods.perturbation import Fill, occlusion
from ..targets import Score, TargetLike
from .faithfulness import attribution_target
from .similarity import rank_correlation

__all__ = ["occlusion_correlation", "spearman"]


def occlusion_correlation(
    model: Any,
    inputs: Tensor,
    saliency: Tensor | Attribution,
    target: TargetLike = None,
    *,
    reference: Attribution | Tensor | None = None,
    window: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] | None = None,
    fill: Fill = "zeros",
    score: Score = "logit",
    batch_size: BatchSize = "auto",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
) -> Tensor:
    """Return the Spearman rank correlation of each map with the occlusion map: ``(N,)``.

    Args:
        model: The classifier (used only when ``reference`` is not given).
        inputs: ``(N, C, H, W)`` images.
        saliency: ``(N, H, W)`` maps at the inputs' resolution (``(N, 1, H, W)`` accepted), or
            an :class:`~salience.Attribution` (its :meth:`~salience.Attribution.saliency`).
        target: What occlusion explains; ``None``: the Attribution's classes, or else the
            predicted class.
        reference: A precomputed occlusion map (an Attribution of :func:`salience.occlusion`
            or an ``(N, H, W)`` tensor), to compare several maps against one occlusion run;
            the occlusion options below are then unused.
        window: Occlusion window (see :func:`salience.occlusion`).
        stride: Occlusion stride.
        fill: What occluded patches show.
        score: The score occlusion follows (``"logit"`` by default).
        batch_size: Occluded images per forward pass, or ``"auto"`` (from the device).
        forward_args: Extra arguments of the model.
        allow_tf32: Let CUDA use TF32.

    Returns:
        ``(N,)`` correlations in ``[-1, 1]`` (``nan`` for a constant map), in float64.

    Raises:
        ValueError: maps not of the inputs' size or batch.

    References:
        Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra. Grad-CAM: Visual Explanations from
        Deep Networks via Gradient-based Localization. ICCV 2017, arXiv:1610.02391.
    """
    check_inputs(inputs)
    n, _, h, w = inputs.shape
    target = attribution_target(saliency, target)
    maps = _as_maps(saliency, n, h, w, "saliency")
    if reference is None:
        reference = occlusion(
            model,
            inputs,
            target,
            window=window,
            stride=stride,
            fill=fill,
            score=score,
            batch_size=batch_size,
            forward_args=forward_args,
            allow_tf32=allow_tf32,
        )
    if isinstance(reference, Attribution):
        if reference.values.shape[1] != inputs.shape[1]:
            raise ValueError(
                "the reference occlusion holds several targets per sample; pass one target"
            )
        ref = reference.values[:, 0]  # every channel holds the occlusion map
    else:
        ref = reference
    ref = _as_maps(ref, n, h, w, "reference")
    rho = spearman(maps.to(ref.device), ref)
    constant = torch.isnan(rho).nonzero().flatten().tolist()
    if constant:
        warn(
            f"occlusion_correlation: the map or the occlusion map of sample(s) {constant[:10]} "
            "is constant, so it ranks no pixels: the correlation is nan (a window as large as "
            "the image gives a constant occlusion map)",
        )
    return rho


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Return Spearman's rank correlation of ``a[i]`` and ``b[i]`` for each row: ``(N,)``.

    Ties get the mean of the ranks they span; a constant row gives ``nan``
    (:func:`salience.metrics.similarity.rank_correlation`).
    """
    return rank_correlation(a, b)


def _as_maps(maps: Tensor | Attribution, n: int, h: int, w: int, name: str) -> Tensor:
    if isinstance(maps, Attribution):
        maps = maps.saliency()
    if not isinstance(maps, Tensor):
        raise TypeError(f"{name} must be an (N, H, W) tensor or an Attribution")
    m = maps.detach()
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3 or tuple(m.shape) != (n, h, w):
        raise ValueError(
            f"{name} must be (N, H, W) = ({n}, {h}, {w}) maps at the inputs' resolution; got "
            f"shape {tuple(maps.shape)} (upsample a layer map first)"
        )
    if not all_finite(m):
        raise ValueError(f"{name} contains NaN or inf values")
    return m
