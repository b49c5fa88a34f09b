r"""Sanity checks: whether a saliency map changes when the model's weights are destroyed.

Adebayo et al. (*Sanity Checks for Saliency Maps*, NeurIPS 2018, Sec. 3) randomize the
parameters of a trained network and re-explain the same inputs. A map that still looks the same
explains the image (an edge detector would draw it too), not the model. Two orders:

- **cascading** randomization: from the top layer (the logits) down, cumulatively: row ``k``
  of the result is the model whose top ``k + 1`` layers are random;
- **independent** randomization: one layer at a time, the others keep their trained values.

What is computed, exactly, for each sample ``i`` and randomized model ``k``:

1. **A copy.** The model is deep-copied once; only the copy is changed. The user's model,
   its parameters, buffers, ``requires_grad`` flags and training flag are never touched, also
   when the method raises midway. The weight the legacy ``weight_norm`` and
   ``spectral_norm`` keep as an attribute is copied detached (after a pass with gradients it
   is in an autograd graph, which ``copy.deepcopy`` refuses).
2. **Layers.** A *unit* is a module with parameters of its own (conv, linear, norm, ...). A
   forward pass on the inputs (forward hooks of :mod:`salience.hooks`) orders the units by
   when their forward call returns; units the forward pass does not run are left out. Units
   are grouped into layers (see :func:`randomization_layers`): by default, the units under the
   same numbered block (``features.3``, ``_blocks.12``, ``layer2.1``), a normalization joining
   the layer just before it. ``layers=`` names the layers instead.
3. **Randomization.** A unit is re-initialized with its ``reset_parameters()`` (PyTorch's
   default initialization; for a norm layer this also resets its running statistics) when it
   has one, else each of its parameters is drawn from a Gaussian ``N(0, s^2)`` with ``s`` the
   standard deviation of its trained values. Each unit draws from its own stream, seeded by
   ``seed`` and the unit's position, so a unit gets the same random values in both orders and
   whatever layers are evaluated. The global random state is left as it was.
4. **Target.** The target is resolved once, on the original model (``None``: its predicted
   class), and kept for every randomized model, as in the paper.
5. **Maps.** ``A = method(copy, inputs, target).values`` of shape ``(N, C, H, W)``. The paper's
   two maps (it uses the visualization of Smilkov et al., 2017):

   - absolute: ``a = sum_c |A_c|``; signed: ``s = sum_c A_c``;
   - for SSIM and HOG, ``a`` is normalized to ``[0, 1]`` per map:
     ``clip((a - min a) / (p99(a) - min a), 0, 1)`` with ``p99`` the 99th percentile
     (the maximum when the percentile equals the minimum).

6. **Similarities** to the map of the trained model, per sample:

   - ``"spearman_abs"``: Spearman rank correlation of the absolute maps ``a`` (before the
     percentile clip: a rank statistic needs no normalization, and the clip would only tie
     the top 1 %); ``"spearman"``: of the signed maps ``s``; ties get their average rank;
   - ``"ssim"``: the structural similarity of the normalized maps (:func:`ssim`, Wang et al.
     2004, Gaussian window ``sigma = 1.5``, data range 1);
   - ``"hog"``: the Pearson correlation of the HOG descriptors of the normalized maps
     (:func:`hog_features`, Dalal and Triggs 2005).

   A measure that is undefined (a constant map has no ranks) is NaN, with a warning.

The verdict (:meth:`SanityCheck.verdict`) reads the Spearman correlation of the absolute maps
averaged over the layers evaluated (:meth:`SanityCheck.average`, the area under the curve):
below 0.45 the maps follow the weights (passes), above 0.55 they barely do (fails).
:meth:`SanityCheck.final` is the figure once every layer is random. These bounds are a
convention of this library (see :attr:`SanityCheck.passed` for the measurements behind them);
the paper compares methods, it does not grade them.

References:
    Adebayo, Gilmer, Muelly, Goodfellow, Hardt, Kim. Sanity Checks for Saliency Maps.
    NeurIPS 2018, arXiv:1810.03292.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._checks import all_finite, check_inputs, check_positive_int, copy_model, warn
from .._forward import ForwardArgs
from .._io import Progress
from ..attribution import Attribution
from ..targets import TargetLike, resolve_target
from ._randomize import (
    LayerSpec,
    _discover,
    _group,
    _randomize,
    _restore,
    _snapshot,
    _unit_seed,
    randomization_layers,
)
from .similarity import (
    _abs_map,
    _hog_cell,
    _measure,
    _normalized,
    _reference,
    hog_features,
    hog_similarity,
    rank_correlation,
    ssim,
)

__all__ = [
    "MEASURES",
    "SanityCheck",
    "hog_features",
    "hog_similarity",
    "parameter_randomization",
    "plot_sanity_checks",
    "randomization_layers",
    "rank_correlation",
    "ssim",
]

MEASURES = ("spearman_abs", "spearman", "ssim", "hog")
"""The similarity measures of :func:`parameter_randomization`, in the paper's order."""

