"""Running a command over many images: opening, classifying, bookkeeping, progress."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._common import EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL, CLIError, _err, _one_line, slug
from ._pipeline import Pipeline


@dataclass
class Run:
    """Bookkeeping of one command over many images: successes, failures, exit status."""

    command: str
    failures: list[str] = field(default_factory=list)
    written: int = 0
    images_ok: int = 0
    images_failed: int = 0

    def fail(self, message: str) -> None:
        self.failures.append(message)
        _err(f"salience {self.command}: error: {message}")

    def finish(self, total: int) -> int:
        if self.failures and total > 1:
            what = (
                f"{self.images_failed} of {total} images failed"
                if self.images_failed
                else f"{len(self.failures)} failure(s)"  # a check of the audit, not an image
            )
            _err(f"salience {self.command}: {what}:")
            for message in self.failures:
                _err(f"  {message}")
        if not self.failures:
            return EXIT_OK
        return EXIT_PARTIAL if self.written else EXIT_FAILURE


def _input_path(text: str) -> tuple[str, Any]:
    """``(label, path or PIL image)``; ``sample:NAME`` is a bundled photo."""
    if text.startswith("sample:") and not os.path.exists(text):
        from .. import models

        name = text.partition(":")[2]
        try:
            return text, models.sample_image(name)
        except ValueError as exc:
            raise CLIError(_one_line(exc)) from None
    return text, text


_STEM = 120
"""Longest stem of an output file: file systems allow 255 bytes per name, and the method and
class names follow the stem."""


def _stems(images: Sequence[str]) -> list[str]:
    stems: list[str] = []
    for text in images:
        stem = slug(text.partition(":")[2]) if text.startswith("sample:") else Path(text).stem
        stem = slug(stem)[:_STEM] if stem else "image"  # room for .method.class.png
        base, n = stem, 2
        while stem in stems:
            stem, n = f"{base}-{n}", n + 1
        stems.append(stem)
    return stems


def _open_image(text: str, args: argparse.Namespace) -> tuple[str, Any]:
    from .._io import load_image

    label, source = _input_path(text)
    if isinstance(source, str):
        return label, load_image(source, max_pixels=args.max_pixels or None)
    return label, source


@dataclass
class Prepared:
    """One image, ready to explain."""

    label: str
    image: Any  # the RGB PIL image
    inputs: Any  # (1, 3, H, W) on the device
    crop: Any  # the PIL image the model sees
    probabilities: Any  # (classes,)


def prepare(text: str, pipe: Pipeline, args: argparse.Namespace) -> Prepared:
    """Load, preprocess and classify one image (errors name the file)."""
    import torch

    from .._io import ImageError

    try:
        label, image = _open_image(text, args)
    except ImageError as exc:
        raise CLIError(str(exc)) from None
    try:
        x = pipe.preprocess(image)
        crop = pipe.crop(image)
        with torch.no_grad():
            probabilities = pipe.model(x).float().softmax(dim=1)[0].cpu()
    except Exception as exc:
        raise CLIError(f"{label}: the model failed on this image ({_one_line(exc)})") from None
    return Prepared(label, image, x, crop, probabilities)


def _check_completeness(label: str, method: str, result: Any, options: dict[str, Any]) -> None:
    """Warn on stderr when Integrated Gradients stopped short of its tolerance."""
    tolerance = options.get("tolerance")
    delta = result.extras.get("delta")
    base = result.extras.get("baseline_scores")
    if tolerance is None or delta is None or base is None:
        return
    change = float(result.scores.flatten()[0] - base.flatten()[0])
    gap = abs(float(delta.flatten()[0])) / max(abs(change), 1e-12)
    if gap > tolerance:
        steps = int(result.extras["steps"].flatten()[0])
        _err(
            f"salience: note: {label}: {method}: completeness gap {100 * gap:.1f}% of the score "
            f"change after {steps} steps (tolerance {100 * tolerance:g}%); raise "
            f"-O {method}.max_steps for a more exact map"
        )


def _summary(item: Prepared, pipe: Pipeline) -> str:
    p, c = item.probabilities.max(dim=0)
    return f"{item.label}: {pipe.name_of(int(c))} ({int(c)}) p={float(p):.3f}"


def _layer_note(layers: dict[str, str]) -> str:
    """``"; layer norm (tokens 1+7x7)"``: where the layer methods read the model, or ``""``."""
    if not layers:
        return ""
    if len(set(layers.values())) == 1:
        return f"; layer {next(iter(layers.values()))}"
    return "; " + ", ".join(f"{method} layer {text}" for method, text in layers.items())


def _layer_text(result: Any) -> str | None:
    """``"norm (NHWC)"``: the layer a CAM result explained and how it was read."""
    if not getattr(result, "layer", None):
        return None
    layout = result.extras.get("layout")
    return f"{result.layer} ({layout})" if layout else str(result.layer)


def _progress(total: int, args: argparse.Namespace, label: str = "") -> Any:
    from .._io import Progress

    return Progress(total, label, enabled=False if args.quiet else None)
