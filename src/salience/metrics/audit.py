"""An audit of saliency methods on one model and its images: a scorecard a person can read.

:func:`audit` runs each chosen method on the images and puts every map through the checks of
:mod:`salience.metrics`, then turns the numbers into one line of reading each:

- **faithfulness** — deletion and insertion (Petsiuk et al. 2018): does removing the pixels the
  map ranks first destroy the score, and does putting them back first restore it? Each figure
  is shown beside that of a *random map* on the same images, the chance level;
- **randomization** — the cascading model-parameter randomization of Adebayo et al. 2018: the
  rank correlation of the map with the map of the fully randomized model. A map that barely
  changes when the weights are destroyed does not explain this model;
- **invariance** — the mean-shift twin of Kindermans et al. 2018: a model whose first layer
  absorbs a constant input shift gives the same outputs; does the map stay the same too?
- **stability** — max-sensitivity (Yeh et al. 2019): how far the map moves, at most, under
  small random input perturbations.

:meth:`Audit.to_html` writes the self-contained scorecard (same machinery as
:mod:`salience.report`): the table, each method's map, the deletion/insertion curves and the
randomization figure, every number with its reading. ``salience audit`` is the command line.

Example:
    >>> from salience import metrics, models
    >>> model = models.load("efficientnet_lite0")
    >>> x = model.preprocess(models.sample_image("chelsea"))
    >>> result = metrics.audit(model, x, ["gradient", "grad_cam"])  # doctest: +SKIP
    >>> result.write_html("audit.html")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from .._checks import check_inputs
from .._forward import model_scope
from .._io import Progress
from ..attribution import Attribution
from ..registry import check_options, explain, get_method
from .faithfulness import PerturbationCurve, deletion, insertion

__all__ = ["CHECKS", "Audit", "MethodAudit", "audit"]

CHECKS = ("faithfulness", "randomization", "invariance", "stability")
"""The checks :func:`audit` can run, in the order of the scorecard."""

DEFAULT_METHODS = (
    "gradient",
    "input_x_gradient",
    "guided_backprop",
    "grad_cam",
    "integrated_gradients",
)
"""What :func:`audit` and ``salience audit`` compare unless told otherwise."""

CHEAP_OPTIONS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"steps": 32},
    "smoothgrad": {"samples": 16},
}
"""Options :func:`audit` uses unless ``options=`` says otherwise: an audit re-runs each method
many times (randomization, twin, perturbed copies), so the costly ones run at a fraction of
their default cost. The scorecard shows the options used."""

# When a reading calls a figure good or bad. These are conventions of this report, stated on
# the page, not thresholds from the papers: the papers compare methods, they do not grade them.
_BETTER_THAN_CHANCE = 0.8  # deletion AUC below 0.8 x that of a random map is clearly faster
_ABOUT = 0.05  # within 5 % of the random map's area: no better than chance
# Randomization and invariance read with the conventions of their modules: SanityCheck.passed
# (mean Spearman |map| over the cascade, pass below PASS_BELOW, fail above FAIL_ABOVE) and
# MethodInvariance.passed (relative L2 change within the tolerance).
_STABLE, _UNSTABLE = 0.1, 0.5  # max-sensitivity (relative) readings

Verdict = str  # "good", "bad", "fair" or "error"


@dataclass(frozen=True)
class Reading:
    """One figure of the scorecard and what it means.

    Attributes:
        value: The figure: the mean over the images whose map is not zero everywhere (for
            invariance the worst of them, as it passes only when every one does); ``None``
            when the check failed, did not run, or every map is zero.
        text: One line for a person, e.g. "drops 3x faster than for a random map".
        verdict: ``"good"``, ``"fair"``, ``"bad"`` or ``"error"``.
    """

    value: float | None
    text: str
    verdict: Verdict


@dataclass
class MethodAudit:
    """Everything the audit measured for one method.

    Attributes:
        method: The registered method name (or ``"random"``, the chance row).
        attribution: The method's result on the images (``None`` if it failed).
        seconds: Time of that one call.
        deletion, insertion: The curves (:mod:`salience.metrics.faithfulness`).
        randomization: The cascading-randomization result
            (:class:`salience.metrics.sanity.SanityCheck`).
        invariance: The input-invariance result (:mod:`salience.metrics.invariance`).
        sensitivity: ``(N,)`` max-sensitivity per image.
        readings: ``{check: Reading}`` for the scorecard.
        errors: ``{check: message}`` for each check that failed.
    """

    method: str
    attribution: Attribution | None = None
    seconds: float = math.nan
    deletion: PerturbationCurve | None = None
    insertion: PerturbationCurve | None = None
    randomization: Any = None
    invariance: Any = None
    sensitivity: Tensor | None = None
    readings: dict[str, Reading] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: the method and the reading of each check."""
        parts = [f"{check}: {r.text}" for check, r in self.readings.items()]
        return f"{self.method}: " + ("; ".join(parts) if parts else "no check ran")