MEASURE_NAMES = {
    "spearman_abs": "Spearman (abs)",
    "spearman": "Spearman (signed)",
    "ssim": "SSIM",
    "hog": "HOG",
}

PASS_BELOW = 0.45
"""Mean Spearman (abs) over the randomized layers below which the maps follow the weights."""
FAIL_ABOVE = 0.55
"""Mean Spearman (abs) over the randomized layers above which the maps barely follow them."""

Method = str | Callable[[nn.Module, Tensor, Any], Attribution]
"""A registered method name, or a callable ``(model, inputs, target) -> Attribution``."""

Mode = Literal["cascading", "independent"]


# --------------------------------------------------------------------------- result


@dataclass(frozen=True, eq=False)
class SanityCheck:
    """The result of :func:`parameter_randomization` for one method.

    Row ``k`` is the ``k``-th randomized model: in cascading mode, the top ``k + 1`` layers
    evaluated are random (and every layer above them); in independent mode, only layer ``k``.

    Attributes:
        method: The method's name.
        mode: ``"cascading"`` or ``"independent"``.
        layers: ``(L,)`` the layer randomized at each row, the top first.
        randomized: ``(L,)`` the units random in the model of each row.
        similarity: ``{measure: (L, N) float64}`` similarity of each sample's map to its map
            under the trained model (:data:`MEASURES`).
        target: ``(N,)`` the classes explained (resolved on the trained model), or ``None``
            for a callable target.
        original: ``(N, H, W)`` the normalized absolute maps of the trained model (on the CPU).
        maps: ``(L, N, H, W)`` the normalized absolute maps of each randomized model (on the
            CPU), or ``None`` with ``keep_maps=False``.
        seed: The randomization seed.
        hog_cell: The HOG cell side used, in pixels.
    """

    method: str
    mode: str
    layers: tuple[str, ...]
    randomized: tuple[tuple[str, ...], ...]
    similarity: dict[str, Tensor]
    target: Tensor | None
    original: Tensor
    maps: Tensor | None
    seed: int
    hog_cell: int
    units: tuple[str, ...] = field(default=())

    @property
    def samples(self) -> int:
        """Number of samples."""
        return int(self.original.shape[0])

    def mean(self, measure: str = "spearman_abs") -> Tensor:
        """``(L,)`` the measure per row, averaged over the samples (NaN ignored)."""
        _check_measure(measure)
        return self.similarity[measure].nanmean(dim=1)

    def final(self, measure: str = "spearman_abs") -> float:
        """Return the measure for the last model evaluated, averaged over the samples.

        In cascading mode that model has every layer random: the one figure that sums up the
        check (the lower, the more the maps depend on the weights).
        """
        return float(self.mean(measure)[-1])

    def average(self, measure: str = "spearman_abs") -> float:
        """Return the measure averaged over the samples and over the layers evaluated.

        In cascading mode, the area under the similarity curve of the paper's Fig. 4 (per
        layer): low when the maps change as soon as the top layers are random, high when they
        survive the randomization of much of the network. Quantus calls it
        ``return_average_correlation``.
        """
        return float(self.mean(measure).nanmean())

    @property
    def passed(self) -> bool | None:
        """Whether the check passes: :meth:`average` Spearman (abs) below 0.45.

        ``False`` above 0.55, ``None`` in between (unclear) or when undefined. Why the
        average and not :meth:`final`: on EfficientNet-Lite0 (cascading, 5 evenly spread
        checkpoints, the cat and coffee images, seeds 0-4) guided backprop keeps a
        similarity of 0.8 down to the middle of the network, yet ends at 0.12-0.38 once every
        layer is random, close to the gradient (0.05-0.12); Grad-CAM ends anywhere from -0.13
        to 0.62 (its map has 7 x 7 degrees of freedom). The averages separate them: guided
        backprop 0.63-0.73, gradient 0.25-0.39, Grad-CAM -0.11-0.38. The bounds are a
        convention of this library, not the paper's.
        """
        value = self.average()
        if math.isnan(value):
            return None
        if value < PASS_BELOW:
            return True
        if value > FAIL_ABOVE:
            return False
        return None

    def table(self) -> list[dict[str, Any]]:
        """One row per randomized layer: ``{"layer", "units", <measure>: mean over samples}``."""
        means = {m: self.mean(m).tolist() for m in MEASURES}
        return [
            {"layer": layer, "units": len(units), **{m: means[m][k] for m in MEASURES}}
            for k, (layer, units) in enumerate(zip(self.layers, self.randomized, strict=True))
        ]

    def to_markdown(self) -> str:
        """Return the :meth:`table` as a Markdown table (2 decimals)."""
        head = "| layer randomized | " + " | ".join(MEASURE_NAMES[m] for m in MEASURES) + " |"
        rule = "|---|" + "---:|" * len(MEASURES)
        rows = [
            f"| {r['layer']} | " + " | ".join(_fmt(r[m]) for m in MEASURES) + " |"
            for r in self.table()
        ]
        return "\n".join([head, rule, *rows])

    def verdict(self) -> str:
        """Return one line saying whether the maps follow the weights."""
        first, last = float(self.mean()[0]), self.final()
        if self.mode == "cascading":
            what = f"from the top layer to all {len(self.layers)} randomized"
        else:
            what = f"{len(self.layers)} layers randomized one at a time"
        trend = (
            f"Spearman |map| {_fmt(first)} → {_fmt(last)} {what}, {_fmt(self.average())} on average"
        )
        if math.isnan(self.average()):
            return (
                f"{self.method}: undefined, the maps are constant (zero) and have no rank "
                f"correlation to read ({trend})"
            )
        if self.passed is True:
            return f"{self.method}: maps change when the model is randomized ({trend}): passes"
        if self.passed is False:
            return (
                f"{self.method}: maps stay similar when the model is randomized ({trend}): "
                "fails, the map does not depend on what the model learned"
            )
        return f"{self.method}: maps change only partly when the model is randomized ({trend})"

    def __repr__(self) -> str:
        return (
            f"SanityCheck(method={self.method!r}, mode={self.mode!r}, layers={len(self.layers)}, "
            f"samples={self.samples}): {self.verdict()}"
        )

    def __str__(self) -> str:
        return self.verdict() + "\n" + self.to_markdown()

    def plot(self, ax: Any = None, measures: Sequence[str] = MEASURES) -> Any:
        """Draw the similarity against the layer randomized, one line per measure.

        As Fig. 2 and 4 of the paper: the first point is the trained model (similarity 1),
        then one point per randomized layer, from the top; the band shows the range over the
        samples. Uses matplotlib (object-oriented API, no pyplot state).

        Args:
            ax: A matplotlib ``Axes`` to draw in; ``None`` makes a new figure.
            measures: Which measures to draw.

        Returns:
            The matplotlib ``Figure``.
        """
        own = ax is None
        if ax is None:
            from matplotlib.figure import Figure

            fig = Figure(figsize=(max(5.0, 0.35 * len(self.layers) + 2.5), 3.6), dpi=100)
            ax = fig.add_subplot(1, 1, 1)
        x = list(range(len(self.layers) + 1))
        for measure in measures:
            _check_measure(measure)
            sim = self.similarity[measure]
            mean = [1.0, *self.mean(measure).tolist()]
            ax.plot(x, mean, marker="o", markersize=3, label=MEASURE_NAMES[measure])
            if sim.shape[1] > 1:
                low = [1.0, *_nan_reduce(sim, "min").tolist()]
                high = [1.0, *_nan_reduce(sim, "max").tolist()]
                ax.fill_between(x, low, high, alpha=0.15)
        _axes(ax, self.layers, f"{self.method}: {self.mode} randomization")
        if own:
            ax.figure.tight_layout()
        return ax.figure


