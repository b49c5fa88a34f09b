"""A self-contained HTML report: the prediction and every requested method's map.

:func:`explain_image` runs the methods on one image and keeps the pictures; :func:`to_html`
turns the results into one page with every image embedded as a ``data:`` URI, so the file can
be mailed or archived on its own. :func:`explain_many` is the loop the command line shares.

Example:
    >>> from salience import models, report
    >>> model = models.load("efficientnet_lite0")
    >>> image = models.sample_image("chelsea")
    >>> result = report.explain_image(model, image, methods=["grad_cam", "gradient"])
    >>> page = report.to_html([result], title="Chelsea")   # doctest: +SKIP
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from . import viz
from ._forward import model_scope
from .attribution import Attribution
from .registry import check_options, explain, get_method

__all__ = [
    "ImageReport",
    "MethodReport",
    "Prediction",
    "display_name",
    "explain_image",
    "explain_many",
    "method_notes",
    "predict",
    "to_html",
    "write_html",
]

_DISPLAY = {
    "gradient": "Gradient",
    "input_x_gradient": "Gradient × Input",
    "deconvnet": "DeconvNet",
    "guided_backprop": "Guided Backprop",
    "smoothgrad": "SmoothGrad",
    "cam": "CAM",
    "grad_cam": "Grad-CAM",
    "grad_cam_plus_plus": "Grad-CAM++",
    "layer_cam": "LayerCAM",
    "guided_grad_cam": "Guided Grad-CAM",
    "score_cam": "Score-CAM",
    "integrated_gradients": "Integrated Gradients",
    "lrp": "LRP",
    "deeplift": "DeepLIFT",
    "occlusion": "Occlusion",
    "rise": "RISE",
}


def display_name(method: str) -> str:
    """Return the name a figure shows for a method (``"grad_cam"`` → ``"Grad-CAM"``)."""
    return _DISPLAY.get(method, method.replace("_", " "))


@dataclass(frozen=True)
class Prediction:
    """One line of a top-k prediction."""

    index: int
    name: str
    probability: float


@dataclass
class MethodReport:
    """One method's map for the report: the picture, or the error that stopped it."""

    method: str
    picture: Image.Image | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class ImageReport:
    """Everything the report shows about one image and one explained class."""

    title: str
    image: Image.Image | None
    predictions: list[Prediction] = field(default_factory=list)
    target: Prediction | None = None
    methods: list[MethodReport] = field(default_factory=list)
    error: str | None = None


def _names(model: nn.Module, class_names: Sequence[str] | None, count: int) -> list[str]:
    if class_names is not None:
        return list(class_names)
    names = getattr(model, "class_names", None)
    if isinstance(names, Sequence) and len(names) == count:
        return list(names)
    if count == 1000:
        from .models import class_names as imagenet

        return imagenet()
    return [f"class {i}" for i in range(count)]


def predict(
    model: nn.Module, inputs: Tensor, *, k: int = 5, class_names: Sequence[str] | None = None
) -> list[Prediction]:
    """Return the top-``k`` classes of the first input, by softmax probability.

    Args:
        model: A classifier returning ``(N, classes)`` logits.
        inputs: ``(N, C, H, W)`` preprocessed images; the first one is used.
        k: How many classes.
        class_names: Names by index; default ``model.class_names``, ImageNet for 1000 classes,
            else ``"class <i>"``.
    """
    output = _run(model, inputs[:1])
    if not isinstance(output, Tensor) or output.ndim != 2:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(f"the model must return (N, classes) logits, got {shape}")
    probabilities = output.float().softmax(dim=1)[0]
    names = _names(model, class_names, probabilities.shape[0])
    top = probabilities.topk(min(k, probabilities.shape[0]))
    return [
        Prediction(int(i), names[int(i)], float(p))
        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]


def method_notes(attribution: Attribution) -> list[str]:
    """Short facts worth showing next to a map.

    The layer and its layout, IG's completeness gap and steps, the number of noise samples, the
    rectifier calls a modified backward rule changed, and values of the map that are not finite.
    """
    notes = []
    extras = attribution.extras
    if attribution.layer:
        layout = extras.get("layout")
        notes.append(f"layer {attribution.layer}" + (f" ({layout})" if layout else ""))
    if isinstance(extras.get("rectifiers"), int):
        notes.append(f"{extras['rectifiers']} rectifier calls modified")
    if "delta" in extras and isinstance(extras["delta"], Tensor):
        delta = float(extras["delta"].flatten()[0])
        change = float(attribution.scores.flatten()[0])
        base = extras.get("baseline_scores")
        if isinstance(base, Tensor):
            change -= float(base.flatten()[0])
        relative = abs(delta) / abs(change) if change else float("inf")
        notes.append(f"completeness gap {delta:+.3g} ({100 * relative:.1f}% of the score change)")
    if "steps" in extras and isinstance(extras["steps"], Tensor):
        notes.append(f"{int(extras['steps'].flatten()[0])} gradient steps")
    if "samples" in extras and isinstance(extras["samples"], int):
        notes.append(f"{extras['samples']} noise samples")
    values = attribution.values[:1]
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        nan = int(values.isnan().sum())
        notes.append(
            f"not finite: {nan} NaN (drawn as zero) and {bad - nan} infinite value(s) (at the "
            "ends of the scale)"
        )
    return notes


