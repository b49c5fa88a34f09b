"""Throughput of a dataset run (`salience batch`): images per second, end to end.

    python bench/bench_batch.py                                # CPU, 64 images, 2 workers
    python bench/bench_batch.py --device cuda --images 512 --batch-size 32 --workers 8

Writes ``--images`` JPEG files (the bundled cat and coffee photos, mirrored and cropped: 64
different images, repeated beyond) into a temporary folder and runs :func:`salience.batch.run`
on them with EfficientNet-Lite0, one method at a time (Grad-CAM; Integrated Gradients with 32
steps), into a fresh store each: decoding, resizing and preprocessing in the loader's workers,
the method, and the compressed maps written (the run's own clock, ``BatchSummary.seconds``).
Each row gives the run's images per second (and per core the process may use, on the CPU), and
the method alone on the same batches already in memory (the part of the run that is not
reading and writing). The first run of each method is a warm-up on a few images (model
loading, the first call's caches), not counted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import torch
from PIL import Image, ImageOps

import salience
from salience import batch, models

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite import machine

METHODS = {"grad_cam": {}, "integrated_gradients": {"steps": 32}}


def write_images(folder: str, count: int) -> list[str]:
    """``count`` distinct JPEG files made from the bundled photos: their paths."""
    photos = [models.sample_image(name) for name in ("chelsea", "coffee")]
    paths = []
    for i in range(count):
        image = photos[i % 2]
        if (i // 2) % 2:
            image = ImageOps.mirror(image)
        side = min(image.size) - 4 * (i // 4 % 16)  # a different square crop each
        image = ImageOps.fit(image, (side, side), Image.Resampling.BILINEAR)
        path = os.path.join(folder, f"img_{i:05d}.jpg")
        image.convert("RGB").save(path, quality=90)
        paths.append(path)
    return paths


def method_alone(model: torch.nn.Module, paths: list[str], method: str, args) -> float:
    """Images per second of the method alone on the run's batches, already on the device."""
    rows = [model.preprocess(Image.open(p).convert("RGB")) for p in paths]
    batches = [
        torch.cat(rows[i : i + args.batch_size]) for i in range(0, len(rows), args.batch_size)
    ]
    batches = [b.to(args.device) for b in batches]
    salience.explain(model, batches[0], method, **METHODS[method])  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for b in batches:
        salience.explain(model, b, method, **METHODS[method])
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(rows) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model = models.load("efficientnet_lite0").to(args.device)
    device = torch.device(args.device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{machine(device)}, device {device}; {args.images} images, batch {args.batch_size}, "
          f"{args.workers} loader workers")  # fmt: skip
    print("| method | run: images/s | per core | method alone: images/s | run / alone |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        images = os.path.join(folder, "images")
        os.makedirs(images)
        paths = write_images(images, args.images)
        for method in args.methods:
            options = {method: METHODS[method]}
            common = dict(
                methods=[method], options=options, batch_size=args.batch_size,
                num_workers=args.workers, device=args.device, progress=False,
            )  # fmt: skip
            batch.run(model, paths[: args.batch_size], out=os.path.join(folder, f"warm-{method}"),
                      **common)  # fmt: skip
            summary = batch.run(model, images, out=os.path.join(folder, f"s-{method}"), **common)
            if summary.failures:
                print(f"failures: {summary.failures[:3]}")
            run_rate = summary.images_per_second
            alone = method_alone(model, paths, method, args)
            per_core = f"{run_rate / cores:.2f}" if device.type == "cpu" else ""
            print(f"| {method} {METHODS[method] or ''} | {run_rate:.2f} | {per_core} | "
                  f"{alone:.2f} | {run_rate / alone:.2f} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