def _nan_reduce(t: Tensor, how: str) -> Tensor:
    filled = torch.nan_to_num(t, nan=math.inf if how == "min" else -math.inf)
    return filled.amin(dim=1) if how == "min" else filled.amax(dim=1)


def _axes(ax: Any, layers: Sequence[str], title: str, ylabel: bool = True) -> None:
    ax.set_xticks(range(len(layers) + 1))
    ax.set_xticklabels(["trained", *layers], rotation=60, ha="right", fontsize=7)
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    ax.set_ylim(-0.5, 1.05)
    if ylabel:
        ax.set_ylabel("similarity to the trained model's map")
    ax.set_xlabel("layers randomized (top first)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower left")


def plot_sanity_checks(
    checks: Sequence[SanityCheck] | Mapping[str, SanityCheck],
    measures: Sequence[str] = ("spearman_abs", "ssim"),
    *,
    axes: Any = None,
) -> Any:
    """Compare methods: one panel per measure, one line per method (as the paper's Fig. 4).

    Args:
        checks: Results of :func:`parameter_randomization` on the same layers.
        measures: One panel each.
        axes: A sequence of matplotlib ``Axes``, one per measure; ``None`` makes a figure.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ValueError: no result, or results over different layers.
    """
    items = list(checks.values()) if isinstance(checks, Mapping) else list(checks)
    if not items:
        raise ValueError("plot_sanity_checks needs at least one result")
    layers = items[0].layers
    if any(c.layers != layers for c in items):
        raise ValueError("the results were computed over different layers; plot them apart")
    own = axes is None
    if axes is None:
        from matplotlib.figure import Figure

        width = max(4.5, 0.3 * len(layers) + 2.5)
        fig = Figure(figsize=(width * len(measures), 3.8), dpi=100)
        axes = [fig.add_subplot(1, len(measures), i + 1) for i in range(len(measures))]
    x = list(range(len(layers) + 1))
    for i, (ax, measure) in enumerate(zip(axes, measures, strict=True)):
        _check_measure(measure)
        for check in items:
            ax.plot(x, [1.0, *check.mean(measure).tolist()], marker="o", markersize=3,
                    label=check.method)  # fmt: skip
        _axes(ax, layers, f"{MEASURE_NAMES[measure]} ({items[0].mode})", ylabel=i == 0)
    if own:
        axes[0].figure.tight_layout()
    return axes[0].figure


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.2f}"


