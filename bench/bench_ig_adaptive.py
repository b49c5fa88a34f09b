"""Integrated Gradients completeness on a real network: fixed rules against the adaptive path.

EfficientNet-Lite0 and the bundled cat photo. For each class, prints the completeness gap
|sum(IG) - (S(x) - S(x'))| / |S(x) - S(x')|, the gradient evaluations used and the wall time,
for Captum's Gauss-Legendre rule, our fixed rules, and ``tolerance=0.01``.

    python bench/bench_ig_adaptive.py [--classes 281 282 285] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import salience
from salience import models


def gap(result: salience.Attribution) -> float:
    change = (result.scores - result.extras["baseline_scores"]).abs()
    return float(result.extras["delta"].abs() / change)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[281, 282, 285])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--uniform", type=int, nargs="+", default=[64, 128, 256, 512])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = models.load("efficientnet_lite0")
    x = model.preprocess(models.sample_image("chelsea"))
    try:
        from captum.attr import IntegratedGradients
    except ImportError:
        IntegratedGradients = None

    print(f"torch {torch.__version__}, {args.threads} threads, EfficientNet-Lite0, cat photo\n")
    print("| class | method | gradient evaluations | completeness gap | time (s) |")
    print("|---|---|---:|---:|---:|")
    for c in args.classes:
        name = model.class_names[c]
        rows: list[tuple[str, int, float, float]] = []
        if IntegratedGradients is not None:
            t = time.perf_counter()
            _, delta = IntegratedGradients(model).attribute(
                x, target=c, n_steps=64, internal_batch_size=10, return_convergence_delta=True
            )
            elapsed = time.perf_counter() - t
            ours = salience.integrated_gradients(model, x, target=c, steps=1)
            change = float((ours.scores - ours.extras["baseline_scores"]).abs())
            rows.append(("Captum, 64 Gauss-Legendre", 64, float(delta.abs()) / change, elapsed))
        for label, options in [("salience, 64 Gauss-Legendre", {"steps": 64})] + [
            (f"salience, {n} uniform (trapezoid)", {"steps": n, "quadrature": "riemann_trapezoid"})
            for n in args.uniform
        ]:
            t = time.perf_counter()
            r = salience.integrated_gradients(model, x, target=c, **options)
            rows.append((label, int(r.extras["steps"]), gap(r), time.perf_counter() - t))
        t = time.perf_counter()
        r = salience.integrated_gradients(model, x, target=c, tolerance=0.01, steps=16)
        rows.append(
            ("salience, tolerance=0.01", int(r.extras["steps"]), gap(r), time.perf_counter() - t)
        )
        for label, steps, g, s in rows:
            print(f"| {c} {name} | {label} | {steps} | {100 * g:.2f} % | {s:.1f} |")


if __name__ == "__main__":
    main()
