"""Run saliency methods through the metrics on images with known objects: one row per method.

:func:`evaluate` explains each image's **true class** with every requested method, turns each
result into an ``(N, H, W)`` map (:meth:`~salience.Attribution.saliency`, the reduction of
the method's paper) and scores it with the metric functions of :mod:`salience.metrics`:

============================  ==========================================================  ====
column                        what (one figure per image, averaged)                       best
============================  ==========================================================  ====
``pointing``                  pointing game (Zhang et al. 2016): the map's maximum lies    high
                              within ``tolerance`` pixels of the object
``pointing_energy``           share of the map's positive mass on the object (Score-CAM)  high
``iou``                       IoU of :func:`~.localization.box_from_map` with the true box high
``localization_error``        top-1 ILSVRC error: wrong class, or IoU < 0.5                low
``deletion_auc``              area under the deletion curve (Petsiuk et al. 2018)          low
``insertion_auc``             area under the insertion curve                               high
``seconds_per_image``         wall time of the method alone, per image                     low
============================  ==========================================================  ====

The object is the mask when ``masks`` are given (pointing game and energy), else the box;
``iou`` and ``localization_error`` use the boxes (derived from the masks when only masks are
given). Explaining the true class makes the top-1 localization error exact: a sample counts as
correct only when the prediction is the true class, and then the map of the true class is the
map of the predicted class, as in the CAM and Grad-CAM protocol.

Reference rows put the numbers in perspective: ``random`` (a uniform random map, seeded) and
``center`` (a centred Gaussian of standard deviation a quarter of the side, the same for
every image).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .._checks import check_batch_size, check_inputs, check_positive_int, warn
from .._chunks import BatchSize
from .._forward import model_scope
from .._io import Progress, atomic_write
from ..registry import available_methods, explain, get_method
from .faithfulness import deletion, insertion
from .localization import box_from_map, iou, localization_error, pointing_energy, pointing_game

__all__ = ["METRICS", "REFERENCES", "EvaluationTable", "evaluate"]

METRICS: tuple[str, ...] = (
    "pointing",
    "pointing_energy",
    "iou",
    "localization_error",
    "deletion_auc",
    "insertion_auc",
)
"""The metric columns :func:`evaluate` can compute (``seconds_per_image`` is always there)."""

REFERENCES: tuple[str, ...] = ("random", "center")
"""Reference maps that :func:`evaluate` can add as rows."""

_HEADERS = {
    "pointing": "pointing ↑",
    "pointing_energy": "energy ↑",
    "iou": "IoU ↑",
    "localization_error": "loc. error ↓",
    "deletion_auc": "deletion AUC ↓",
    "insertion_auc": "insertion AUC ↑",
    "seconds_per_image": "s / image",
}


@dataclass(frozen=True, eq=False)
class EvaluationTable:
    """The result of :func:`evaluate`: one row per method, the mean of each metric.

    Attributes:
        rows: One mapping per method (and reference map), ``{"method": name, "kind":
            "method" | "reference", metric: mean, ..., "error": message or ""}``; a method
            that failed (with ``on_error="record"``) has NaN metrics and its error message.
        columns: The metric columns, in order.
        per_sample: ``{method: {metric: (N,) tensor}}`` of the per-image figures (CPU).
        settings: How the table was computed: images, model accuracy, tolerance, threshold,
            steps, substrates, method options, seed.
    """

    rows: tuple[dict[str, Any], ...]
    columns: tuple[str, ...]
    per_sample: dict[str, dict[str, Tensor]] = field(repr=False)
    settings: dict[str, Any]

    @property
    def methods(self) -> list[str]:
        """The row names, in order."""
        return [r["method"] for r in self.rows]

    @property
    def errors(self) -> dict[str, str]:
        """``{method: message}`` of the methods that failed."""
        return {r["method"]: r["error"] for r in self.rows if r["error"]}

    def __getitem__(self, method: str) -> dict[str, Any]:
        """Return the row of ``method``."""
        for row in self.rows:
            if row["method"] == method:
                return row
        raise KeyError(f"no row {method!r}; rows: {', '.join(self.methods)}")

    def to_dict(self) -> dict[str, Any]:
        """Return ``{"settings": ..., "columns": ..., "rows": ...}`` (NaN as ``None``)."""

        def clean(value: Any) -> Any:
            return None if isinstance(value, float) and math.isnan(value) else value

        return {
            "settings": self.settings,
            "columns": list(self.columns),
            "rows": [{k: clean(v) for k, v in row.items()} for row in self.rows],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """Return the table as JSON; also write it to ``path`` (atomically) when given."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        if path is not None:
            atomic_write(path, text.encode("utf-8"))
        return text

    def to_csv(self, path: str | Path | None = None) -> str:
        """Return the table as CSV (one row per method); also write it to ``path`` atomically."""
        buffer = io.StringIO()
        names = ["method", "kind", *self.columns, "error"]
        writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: ("" if _isnan(row[k]) else row[k]) for k in names})
        text = buffer.getvalue()
        if path is not None:
            atomic_write(path, text.encode("utf-8"))
        return text

    def to_markdown(self, digits: int = 3) -> str:
        """Return the table in Markdown, arrows marking which way is better."""
        head = ["method", *(_HEADERS[c] for c in self.columns)]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            name = f"*{row['method']}*" if row["kind"] == "reference" else row["method"]
            cells = [name, *(_format(row[c], c, digits) for c in self.columns)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n\n" + self._caption() + "\n"

    def _caption(self) -> str:
        s = self.settings
        text = (
            f"{s['images']} images; model top-1 accuracy {s['accuracy']:.3f}; pointing "
            f"tolerance {s['tolerance']:.3g} px; box threshold {s['threshold']:g} of the max; "
            f"deletion/insertion {s['steps']} steps ({s['deletion_substrate']} / "
            f"{s['insertion_substrate']} substrate, {s['score']})."
        )
        if s["options"]:
            text += " Options: " + "; ".join(
                f"{m} " + ", ".join(f"{k}={v}" for k, v in o.items())
                for m, o in s["options"].items()
            )
            text += "."
        if self.errors:
            text += " Failed: " + "; ".join(f"{m}: {e}" for m, e in self.errors.items())
        return text

    def __repr__(self) -> str:
        head = ["method", *(_HEADERS[c] for c in self.columns)]
        body = [
            [row["method"], *(_format(row[c], c, 3) for c in self.columns)] for row in self.rows
        ]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
        lines = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in [head, *body]
        ]
        return "\n".join(lines) + "\n" + self._caption()


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _format(value: Any, column: str, digits: int) -> str:
    if _isnan(value):
        return "—"
    if column == "seconds_per_image":
        return f"{value:.2g}" if value < 0.01 else f"{value:.3f}"
    return f"{value:.{digits}f}"