def _check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; expected one of: {', '.join(MEASURES)}")


# --------------------------------------------------------------------------- the check


def _method_runner(
    method: Method, options: Mapping[str, Any] | None
) -> tuple[str, Callable[[nn.Module, Tensor, Any], Attribution]]:
    if isinstance(method, str):
        from ..registry import check_options, get_method

        spec = get_method(method)
        opts = dict(options or {})
        check_options(spec, opts)
        return method, lambda m, x, t: spec.func(m, x, t, **opts)
    if callable(method):
        if options:
            raise ValueError(
                "options= applies to a registered method name; bind them in your callable"
            )
        name = getattr(method, "__name__", type(method).__name__)
        return name, method
    raise TypeError(
        f"method must be a registered method name or a callable (model, inputs, target) -> "
        f"Attribution; got {type(method).__name__}"
    )


def _run(
    run: Callable[[nn.Module, Tensor, Any], Attribution],
    name: str,
    model: nn.Module,
    x: Tensor,
    target: Any,
    where: str,
    *,
    quiet: bool = False,
) -> Tensor:
    """Run the method on ``x`` and check its maps.

    ``quiet``: without the method's warnings, for a randomized model, whose degenerate maps
    (all zero, amplified relevance) are expected and not the user's to act on.
    """
    if quiet:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            result = run(model, x, target)
    else:
        result = run(model, x, target)
    if not isinstance(result, Attribution):
        raise TypeError(f"the method {name!r} returned {type(result).__name__}, not an Attribution")
    values = result.values
    if values.ndim == 4 and values.shape[1] != 1 and result.reduction == "none":
        raise ValueError(
            f"{name} returned {values.shape[1]} maps per sample (several targets); the sanity "
            "check compares one map per sample: give one target per sample"
        )
    if values.shape[0] != x.shape[0] or values.ndim not in (3, 4):
        raise ValueError(
            f"{name} returned values of shape {tuple(values.shape)} for {x.shape[0]} inputs; "
            "expected (N, C, H, W) maps"
        )
    if not all_finite(values):
        raise ValueError(f"{name} gave NaN or inf values on the {where}")
    return values.detach()


