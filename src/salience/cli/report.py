"""``salience report``: one self-contained HTML page of predictions and maps."""

from __future__ import annotations

import argparse

from ._common import CLIError
from ._options import compare_methods, method_options, parse_methods
from ._pipeline import load_pipeline, parse_targets, resolve_classes
from ._run import Run, _progress, _summary, prepare


def cmd_report(args: argparse.Namespace) -> int:
    """``salience report``: one self-contained HTML page."""
    from ..report import ImageReport, Prediction, explain_many, method_report, to_html, write_html

    methods = parse_methods(args.method, compare_methods())
    options = method_options(args.option, methods, args.layer)
    pipe = load_pipeline(args)
    specs = parse_targets(args.target, pipe)
    run = Run("report")
    sections: list[ImageReport] = []
    per_image = len(methods) * sum(s.top or 1 for s in specs)
    with _progress(len(args.images) * per_image, args, "report") as bar:
        for text in args.images:
            try:
                item = prepare(text, pipe, args)
            except CLIError as exc:
                run.images_failed += 1
                run.fail(str(exc))
                # the title names the image: the error says what went wrong, once
                error = str(exc).removeprefix(f"{text}: ")
                sections.append(ImageReport(title=text, image=None, error=error))
                bar.update(per_image)
                continue
            probs = item.probabilities
            top = probs.topk(min(args.top, pipe.num_classes))
            predictions = [
                Prediction(int(i), pipe.name_of(int(i)), float(p))
                for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            ]
            failed = False
            for c in resolve_classes(specs, probs):
                bar.set_label(f"{item.label} -> {pipe.name_of(c)}")
                results = explain_many(
                    pipe.model,
                    item.inputs,
                    methods,
                    c,
                    options=options,
                    on_done=lambda _m: bar.update(),
                )
                entries = []
                for method, result in results.items():
                    entry = method_report(method, result, item.crop, percentile=args.percentile)
                    if entry.error is not None:
                        failed = True
                        run.fail(f"{item.label}: {method}: {entry.error}")
                    entries.append(entry)
                sections.append(
                    ImageReport(
                        title=item.label,
                        image=item.crop,
                        predictions=predictions,
                        target=Prediction(c, pipe.name_of(c), float(probs[c])),
                        methods=entries,
                    )
                )
            if failed:
                run.images_failed += 1
            else:
                run.images_ok += 1
            bar.close()
            print(_summary(item, pipe), flush=True)
    if any(section.error is None for section in sections):
        page = to_html(
            sections,
            title=args.title,
            metadata={"model": pipe.name, "device": str(pipe.device)},
        )
        try:
            path = write_html(args.out, page)
        except OSError as exc:
            raise CLIError(f"{args.out}: cannot write ({exc.strerror or exc})") from None
        run.written += 1
        print(f"wrote {path}", flush=True)
    return run.finish(len(args.images))
