"""Metric speed, side by side in one run: salience vs Quantus 0.6 on the same model and maps.

    PYTHONPATH=/path/to/quantus python bench/bench_metrics.py [--repeats 3] [--threads 2]
        [--samples 50] [--lite0 [--lite0-steps 48] [--lite0-samples 10] [--skip-vgg]]

Without quantus only salience's own figures are printed. Contenders run in turn, after one
warm-up call each; the median of ``--repeats`` is reported. Measured:

1. **Deletion** (Petsiuk et al. 2018; Quantus ``PixelFlipping``): zeros substrate, softmax
   probability of the predicted class, the same ``(N, H, W)`` maps (gradient maps), the same
   number of forward passes. Quantus flips ``features_in_step`` elements of ``(C, H, W)``
   and asks that step to divide ``H * W``, so with 3 channels its steps cannot hold whole
   pixels: both take ``steps = 3 H W / f`` steps (``f`` elements per Quantus step, ``f / 3``
   pixels per step for salience), the same number of forward passes. The curves then differ
   only by the partial pixels at step boundaries; their largest difference is printed.
   Insertion costs salience exactly what deletion costs; Quantus 0.6 has no insertion.
2. **Max-sensitivity** (Yeh et al. 2019; Quantus ``MaxSensitivity``): ``samples`` uniform
   draws in an L∞ ball of radius 0.1, the gradient map explained by salience in both (Quantus
   is given ``salience.gradient`` as its ``explain_func`` and replays salience's draws), so
   the figures agree and the difference is in how the draws are batched.

Models: a VGG-style CNN at 3x32x32 (8 images) and, with ``--lite0``, the pretrained
EfficientNet-Lite0 at 3x224x224 (2 images).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

import salience as sl
from salience.metrics import deletion, max_sensitivity

try:
    import quantus
except ImportError:  # pragma: no cover - optional
    quantus = None
else:
    if not hasattr(np, "trapz"):  # Quantus 0.6 calls np.trapz, removed in NumPy 2.4
        np.trapz = np.trapezoid  # type: ignore[attr-defined]


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, tuple[float, Any]]:
    """Return ``{name: (median seconds, last result)}``, one warm-up call each, run in turn."""
    results: dict[str, Any] = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in fns}


class VGG32(nn.Module):
    """VGG-style: three conv blocks (conv-ReLU-conv-ReLU-pool) and an MLP, for 3x32x32."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in (32, 64, 128):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=True)]
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 4 * 4, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def explain_gradient(model: nn.Module, inputs: Any, targets: Any, **kwargs: Any) -> np.ndarray:
    """Quantus's ``explain_func``: salience's gradient map of its NumPy inputs."""
    x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
    t = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    return sl.gradient(model, x, t).saliency().numpy()


def replay(radius: float, seed: int, shape: tuple[int, ...]) -> Callable[..., np.ndarray]:
    """A Quantus ``perturb_func`` adding salience's draws, in salience's order."""
    gen = torch.Generator().manual_seed(seed)

    def perturb(arr: np.ndarray, indices: np.ndarray, **kwargs: Any) -> np.ndarray:
        u = torch.rand(shape, generator=gen, dtype=torch.float64).numpy().reshape(1, -1)
        return arr + (2 * u - 1) * radius

    return perturb


def bench(
    name: str, model: nn.Module, x: torch.Tensor, steps: int, samples: int, reps: int
) -> None:
    n, c, h, w = x.shape
    with torch.no_grad():
        y = model(x).argmax(1)
    maps = sl.gradient(model, x, y).saliency()
    features = c * h * w // steps
    if features * steps != c * h * w or (h * w) % features:
        raise SystemExit(f"steps must be C*H*W/f with f dividing H*W (Quantus); got {steps}")
    print(f"\n## {name}: {n} x {tuple(x.shape[1:])}, deletion with {steps} steps "
          f"({features} elements = {features / c:.3g} pixels per step)\n")  # fmt: skip
    print("| metric | salience | Quantus 0.6 | salience faster by | agreement |")
    print("|---|---|---|---|---|")

    fns: dict[str, Callable[[], Any]] = {
        "ours": lambda: deletion(model, x, maps, y, steps=steps, substrate="zeros").curve
    }
    if quantus is not None:
        flip = quantus.PixelFlipping(
            features_in_step=features, perturb_baseline=0.0, normalise=False, disable_warnings=True
        )
        kw = {"model": model, "x_batch": x.numpy(), "y_batch": y.numpy(),
              "a_batch": maps[:, None].numpy()}  # fmt: skip
        fns["quantus"] = lambda: np.asarray(flip(**kw))
    t = interleaved(fns, reps)
    _row("deletion", t, lambda a, b: f"max curve diff {np.abs(a[:, 1:].numpy() - b).max():.2g}")

    radius, seed = 0.1, 0
    fns = {
        "ours": lambda: max_sensitivity(model, x, "gradient", radius, samples=samples, seed=seed)
    }
    if quantus is not None:

        def run_quantus() -> np.ndarray:
            metric = quantus.MaxSensitivity(
                nr_samples=samples, lower_bound=radius, disable_warnings=True,
                perturb_func=replay(radius, seed, tuple(x.shape[1:])),
            )  # fmt: skip
            return np.asarray(
                metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(),
                       explain_func=explain_gradient, device="cpu")
            )  # fmt: skip

        fns["quantus"] = run_quantus
    t = interleaved(fns, reps)
    _row(
        f"max-sensitivity ({samples} draws)",
        t,
        lambda a, b: f"max rel diff {np.abs(a.max.numpy() / b - 1).max():.1e}",
    )


def _row(label: str, t: dict[str, tuple[float, Any]], agree: Callable[[Any, Any], str]) -> None:
    ours, ours_res = t["ours"]
    if "quantus" in t:
        theirs, res = t["quantus"]
        print(f"| {label} | {ours * 1000:.0f} ms | {theirs * 1000:.0f} ms | "
              f"{theirs / ours:.1f}x | {agree(ours_res, res)} |")  # fmt: skip
    else:
        print(f"| {label} | {ours * 1000:.0f} ms | (quantus missing) | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=50, help="max-sensitivity draws")
    parser.add_argument("--lite0", action="store_true", help="also EfficientNet-Lite0 at 224")
    parser.add_argument("--lite0-steps", type=int, default=48, help="3HW/f, f dividing HW")
    parser.add_argument("--lite0-samples", type=int, default=10)
    parser.add_argument("--skip-vgg", action="store_true", help="only EfficientNet-Lite0")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, numpy {np.__version__}, {args.threads} threads, "
          f"quantus {getattr(quantus, '__version__', 'missing')}; median of {args.repeats} "
          "after a warm-up")  # fmt: skip

    torch.manual_seed(0)
    vgg = VGG32().eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    if not args.skip_vgg:
        bench("VGG-style CNN", vgg, x, steps=96, samples=args.samples, reps=args.repeats)

    if args.lite0:
        from salience import models

        lite0 = models.load("efficientnet_lite0")
        img = lite0.preprocess(models.sample_image("chelsea"))
        x2 = torch.cat([img, img.flip(-1)])
        bench("EfficientNet-Lite0", lite0, x2, steps=args.lite0_steps,
              samples=args.lite0_samples, reps=args.repeats)  # fmt: skip


if __name__ == "__main__":
    main()
