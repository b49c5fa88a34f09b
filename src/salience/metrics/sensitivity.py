r"""Max-sensitivity (Yeh et al. 2019): how far a map moves under small input perturbations.

:func:`max_sensitivity` draws uniform noise in an L∞ ball around each input, re-runs the method
and reports :math:`\max_k \|\Phi(x+\delta_k)-\Phi(x)\|_2 / \|\Phi(x)\|_2` per sample, normalized
and drawn as Quantus 0.6's ``MaxSensitivity`` (equal to it on the same draws); the mean over the
draws is Quantus's ``AvgSensitivity``. The perturbed copies of all samples run through the
method in chunks. :func:`salience.metrics.fragility` is the adversarial counterpart.

References:
    Yeh, Hsieh, Suggala, Inouye, Ravikumar. On the (In)fidelity and Sensitivity of
    Explanations. NeurIPS 2019, arXiv:1901.09392.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import check_inputs, check_positive_int, warn
from .._chunks import BatchSize, Chunker
from .._forward import ForwardArgs, model_scope
from .._io import Progress
from ..targets import TargetLike
from .fragility import (
    MethodLike,
    _check_number,
    _chunk_args,
    _chunk_target,
    _fixed_target,
    _mean,
    _resolve_method,
)

__all__ = ["Sensitivity", "max_sensitivity"]


@dataclass(frozen=True, eq=False)
class Sensitivity:
    r"""The result of :func:`max_sensitivity`.

    Attributes:
        method: Name of the method.
        radius: Half-width of the uniform noise, in input units.
        samples: Number of noise draws.
        max: ``(N,)`` max-sensitivity, :math:`\max_k \|\Phi(x+\delta_k)-\Phi(x)\|_2 /
            \|\Phi(x)\|_2` (lower is more stable).
        mean: ``(N,)`` the same ratio averaged over the draws (Yeh et al.'s average
            sensitivity with this normalization; Quantus's ``AvgSensitivity``).
    """

    method: str
    radius: float
    samples: int
    max: Tensor
    mean: Tensor

    @property
    def figure(self) -> float:
        """The headline: max-sensitivity averaged over samples (0: the map does not move)."""
        return _mean(self.max)

    def reading(self) -> str:
        """One sentence a person can read, e.g. for a scorecard."""
        n = self.max.shape[0]
        worst = float(self.max.double().max())
        return (
            f"{self.method}: uniform noise of ±{self.radius:.3g} per input value changes the "
            f"map by up to {self.figure:.0%} of its norm on average ({self.samples} draws, "
            f"{n} image{'s' if n != 1 else ''}; worst image {worst:.0%}); typical change "
            f"{_mean(self.mean):.0%}."
        )

    def __repr__(self) -> str:
        return (
            f"Sensitivity(method={self.method!r}, radius={self.radius:g}, "
            f"samples={self.samples}, max={[round(v, 4) for v in self.max.tolist()[:8]]})"
        )


def max_sensitivity(
    model: Any,
    inputs: Tensor,
    method: MethodLike = "gradient",
    radius: float = 0.2,
    *,
    target: TargetLike = None,
    samples: int = 200,
    seed: int = 0,
    method_options: Mapping[str, Any] | None = None,
    batch_size: BatchSize = "auto",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
    progress: bool | None = False,
) -> Sensitivity:
    r"""Max-sensitivity of the maps under uniform noise (Yeh et al. 2019), as in Quantus.

    .. math:: \mathrm{SENS}_{\max}(x) = \max_{k=1..K}
              \frac{\|\Phi(x + \delta_k) - \Phi(x)\|_2}{\|\Phi(x)\|_2},\qquad
              \delta_k \sim \mathcal U[-r, r]^{C \times H \times W}

    :math:`\Phi` is the method's ``(H, W)`` map (its :meth:`~salience.Attribution.saliency`,
    signed, not normalized) and the norms are Frobenius norms over the map. This is Quantus
    0.6's ``MaxSensitivity`` with its defaults (``lower_bound=0.2`` as ``radius``,
    ``nr_samples=200``, uniform noise, ``difference`` similarity, Frobenius norms for the
    numerator and the denominator, ``abs=False``, ``normalise=False``, no check of the
    label); the target (default: the predicted class) is fixed on the clean inputs, as
    Quantus's ``y_batch``. The average over the draws is returned as well.

    **The draws.** ``torch.Generator(device=inputs.device).manual_seed(seed)`` draws, on the
    inputs' device, for ``k = 0, 1, ...``, one ``torch.rand(C, H, W, dtype=torch.float64)``
    ``u_k`` (the same seed gives the same draws on the same device, not across devices);
    :math:`\delta_k = (2 u_k - 1) r`, shared by every sample of the batch (so a batch gives
    the figures of its samples one by one). The noisy input ``(x.double() + delta_k)`` is
    cast to the dtype of ``x``. All the ``N * samples`` noisy copies go through the method
    ``batch_size`` rows at a time.

    A map that is zero everywhere has no relative change: its sensitivity is ``inf`` if a
    draw makes it nonzero, else 0, and a warning names the samples.

    Args:
        model: The model, called as ``model(x, *forward_args)``.
        inputs: ``(N, C, H, W)`` images.
        method: A registered method name, or ``method(model, inputs, target, **options)``
            returning an :class:`~salience.Attribution` or ``(N, H, W)`` maps.
        radius: Half-width :math:`r` of the noise, in input units (Quantus: 0.2).
        target: What is explained; see :mod:`salience.targets`.
        samples: Number of draws :math:`K` (Quantus: 200).
        seed: Seed of the draws.
        method_options: Options of the method, e.g. ``{"steps": 16}``.
        batch_size: Noisy rows per method call, or ``"auto"``: from the device (on CUDA the
            first clean call is the probe; see :mod:`salience._chunks`).
        forward_args: Extra arguments of the model; per-sample tensors follow their rows.
        allow_tf32: Let CUDA use TF32; off by default.
        progress: Show a progress bar on stderr (``None``: only on a terminal).

    Returns:
        A :class:`Sensitivity` (``.max``, ``.mean``, ``.figure``, ``.reading()``).

    References:
        Yeh, Hsieh, Suggala, Inouye, Ravikumar. On the (In)fidelity and Sensitivity of
        Explanations. NeurIPS 2019, arXiv:1901.09392. Hedström et al. Quantus, JMLR 2023.
    """
    check_inputs(inputs)
    radius = _check_number("radius", radius)
    samples = check_positive_int("samples", samples)
    meth = _resolve_method(method, method_options)
    x = inputs.detach()
    n = x.shape[0]
    chunker = Chunker(x, batch_size, owner=model, kind=f"max_sensitivity/{meth.name}")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    ratios = torch.empty(samples, n, dtype=torch.float64, device=x.device)
    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as fwd:
        target_fixed, _ = _fixed_target(fwd, x, target)
        clean_parts = []
        for part in chunker.passes(n, even=False):  # a pass out of memory is redone
            with part as (start, stop):
                ids = torch.arange(start, stop, device=x.device)
                m, _ = meth.maps(
                    model, x[ids].clone(), _chunk_target(target_fixed, ids),
                    _chunk_args(fwd, ids), allow_tf32,
                )  # fmt: skip
                clean_parts.append(m.double())
        clean = torch.cat(clean_parts)
        norm0 = clean.flatten(1).norm(dim=1)
        per_pass = chunker.most()
        draws_per_pass = max(1, per_pass // n)
        passes = -(-samples // draws_per_pass) * -(-n // min(n, per_pass))
        with Progress(passes, "max-sensitivity", enabled=progress) as bar:
            for k0 in range(0, samples, draws_per_pass):
                kk = min(draws_per_pass, samples - k0)
                # One draw at a time (the draws do not depend on the chunking), on the device.
                noise = torch.stack(
                    [
                        torch.rand(x.shape[1:], generator=gen, dtype=torch.float64, device=x.device)
                        for _ in range(kk)
                    ]
                )
                delta = (2 * noise - 1) * radius
                noisy = (x.double()[None] + delta[:, None]).to(x.dtype)  # (kk, N, C, H, W)
                noisy = noisy.reshape(kk * n, *x.shape[1:])
                row_sample = torch.arange(n, device=x.device).repeat(kk)
                row_draw = torch.arange(k0, k0 + kk, device=x.device).repeat_interleave(n)
                for part in chunker.passes(kk * n, even=False):  # out of memory: redone
                    with part as (r0, r1):
                        sl = slice(r0, r1)
                        ids = row_sample[sl]
                        m, _ = meth.maps(
                            model, noisy[sl].clone(), _chunk_target(target_fixed, ids),
                            _chunk_args(fwd, ids), allow_tf32,
                        )  # fmt: skip
                        if m.shape[1:] != clean.shape[1:]:
                            raise ValueError(
                                f"method {meth.name!r} gave maps of shape "
                                f"{tuple(m.shape[1:])} on noisy inputs and "
                                f"{tuple(clean.shape[1:])} on clean ones"
                            )
                        num = (m.double() - clean[ids]).flatten(1).norm(dim=1)
                        den = norm0[ids]
                        ratio = torch.where(
                            den > 0, num / den.clamp(min=1e-300),
                            torch.where(num > 0, math.inf, 0.0),
                        )  # fmt: skip
                        ratios[row_draw[sl], ids] = ratio
                        bar.update()
    zero = (norm0 == 0).nonzero().flatten().tolist()
    if zero:
        warn(
            f"max_sensitivity: the map of {meth.name} is zero everywhere for sample(s) "
            f"{zero[:10]}: a relative change is undefined (reported as inf where a draw "
            "changes it, 0 where none does)",
        )
    return Sensitivity(
        method=meth.name,
        radius=radius,
        samples=samples,
        max=ratios.amax(0),
        mean=ratios.mean(0),
    )
