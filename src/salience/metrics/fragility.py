r"""Fragility and sensitivity: does a map survive a perturbation that the model shrugs off.

Two ways to move a map without moving the prediction:

- :func:`fragility` — an **attack** (Ghorbani, Abid and Zou, "Interpretation of Neural Networks
  is Fragile", AAAI 2019, Algorithm 1): iterative signed-gradient steps inside an
  :math:`L_\infty` ball of radius ``epsilon`` that push the map away from the original one
  while the predicted label is kept, next to a **random-sign perturbation** of the same size
  (the paper's baseline). A map that survives random noise but not the attack is fragile.
- :func:`max_sensitivity` — **random** perturbations (Yeh et al., "On the (In)fidelity and
  Sensitivity of Explanations", NeurIPS 2019): the largest relative change of the map over
  uniform draws in the :math:`L_\infty` ball, as Quantus's ``MaxSensitivity`` computes it.

**Which map.** A method is a registered name (``"gradient"``, ``"grad_cam"``, ...) or a
callable ``method(model, inputs, target, **method_options)`` returning an
:class:`~salience.Attribution` or ``(N, H, W)`` maps. The map is the result's
:meth:`~salience.Attribution.saliency` (the reduction of the method's paper). Fragility ranks
pixels by the **magnitude** of the map, ``|map|``, as the paper does (it takes absolute values
and normalizes the map to sum to one); max-sensitivity uses the signed map as it is, as
Quantus does by default (``abs=False, normalise=False``).

**The attack needs the gradient of the map with respect to the input** (double backprop). For
a ReLU network the gradient map is piecewise constant in the input, so that derivative is zero
almost everywhere and a direct attack does not move. As the paper does, the attack *direction*
is computed on a smoothed twin of the model in which every rectifier is replaced by
:math:`\mathrm{softplus}_\beta(t) = \log(1 + e^{\beta t}) / \beta` (a clipped rectifier
``clamp(t, 0, u)`` by :math:`\mathrm{softplus}_\beta(t) - \mathrm{softplus}_\beta(t - u)`),
while every map, label and figure reported is computed on the **true model**. The twin is
not a copy: the replacement is a call rule (:func:`salience.hooks.call_rule`) active only
while the direction is computed, which sees rectifiers however they are written
(``nn.ReLU``, ``F.relu``, ``clamp(min=0)``, ReLU6, ...; see :mod:`salience.rectifiers`). The
model's parameters, buffers, hooks and flags are left as they were.

Differentiable maps are built for ``gradient``, ``input_x_gradient``,
``integrated_gradients`` (a fixed quadrature: double backprop through ``steps`` points, so
keep ``steps`` small) and ``grad_cam`` (a convolutional ``(N, C, h, w)`` layer, or one read
with ``reshape=``). A callable method is differentiated through as it is: it must build its
map with autograd (``create_graph=True``); a map that does not depend on the input through
autograd cannot be attacked, and a warning says so. Other registered methods raise an error.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .._checks import (
    check_inputs,
    check_positive_int,
    warn,
)
from .._chunks import BatchSize, Chunker
from .._forward import Forward, ForwardArgs, model_scope
from .._io import Progress
from ..targets import TargetLike
from ._fragility_maps import (
    _DIFFERENTIABLE,
    MethodLike,
    _chunk_args,
    _chunk_target,
    _differentiable_map,
    _fixed_target,
    _labels,
    _Method,
    _resolve_method,
    _Softplus,
)
from .sanity import rank_correlation

__all__ = [
    "Fragility",
    "FragilityScores",
    "MethodLike",
    "fragility",
    "top_k_intersection",
]

Attack = Literal["top_k", "center_of_mass"]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class FragilityScores:
    r"""How much one perturbation moved the maps, per sample (see :func:`fragility`).

    Attributes:
        top_k_intersection: ``(N,)`` fraction of the original top-``k`` pixels (by ``|map|``)
            still in the top ``k`` after the perturbation: 1 is unmoved.
        spearman: ``(N,)`` Spearman rank correlation of ``|map|`` before and after (ties get
            their average rank); NaN where exactly one of the two maps is constant.
        center_shift: ``(N,)`` distance in pixels between the centers of mass of ``|map|``
            before and after.
        linf: ``(N,)`` :math:`L_\infty` norm of the perturbation actually applied.
        label_held: ``(N,)`` bool: the model predicts the same class on the perturbed input.
    """

    top_k_intersection: Tensor
    spearman: Tensor
    center_shift: Tensor
    linf: Tensor
    label_held: Tensor


@dataclass(frozen=True, eq=False)
class Fragility:
    r"""The result of :func:`fragility`: the attack and the random baseline, per sample.

    Attributes:
        method: Name of the method attacked.
        attack: ``"top_k"`` or ``"center_of_mass"``.
        epsilon: The :math:`L_\infty` budget, in input units.
        k: Number of top pixels compared.
        attacked: What the attack did (its perturbation always keeps the label).
        random: What a random-sign perturbation of size ``epsilon`` did.
        original_map: ``(N, h, w)`` the map of the clean inputs.
        attacked_map: ``(N, h, w)`` the map of the attacked inputs.
        perturbed: ``(N, C, H, W)`` the attacked inputs.
        label: ``(N,)`` the class predicted on the clean inputs.
        kept_steps: ``(N,)`` how many of the ``steps`` iterates kept the label (the others
            are never returned).
    """

    method: str
    attack: str
    epsilon: float
    k: int
    attacked: FragilityScores
    random: FragilityScores
    original_map: Tensor
    attacked_map: Tensor
    perturbed: Tensor
    label: Tensor
    kept_steps: Tensor

    @property
    def figure(self) -> float:
        """The headline: mean top-``k`` intersection after the attack (1: robust, 0: moved)."""
        return float(self.attacked.top_k_intersection.double().mean())

    def summary(self) -> dict[str, float]:
        """Return the means over samples of every figure, attacked and random."""
        out: dict[str, float] = {}
        for name, scores in (("attack", self.attacked), ("random", self.random)):
            out[f"{name}_top_k_intersection"] = _mean(scores.top_k_intersection)
            out[f"{name}_spearman"] = _mean(scores.spearman)
            out[f"{name}_center_shift"] = _mean(scores.center_shift)
            out[f"{name}_linf"] = float(scores.linf.double().max())
            out[f"{name}_label_held"] = float(scores.label_held.double().mean())
        return out

    def reading(self) -> str:
        """One sentence a person can read, e.g. for a scorecard."""
        s = self.summary()
        n = self.attacked.linf.shape[0]
        verdict = (
            "fragile"
            if s["attack_top_k_intersection"] < 0.5
            else ("somewhat fragile" if s["attack_top_k_intersection"] < 0.8 else "robust")
        )
        return (
            f"{self.method}: {verdict} — a label-preserving {self.attack.replace('_', '-')} "
            f"attack of L∞ ≤ {self.epsilon:.3g} keeps {s['attack_top_k_intersection']:.0%} of "
            f"the top-{self.k} pixels (random noise of the same size: "
            f"{s['random_top_k_intersection']:.0%}); rank correlation "
            f"{s['attack_spearman']:.2f} (noise {s['random_spearman']:.2f}); mean over {n} "
            f"image{'s' if n != 1 else ''}."
        )

    def __repr__(self) -> str:
        return (
            f"Fragility(method={self.method!r}, attack={self.attack!r}, epsilon={self.epsilon:g}, "
            f"k={self.k}, top_k_intersection={self.figure:.3f}, random="
            f"{_mean(self.random.top_k_intersection):.3f})"
        )


def _mean(t: Tensor) -> float:
    t = t.double()
    t = t[~torch.isnan(t)]
    return float(t.mean()) if t.numel() else math.nan


# --------------------------------------------------------------------------- map comparison


def _ranking(m: Tensor) -> Tensor:
    """``(N, P)`` position of each pixel when sorted by decreasing value, ties row-major."""
    flat = m.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(flat.shape[1], device=m.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def top_k_intersection(a: Tensor, b: Tensor, k: int) -> Tensor:
    """Return the fraction of the top ``k`` pixels of ``a`` that are in the top ``k`` of ``b``.

    Pixels are ranked by value, largest first; equal values keep row-major order (a stable
    sort), so identical maps always give 1. Pass ``|map|`` to rank by magnitude.

    Args:
        a: ``(N, H, W)`` maps.
        b: ``(N, H, W)`` maps.
        k: Number of top pixels, ``1 <= k <= H * W``.

    Returns:
        ``(N,)`` float64 in ``[0, 1]``.
    """
    if a.shape != b.shape:
        raise ValueError(f"maps of shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    pixels = a[0].numel()
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= pixels:
        raise ValueError(f"k must be an integer in [1, {pixels}] (pixels per map), got {k!r}")
    if torch.isnan(a).any() or torch.isnan(b).any():
        raise ValueError("the maps hold NaN: their top pixels are undefined")
    top_a = _ranking(a) < k
    top_b = _ranking(b) < k
    return (top_a & top_b).sum(1).double() / k


def _spearman(a: Tensor, b: Tensor) -> Tensor:
    """Return the Spearman rank correlation per sample, ties averaged; NaN for a constant map.

    As :func:`salience.metrics.sanity.rank_correlation`, except that two identical maps
    correlate 1, also when constant.
    """
    rho = rank_correlation(a, b)
    same = (a.flatten(1) == b.flatten(1)).all(1)
    return torch.where(torch.isnan(rho) & same, torch.ones_like(rho), rho)


def _center(m: Tensor) -> Tensor:
    """``(N, 2)`` center of mass (row, column) of nonnegative maps; a zero map: the middle."""
    _, h, w = m.shape
    rows = torch.arange(h, device=m.device, dtype=m.dtype)
    cols = torch.arange(w, device=m.device, dtype=m.dtype)
    total = m.sum((1, 2))
    safe = total.clamp(min=torch.finfo(m.dtype).tiny)
    cy = (m.sum(2) * rows).sum(1) / safe
    cx = (m.sum(1) * cols).sum(1) / safe
    middle = torch.tensor([(h - 1) / 2, (w - 1) / 2], device=m.device, dtype=m.dtype)
    c = torch.stack([cy, cx], 1)
    return torch.where((total > 0)[:, None], c, middle)


def _compare(m0: Tensor, m1: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    a, b = m0.abs().double(), m1.abs().double()
    shift = (_center(a) - _center(b)).norm(dim=1)
    return top_k_intersection(a, b, k), _spearman(a, b), shift


# --------------------------------------------------------------------------- fragility


def _check_number(name: str, value: Any, positive: bool = True) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def fragility(
    model: Any,
    inputs: Tensor,
    method: MethodLike = "gradient",
    *,
    epsilon: float,
    target: TargetLike = None,
    attack: Attack = "top_k",
    steps: int = 20,
    step_size: float | None = None,
    k: int | float = 0.02,
    beta: float = 30.0,
    bounds: tuple[float, float] | None = None,
    seed: int = 0,
    method_options: Mapping[str, Any] | None = None,
    batch_size: BatchSize = "auto",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
    progress: bool | None = False,
) -> Fragility:
    r"""Attack the maps within an :math:`L_\infty` ball, keeping the label (Ghorbani et al. 2019).

    For each sample :math:`x` with map :math:`M(x)` and predicted label :math:`y`, let
    :math:`I(z) = |M(z)| / \sum |M(z)|` (the map normalized to sum to one) and :math:`B` the
    ``k`` largest pixels of :math:`|M(x)|`. The dissimilarity is

    - ``attack="top_k"``: :math:`D(z) = -\sum_{i \in B} I(z)_i`, the mass left on the
      original top pixels;
    - ``attack="center_of_mass"``: :math:`D(z) = \|C(I(z)) - C(I(x))\|_2`, how far the center
      of mass :math:`C` moves (while it has not moved yet, the first steps push it along a
      seeded random direction instead).

    Starting at :math:`x^0 = x`, each step is
    :math:`x^{p} = \mathrm{clip}_{x,\epsilon}(x^{p-1} + \alpha\,\mathrm{sign}\,\nabla D(x^{p-1}))`
    (and clipped to ``bounds``). The gradient is taken on the softplus twin of the model (see
    the module documentation). Among :math:`x^1, \dots, x^P` the iterate returned is, as in the
    paper's Algorithm 1, the one whose **true** map is furthest from the original (lowest
    top-``k`` intersection, or largest center shift) among those the true model still gives
    label :math:`y`; iterates that change the label are never returned. If none keeps it,
    the clean input is returned (a perturbation of size 0).

    The baseline is the random-sign perturbation :math:`x + \epsilon\,s`, :math:`s \in
    \{-1, 1\}^{C \times H \times W}` (clipped to ``bounds``), one seeded pattern shared by the
    samples. Both are scored on the true model against the clean map by
    :class:`FragilityScores`. The target (default: the predicted class) is fixed once on the
    clean inputs.

    Args:
        model: The classifier (output ``(N, classes)``), called as ``model(x, *forward_args)``.
        inputs: ``(N, C, H, W)`` images.
        method: A registered name (``gradient``, ``input_x_gradient``,
            ``integrated_gradients``, ``grad_cam``) or a callable building its map with
            autograd (see the module documentation).
        target: What is explained; see :mod:`salience.targets`.
        epsilon: The :math:`L_\infty` budget, in the units of ``inputs`` (for inputs
            normalized by a standard deviation ``s``, 8/255 in pixel units is ``8/255/s``).
        attack: ``"top_k"`` (default) or ``"center_of_mass"``.
        steps: Number of attack iterations :math:`P`.
        step_size: :math:`\alpha`; default ``2.5 * epsilon / steps``.
        k: Number of top pixels, or a fraction of the map's pixels (default 2 %: 1003 pixels
            at 224 x 224, the paper's 1000).
        beta: Sharpness of the softplus that replaces rectifiers for the attack direction.
        bounds: ``(low, high)`` valid input range to clip to, or ``None``.
        seed: Seed of the random-sign baseline and of the center attack's first direction.
        method_options: Options of the method (e.g. ``{"steps": 8}`` for Integrated
            Gradients, ``{"layer": "features"}`` for Grad-CAM).
        batch_size: Samples attacked per pass, or ``"auto"``: from the image size on the CPU,
            from the memory left on CUDA (see :mod:`salience._chunks`).
        forward_args: Extra arguments of the model; per-sample tensors follow their rows.
        allow_tf32: Let CUDA use TF32; off by default.
        progress: Show a progress bar on stderr (``None``: only on a terminal).

    Returns:
        A :class:`Fragility` (``.figure``, ``.summary()``, ``.reading()``).

    Raises:
        ValueError: a method whose map cannot be differentiated (use a callable), a bad
            ``epsilon``, ``k``, ``attack`` or ``bounds``, a model output that is not
            ``(N, classes)``.

    References:
        Ghorbani, Abid, Zou. Interpretation of Neural Networks is Fragile. AAAI 2019,
        arXiv:1710.10547.
    """
    check_inputs(inputs)
    epsilon = _check_number("epsilon", epsilon)
    steps = check_positive_int("steps", steps)
    alpha = 2.5 * epsilon / steps if step_size is None else _check_number("step_size", step_size)
    beta = _check_number("beta", beta)
    if attack not in ("top_k", "center_of_mass"):
        raise ValueError(f"unknown attack {attack!r}; expected 'top_k' or 'center_of_mass'")
    if bounds is not None:
        lo, hi = (_check_number("bounds", b, positive=False) for b in bounds)
        if not lo < hi:
            raise ValueError(f"bounds must be (low, high) with low < high, got {bounds}")
        outside = ((inputs < lo) | (inputs > hi)).flatten(1).any(1)
        if outside.any():
            raise ValueError(
                f"inputs of sample(s) {outside.nonzero().flatten().tolist()[:10]} lie outside "
                f"bounds={bounds}: bounds is the valid input range, which the inputs must "
                "respect (for normalized images, the normalized 0 and 1)"
            )
    meth = _resolve_method(method, method_options)
    if meth.registered and meth.reduction is None:
        raise ValueError(
            f"fragility needs the gradient of the map with respect to the input (double "
            f"backprop); salience builds it for {', '.join(_DIFFERENTIABLE)}, not for "
            f"{meth.name!r}. Pass a callable method that builds its map with autograd "
            "(create_graph=True), or use max_sensitivity, which needs no gradient of the map"
        )
    x = inputs.detach()
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    signs = (torch.randint(0, 2, x.shape[1:], generator=gen) * 2 - 1).to(x.device, x.dtype)
    angle = float(torch.rand((), generator=gen, dtype=torch.float64)) * 2 * math.pi
    rows_per_sample = (
        (meth.options.get("steps") or 50) if meth.name == "integrated_gradients" else 1
    )
    # Samples attacked per pass: each runs its method twice per step (map, and its gradient).
    chunker = Chunker(
        x, batch_size, backward=True, owner=model, kind=f"fragility/{meth.name}",
        cost=2 * rows_per_sample,
    )  # fmt: skip

    parts: dict[str, list[Tensor]] = {}
    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as fwd:
        target_fixed, labels = _fixed_target(fwd, x, target)
        label = "fragility attack"
        with Progress(n * (steps + 2), label, enabled=progress) as bar:
            for part in chunker.passes(n):
                with part as (start, stop):  # out of memory on CUDA: redone with fewer
                    ids = torch.arange(start, stop, device=x.device)
                    out = _attack_chunk(
                        meth, fwd, x[ids], ids, target_fixed, labels[ids], attack, epsilon,
                        alpha, steps, k, bounds, signs, angle, beta, allow_tf32, bar,
                    )  # fmt: skip
                    for key, value in out.items():
                        parts.setdefault(key, []).append(value)
    cat = {key: torch.cat(v) for key, v in parts.items()}
    kk = int(cat.pop("k")[0])
    return Fragility(
        method=meth.name,
        attack=attack,
        epsilon=epsilon,
        k=kk,
        attacked=FragilityScores(*(cat[f"a_{f}"] for f in _FIELDS)),
        random=FragilityScores(*(cat[f"r_{f}"] for f in _FIELDS)),
        original_map=cat["m0"],
        attacked_map=cat["m_att"],
        perturbed=cat["x_att"],
        label=labels,
        kept_steps=cat["kept"],
    )


_FIELDS = ("top_k_intersection", "spearman", "center_shift", "linf", "label_held")


def _resolve_k(k: int | float, pixels: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise ValueError(f"k must be a number of pixels or a fraction in (0, 1), got {k!r}")
    if isinstance(k, numbers.Integral):
        if not 1 <= int(k) <= pixels:
            raise ValueError(f"k={k} pixels is outside [1, {pixels}] (pixels per map)")
        return int(k)
    if not 0 < k < 1:
        raise ValueError(f"k as a fraction of the pixels must lie in (0, 1), got {k}")
    return max(1, round(float(k) * pixels))


def _attack_chunk(
    meth: _Method,
    fwd: Forward,
    x0: Tensor,
    ids: Tensor,
    target: Any,
    label: Tensor,
    attack: str,
    epsilon: float,
    alpha: float,
    steps: int,
    k: int | float,
    bounds: tuple[float, float] | None,
    signs: Tensor,
    angle: float,
    beta: float,
    allow_tf32: bool,
    bar: Progress,
) -> dict[str, Tensor]:
    model = fwd.model
    args = _chunk_args(fwd, ids)
    tgt = _chunk_target(target, ids)
    r = x0.shape[0]
    m0, att = meth.maps(model, x0.clone(), tgt, args, allow_tf32)
    layer = att.layer if att is not None else None
    if meth.name == "grad_cam" and meth.registered:
        layer = layer or meth.options.get("layer")
    kk = _resolve_k(k, m0[0].numel())
    top0 = (_ranking(m0.abs()) < kk).view_as(m0)  # B: the original top-k pixels
    c0 = _center(m0.abs().double())
    direction = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
    direction = direction.to(x0.device)
    bar.update(r)

    def clip(z: Tensor) -> Tensor:
        z = torch.maximum(torch.minimum(z, x0 + epsilon), x0 - epsilon)
        return z.clamp(*bounds) if bounds is not None else z

    rule = _Softplus(beta)
    best = x0.clone()
    best_map = m0
    best_score = torch.full((r,), math.inf if attack == "top_k" else -math.inf, device=x0.device,
                            dtype=torch.float64)  # fmt: skip
    kept = torch.zeros(r, dtype=torch.long, device=x0.device)
    stuck = torch.ones(r, dtype=torch.bool, device=x0.device)
    z = x0.clone()
    for _ in range(steps):
        leaf = z.detach().requires_grad_(True)
        with torch.enable_grad():
            m = _differentiable_map(meth, fwd, leaf, tgt, ids, layer, rule)
            if m.shape != m0.shape:
                raise ValueError(
                    f"the differentiable map of {meth.name} has shape {tuple(m.shape)}, the "
                    f"method's {tuple(m0.shape)}"
                )
            mass = m.abs()
            share = mass / mass.flatten(1).sum(1).clamp(min=1e-30).view(-1, 1, 1)
            if attack == "top_k":
                d = -(share * top0).flatten(1).sum(1)
            else:
                moved = _center(share.double()) - c0
                dist = moved.norm(dim=1)
                d = torch.where(dist > 1e-6, dist, (moved * direction).sum(1))
            if d.requires_grad:
                (g,) = torch.autograd.grad(d.sum(), leaf, materialize_grads=True)
            else:
                g = torch.zeros_like(leaf)
        g = g.detach()
        stuck &= (g.flatten(1) == 0).all(1)
        z = clip(z + alpha * g.sign())
        mz, att_z = meth.maps(model, z.clone(), tgt, args, allow_tf32)
        held = _labels(fwd, z, ids, att_z) == label
        kept += held.long()
        inter = top_k_intersection(m0.abs().double(), mz.abs().double(), kk)
        score = inter if attack == "top_k" else (_center(mz.abs().double()) - c0).norm(dim=1)
        better = held & ((score < best_score) if attack == "top_k" else (score > best_score))
        best = torch.where(better.view(-1, 1, 1, 1), z, best)
        best_map = torch.where(better.view(-1, 1, 1), mz.to(best_map.dtype), best_map)
        best_score = torch.where(better, score, best_score)
        bar.update(r)
    if stuck.any():
        why = (
            "" if meth.registered else " (or the callable method detaches its map: build it "
            "with autograd, create_graph=True, for the attack to see it)"
        )  # fmt: skip
        warn(
            f"fragility: the map of {meth.name} does not change with the input to first order "
            f"for sample(s) {(ids[stuck]).tolist()[:10]}: the attack had no direction and left "
            f"them unperturbed{why}",
        )
    x_rand = x0 + epsilon * signs
    x_rand = x_rand.clamp(*bounds) if bounds is not None else x_rand
    m_rand, _ = meth.maps(model, x_rand.clone(), tgt, args, allow_tf32)
    held_rand = _labels(fwd, x_rand, ids) == label
    held_att = _labels(fwd, best, ids) == label
    bar.update(r)
    out: dict[str, Tensor] = {"k": torch.tensor([kk])}
    for prefix, xp, mp, held in (("a", best, best_map, held_att), ("r", x_rand, m_rand, held_rand)):
        inter, rho, shift = _compare(m0, mp, kk)
        linf = (xp - x0).abs().flatten(1).amax(1)
        for f, v in zip(_FIELDS, (inter, rho, shift, linf, held), strict=True):
            out[f"{prefix}_{f}"] = v
    out.update(m0=m0, m_att=best_map, x_att=best, kept=kept)
    return out
