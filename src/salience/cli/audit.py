"""``salience audit``: which map to believe, as a self-contained HTML scorecard."""

from __future__ import annotations

import argparse

from ._common import CLIError, UsageError
from ._options import method_options, parse_methods
from ._pipeline import load_pipeline, parse_targets
from ._run import Run, _summary, prepare


def cmd_audit(args: argparse.Namespace) -> int:
    """``salience audit``: run the methods through the checks, write the HTML scorecard."""
    import torch

    from ..metrics.audit import CHECKS, DEFAULT_METHODS, audit

    methods = parse_methods(args.method, DEFAULT_METHODS)
    options = method_options(args.option, methods, args.layer, defaults=False)
    checks = _checks(args.check, CHECKS)
    pipe = load_pipeline(args)
    specs = parse_targets(args.target, pipe)
    if len(specs) != 1 or specs[0].top > 1:
        raise UsageError("audit explains one class per image: --target top1 or a class")
    run = Run("audit")
    prepared = []
    for text in args.images:
        try:
            item = prepare(text, pipe, args)
        except CLIError as exc:
            run.images_failed += 1
            run.fail(str(exc))
            continue
        run.images_ok += 1
        prepared.append(item)
        print(_summary(item, pipe), flush=True)
    if not prepared:
        return run.finish(len(args.images))
    x = torch.cat([item.inputs for item in prepared])
    spec = specs[0]
    if spec.index is not None:
        target = torch.full((x.shape[0],), spec.index, dtype=torch.long, device=x.device)
    else:
        target = torch.stack([item.probabilities.argmax() for item in prepared]).to(x.device)
    result = audit(
        pipe.model,
        x,
        methods,
        target,
        checks=checks,
        options=options,
        steps=args.steps,
        seed=args.seed,
        images=[item.crop for item in prepared],
        progress=False if args.quiet else None,
    )
    print(result.to_markdown(), flush=True)
    for row in result.methods:
        for check, message in row.errors.items():
            run.fail(f"{row.method}: {check}: {message}")
    metadata = {
        "model": pipe.name,
        "device": str(pipe.device),
        "images": ", ".join(item.label for item in prepared),
    }
    try:
        path = result.write_html(args.out, title=args.title, metadata=metadata)
    except OSError as exc:
        raise CLIError(f"{args.out}: cannot write ({exc.strerror or exc})") from None
    run.written += 1
    print(f"wrote {path}", flush=True)
    return run.finish(len(args.images))


def _checks(values: list[str] | None, known: tuple[str, ...]) -> tuple[str, ...]:
    if not values:
        return known
    chosen: list[str] = []
    for value in values:
        for part in value.split(","):
            name = part.strip()
            if not name:
                continue
            if name not in known:
                raise UsageError(f"--check {name!r}: choose from {', '.join(known)}")
            if name not in chosen:
                chosen.append(name)
    return tuple(chosen)