# --------------------------------------------------------------------------- evaluate


def _check_labels(labels: Any, n: int) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(
            f"labels must be a torch.Tensor of class indices, got {type(labels).__name__}"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must hold integer class indices, got dtype {labels.dtype}")
    if tuple(labels.shape) != (n,):
        raise ValueError(f"labels must have shape (N={n},), got {tuple(labels.shape)}")
    return labels.long()


def _check_masks(masks: Any, n: int, h: int, w: int) -> Tensor:
    if not isinstance(masks, Tensor):
        raise TypeError(f"masks must be a bool torch.Tensor (N, H, W), got {type(masks).__name__}")
    if masks.dtype != torch.bool:
        raise TypeError(f"masks must be a bool tensor, got dtype {masks.dtype}; pass masks > 0.5")
    if tuple(masks.shape) != (n, h, w):
        raise ValueError(f"masks must have shape (N, H, W) = {(n, h, w)}, got {tuple(masks.shape)}")
    empty = ~masks.flatten(1).any(dim=1)
    if empty.any():
        raise ValueError(f"masks of samples {empty.nonzero().flatten().tolist()[:10]} are empty")
    return masks


def _boxes_of(masks: Tensor) -> Tensor:
    """Tight half-open boxes ``(x0, y0, x1, y1)`` of non-empty bool masks."""
    h, w = masks.shape[1:]
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    y0 = rows.int().argmax(dim=1)
    y1 = h - rows.flip(1).int().argmax(dim=1)
    x0 = cols.int().argmax(dim=1)
    x1 = w - cols.flip(1).int().argmax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1).long()


