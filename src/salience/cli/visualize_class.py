"""``salience visualize-class``: the class model image (Simonyan et al. 2013), or a unit's."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import EXIT_OK, CLIError, UsageError, _one_line, slug
from ._pipeline import load_pipeline, lookup_class


def cmd_visualize_class(args: argparse.Namespace) -> int:
    """``salience visualize-class``: the image that maximizes a class or a channel."""
    import torch
    from PIL import Image

    from .._io import save_png
    from ..features import channel, class_logit, class_model
    from ..features.class_model import _objective_values
    from ..layers import find_layer

    unit = args.layer is not None or args.channel is not None
    if unit and args.cls is not None:
        raise UsageError("give either a CLASS or --layer and --channel, not both")
    if unit and (args.layer is None or args.channel is None):
        raise UsageError("--layer and --channel go together: the channel of that layer")
    if not unit and args.cls is None:
        raise UsageError("give a CLASS (index or name), or --layer and --channel")
    if unit and args.channel < 0:
        raise UsageError(f"--channel must be a non-negative integer, got {args.channel}")
    pipe = load_pipeline(args)
    if unit:
        try:
            layer, _ = find_layer(pipe.model, args.layer)
        except ValueError as exc:
            raise UsageError(f"--layer: {_one_line(exc)}") from None
        objective = channel(layer, args.channel)
    else:
        index = lookup_class(args.cls, pipe)
        objective = class_logit(index)
    try:
        image = class_model(
            pipe.model,
            objective,
            steps=args.steps,
            lr=args.lr,
            l2=args.l2,
            jitter=args.jitter,
            blur_every=args.blur_every,
            blur_sigma=args.blur_sigma,
            param=args.param,
            size=pipe.input_size,
            seed=args.seed,
            progress=False if args.quiet else None,
        )
    except ValueError as exc:
        raise (UsageError if unit else CLIError)(_one_line(exc)) from None
    picture = Image.fromarray(pipe.to_image(image[0]))
    if unit:
        modules = [find_layer(pipe.model, objective.layer or "")]
        with torch.no_grad():
            value = float(_objective_values(pipe.model, [objective], modules, image)[0])
            start = float(
                _objective_values(pipe.model, [objective], modules, torch.zeros_like(image))[0]
            )
        path = Path(args.out) / f"unit.{slug(layer)}.{args.channel}.png"
        line = (
            f"{layer} channel {args.channel}: mean activation {value:.4g} on the image "
            f"({start:.4g} on the zero image)"
        )
    else:
        with torch.no_grad():
            probabilities = pipe.model(image).float().softmax(dim=1)[0]
        path = Path(args.out) / f"class_model.{pipe.file_label(index)}.png"
        p = float(probabilities[index])
        line = f"{pipe.name_of(index)} ({index}): p={p:.3f} on the class model image"
    try:
        save_png(picture, path)
    except OSError as exc:
        raise CLIError(f"{path}: cannot write ({exc.strerror or exc})") from None
    print(f"{line}; wrote {path}", flush=True)
    return EXIT_OK
