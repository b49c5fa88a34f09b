"""Occlusion on the CPU: salience.occlusion against Captum's Occlusion, same answer, same run.

Window 16, stride 8 on 224 x 224 inputs (27 x 27 = 729 windows per image), fill zeros, the
predicted class, on two networks:

- a VGG-style network with random weights (3x3 convolutions and max-pooling, most of its work
  at full and half resolution);
- the pretrained EfficientNet-Lite0 on the bundled cat photo (batch 1; larger batches repeat
  the photo with flips).

Captum runs at each ``perturbations_per_eval`` of ``--ppe`` (its best is reported),
salience with its default rows per pass (and ``--rows`` if given), with full forward passes
and with exact incremental inference (:mod:`salience.methods.incremental`). The maps are
compared in the same run (max absolute difference to salience's full-pass map, relative to
its max) and the speed ratios are printed.

    python bench/bench_perturbation.py [--threads 1] [--batch 1] [--ppe 8 32 64]
        [--models vgg lite0] [--repeats 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

import salience
from salience import models

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


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    assert out is not None
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ppe", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--rows", type=int, nargs="*", default=[], help="extra batch_size")
    parser.add_argument("--models", nargs="+", default=["vgg", "lite0"])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from captum.attr import Occlusion

    print(
        f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, window "
        f"{WINDOW}, stride {STRIDE}, 224 x 224 (729 windows per image)\n"
    )
    print("| model | run | time (s) | max abs diff / max abs map |")
    print("|---|---|---:|---:|")
    for name in args.models:
        model, x = (vgg_case if name == "vgg" else lite0_case)(args.batch)
        bench(name, model, x, args.ppe, args.rows, args.repeats, Occlusion)


def bench(
    name: str,
    model: nn.Module,
    x: torch.Tensor,
    ppes: list[int],
    extra_rows: list[int],
    repeats: int,
    occlusion_cls: type,
) -> None:
    """Time Captum at each ``perturbations_per_eval`` and salience; print the table rows."""
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

    def ours(rows: int | None, incremental: bool) -> torch.Tensor:
        return salience.occlusion(
            model,
            x,
            target,
            window=WINDOW,
            stride=STRIDE,
            batch_size=rows,
            incremental=incremental,
        ).values

    results: dict[str, tuple[float, torch.Tensor]] = {}
    for ppe in ppes:
        results[f"Captum, perturbations_per_eval={ppe}"] = timed(partial(captum, ppe), repeats)
    for incremental in (False, True):
        for rows in [None, *extra_rows]:
            label = f"salience, incremental={incremental}, batch_size={rows if rows else 'auto'}"
            results[label] = timed(partial(ours, rows, incremental), repeats)
    reference = next(v for k, v in results.items() if k.startswith("salience"))[1]
    scale = float(reference.abs().max())
    for label, (seconds, values) in results.items():
        diff = float((values - reference).abs().max()) / scale
        print(f"| {name} | {label} | {seconds:.1f} | {diff:.1e} |", flush=True)
    captum_best = min(s for k, (s, _) in results.items() if k.startswith("Captum"))
    for mode in ("False", "True"):
        ours_best = min(s for k, (s, _) in results.items() if f"incremental={mode}" in k)
        print(
            f"| {name} | **speed-up vs Captum's best, incremental={mode}** | "
            f"**{captum_best / ours_best:.2f}x** | |"
        )


if __name__ == "__main__":
    main()
