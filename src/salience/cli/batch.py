"""``salience batch``: every image of a folder or glob, every method, every map on disk."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ._common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PARTIAL,
    CLIError,
    UsageError,
    _err,
    _one_line,
    printable,
)
from ._options import method_options, parse_methods
from ._pipeline import Pipeline, load_pipeline, parse_targets


def default_workers(engine: str, cores: int | None = None) -> int:
    """``--workers`` when not given: loader processes (``local``) or Ray actors (``ray``).

    Loader processes compete with the model's threads for the cores: on two cores, Grad-CAM
    on EfficientNet-Lite0 ran 25–28 images/s with none against 15–18 with one or two
    (``bench/bench_batch.py``, 48 images, batch 8). Ray actors each run the model.
    """
    cores = cores if cores is not None else usable_cores()
    if engine == "local" and cores <= 2:
        return 0
    return min(4, cores)


def usable_cores() -> int:
    """Count the cores this process may run on (its affinity: ``taskset``, a cpuset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def cmd_batch(args: argparse.Namespace) -> int:
    """``salience batch``: stream the images through the methods into a store."""
    from ..batch import find_images, run

    methods = parse_methods(args.method, ["grad_cam"])
    options = method_options(args.option, methods, args.layer)
    try:
        files = find_images(_sample_files(args.images))
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    if not files:
        raise CLIError(f"no image files in {', '.join(args.images)}")
    pipe = load_pipeline(args)
    specs = parse_targets(args.target, pipe)
    if len(specs) != 1 or specs[0].top > 1:
        raise UsageError("batch explains one class per image: --target top1 or a class")
    target = specs[0].index  # None: the predicted class
    workers = args.workers if args.workers is not None else default_workers(args.engine)
    preprocess = _cpu_preprocess(pipe, args)
    if preprocess is None:
        preprocess, workers = pipe.preprocess, 0
    try:
        summary = run(
            pipe.model,
            files,
            methods,
            args.out,
            target=target,
            options=options,
            batch_size=args.batch_size,
            num_workers=workers,
            preprocess=preprocess,
            crop=pipe.crop,
            overlays=args.overlays,
            overlay_options={"percentile": args.percentile},
            max_pixels=args.max_pixels or None,
            device=pipe.device,
            progress=False if args.quiet else None,
            log=lambda line: _err(f"salience batch: error: {printable(line)}"),
            engine=args.engine,
            ray_address=args.ray_address,
        )
    except (ValueError, OSError, ImportError) as exc:  # a file as --out, a read-only store
        raise CLIError(_one_line(exc)) from None
    drawn = f", {summary.overlays} overlays drawn from them" if summary.overlays else ""
    print(
        f"{summary.written} maps written, {summary.skipped} already stored{drawn}, "
        f"{len(summary.failures)} failures; {summary.images} images in {summary.seconds:.1f} s "
        f"({summary.images_per_second:.2f} images/s); store: {os.fspath(summary.store.path)}",
        flush=True,
    )
    if summary.failures:
        _err(f"salience batch: {len(summary.failures)} failures (listed in failures.csv)")
        return EXIT_PARTIAL if summary.written or summary.skipped else EXIT_FAILURE
    return EXIT_OK


def _sample_files(images: list[str]) -> list[str]:
    """Replace each ``sample:NAME`` by the bundled photo's file, as ``explain`` opens it.

    The store reads its inputs from files (in the loader's workers): the bundled photo is one,
    inside the package. A file that exists under the name ``sample:NAME`` is kept.
    """
    from importlib import resources
    from pathlib import Path

    from .. import models

    files = []
    for text in images:
        if not text.startswith("sample:") or os.path.exists(text):
            files.append(text)
            continue
        name = text.partition(":")[2].strip().lower()
        if name not in models.sample_images():
            known = ", ".join(f"sample:{n}" for n in models.sample_images())
            raise CLIError(f"{text}: unknown sample image; expected one of {known}")
        resource = resources.files("salience").joinpath("data").joinpath(models._SAMPLES[name])
        if not isinstance(resource, Path):  # a zipped install: no file to hand the loader
            raise CLIError(f"{text}: the bundled photo is not a file here; give its path instead")
        files.append(os.fspath(resource))
    return files


def _cpu_preprocess(pipe: Pipeline, args: argparse.Namespace) -> Any:
    """Return a preprocess giving CPU tensors, safe in loader workers; ``None`` if unknown."""
    import torch

    if torch.device(pipe.device).type == "cpu":
        return pipe.preprocess
    from ..models import preprocess_image

    model = pipe.model
    size = getattr(model, "input_size", None) or pipe.input_size
    resize = getattr(model, "resize_size", None) or max(
        args.resize or round(pipe.input_size[0] * 256 / 224), pipe.input_size[0]
    )
    if pipe.mean is None or pipe.std is None:
        return None
    mean, std = tuple(pipe.mean), tuple(pipe.std)

    def preprocess(image: Any) -> Any:
        return preprocess_image(image, size=size, resize=resize, mean=mean, std=std)

    return preprocess
