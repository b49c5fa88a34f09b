"""Occlusion on the CPU: salience.occlusion against Captum's Occlusion, same answer, same run.

Window 16, stride 8 on 224 x 224 inputs (27 x 27 = 729 windows per image), fill zeros, the
predicted class, on two networks:

- a VGG-style network with random weights (3x3 convolutions and max-pooling, most of its work
  at full and half resolution);
- the pretrained EfficientNet-Lite0 on the bundled cat photo (batch 1; larger batches repeat
  the photo with flips).

Captum runs at each ``perturbations_per_eval`` of ``--ppe`` (its best is reported),
salience with its default rows per pass (and ``--rows`` if given), with full forward passes,
with exact incremental inference (:mod:`salience.methods.incremental`) and in Krypton's
approximate modes (``approximate=``: projective-field thresholding ``tau``, adaptive
drill-down). The runs are interleaved (``--repeats`` rounds, each run once per round; the
median is reported) so that a shared machine's load hits all of them alike. The maps are
compared in the same run: exact ones by the max absolute difference to salience's full-pass
map (relative to its max), approximate ones against the exact map (max absolute difference
relative to its max, and the mean SSIM of :func:`salience.metrics.similarity.ssim`).

    python bench/bench_perturbation.py [--threads 1] [--batch 1 8] [--ppe 1 8 32]
        [--models vgg lite0] [--repeats 3] [--no-approximate] [--no-full]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

import salience
from salience import models
from salience.metrics.similarity import ssim

WINDOW, STRIDE = 16, 8


class VGGStyle(nn.Module):
    """Conv-ReLU pairs and max-pooling down to 28 x 28, then a global-average head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (16, 16, "M", 32, 32, "M", 64, 64, "M"):
            if c_out == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, int(c_out), 3, padding=1), nn.ReLU(inplace=True)]
                c_in = int(c_out)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def vgg_case(batch: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = VGGStyle().eval()
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return model, x


def lite0_case(batch: int) -> tuple[nn.Module, torch.Tensor]:
    model = models.load("efficientnet_lite0")
    x = model.preprocess(models.sample_image("chelsea"))
    views = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
    return model, torch.cat([views[i % 4] for i in range(batch)])


APPROXIMATE: list[dict[str, float]] = [
    {"tau": 0.5},
    {"tau": 0.9},
    {"drill_down": 0.25},
    {"tau": 0.9, "drill_down": 0.25},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--ppe", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rows", type=int, nargs="*", default=[], help="extra batch_size")
    parser.add_argument("--models", nargs="+", default=["vgg", "lite0"])
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds")
    parser.add_argument("--no-approximate", action="store_true")
    parser.add_argument("--no-full", action="store_true", help="skip salience's full passes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from captum.attr import Occlusion

    print(
        f"torch {torch.__version__}, {args.threads} thread(s), window {WINDOW}, stride "
        f"{STRIDE}, 224 x 224 (729 windows per image), {args.repeats} interleaved round(s), "
        f"median times; {os.cpu_count()} CPUs, load average at start "
        f"{os.getloadavg()[0]:.2f}\n"
    )
    print(
        "| model | batch | run | time (s) | vs Captum's best | max abs diff / max abs map "
        "| SSIM to exact |"
    )
    print("|---|---:|---|---:|---:|---:|---:|")
    specs = [] if args.no_approximate else APPROXIMATE
    for batch in args.batch:
        for name in args.models:
            model, x = (vgg_case if name == "vgg" else lite0_case)(batch)
            bench(name, model, x, args.ppe, args.rows, args.repeats, Occlusion, specs, args.no_full)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


def bench(
    name: str,
    model: nn.Module,
    x: torch.Tensor,
    ppes: list[int],
    extra_rows: list[int],
    repeats: int,
    occlusion_cls: type,
    specs: list[dict[str, float]],
    no_full: bool = False,
) -> None:
    """Time Captum at each ``perturbations_per_eval`` and salience, interleaved; print rows."""
    with torch.no_grad():
        target = model(x).argmax(1)
    c = x.shape[1]

    def captum(ppe: int) -> torch.Tensor:
        with torch.no_grad():
            return occlusion_cls(model).attribute(
                x,
                sliding_window_shapes=(c, WINDOW, WINDOW),
                strides=(c, STRIDE, STRIDE),
                target=target,
                perturbations_per_eval=ppe,
            )

    def ours(rows: int | None, incremental: bool, approximate: dict | None = None) -> Any:
        return salience.occlusion(
            model,
            x,
            target,
            window=WINDOW,
            stride=STRIDE,
            batch_size=rows if rows else "auto",
            incremental=incremental,
            approximate=approximate,
        )

    runs: dict[str, Callable[[], Any]] = {}
    for ppe in ppes:
        runs[f"Captum, perturbations_per_eval={ppe}"] = partial(captum, ppe)
    for incremental in (True,) if no_full else (False, True):
        for rows in [None, *extra_rows]:
            label = f"salience, incremental={incremental}, batch_size={rows if rows else 'auto'}"
            runs[label] = partial(ours, rows, incremental)
    for spec in specs:
        runs[f"salience, approximate={spec}"] = partial(ours, None, True, spec)
    times: dict[str, list[float]] = {label: [] for label in runs}
    outs: dict[str, Any] = {}
    for _ in range(repeats):  # interleaved: every run once per round
        for label, fn in runs.items():
            start = time.perf_counter()
            outs[label] = fn()
            times[label].append(time.perf_counter() - start)
    median = {label: statistics.median(t) for label, t in times.items()}
    maps = {k: (v if isinstance(v, torch.Tensor) else v.values) for k, v in outs.items()}
    exact = maps["salience, incremental=True, batch_size=auto"]
    reference = maps.get("salience, incremental=False, batch_size=auto", exact)
    scale = float(reference.abs().max())
    captum_best = min(t for k, t in median.items() if k.startswith("Captum"))
    exact_time = median["salience, incremental=True, batch_size=auto"]
    n = x.shape[0]
    for label, seconds in median.items():
        ratio = f"{captum_best / seconds:.2f}x"
        if "approximate" in label:
            diff = float((maps[label] - exact).abs().max()) / float(exact.abs().max())
            record = outs[label].extras["approximate"]
            done = outs[label].extras["windows_evaluated"].float().mean()
            similar = float(ssim(maps[label][:, 0], exact[:, 0]).mean())
            label += (
                f" ({done:.0f} of {record['windows']} windows, recomputed "
                f"{_fraction(record['recomputed_fraction'])}; "
                f"{exact_time / seconds:.2f}x our exact)"
            )
            print(
                f"| {name} | {n} | {label} | {seconds:.2f} | {ratio} | {diff:.1e} | {similar:.3f} |"
            )
        else:
            diff = float((maps[label] - reference).abs().max()) / scale
            print(
                f"| {name} | {n} | {label} | {seconds:.2f} | {ratio} | {diff:.1e} | |", flush=True
            )
    print(f"<!-- {name} batch {n}: load average {os.getloadavg()[0]:.2f} -->", flush=True)


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} of exact"


if __name__ == "__main__":
    main()
