"""``salience compare``: the image and each method's map side by side, as one PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import CLIError, _one_line
from ._options import compare_methods, method_options, parse_methods
from ._pipeline import Pipeline, load_pipeline, parse_targets, resolve_classes
from ._run import (
    Prepared,
    Run,
    _check_completeness,
    _layer_note,
    _layer_text,
    _progress,
    _stems,
    _summary,
    prepare,
)


def _figure_title(item: Prepared, pipe: Pipeline, c: int) -> str:
    p, top = item.probabilities.max(dim=0)
    top_i = int(top)
    text = f"{item.label} · predicted: {pipe.name_of(top_i)} (p = {float(p):.2f})"
    if c != top_i:
        text += f" · explained: {pipe.name_of(c)} (p = {float(item.probabilities[c]):.2f})"
    return text


def cmd_compare(args: argparse.Namespace) -> int:
    """``salience compare``: the image and each method's map side by side, as one PNG."""
    from .. import viz
    from .._io import save_png
    from ..report import display_name, explain_many

    methods = parse_methods(args.method, compare_methods())
    options = method_options(args.option, methods, args.layer)
    pipe = load_pipeline(args)
    specs = parse_targets(args.target, pipe)
    out = Path(args.out)
    run = Run("compare")
    per_image = len(methods) * sum(s.top or 1 for s in specs)
    with _progress(len(args.images) * per_image, args, "compare") as bar:
        for text, stem in zip(args.images, _stems(args.images), strict=True):
            try:
                item = prepare(text, pipe, args)
            except CLIError as exc:
                run.images_failed += 1
                run.fail(str(exc))
                bar.update(per_image)
                continue
            failed = False
            names = []
            layers: dict[str, str] = {}
            for c in resolve_classes(specs, item.probabilities):
                bar.set_label(f"{item.label} -> {pipe.name_of(c)}")
                results = explain_many(
                    pipe.model,
                    item.inputs,
                    methods,
                    c,
                    options=options,
                    on_done=lambda _m: bar.update(),
                )
                panels, titles = [item.crop], ["input"]
                for method, result in results.items():
                    if isinstance(result, Exception):
                        failed = True
                        run.fail(f"{item.label}: {method}: {_one_line(result)}")
                        continue
                    _check_completeness(item.label, method, result, options[method])
                    layer = _layer_text(result)
                    if layer:
                        layers[method] = layer
                    panels.append(viz.render(result, item.crop, percentile=args.percentile))
                    titles.append(display_name(method))
                if len(panels) == 1:
                    continue
                figure = viz.grid(
                    panels,
                    titles,
                    ncols=args.columns,
                    title=_figure_title(item, pipe, c),
                    panel_size=args.panel_size,
                    dpi=args.dpi,
                )
                path = out / f"{stem}.compare.{pipe.file_label(c)}.png"
                try:
                    save_png(figure, path)
                except OSError as exc:
                    failed = True
                    run.fail(f"{path}: cannot write ({exc.strerror or exc})")
                    continue
                run.written += 1
                names.append(str(path))
            bar.close()
            if failed:
                run.images_failed += 1
            else:
                run.images_ok += 1
            wrote = ", ".join(names) or "nothing"
            print(f"{_summary(item, pipe)}{_layer_note(layers)}; wrote {wrote}", flush=True)
    return run.finish(len(args.images))