def explain_many(
    model: nn.Module,
    inputs: Tensor,
    methods: Sequence[str],
    target: Any = None,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    on_done: Callable[[str], None] | None = None,
) -> dict[str, Attribution | Exception]:
    """Run several registered methods on the same inputs; a failure does not stop the others.

    Args:
        model: The model.
        inputs: ``(N, C, H, W)`` preprocessed images.
        methods: Registered method names.
        target: What to explain, for every method (see :mod:`salience.targets`).
        options: ``{method: {option: value}}``, checked against each method's options.
        on_done: Called with the method name after each method (for progress bars).

    Returns:
        ``{method: Attribution}``, or the exception a method raised in place of its result.
        ``KeyboardInterrupt`` is not caught.
    """
    results: dict[str, Attribution | Exception] = {}
    for name in methods:
        opts = dict((options or {}).get(name, {}))
        try:
            check_options(get_method(name), opts)
            results[name] = explain(model, inputs, name, target, **opts)
        except Exception as exc:
            results[name] = exc
        if on_done is not None:
            on_done(name)
    return results


def explain_image(
    model: nn.Module,
    image: Image.Image | str | os.PathLike[str],
    methods: Sequence[str] = ("gradient", "guided_backprop", "grad_cam", "guided_grad_cam"),
    target: int | None = None,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    class_names: Sequence[str] | None = None,
    top: int = 5,
    title: str | None = None,
    preprocess: Callable[[Image.Image], Tensor] | None = None,
    crop: Callable[[Image.Image], Image.Image] | None = None,
    on_done: Callable[[str], None] | None = None,
) -> ImageReport:
    """Predict and explain one image with several methods, for :func:`to_html`.

    Args:
        model: A classifier. By default its own ``preprocess`` and ``crop`` prepare the image
            (the pretrained models of :mod:`salience.models` have them).
        image: A PIL image or an image file.
        methods: Registered method names.
        target: The class to explain; ``None`` explains the predicted class.
        options: ``{method: {option: value}}``.
        class_names: Names by class index (see :func:`predict`).
        top: How many classes the prediction table shows.
        title: The section title; default the file name.
        preprocess: ``image -> (1, C, H, W)`` input, if the model has no ``preprocess``.
        crop: ``image -> the image the model sees``, for overlays; default ``model.crop``.
        on_done: Called with each method name when it is done.

    Returns:
        The section of the report; methods that failed carry their error message.
    """
    from .models import to_rgb

    name = title or (os.fspath(image) if not isinstance(image, Image.Image) else "image")
    rgb = to_rgb(image)
    prep = preprocess or getattr(model, "preprocess", None)
    if prep is None:
        raise ValueError("the model has no preprocess method: pass preprocess=")
    view = crop or getattr(model, "crop", None)
    x = prep(rgb)
    shown = view(rgb) if view is not None else None
    predictions = predict(model, x, k=max(top, 1), class_names=class_names)
    if target is None:
        chosen = predictions[0]
    else:
        logits = _run(model, x)
        names = _names(model, class_names, int(logits.shape[1]))
        p = logits.float().softmax(1)[0, target]
        chosen = Prediction(int(target), names[int(target)], float(p))
    results = explain_many(model, x, methods, chosen.index, options=options, on_done=on_done)
    return ImageReport(
        title=name,
        image=shown,
        predictions=predictions[:top],
        target=chosen,
        methods=[method_report(m, r, shown) for m, r in results.items()],
    )


def _run(model: nn.Module, x: Tensor) -> Any:
    """Return the model's output on ``x``, its buffers kept (a model left in training mode)."""
    with torch.no_grad(), model_scope(model, x) as forward:
        return forward(x)


def method_report(
    method: str,
    result: Attribution | Exception,
    image: Image.Image | None,
    *,
    percentile: float | None = 99.0,
) -> MethodReport:
    """Turn one method's result into a report entry (a picture drawn with :func:`viz.render`)."""
    if isinstance(result, Exception):
        return MethodReport(method, error=_one_line(result))
    try:
        picture = viz.render(result, image, percentile=percentile)
    except Exception as exc:
        return MethodReport(method, error=f"cannot draw the map: {_one_line(exc)}")
    return MethodReport(method, picture=picture, notes=method_notes(result))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# -- HTML ------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#222;background:#fff}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.meta{color:#666;font-size:90%}