def _reference_map(name: str, n: int, h: int, w: int, generator: torch.Generator) -> Tensor:
    if name == "random":
        return torch.rand(n, h, w, generator=generator)
    ys = torch.arange(h, dtype=torch.float32) - (h - 1) / 2
    xs = torch.arange(w, dtype=torch.float32) - (w - 1) / 2
    sigma_y, sigma_x = h / 4, w / 4
    g = torch.exp(-0.5 * ((ys[:, None] / sigma_y) ** 2 + (xs[None, :] / sigma_x) ** 2))
    return g.expand(n, h, w).clone()


def _as_input_map(result: Any, h: int, w: int) -> Tensor:
    """Return the ``(N, H, W)`` map of a result, upsampled bilinearly if at layer resolution."""
    m = result.saliency().detach()
    if m.shape[-2:] != (h, w):
        m = torch.nn.functional.interpolate(
            m[:, None].float(), size=(h, w), mode="bilinear", align_corners=False
        )[:, 0].to(m.dtype)
    return m


def evaluate(
    model: Any,
    images: Tensor,
    labels: Tensor,
    boxes: Tensor | None = None,
    masks: Tensor | None = None,
    *,
    methods: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    references: Sequence[str] = REFERENCES,
    batch_size: int = 32,
    tolerance: float | None = None,
    threshold: float = 0.15,
    steps: int = 64,
    deletion_substrate: Literal["zeros", "blur"] | float = "zeros",
    insertion_substrate: Literal["zeros", "blur"] | float = "blur",
    score: Literal["probability", "logit", "log_probability"] = "probability",
    perturbation_batch_size: BatchSize = "auto",
    seed: int = 0,
    on_error: Literal["raise", "record"] = "raise",
    progress: bool | None = False,
) -> EvaluationTable:
    """Score saliency methods against known objects and the model: a table, one row per method.

    Each method explains the true class of each image, ``batch_size`` images per call; its
    map is scored by the metrics of :mod:`salience.metrics` (see
    :mod:`salience.metrics.evaluate` for the columns). The model is run as the methods run it
    (:func:`salience._forward.model_scope`: buffers restored, full float32) and never changed;
    the inputs are not modified. Everything runs on the images' device. A map not at the
    input's resolution (a CAM with ``upsample=False``) is upsampled bilinearly, as the CAM
    methods do by default. Warnings raised while a method is scored (e.g. constant maps) are
    summed up in one warning per method.

    Args:
        model: The classifier, ``model(images) -> (N, classes)`` logits.
        images: ``(N, C, H, W)`` images, as the model takes them.
        labels: ``(N,)`` the true class of each image (the class that is explained).
        boxes: ``(N, 4)`` half-open object boxes ``(x0, y0, x1, y1)`` in pixels; derived from
            ``masks`` (their tight boxes) when not given.
        masks: ``(N, H, W)`` bool object masks; when given, the pointing game and the energy
            use them instead of the boxes.
        methods: Registered method names (default: every registered method).
        metrics: Subset of :data:`METRICS` (default: all); ``seconds_per_image`` is always
            reported.
        options: ``{method: {option: value}}`` passed to the methods, e.g.
            ``{"smoothgrad": {"samples": 10}}``.
        references: Reference maps added as rows, from :data:`REFERENCES` (default both).
        batch_size: Images per method call.
        tolerance: Pointing-game tolerance in pixels; ``None``: the paper's 15 pixels at
            224 x 224, scaled to the images' longer side, ``15 * max(H, W) / 224``.
        threshold: :func:`~.localization.box_from_map` threshold (Grad-CAM's 0.15 of the max).
        steps: Steps of the deletion and insertion curves (64: 64 pixels per step at 64 x 64).
        deletion_substrate: What deleted pixels become (the paper's zeros by default).
        insertion_substrate: What insertion starts from (the paper's blur by default).
        score: What the curves follow: the paper's softmax ``"probability"`` by default.
        perturbation_batch_size: Perturbed images per forward pass of the curves
            (``"auto"``: from the device, see :mod:`salience._chunks`).
        seed: Seed of the ``random`` reference map.
        on_error: ``"raise"`` (default) stops at the first method that fails; ``"record"``
            keeps its row with NaN figures and the error message (see
            :attr:`EvaluationTable.errors`).
        progress: Show a progress bar on stderr (``None``: only on a terminal).

    Returns:
        An :class:`EvaluationTable`.

    Raises:
        ValueError: Ill-shaped labels, boxes or masks; neither boxes nor masks while a
            localization metric is asked for; an unknown method, metric or reference.
        TypeError: Wrong types; an option a method does not take.
    """
    x = check_inputs(images).detach()
    n, _, h, w = x.shape
    y = _check_labels(labels, n).to(x.device)
    if masks is not None:
        masks = _check_masks(masks, n, h, w).to(x.device)
    if boxes is None and masks is not None:
        boxes = _boxes_of(masks)
    wanted = list(METRICS if metrics is None else metrics)
    for name in wanted:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; expected some of {', '.join(METRICS)}")
    if boxes is None and any(m in wanted for m in METRICS[:4]):
        raise ValueError(
            "the localization metrics (pointing, pointing_energy, iou, localization_error) need "
            "boxes or masks; pass them, or metrics=['deletion_auc', 'insertion_auc']"
        )
    if boxes is not None:
        # The metric functions check them (shape, order, inside the image) on first use.
        boxes = boxes.to(x.device)
        if tuple(boxes.shape) != (n, 4):
            raise ValueError(f"boxes must have shape (N={n}, 4), got {tuple(boxes.shape)}")
    names = list(available_methods() if methods is None else methods)
    for name in names:
        get_method(name)  # unknown names raise with suggestions
    for name in references:
        if name not in REFERENCES:
            raise ValueError(f"unknown reference {name!r}; expected some of {REFERENCES}")
    options = dict(options or {})
    for name in options:
        if name not in names:
            raise ValueError(f"options given for {name!r}, which is not among the methods")
    batch_size = check_positive_int("batch_size", batch_size)
    check_batch_size(perturbation_batch_size, "perturbation_batch_size")
    if tolerance is None:
        tolerance = 15 * max(h, w) / 224
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error must be 'raise' or 'record', got {on_error!r}")

    # Predictions, once: the model's accuracy, and the top-1 class for the localization error.
    predicted = []
    with model_scope(model, x) as fwd, torch.no_grad():
        for start in range(0, n, batch_size):
            index = torch.arange(start, min(start + batch_size, n), device=x.device)
            logits = fwd(x[index].clone(), index)
            if not isinstance(logits, Tensor) or logits.ndim != 2:
                shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits)
                raise ValueError(
                    f"evaluate needs a classifier's (N, classes) logits; the model returned {shape}"
                )
            predicted.append(logits.argmax(dim=1))
    top1 = torch.cat(predicted)
    region = masks if masks is not None else boxes
    chunks = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    generator = torch.Generator().manual_seed(seed)

    def score_maps(maps: Tensor, a: int, b: int) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if boxes is not None and region is not None:  # (the localization metrics need them)
            if "pointing" in wanted:
                out["pointing"] = pointing_game(maps, region[a:b], tolerance=tolerance)
            if "pointing_energy" in wanted:
                out["pointing_energy"] = pointing_energy(maps, region[a:b])
            if "iou" in wanted or "localization_error" in wanted:
                found = box_from_map(maps, threshold=threshold)
                if "iou" in wanted:
                    out["iou"] = iou(found, boxes[a:b])
                if "localization_error" in wanted:
                    out["localization_error"] = localization_error(
                        found, top1[a:b], y[a:b], boxes[a:b]
                    )
        common: dict[str, Any] = {
            "steps": steps,
            "score": score,
            "batch_size": perturbation_batch_size,
        }
        if "deletion_auc" in wanted:
            out["deletion_auc"] = deletion(
                model, x[a:b], maps, y[a:b], substrate=deletion_substrate, **common
            ).auc
        if "insertion_auc" in wanted:
            out["insertion_auc"] = insertion(
                model, x[a:b], maps, y[a:b], substrate=insertion_substrate, **common
            ).auc
        return out

    rows: list[dict[str, Any]] = []
    per_sample: dict[str, dict[str, Tensor]] = {}
    columns = (*[m for m in METRICS if m in wanted], "seconds_per_image")
    jobs = [(name, "method") for name in names] + [(name, "reference") for name in references]
    with Progress(len(jobs) * len(chunks), "evaluate", enabled=progress) as bar:
        for name, kind in jobs:
            parts: dict[str, list[Tensor]] = {}
            seconds = 0.0
            error = ""
            caught: list[str] = []
            bar.set_label(f"evaluate {name}")
            try:
                with warnings.catch_warnings(record=True) as records:
                    warnings.simplefilter("always")
                    for a, b in chunks:
                        if kind == "method":
                            _sync(x)
                            begin = time.perf_counter()
                            result = explain(
                                model, x[a:b], name, y[a:b], **dict(options.get(name, {}))
                            )
                            maps = _as_input_map(result, h, w)
                            _sync(x)
                            seconds += time.perf_counter() - begin
                        else:
                            maps = _reference_map(name, b - a, h, w, generator).to(x.device)
                        for metric, values in score_maps(maps, a, b).items():
                            parts.setdefault(metric, []).append(values.detach().float().cpu())
                        bar.update()
                caught = [str(r.message) for r in records]
            except Exception as exc:
                if on_error == "raise":
                    raise
                error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
                bar.update(len(chunks) - len(next(iter(parts.values()), [])))
                parts = {}
            if caught:
                warn(f"evaluate: {name}: {len(caught)} warning(s) while scoring, e.g. {caught[0]}")
            samples = {metric: torch.cat(values) for metric, values in parts.items()}
            per_sample[name] = samples
            row: dict[str, Any] = {"method": name, "kind": kind}
            for metric in columns[:-1]:
                row[metric] = float(samples[metric].mean()) if metric in samples else math.nan
            row["seconds_per_image"] = (
                math.nan if error else (seconds / n if kind == "method" else 0.0)
            )
            row["error"] = error
            rows.append(row)

    settings = {
        "images": n,
        "size": [h, w],
        "accuracy": float((top1 == y).float().mean()),
        "tolerance": float(tolerance),
        "threshold": float(threshold),
        "steps": int(steps),
        "deletion_substrate": _describe(deletion_substrate),
        "insertion_substrate": _describe(insertion_substrate),
        "score": score,
        "region": "mask" if masks is not None else "box",
        "batch_size": batch_size,
        "options": {k: {o: _describe(v) for o, v in opts.items()} for k, opts in options.items()},
        "seed": seed,
        "device": str(x.device),
    }
    return EvaluationTable(
        rows=tuple(rows), columns=columns, per_sample=per_sample, settings=settings
    )


def _describe(value: Any) -> Any:
    """Return a JSON-friendly form of an option value."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Tensor):
        return f"tensor{tuple(value.shape)}"
    return repr(value)


def _sync(x: Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
