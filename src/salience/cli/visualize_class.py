"""``salience visualize-class``: the class model image (Simonyan et al. 2013)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import EXIT_OK, CLIError
from ._pipeline import load_pipeline, lookup_class


def cmd_visualize_class(args: argparse.Namespace) -> int:
    """``salience visualize-class``: the class model image (Simonyan et al. 2013)."""
    from PIL import Image

    from .._io import save_png
    from ..features import class_model

    pipe = load_pipeline(args)
    index = lookup_class(args.cls, pipe)
    image = class_model(
        pipe.model,
        index,
        steps=args.steps,
        lr=args.lr,
        l2=args.l2,
        jitter=args.jitter,
        blur_every=args.blur_every,
        blur_sigma=args.blur_sigma,
        size=pipe.input_size,
        seed=args.seed,
        progress=False if args.quiet else None,
    )
    import torch

    with torch.no_grad():
        probabilities = pipe.model(image).float().softmax(dim=1)[0]
    picture = Image.fromarray(pipe.to_image(image[0]))
    path = Path(args.out) / f"class_model.{pipe.file_label(index)}.png"
    try:
        save_png(picture, path)
    except OSError as exc:
        raise CLIError(f"{path}: cannot write ({exc.strerror or exc})") from None
    print(
        f"{pipe.name_of(index)} ({index}): p={float(probabilities[index]):.3f} on the class "
        f"model image; wrote {path}",
        flush=True,
    )
    return EXIT_OK