.row{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}
.maps{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0;width:224px}figure img{width:224px;height:auto;image-rendering:auto;
border:1px solid #eee}
figcaption{font-size:85%;margin-top:.3em}figcaption .note{color:#555}
table.top{border-collapse:collapse;min-width:360px}
table.top td,table.top th{padding:.25em .6em;text-align:left;border-bottom:1px solid #eee}
table.top td.p{width:180px}
.bar{background:#4a78c2;height:.8em;display:inline-block;vertical-align:middle;margin-right:.4em}
.error{color:#a00}.na{color:#666;font-style:italic}
code{font-size:90%}
"""


def _data_uri(picture: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(viz.to_png(picture)).decode("ascii")


def _img(picture: Image.Image, alt: str) -> str:
    return (
        f'<img src="{_data_uri(picture)}" alt="{html.escape(alt)}" '
        f'width="{picture.width}" height="{picture.height}">'
    )


def _bar(probability: float) -> int:
    """Width in pixels of a probability's bar; none for a probability that is not finite."""
    return max(1, round(120 * probability)) if math.isfinite(probability) else 0


def _section(number: int, item: ImageReport) -> str:
    e = html.escape
    parts = [f'<section class="image" id="image-{number}">', f"<h2>{e(item.title)}</h2>"]
    if item.error is not None:
        parts.append(f'<p class="error">Failed: {e(item.error)}</p></section>')
        return "\n".join(parts)
    parts.append('<div class="row">')
    if item.image is not None:
        parts.append(
            f"<figure>{_img(item.image, f'input {item.title}')}"
            f"<figcaption>Input as the model sees it "
            f"({item.image.width}×{item.image.height})</figcaption></figure>"
        )
    if item.predictions:
        rows = "".join(
            f"<tr><td>{rank}</td><td>{e(p.name)}</td><td>{p.index}</td>"
            f'<td class="p"><span class="bar" style="width:{_bar(p.probability)}px">'
            f"</span>{p.probability:.3f}</td></tr>"
            for rank, p in enumerate(item.predictions, 1)
        )
        parts.append(
            f'<table class="top"><caption>Top-{len(item.predictions)} prediction</caption>'
            "<tr><th>#</th><th>class</th><th>index</th><th>probability</th></tr>"
            f"{rows}</table>"
        )
    parts.append("</div>")
    if item.target is not None:
        t = item.target
        parts.append(
            f"<h3>Maps for {e(t.name)} (class {t.index}, probability {t.probability:.3f})</h3>"
        )
    parts.append('<div class="maps">')
    for m in item.methods:
        try:
            description = get_method(m.method).description
        except ValueError:
            description = ""
        caption = (
            f"<b>{e(display_name(m.method))}</b> <code>{e(m.method)}</code><br>"
            f'<span class="note">{e(description)}</span>'
        )
        if m.notes:
            caption += "<br>" + "<br>".join(f'<span class="note">{e(n)}</span>' for n in m.notes)
        if m.picture is not None:
            body = _img(m.picture, f"{m.method} map")
        else:
            body = f'<p class="error">Failed: {e(m.error or "unknown error")}</p>'
        parts.append(f"<figure>{body}<figcaption>{caption}</figcaption></figure>")
    parts.append("</div>")
    parts.append(
        "<h3>Which map to believe</h3>"
        '<p class="na">This page shows the maps; <code>salience audit</code> (or '
        "<code>salience.metrics.audit</code>) scores them on the same images: deletion and "
        "insertion, the randomization sanity check, input invariance and stability.</p>"
    )
    parts.append("</section>")
    return "\n".join(parts)


def to_html(
    items: Sequence[ImageReport],
    *,
    title: str = "salience report",
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Render report sections as one self-contained HTML page.

    Every picture is embedded as a base64 PNG ``data:`` URI; the page loads nothing else.

    Args:
        items: One section per image (from :func:`explain_image`).
        title: The page title.
        metadata: Shown under the title, e.g. ``{"model": "efficientnet_lite0"}``.

    Returns:
        The HTML document.
    """
    from . import __version__

    e = html.escape
    meta = dict(metadata or {})
    meta.setdefault("salience", __version__)
    meta.setdefault("generated", _dt.datetime.now().isoformat(timespec="seconds"))
    meta_line = " · ".join(f"{e(k)}: {e(str(v))}" for k, v in meta.items())
    failed = [i for i in items if i.error is not None]
    body = [_section(n, item) for n, item in enumerate(items, 1)]
    if failed:
        listed = "".join(f"<li>{e(i.title)}: {e(str(i.error))}</li>" for i in failed)
        body.append(
            f'<section class="failures"><h2>Failures</h2>'
            f'<p class="error">{len(failed)} of {len(items)} images failed:</p>'
            f"<ul>{listed}</ul></section>"
        )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f'<header><h1>{e(title)}</h1><p class="meta">{meta_line}</p></header>\n'
        + "\n".join(body)
        + '\n<footer class="meta"><p>Maps are raw attributions, scaled for display only (a high '
        "percentile of the magnitude is the end of the color scale). Generated by salience."
        "</p></footer>\n"
        "</body>\n</html>\n"
    )


def write_html(path: str | os.PathLike[str], page: str) -> str:
    """Write the page atomically (a temporary file, then a rename); returns the path."""
    from ._io import atomic_write

    return os.fspath(atomic_write(path, page.encode("utf-8")))
