"""Speed settings on EfficientNet-Lite0: eager vs channels-last vs torch.compile.

    python bench/bench_performance.py                       # CPU, 1 thread, batch 1 and 8
    python bench/bench_performance.py --threads 2 --repeats 5
    python bench/bench_performance.py --device cuda --compile-mode reduce-overhead
    python bench/bench_performance.py --quick               # smoke run: batch 1, 8 IG steps

For each batch size and method (the vanilla gradient, Integrated Gradients with ``--steps``
steps), the same call runs eagerly, under ``salience.performance(channels_last=True)`` and
under ``salience.performance(compile=...)`` (inductor, ``--compile-mode`` if given). The first
call of each setting is timed alone (for compile it includes compiling the forward and
backward graphs for every chunk shape the method uses); then the settings run in turn,
rotating the order, ``--repeats`` times, and the table gives the median wall time
(``time.perf_counter``; CUDA synchronized). ``rel diff`` is the max-abs difference of the map
from the eager one, over the eager map's max-abs value, and ``corr`` their Pearson correlation:
the settings must not change maps beyond float rounding. ``1-ulp floor`` is what float
rounding alone does to the eager map: the largest ``rel diff`` of the eager map of the inputs
perturbed by about one ulp (``x + |x| 1.2e-7 noise``, two draws). A ReLU6 network's gradient is
a discontinuous function of its activations: one gate flipped by rounding moves a patch of
the map, so the floor is far above 1e-7. The run fails (exit 1) when a map correlates below
0.9999 with the eager one. The compiled model is cached per model and setting, so the gradient
rows' compile is partly reused by Integrated Gradients (other shapes compile again).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

import salience
from salience import models

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite import machine


def batch_of(model: nn.Module, n: int) -> Tensor:
    """The cat photo and the coffee cup and their mirror images, repeated to ``n`` rows."""
    pool = [model.preprocess(models.sample_image(s)) for s in ("chelsea", "coffee")]
    pool += [p.flip(-1) for p in pool]
    return torch.cat([pool[i % len(pool)] for i in range(n)])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def rel_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def corr(a: Tensor, b: Tensor) -> float:
    pair = torch.stack([a.flatten().double(), b.flatten().double()])
    return float(torch.corrcoef(pair)[0, 1])


def ulp_floor(call: Callable[[Tensor], salience.Attribution], x: Tensor, ref: Tensor) -> float:
    """The largest rel diff of the eager map of ``x`` perturbed by about one ulp (two draws)."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(2):
        noise = torch.randn(x.shape, generator=gen).to(x.device)
        worst = max(worst, rel_diff(call(x + x.abs() * 1.2e-7 * noise).values, ref))
    return worst


def settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    compile_: Any = args.compile_mode or True
    out: dict[str, dict[str, Any]] = {
        "eager": {},
        "channels_last": {"channels_last": True},
        "compile": {"compile": compile_},
    }
    if args.both:
        out["compile+channels_last"] = {"compile": compile_, "channels_last": True}
    return out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    model = models.load("efficientnet_lite0").to(device)
    rows: list[dict[str, Any]] = []
    for n in args.batch:
        x = batch_of(model, n).to(device)
        with torch.no_grad():
            target = model(x).argmax(1)
        methods: dict[str, Callable[[Tensor], salience.Attribution]] = {
            "gradient": lambda x, t=target: salience.gradient(model, x, t),
            "integrated_gradients": lambda x, t=target: salience.integrated_gradients(
                model, x, t, steps=args.steps, batch_size=args.ig_batch
            ),
        }
        for method, on in methods.items():
            call = partial(on, x)
            variants = settings(args)
            first: dict[str, float] = {}
            maps: dict[str, Tensor] = {}
            compiled: dict[str, bool] = {}
            for name, kwargs in variants.items():
                with salience.performance(**kwargs):
                    seconds, result = timed(call, device)
                first[name] = seconds
                maps[name] = result.values
                compiled[name] = bool(result.extras.get("performance", {}).get("compiled"))
            times: dict[str, list[float]] = {name: [] for name in variants}
            names = list(variants)
            for i in range(args.repeats):
                shift = i % len(names)
                for name in names[shift:] + names[:shift]:
                    with salience.performance(**variants[name]):
                        seconds, result = timed(call, device)
                    times[name].append(seconds)
                    maps[name] = result.values
            base = statistics.median(times["eager"])
            floor = ulp_floor(on, x, maps["eager"])
            for name in names:
                median = statistics.median(times[name])
                rows.append(
                    {
                        "batch": n,
                        "method": method,
                        "setting": name,
                        "first": first[name],
                        "median": median,
                        "speedup": base / median,
                        "rel_diff": rel_diff(maps[name], maps["eager"]),
                        "corr": corr(maps[name], maps["eager"]),
                        "floor": floor,
                        "compiled": compiled[name],
                    }
                )
                print(format_row(rows[-1]), flush=True)
    return rows


HEADER = (
    "| batch | method | setting | first call (s) | median (s) | eager / setting | rel diff "
    "| 1-ulp floor | corr |\n|---:|---|---|---:|---:|---:|---:|---:|---:|"
)


def format_row(r: dict[str, Any]) -> str:
    setting = r["setting"] + ("" if r["compiled"] or "compile" not in r["setting"] else " (eager!)")
    return (
        f"| {r['batch']} | {r['method']} | {setting} | {r['first']:.2f} | {r['median']:.3f} | "
        f"{r['speedup']:.2f}x | {r['rel_diff']:.1e} | {r['floor']:.1e} | {r['corr']:.7f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=50, help="Integrated Gradients steps")
    parser.add_argument("--ig-batch", type=int, default=None,
                        help="rows per pass of Integrated Gradients (default: 'auto')")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")  # fmt: skip
    parser.add_argument("--both", action="store_true", help="also compile + channels-last")
    parser.add_argument("--quick", action="store_true", help="batch 1, 8 steps, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.repeats = [1], 8, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# {machine(device)}")
    print(f"# Integrated Gradients: {args.steps} steps; median of {args.repeats} runs")
    print(HEADER, flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = run(args)
    worst = min(r["corr"] for r in rows)
    print(f"\nlowest correlation with the eager map: {worst:.7f}")
    return 0 if worst > 0.9999 else 1


if __name__ == "__main__":
    sys.exit(main())
