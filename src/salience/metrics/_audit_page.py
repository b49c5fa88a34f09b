"""The HTML page of :class:`~salience.metrics.audit.Audit`: scorecard, maps, curves, figures.

Self-contained like :mod:`salience.report` (same style sheet; every picture a ``data:`` URI).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .audit import _ABOUT, _BETTER_THAN_CHANCE, _COLUMNS, _STABLE, _UNSTABLE, _checks_shown

if TYPE_CHECKING:
    from .audit import Audit

_AUDIT_CSS = """
table.card{border-collapse:collapse;margin:1em 0;font-size:92%}
table.card th,table.card td{border:1px solid #ddd;padding:.4em .6em;vertical-align:top;
text-align:left}
table.card th{background:#f5f5f5}
td.good{background:#e6f4e6}td.fair{background:#fff6dc}td.bad{background:#fbe3e3}
td.error{background:#f0f0f0;color:#a00}
td .v{font-weight:600;font-variant-numeric:tabular-nums}
td .r{display:block;color:#444;font-size:90%}
ul.verdicts li{margin:.3em 0}
"""


def _figure_png(draw: Callable[[Any], None], size: tuple[float, float]) -> str:
    """Draw with matplotlib on a fresh figure; return it as a ``data:`` URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    draw(fig)
    fig.tight_layout()
    return _png_uri(fig)


def _png_uri(fig: Any) -> str:
    """Return a matplotlib figure as a PNG ``data:`` URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _curves_figure(result: Audit) -> str | None:
    rows = [r for r in [*result.methods, result.chance] if r.deletion is not None]
    if not rows:
        return None
    from ..report import display_name

    def draw(fig: Any) -> None:
        for i, kind in enumerate(("deletion", "insertion")):
            ax = fig.add_subplot(1, 2, i + 1)
            for row in rows:
                curve = getattr(row, kind)
                if curve is None:
                    continue
                style = {"linestyle": "--", "color": "gray"} if row is result.chance else {}
                label = "random map" if row is result.chance else display_name(row.method)
                mean = curve.curve.double().mean(0).cpu().numpy()
                ax.plot(curve.fractions.numpy(), mean, label=label, **style)
            better = "lower" if kind == "deletion" else "higher"
            ax.set_title(f"{kind} (area: {better} is better)", fontsize=10)
            ax.set_xlabel("fraction of pixels " + ("removed" if kind == "deletion" else "inserted"))
            ax.set_ylabel("score of the class")
            ax.grid(alpha=0.3)
        fig.axes[0].legend(fontsize=8)

    return _figure_png(draw, (10, 3.8))


def _randomization_figure(result: Audit) -> str | None:
    checks = {r.method: r.randomization for r in result.methods if r.randomization is not None}
    if not checks:
        return None
    from .sanity import plot_sanity_checks

    try:
        figure = plot_sanity_checks(checks)
    except ValueError:  # results over different layers cannot share axes
        return None
    return _png_uri(figure)


def _map_pictures(result: Audit) -> list[tuple[str, str]]:
    """Return ``(method, data URI)`` of each method's map on the first image."""
    from .. import viz
    from ..report import _data_uri

    image = result.images[0] if result.images else None
    pictures = []
    for row in result.methods:
        if row.attribution is None:
            continue
        try:
            pictures.append((row.method, _data_uri(viz.render(row.attribution, image))))
        except Exception:  # a picture that cannot be drawn is left out, the numbers stay
            continue
    return pictures


def page(result: Audit, title: str, metadata: Mapping[str, str]) -> str:
    """Return the audit as one self-contained HTML document."""
    import datetime as _dt

    from .. import __version__
    from ..report import _CSS, display_name

    e = html.escape
    meta = {"salience": __version__, **dict(metadata)}
    meta.setdefault("generated", _dt.datetime.now().isoformat(timespec="seconds"))
    # how many images, and which when the caller names them (the CLI gives the file names)
    count = str(result.inputs.shape[0])
    names = str(meta.get("images", "")).strip()
    meta["images"] = f"{count} ({names})" if names and names != count else count
    meta_line = " · ".join(f"{e(k)}: {e(str(v))}" for k, v in meta.items())
    checks = _checks_shown(result.checks)
    columns = [c for c, (check, _, _) in _COLUMNS.items() if check in checks]
    head = "".join(f"<th>{e(_COLUMNS[c][1])}</th>" for c in columns)
    body = []
    for row in [*result.methods, result.chance]:
        name = "Random map (chance)" if row is result.chance else display_name(row.method)
        cells = [f"<td><b>{e(name)}</b><br><code>{e(row.method)}</code></td>"]
        for c in columns:
            reading = row.readings.get(_COLUMNS[c][0])
            if reading is None:
                cells.append('<td class="na">—</td>')
                continue
            value = "" if reading.value is None else f'<span class="v">{reading.value:.3g}</span>'
            text = f'<span class="r">{e(reading.text)}</span>'
            cells.append(f'<td class="{e(reading.verdict)}">{value}{text}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    parts = [
        "<section><h2>Scorecard</h2>",
        "<p>Each cell is the mean over the images, with its reading. Green: the map passes "
        "this check; yellow: inconclusive; red: the map fails it. The readings compare "
        "with a random map and use fixed cut-offs stated at the end of the page.</p>",
        f'<table class="card"><tr><th>method</th>{head}</tr>{"".join(body)}</table>',
        '<ul class="verdicts">'
        + "".join(f"<li>{e(row.summary())}</li>" for row in result.methods)
        + "</ul></section>",
    ]
    pictures = _map_pictures(result)
    if pictures:
        figures = "".join(
            f'<figure><img src="{uri}" alt="{e(m)} map"><figcaption><b>{e(display_name(m))}'
            f"</b> <code>{e(m)}</code></figcaption></figure>"
            for m, uri in pictures
        )
        parts.append(
            f'<section><h2>Maps (first image)</h2><div class="maps">{figures}</div></section>'
        )
    curves = _curves_figure(result)
    if curves is not None:
        parts.append(
            "<section><h2>Deletion and insertion</h2><p>The score of the class as the pixels "
            "a map ranks first are removed (replaced by zeros) or inserted (into a blurred "
            "copy), mean over the images (Petsiuk et al. 2018).</p>"
            f'<img src="{curves}" alt="deletion and insertion curves"></section>'
        )
    sanity = _randomization_figure(result)
    if sanity is not None:
        parts.append(
            "<section><h2>Model randomization</h2><p>Cascading randomization of a copy of the "
            "model, from the top layer down (Adebayo et al. 2018): the rank correlation "
            "(Spearman of |map|) and SSIM between each method's map and its map on the "
            "randomized model. A map that explains the model falls as layers are randomized; "
            "one that stays high reflects the image, not the weights.</p>"
            f'<img src="{sanity}" alt="cascading randomization"></section>'
        )
    parts.append(_settings_html(result))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{e(title)}</title>\n<style>{_CSS}{_AUDIT_CSS}</style>\n</head>\n<body>\n"
        f'<header><h1>{e(title)}</h1><p class="meta">{meta_line}</p></header>\n'
        + "\n".join(parts)
        + '\n<footer class="meta"><p>Generated by salience.</p></footer>\n</body>\n</html>\n'
    )


def _settings_html(result: Audit) -> str:
    e = html.escape
    s = result.settings
    options = "; ".join(
        f"{m}: {', '.join(f'{k}={v!r}' for k, v in o.items())}"
        for m, o in result.options.items()
        if o
    )
    from .sanity import FAIL_ABOVE, PASS_BELOW

    cutoffs = (
        f"deletion good below {_BETTER_THAN_CHANCE:g}× the random map's area, insertion good "
        f"above {1 / _BETTER_THAN_CHANCE:g}×, within {100 * _ABOUT:g} % of it no better than "
        f"chance; randomization passes when the mean rank correlation (Spearman of |map|) "
        f"over the cascade is below {PASS_BELOW:g}, fails above {FAIL_ABOVE:g}; input "
        f"invariance holds when the relative L2 change of every image's map is within 1 % (the "
        f"worst is shown); max-sensitivity good below {_STABLE:g}, bad above {_UNSTABLE:g}; "
        f"images whose map is zero everywhere are left out of both (all zero: undefined)"
    )
    return (
        "<section><h2>How this was computed</h2><ul>"
        f"<li>Checks: {e(', '.join(result.checks))}; curves of {s['steps']} steps; mean-shift "
        f"{s['shift']:g}; max-sensitivity radius {s['radius']:g} of the value range, "
        f"{s['samples']} perturbations; seed {s['seed']}.</li>"
        f"<li>Method options: {e(options or 'defaults')}.</li>"
        f"<li>Cut-offs of the readings (conventions of this report): {e(cutoffs)}.</li>"
        "</ul></section>"
    )
