"""``salience explain``: saliency maps as PNG overlays and ``.npy`` arrays."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import CLIError, _one_line
from ._options import method_options, parse_methods
from ._pipeline import load_pipeline, parse_targets, resolve_classes
from ._run import (
    Run,
    _check_completeness,
    _layer_note,
    _layer_text,
    _progress,
    _stems,
    _summary,
    prepare,
)


def cmd_explain(args: argparse.Namespace) -> int:
    """``salience explain``: maps as PNG overlays and ``.npy`` arrays, one line per image."""
    from .. import viz
    from .._io import save_npy, save_png
    from ..report import explain_many

    methods = parse_methods(args.method, ["grad_cam"])
    options = method_options(args.option, methods, args.layer)
    pipe = load_pipeline(args)
    specs = parse_targets(args.target, pipe)
    out = Path(args.out)
    per_image = len(methods) * sum(s.top or 1 for s in specs)
    run = Run("explain")
    stems = _stems(args.images)
    with _progress(len(args.images) * per_image, args, "explain") as bar:
        for text, stem in zip(args.images, stems, strict=True):
            try:
                item = prepare(text, pipe, args)
            except CLIError as exc:
                run.images_failed += 1
                run.fail(str(exc))
                bar.update(per_image)
                continue
            classes = resolve_classes(specs, item.probabilities)
            errors = 0
            wrote = 0
            layers: dict[str, str] = {}
            for c in classes:
                bar.set_label(f"{item.label} -> {pipe.name_of(c)}")
                results = explain_many(
                    pipe.model,
                    item.inputs,
                    methods,
                    c,
                    options=options,
                    on_done=lambda _m: bar.update(),
                )
                for method, result in results.items():
                    if isinstance(result, Exception):
                        errors += 1
                        run.fail(f"{item.label}: {method}: {_one_line(result)}")
                        continue
                    _check_completeness(item.label, method, result, options[method])
                    layer = _layer_text(result)
                    if layer:
                        layers[method] = layer
                    name = f"{stem}.{method}.{pipe.file_label(c)}"
                    try:
                        picture = viz.render(
                            result,
                            item.crop,
                            style=args.style,
                            cmap=args.cmap,
                            alpha=args.alpha,
                            percentile=args.percentile,
                        )
                        save_png(picture, out / f"{name}.png")
                        values = result.values[0].detach().float().cpu().numpy()
                        save_npy(values, out / f"{name}.npy")
                    except OSError as exc:
                        errors += 1
                        run.fail(f"{out / name}: cannot write ({exc.strerror or exc})")
                        continue
                    except Exception as exc:
                        errors += 1
                        run.fail(f"{item.label}: {method}: cannot draw ({_one_line(exc)})")
                        continue
                    wrote += 1
            run.written += wrote
            if errors:
                run.images_failed += 1
            else:
                run.images_ok += 1
            bar.close()
            maps = f"{wrote} map{'s' * (wrote != 1)} in {out}/"
            print(f"{_summary(item, pipe)}{_layer_note(layers)}; {maps}", flush=True)
    return run.finish(len(args.images))