@dataclass
class Audit:
    """The result of :func:`audit`: one :class:`MethodAudit` per method, and the chance row.

    ``str(audit)`` is the scorecard as a Markdown table; :meth:`to_html` the full report.
    """

    methods: list[MethodAudit]
    chance: MethodAudit
    inputs: Tensor
    target: Tensor | None
    checks: tuple[str, ...]
    options: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    images: list[Image.Image] | None = None

    def __getitem__(self, method: str) -> MethodAudit:
        for row in self.methods:
            if row.method == method:
                return row
        raise KeyError(f"{method!r} was not audited; audited: {[r.method for r in self.methods]}")

    def table(self) -> list[dict[str, Any]]:
        """One dict per method: the figure of each check (``None`` where it did not run)."""
        rows = []
        for row in [*self.methods, self.chance]:
            entry: dict[str, Any] = {"method": row.method, "seconds": row.seconds}
            for column, (check, _, _) in _COLUMNS.items():
                reading = row.readings.get(check)
                entry[column] = None if reading is None else reading.value
            rows.append(entry)
        return rows

    def to_markdown(self) -> str:
        """Return the scorecard as a Markdown table, a reading per cell."""
        shown = _checks_shown(self.checks)
        columns = [c for c, (check, _, _) in _COLUMNS.items() if check in shown]
        lines = [
            "| method | " + " | ".join(_COLUMNS[c][1] for c in columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for row in [*self.methods, self.chance]:
            cells = []
            for c in columns:
                reading = row.readings.get(_COLUMNS[c][0])
                cells.append("" if reading is None else _cell_text(reading))
            lines.append(f"| {row.method} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        return (
            f"Audit(methods={[r.method for r in self.methods]}, images={self.inputs.shape[0]}, "
            f"checks={list(self.checks)})"
        )

    def to_html(
        self, *, title: str = "salience audit", metadata: Mapping[str, str] | None = None
    ) -> str:
        """Return the scorecard as one self-contained HTML page (every picture embedded)."""
        from ._audit_page import page

        return page(self, title, metadata or {})

    def write_html(
        self,
        path: str | os.PathLike[str],
        *,
        title: str = "salience audit",
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Write :meth:`to_html` atomically (a complete page or nothing); returns the path."""
        from ..report import write_html

        return write_html(path, self.to_html(title=title, metadata=metadata))


# column -> (check, header, "lower" / "higher" is better)
_COLUMNS: dict[str, tuple[str, str, str]] = {
    "deletion_auc": ("deletion", "deletion AUC ↓", "lower"),
    "insertion_auc": ("insertion", "insertion AUC ↑", "higher"),
    "randomized_similarity": ("randomization", "similarity under randomization ↓", "lower"),
    "shift_change": ("invariance", "change under a mean shift ↓", "lower"),
    "max_sensitivity": ("stability", "max-sensitivity ↓", "lower"),
}
_CHECK_OF = {"faithfulness": ("deletion", "insertion")}


def _cell_text(reading: Reading) -> str:
    if reading.value is None:
        return reading.text
    return f"{reading.value:.3g} ({reading.text})"


# -- running the checks ----------------------------------------------------------------------


def audit(
    model: nn.Module,
    inputs: Tensor,
    methods: Sequence[str] = DEFAULT_METHODS,
    target: Any = None,
    *,
    checks: Sequence[str] = CHECKS,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    steps: int = 50,
    shift: float = 1.0,
    radius: float = 0.02,
    samples: int = 8,
    checkpoints: int = 5,
    seed: int = 0,
    images: Sequence[Image.Image] | None = None,
    progress: bool | None = None,
) -> Audit:
    """Run ``methods`` on ``inputs`` and put every map through the ``checks``.

    A method or a check that fails does not stop the others: its cell says why. The user's
    model is not modified (the randomization and the twin work on copies).

    Args:
        model: A classifier returning ``(N, classes)`` logits, in eval mode.
        inputs: ``(N, C, H, W)`` preprocessed images.
        methods: Registered method names.
        target: The classes to explain; ``None``: the predicted class of each image, resolved
            once and used by every method and check.
        checks: A subset of :data:`CHECKS`.
        options: ``{method: {option: value}}`` on top of :data:`CHEAP_OPTIONS`.
        steps: Points of the deletion and insertion curves.
        shift: The constant added to every input value by the mean-shift twin.
        radius: Max-sensitivity's L∞ radius, as a fraction of the inputs' value range.
        samples: Max-sensitivity's random perturbations per image.
        checkpoints: Layers at which the cascading randomization is measured (spread
            evenly from the top; every layer above is random too).
        seed: Seed of the random map, the randomization and the perturbations.
        images: The images as the model sees them, for the pictures of the report.
        progress: Show progress on stderr (``None``: only on a terminal).

    Returns:
        An :class:`Audit`; ``print(result)`` shows the scorecard, ``result.write_html(path)``
        writes the report.

    Raises:
        ValueError: an unknown method or check, or bad options (before any work is done).
    """
    x = check_inputs(inputs).detach()
    checks = tuple(checks)
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")
    if not methods:
        raise ValueError("audit needs at least one method")
    merged: dict[str, dict[str, Any]] = {}
    for name in methods:
        spec = get_method(name)  # an unknown name fails here, naming close matches
        opts = {**CHEAP_OPTIONS.get(name, {}), **dict((options or {}).get(name, {}))}
        check_options(spec, opts)
        merged[name] = opts
    if target is None:
        with torch.no_grad(), model_scope(model, x) as forward:
            target = forward(x).argmax(dim=1)
    settings = {
        "steps": steps,
        "shift": shift,
        "radius": radius,
        "samples": samples,
        "seed": seed,
        "checkpoints": checkpoints,
    }
    work = len(methods) * (1 + len(checks)) + ("faithfulness" in checks)
    rows: list[MethodAudit] = []
    with Progress(work, "audit", enabled=progress) as bar:
        for name in methods:
            row = MethodAudit(name)
            rows.append(row)
            bar.set_label(f"audit {name}")
            start = time.perf_counter()
            try:
                row.attribution = explain(model, x, name, target, **merged[name])
            except Exception as exc:
                row.errors["method"] = _one_line(exc)
                bar.update(1 + len(checks))
                continue
            row.seconds = time.perf_counter() - start
            bar.update()
            for check in checks:
                bar.set_label(f"audit {name}: {check}")
                try:
                    _RUNNERS[check](row, model, x, target, merged[name], settings)
                except Exception as exc:
                    row.errors[check] = _one_line(exc)
                bar.update()
        chance = MethodAudit("random")
        if "faithfulness" in checks:
            bar.set_label("audit: random map")
            generator = torch.Generator().manual_seed(seed)
            noise = torch.rand((x.shape[0], *x.shape[-2:]), generator=generator)
            _faithfulness_of(chance, model, x, target, noise.to(x.device), settings)
            bar.update()
    result = Audit(
        methods=rows,
        chance=chance,
        inputs=x,
        target=target if isinstance(target, Tensor) else None,
        checks=checks,
        options=merged,
        settings=settings,
        images=list(images) if images is not None else None,
    )
    _read(result)
    return result


def _faithfulness_of(
    row: MethodAudit,
    model: nn.Module,
    x: Tensor,
    target: Any,
    saliency: Tensor | Attribution,
    settings: Mapping[str, Any],
) -> None:
    row.deletion = deletion(model, x, saliency, target, steps=settings["steps"])
    row.insertion = insertion(model, x, saliency, target, steps=settings["steps"])


def _faithfulness(
    row: MethodAudit,
    model: nn.Module,
    x: Tensor,
    target: Any,
    options: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> None:
    assert row.attribution is not None
    # Pixels are ranked by the map as the method's paper draws it (Attribution.saliency):
    # signed maps put the strongest evidence *for* the class first.
    _faithfulness_of(row, model, x, target, row.attribution.saliency(), settings)


def _randomization(
    row: MethodAudit,
    model: nn.Module,
    x: Tensor,
    target: Any,
    options: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> None:
    from .sanity import parameter_randomization

    row.randomization = parameter_randomization(
        model,
        x,
        row.method,
        target,
        options=dict(options),
        seed=settings["seed"],
        checkpoints=settings["checkpoints"],
        keep_maps=False,
    )


def _invariance(
    row: MethodAudit,
    model: nn.Module,
    x: Tensor,
    target: Any,
    options: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> None:
    from .invariance import input_invariance

    result = input_invariance(
        model, x, [row.method], target, shift=settings["shift"], options={row.method: options}
    )
    row.invariance = result[row.method]


def _stability(
    row: MethodAudit,
    model: nn.Module,
    x: Tensor,
    target: Any,
    options: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> None:
    from .sensitivity import max_sensitivity

    value_range = float((x.amax() - x.amin()).clamp(min=1e-12))
    result = max_sensitivity(
        model,
        x,
        row.method,
        settings["radius"] * value_range,
        target=target,
        samples=settings["samples"],
        seed=settings["seed"],
        method_options=dict(options),
    )
    row.sensitivity = result.max


_RUNNERS: dict[str, Callable[..., None]] = {
    "faithfulness": _faithfulness,
    "randomization": _randomization,
    "invariance": _invariance,
    "stability": _stability,
}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- readings --------------------------------------------------------------------------------


def _mean(t: Tensor | None) -> float | None:
    if t is None:
        return None
    value = float(t.double().mean())
    return value if math.isfinite(value) else None


def _read(result: Audit) -> None:
    chance = result.chance
    chance_deletion = _mean(chance.deletion.auc) if chance.deletion is not None else None
    chance_insertion = _mean(chance.insertion.auc) if chance.insertion is not None else None
    if chance_deletion is not None:
        chance.readings["deletion"] = Reading(chance_deletion, "chance level", "fair")
    if chance_insertion is not None:
        chance.readings["insertion"] = Reading(chance_insertion, "chance level", "fair")
    for row in result.methods:
        if "method" in row.errors:
            for check in _checks_shown(result.checks):
                row.readings[check] = Reading(
                    None, f"method failed: {row.errors['method']}", "error"
                )
            continue
        for check in _checks_shown(result.checks):
            failed = row.errors.get(_RUN_OF.get(check, check))
            if failed is not None:
                row.readings[check] = Reading(None, f"failed: {failed}", "error")
                continue
            reader = _READERS.get(check)
            if reader is not None:
                reading = reader(row, chance_deletion, chance_insertion)
                if reading is not None:
                    row.readings[check] = reading


def _checks_shown(checks: Sequence[str]) -> list[str]:
    shown: list[str] = []
    for check in checks:
        shown.extend(_CHECK_OF.get(check, (check,)))
    return shown


_RUN_OF = {"deletion": "faithfulness", "insertion": "faithfulness"}


def _versus_chance(value: float, chance: float | None, kind: str) -> Reading:
    """Read an area under a curve against the random map's (``kind``: which way is better)."""
    if chance is None or chance <= 0:
        return Reading(value, f"{'lower' if kind == 'deletion' else 'higher'} is better", "fair")
    # gain > 1: better than chance
    deleted = chance / value if value > 0 else math.inf
    gain = deleted if kind == "deletion" else value / chance
    if not math.isfinite(gain) or gain > 1 / _BETTER_THAN_CHANCE:
        how = "falls" if kind == "deletion" else "returns"
        return Reading(value, f"score {how} faster than for a random map ({chance:.3g})", "good")
    if gain > 1 + _ABOUT:
        return Reading(value, f"somewhat better than a random map ({chance:.3g})", "fair")
    if gain >= 1 - _ABOUT:
        return Reading(value, f"no better than a random map ({chance:.3g})", "bad")
    return Reading(value, f"worse than a random map ({chance:.3g})", "bad")


def _read_deletion(row: MethodAudit, chance: float | None, _: float | None) -> Reading | None:
    value = _mean(row.deletion.auc) if row.deletion is not None else None
    return None if value is None else _versus_chance(value, chance, "deletion")


def _read_insertion(row: MethodAudit, _: float | None, chance: float | None) -> Reading | None:
    value = _mean(row.insertion.auc) if row.insertion is not None else None
    return None if value is None else _versus_chance(value, chance, "insertion")


def _read_randomization(row: MethodAudit, *_: Any) -> Reading | None:
    check = row.randomization
    if check is None:
        return None
    value = check.average("spearman_abs")
    if not math.isfinite(value):
        return Reading(None, "undefined (constant maps)", "error")
    if check.passed is True:
        return Reading(
            value, "maps change as the weights are randomized: they explain the model", "good"
        )
    if check.passed is False:
        return Reading(
            value,
            "maps survive randomizing the weights: they show the image more than the model "
            "(Adebayo et al. 2018)",
            "bad",
        )
    return Reading(value, "maps change only partly as the weights are randomized", "fair")


def _read_invariance(row: MethodAudit, *_: Any) -> Reading | None:
    result = row.invariance
    if result is None:
        return None
    change = _of_maps(row, result.change)
    worst = float(change.max()) if change.numel() else math.nan
    if math.isnan(worst):
        return Reading(None, "undefined (zero maps)", "error")
    if worst <= result.tolerance:
        return Reading(worst, "unchanged by a constant input shift the model ignores", "good")
    return Reading(
        worst,
        f"changes by up to {100 * worst:.3g} % under a constant input shift the model ignores "
        "(Kindermans et al. 2018)",
        "bad",
    )


def _read_stability(row: MethodAudit, *_: Any) -> Reading | None:
    if row.sensitivity is None:
        return None
    value = _mean(_of_maps(row, row.sensitivity))
    if value is None:
        return Reading(None, "undefined (zero maps)", "error")
    moved = f"small random perturbations move the map by up to {100 * value:.0f} % of its norm"
    if value < _STABLE:
        return Reading(value, f"stable: {moved}", "good")
    if value > _UNSTABLE:
        return Reading(value, f"unstable: {moved}", "bad")
    return Reading(value, moved, "fair")


def _of_maps(row: MethodAudit, per_image: Tensor) -> Tensor:
    """Return the figures of the images whose map is not zero everywhere.

    A zero map explains nothing: that it stays zero under a shift or noise is no merit. One
    that does not stay zero (an infinite change) is kept: that is a failure.
    """
    if row.attribution is None:
        return per_image
    shown = row.attribution.values.flatten(1).abs().amax(1).to(per_image.device) > 0
    return per_image[shown | (per_image != 0)]


_READERS: dict[str, Callable[[MethodAudit, float | None, float | None], Reading | None]] = {
    "deletion": _read_deletion,
    "insertion": _read_insertion,
    "randomization": _read_randomization,
    "invariance": _read_invariance,
    "stability": _read_stability,
}