def _checkpoints(count: int, checkpoints: int | None) -> list[int]:
    if checkpoints is None:
        return list(range(count))
    checkpoints = check_positive_int("checkpoints", checkpoints)
    if checkpoints >= count:
        return list(range(count))
    if checkpoints == 1:
        return [count - 1]
    return sorted({round(i * (count - 1) / (checkpoints - 1)) for i in range(checkpoints)})


def parameter_randomization(
    model: nn.Module,
    inputs: Tensor,
    method: Method = "gradient",
    target: TargetLike = None,
    *,
    mode: Mode = "cascading",
    layers: Sequence[LayerSpec] | Literal["blocks", "units"] = "blocks",
    checkpoints: int | None = None,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    keep_maps: bool = True,
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
    progress: bool | None = False,
) -> SanityCheck:
    """Model parameter randomization test (Adebayo et al. 2018) of one method on ``inputs``.

    Randomizes the layers of a deep copy of ``model`` from the top down (cascading) or one at
    a time (independent), re-runs ``method`` on the same inputs and target after each, and
    measures how similar each map stays to the map of the trained model; see
    :mod:`salience.metrics.sanity` for exactly what is computed. The method's warnings are
    shown for the trained model only (a randomized model's maps may well be all zero).

    Example:
        >>> check = parameter_randomization(model, x, "guided_backprop", checkpoints=5)
        >>> check.verdict()  # doctest: +SKIP
        'guided_backprop: maps stay similar when the model is randomized (...): fails, ...'
        >>> check.plot().savefig("sanity.png")  # doctest: +SKIP

    Args:
        model: The classifier (an ``nn.Module``); it is not modified.
        inputs: ``(N, C, H, W)`` preprocessed images.
        method: A registered method name, or a callable ``(model, inputs, target) ->
            Attribution`` (called with class indices when the target resolves to classes).
        target: What to explain; resolved once on the trained model (see
            :mod:`salience.targets`).
        mode: ``"cascading"`` (top-down, cumulative) or ``"independent"`` (one layer at a
            time).
        layers: The layers: ``"blocks"``, ``"units"`` or module names (see
            :func:`randomization_layers`).
        checkpoints: Evaluate only this many layers, evenly spread from the top layer to the
            bottom one (both included); in cascading mode the layers in between are still
            randomized along the way. ``None``: every layer.
        seed: Seed of the randomization.
        options: Options of a registered method, e.g. ``{"steps": 16}``.
        keep_maps: Keep the normalized maps of every randomized model (on the CPU).
        forward_args: Extra arguments of the model (see :func:`salience.gradient`).
        allow_tf32: Let CUDA use TF32 for the forward pass that finds the layers.
        progress: Show a progress bar on stderr (``None``: only on a terminal).

    Returns:
        A :class:`SanityCheck`: ``.table()``, ``.plot()``, ``.verdict()``, ``.final()``.

    Raises:
        ValueError: an unknown mode, method or layer name; a model without parameters; a
            method giving NaN maps or several maps per sample.
        TypeError: a model that is not an ``nn.Module`` or cannot be deep-copied.
    """
    check_inputs(inputs)
    if mode not in ("cascading", "independent"):
        raise ValueError(f"unknown mode {mode!r}; expected 'cascading' or 'independent'")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    name, run = _method_runner(method, options)
    x = inputs.detach()
    n = x.shape[0]
    if not isinstance(model, nn.Module):
        raise TypeError(
            "the sanity check randomizes the parameters of an nn.Module; got "
            f"{type(model).__name__}"
        )
    twin = copy_model(model, "the sanity check randomizes a copy")

    units, output = _discover(twin, x, forward_args, allow_tf32)
    resolved = resolve_target(target, output, n)
    fixed = resolved.classes if resolved.classes is not None else target
    groups = _group(twin, units, layers)
    # From the top: the layer whose units run last comes first.
    groups.sort(key=lambda g: -max(u.rank for u in g[1]))
    index = {u.name: i for i, u in enumerate(units)}
    rows = _checkpoints(len(groups), checkpoints)

    reference_values = _run(run, name, twin, x, fixed, "trained model")
    reference = _reference(reference_values)
    h, w = reference["norm"].shape[-2:]
    hog_cell = _hog_cell(h, w)
    scores: dict[str, list[Tensor]] = {m: [] for m in MEASURES}
    kept: list[Tensor] = []
    randomized: list[tuple[str, ...]] = []
    done: set[str] = set()
    low = math.inf
    with Progress(len(rows), f"sanity check {name}", enabled=progress) as bar:
        for k, (label, group) in enumerate(groups):
            if mode == "cascading":
                low = min(low, *(u.rank for u in group))
                todo = [u for u in units if u.name not in done and (u.rank >= low or u in group)]
                for unit in todo:
                    _randomize(unit, _unit_seed(seed, index[unit.name]))
                    done.add(unit.name)
                if k not in rows:
                    continue
                state = tuple(u.name for u in units if u.name in done)
                values = _run(
                    run, name, twin, x, fixed, f"model randomized down to {label!r}", quiet=True
                )
            else:
                if k not in rows:
                    continue
                saved = [s for u in group for s in _snapshot(u)]
                try:
                    for unit in group:
                        _randomize(unit, _unit_seed(seed, index[unit.name]))
                    state = tuple(u.name for u in group)
                    where = f"model with {label!r} randomized"
                    values = _run(run, name, twin, x, fixed, where, quiet=True)
                finally:
                    _restore(saved)
            if tuple(values.shape) != tuple(reference_values.shape):
                raise ValueError(
                    f"{name} gave maps of shape {tuple(values.shape)} on the randomized model, "
                    f"{tuple(reference_values.shape)} on the trained one"
                )
            for measure, value in _measure(values, reference, hog_cell).items():
                scores[measure].append(value.cpu())
            if keep_maps:
                kept.append(_normalized(_abs_map(values)).float().cpu())
            randomized.append(state)
            bar.update()

    labels = tuple(groups[k][0] for k in rows)
    similarity = {m: torch.stack(v) for m, v in scores.items()}
    for measure, value in similarity.items():
        bad = torch.isnan(value).nonzero().tolist()
        if bad:
            where = ", ".join(f"{labels[r]!r} sample {s}" for r, s in bad[:5])
            warn(
                f"{name}: {MEASURE_NAMES[measure]} is undefined (a constant map) at {where}"
                f"{', ...' if len(bad) > 5 else ''}; it is NaN there and left out of the means",
            )
    return SanityCheck(
        method=name,
        mode=mode,
        layers=labels,
        randomized=tuple(randomized),
        similarity=similarity,
        target=resolved.classes,
        original=reference["norm"].float().cpu(),
        maps=torch.stack(kept) if keep_maps else None,
        seed=seed,
        hog_cell=hog_cell,
        units=tuple(u.name for u in units),
    )
