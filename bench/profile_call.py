"""Where a call's time goes in Python: cProfile of repeated calls of one method at batch 1.

    python bench/profile_call.py --device cuda                  # Lite0, the gradient, 224²
    python bench/profile_call.py --model thin --method grad_cam

Prints the functions of salience by their own time and by their cumulative time, per call,
and the profiled call's time beside a hand-written forward + backward pass profiled the same
way (the profiler slows every Python function, so read the rows against each other, not
against ``bench_overhead.py``'s figures). Nothing is written to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import salience
from bench_overhead import model_and_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="lite0")
    parser.add_argument("--method", default="gradient")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    model, size = model_and_size(args.model, args.size)
    model = model.to(device)
    x = torch.rand(1, 3, size, size, device=device)
    target = torch.tensor([3], device=device)
    method = getattr(salience, args.method)

    def bare() -> None:
        leaf = x.detach().clone().requires_grad_(True)
        torch.autograd.grad(model(leaf).gather(1, target[:, None]).sum(), leaf)

    def call() -> None:
        method(model, x, target=target)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(20):
        bare(), call()
    sync()
    per_call = {}
    profiles = {}
    for name, run in (("bare pass", bare), (args.method, call)):
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        for _ in range(args.calls):
            run()
            sync()
        profile.disable()
        per_call[name] = (time.perf_counter() - start) / args.calls
        profiles[name] = profile
    print(f"{args.model}, {args.method}, {device}, {size}², batch 1, {args.calls} calls, profiled:")
    for name, seconds in per_call.items():
        print(f"  {name}: {seconds * 1e3:.2f} ms per call")
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        stats = pstats.Stats(profiles[args.method], stream=text)
        stats.sort_stats(order).print_stats("salience", args.rows)
        print(f"\n-- salience's functions by {order} (seconds over {args.calls} calls)")
        print(text.getvalue().split("\n\n", 2)[-1].rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
