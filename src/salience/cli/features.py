"""``salience features``: the image patches that excite a channel most, with reconstructions."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import DEFAULT_OUT, CLIError, UsageError, _one_line, slug
from ._pipeline import load_pipeline
from ._run import Run


def cmd_features(args: argparse.Namespace) -> int:
    """``salience features DIR --layer L --channel C``: Zeiler & Fergus's figure for a channel."""
    from .._io import save_png
    from ..features import top_activating, top_grid
    from ..features.top import _files
    from ..layers import find_layer

    folder = Path(args.folder)
    if not folder.is_dir():
        raise CLIError(f"{folder}: not a folder (give a folder of images)")
    files = _files(folder)
    if not files:
        raise CLIError(f"{folder}: no image files (.png, .jpg, ...) in this folder")
    if args.channel < 0:
        raise UsageError(f"--channel must be a non-negative integer, got {args.channel}")
    pipe = load_pipeline(args)
    try:
        layer, _ = find_layer(pipe.model, args.layer)
    except ValueError as exc:
        raise UsageError(f"--layer: {_one_line(exc)}") from None
    run = Run("features")

    def on_skip(label: str, reason: str) -> None:
        run.images_failed += 1
        run.fail(f"{folder / label}: {reason}")

    try:
        result = top_activating(
            pipe.model,
            folder,
            layer,
            args.channel,
            args.k,
            preprocess=pipe.preprocess,
            on_skip=on_skip,
            max_pixels=getattr(args, "max_pixels", None) or None,
            progress=False if args.quiet else None,
        )
    except (ValueError, TypeError) as exc:
        if run.failures and "no usable image" in str(exc):
            return run.finish(len(files))
        raise CLIError(_one_line(exc)) from None
    run.images_ok = result.seen
    picture = top_grid(result, pipe.to_image)
    out = (
        Path(args.out)
        if args.out
        else Path(DEFAULT_OUT) / f"features.{slug(layer)}.{args.channel}.png"
    )
    try:
        save_png(picture, out)
    except OSError as exc:
        raise CLIError(f"{out}: cannot write ({exc.strerror or exc})") from None
    run.written += 1
    rec = result.reconstruction
    for rank, label in enumerate(result.labels, 1):
        y, x = (int(v) for v in rec.position[rank - 1])
        top, left, bottom, right = (int(v) for v in rec.box[rank - 1])
        print(
            f"{rank}. {label}: activation {float(result.activations[rank - 1]):.4g} at ({y}, {x}) "
            f"of {layer}; patch rows {top}:{bottom}, columns {left}:{right}",
            flush=True,
        )
    print(f"wrote {out} ({len(result.labels)} of {result.seen} images)", flush=True)
    return run.finish(len(files))
