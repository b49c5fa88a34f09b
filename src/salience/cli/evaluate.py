"""``salience evaluate``: the synthetic benchmark, one row per method (see salience.evaluate)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL, CLIError, UsageError, _err, _one_line
from ._options import _Formatter, _positive_int, _wrap, method_options, parse_methods

FORMATS = (".csv", ".json", ".md")
"""Suffixes ``--out`` accepts."""

DEFAULT_IMAGES = 100

EVALUATE_DEFAULTS: dict[str, dict[str, Any]] = {"rise": {"masks": 1000}}
"""Method options of this command unless ``-O`` overrides them (on top of the CLI-wide
``METHOD_DEFAULTS``): RISE with 1000 masks instead of the paper's 4000, a quarter of the time
on 64x64 images. They are listed under the table and in its settings."""


def add_evaluate_parser(sub: Any, epilog: str) -> argparse.ArgumentParser:
    """Add the ``evaluate`` command to the sub-parsers ``sub``."""
    from ..metrics.synthetic import CLASSES, TRAIN_SEED

    p = sub.add_parser(
        "evaluate",
        help="score methods on the synthetic benchmark: pointing game, IoU, deletion, ...",
        description=_wrap(
            "Runs saliency methods on held-out images of the synthetic benchmark (64x64 "
            f"shapes on clutter: {', '.join(CLASSES)}; one labelled object and up to two "
            "smaller distractors of other classes) with the shipped small CNN, explaining the "
            "true class, and prints one row per method: pointing-game accuracy, pointing "
            "energy, IoU of the box around the map with the object's box, top-1 localization "
            "error, deletion and insertion AUC, and seconds per image; a uniform random map "
            "and a centred Gaussian are reference rows. The same as salience.evaluate(...) in "
            f"Python. Seed {TRAIN_SEED} is the model's training data: use any other seed."
        ),
        epilog=epilog,
        formatter_class=_Formatter,
    )
    p.add_argument(
        "-m",
        "--method",
        action="append",
        metavar="NAME",
        help="a registered method (repeatable, or comma-separated; default: every method)",
    )
    p.add_argument(
        "-O",
        "--option",
        action="append",
        metavar="[METHOD.]KEY=VALUE",
        help="a method option, e.g. -O smoothgrad.samples=10 or -O steps=16 (every requested "
        "method that has it). Defaults here: rise.masks=1000 (the paper: 4000) and the adaptive "
        "Integrated Gradients of 'salience explain'",
    )
    p.add_argument("--images", type=_positive_int, default=DEFAULT_IMAGES, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="seed of the images (held out: not 1)")
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=32,
        help="steps of the deletion/insertion curves (32: 128 pixels per step)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="pointing-game tolerance in pixels (default: the paper's 15 px at 224, scaled to "
        "64 px images: 4.3)",
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=50, help="images per call of a method"
    )
    p.add_argument(
        "-o",
        "--out",
        default=None,
        metavar="TABLE",
        help="also write the table to TABLE, by its suffix: .csv, .json or .md (atomically)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_evaluate)
    return p


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``salience evaluate``: run the benchmark and print (and write) the table."""
    from ..metrics import evaluate
    from ..metrics.synthetic import TRAIN_SEED, generate
    from ..models import synthetic_cnn
    from ..registry import available_methods

    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in FORMATS:
        raise UsageError(
            f"--out {args.out}: unknown table format {out.suffix or '(no suffix)'!r}; use one "
            f"of {', '.join(FORMATS)}"
        )
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.tolerance is not None and not 0 <= args.tolerance < float("inf"):
        raise UsageError(
            f"--tolerance must be a finite number of pixels >= 0, got {args.tolerance}"
        )
    methods = parse_methods(args.method, list(available_methods()))
    items = [
        f"{m}.{k}={v!r}" for m, o in EVALUATE_DEFAULTS.items() if m in methods for k, v in o.items()
    ]
    options = method_options([*items, *(args.option or [])], methods, None)
    if args.seed == TRAIN_SEED:
        _err(
            f"salience evaluate: warning: seed {TRAIN_SEED} is the model's training data; "
            "the figures are not held out"
        )
    try:
        model = synthetic_cnn()
    except Exception as exc:  # missing, or not the weights of this network (a damaged install)
        raise CLIError(f"cannot load the synthetic benchmark's model: {_one_line(exc)}") from None
    data = generate(args.images, seed=args.seed)
    table = evaluate(
        model,
        data.images,
        data.labels,
        data.boxes,
        data.masks,
        methods=methods,
        options={m: o for m, o in options.items() if o},
        batch_size=args.batch_size,
        tolerance=args.tolerance,
        steps=args.steps,
        seed=args.seed,
        on_error="record",
        progress=False if args.quiet else None,
    )
    print(repr(table), flush=True)
    for method, message in table.errors.items():
        _err(f"salience evaluate: error: {method}: {message}")
    if out is not None:
        suffix = out.suffix.lower()
        try:
            if suffix == ".csv":
                table.to_csv(out)
            elif suffix == ".json":
                table.to_json(out)
            else:
                from .._io import atomic_write

                atomic_write(out, table.to_markdown().encode("utf-8"))
        except OSError as exc:
            raise CLIError(f"{out}: cannot write ({exc.strerror or exc})") from None
        print(f"wrote {out}", flush=True)
    if not table.errors:
        return EXIT_OK
    return EXIT_PARTIAL if len(table.errors) < len(methods) else EXIT_FAILURE
