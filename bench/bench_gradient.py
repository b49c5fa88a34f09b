"""Speed of salience's gradient methods on EfficientNet-Lite0, against autograd and Captum 0.9.

Run on an idle machine::

    python bench/bench_gradient.py --repeats 15
    python bench/bench_gradient.py --batch 1 4
    python bench/bench_gradient.py --quick          # smoke run: one repeat, fewer steps

Each row times salience and its peer on the same inputs and target (the predicted class).
Runs are interleaved, alternating which goes first, after one warm-up run of each; the table
gives the median wall time (``time.perf_counter``) and the ratio peer / salience (above 1:
salience is faster). The first row checks the cost of salience's checks and bookkeeping over
a hand-written ``torch.autograd.grad`` saliency: salience / hand-written must be <= 1.10.

Captum's GuidedBackprop and Deconvolution hook ``nn.ReLU`` modules only; EfficientNet-Lite0
uses ``nn.ReLU6``, so on this network they compute the plain gradient (a wrong map). They are
timed for reference only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

import salience
from salience import models

OVERHEAD_LIMIT = 1.10


def interleaved(
    runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each callable, run in turn (rotating the order) ``repeats`` times."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def batch_of(model: nn.Module, n: int) -> Tensor:
    """The cat photo (batch 1); for more, the cat and the coffee cup and their mirror images."""
    cat = model.preprocess(models.sample_image("chelsea"))
    if n == 1:
        return cat
    coffee = model.preprocess(models.sample_image("coffee"))
    pool = [cat, coffee, cat.flip(-1), coffee.flip(-1)]
    return torch.cat([pool[i % len(pool)] for i in range(n)])


def bench_batch(model: nn.Module, inputs: Tensor, args: argparse.Namespace) -> list[tuple]:
    from captum import attr as captum_attr

    with torch.no_grad():
        target = model(inputs).argmax(1)
    n = inputs.shape[0]
    repeats = args.repeats
    rows: list[tuple[str, float, float, str]] = []

    def hand_written() -> Tensor:
        x = inputs.detach().clone().requires_grad_(True)
        out = model(x)
        (grad,) = torch.autograd.grad(out.gather(1, target.view(-1, 1)).sum(), x)
        return grad

    def row(label: str, ours: Callable[[], object], peer: Callable[[], object], peer_label: str):
        t = interleaved({"ours": ours, "peer": peer}, repeats)
        rows.append((label, t["ours"], t["peer"], peer_label))

    row(
        "gradient",
        lambda: salience.gradient(model, inputs, target),
        hand_written,
        "hand-written torch.autograd.grad",
    )
    row(
        "gradient",
        lambda: salience.gradient(model, inputs, target),
        lambda: captum_attr.Saliency(model).attribute(inputs, target=target, abs=False),
        "Captum Saliency(abs=False)",
    )
    row(
        "input_x_gradient",
        lambda: salience.input_x_gradient(model, inputs, target),
        lambda: captum_attr.InputXGradient(model).attribute(inputs, target=target),
        "Captum InputXGradient",
    )
    row(
        "guided_backprop",
        lambda: salience.guided_backprop(model, inputs, target),
        lambda: captum_attr.GuidedBackprop(model).attribute(inputs, target=target),
        "Captum GuidedBackprop (wrong on ReLU6: plain gradient)",
    )
    row(
        "deconvnet",
        lambda: salience.deconvnet(model, inputs, target),
        lambda: captum_attr.Deconvolution(model).attribute(inputs, target=target),
        "Captum Deconvolution (wrong on ReLU6: plain gradient)",
    )

    steps = args.ig_steps
    candidates: list[int | None] = [None, 10]
    if steps * n > args.max_rows:  # one pass of all steps would need too much memory
        candidates.remove(None)
    ig = captum_attr.IntegratedGradients(model)
    peers = {
        f"captum_{b}": (
            lambda b=b: ig.attribute(
                inputs, target=target, n_steps=steps, method="gausslegendre", internal_batch_size=b
            )
        )
        for b in candidates
    }
    t = interleaved(
        {
            "ours": lambda: salience.integrated_gradients(
                model, inputs, target, steps=steps, quadrature="gausslegendre"
            ),
            **peers,
        },
        repeats,
    )
    best = min(candidates, key=lambda b: t[f"captum_{b}"])
    tried = ", ".join(f"{b}: {t[f'captum_{b}']:.3f} s" for b in candidates)
    rows.append(
        (
            f"integrated_gradients ({steps} steps, gausslegendre)",
            t["ours"],
            t[f"captum_{best}"],
            f"Captum IntegratedGradients, internal_batch_size={best} (tried {tried})",
        )
    )

    samples = args.sg_samples
    noise_level = 0.15
    stdev = noise_level * float(inputs.max() - inputs.min())
    noise_tunnel = captum_attr.NoiseTunnel(captum_attr.Saliency(model))
    row(
        f"smoothgrad ({samples} samples)",
        lambda: salience.smoothgrad(
            model, inputs, target, samples=samples, noise_level=noise_level
        ),
        lambda: noise_tunnel.attribute(
            inputs,
            nt_type="smoothgrad",
            nt_samples=samples,
            nt_samples_batch_size=args.nt_batch,
            stdevs=stdev,
            target=target,
            abs=False,
        ),
        f"Captum NoiseTunnel(Saliency), nt_samples_batch_size={args.nt_batch}",
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per method")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--ig-steps", type=int, default=50)
    parser.add_argument("--sg-samples", type=int, default=32)
    parser.add_argument("--nt-batch", type=int, default=8, help="Captum nt_samples_batch_size")
    parser.add_argument(
        "--max-rows",
        type=int,
        default=64,
        help="try Captum IG without internal_batch_size only up to this many rows per pass",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 repeat, 8 IG steps, 8 samples"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.ig_steps, args.sg_samples = 1, 8, 8
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    try:
        import captum
    except ImportError as exc:
        print(f"Captum is needed for this benchmark: {exc}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", module=r"captum\..*")
    torch.set_num_threads(args.threads)
    model = models.load("efficientnet_lite0")

    print(
        f"torch {torch.__version__}, captum {captum.__version__}, salience "
        f"{salience.__version__}; {torch.get_num_threads()} threads; median of "
        f"{args.repeats} interleaved runs after 1 warm-up{' (--quick)' if args.quick else ''}"
    )
    over = False
    for n in args.batch:
        inputs = batch_of(model, n)
        rows = bench_batch(model, inputs, args)
        print(f"\n### EfficientNet-Lite0, batch {n}, 224x224\n")
        print("| method | salience (s) | peer (s) | ratio (peer/ours) | peer |")
        print("|---|---:|---:|---:|---|")
        for label, ours, peer, peer_label in rows:
            print(f"| {label} | {ours:.4f} | {peer:.4f} | {peer / ours:.2f} | {peer_label} |")
        label, ours, hand, _ = rows[0]
        overhead = ours / hand
        verdict = "OK" if overhead <= OVERHEAD_LIMIT else "OVER THE LIMIT"
        over |= overhead > OVERHEAD_LIMIT
        print(
            f"\nsalience.gradient / hand-written autograd.grad = {overhead:.3f} "
            f"(limit {OVERHEAD_LIMIT:.2f}): {verdict}"
        )
    if over and not args.quick:
        print("\nnote: on a busy machine, rerun with more --repeats before drawing conclusions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
