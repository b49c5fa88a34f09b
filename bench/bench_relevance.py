"""Speed of salience's relevance methods (DeepLIFT) against Captum 0.9, and cost over a gradient.

Run on an idle machine::

    python bench/bench_relevance.py --repeats 7
    python bench/bench_relevance.py --batch 1 8 --models vgg lite0
    python bench/bench_relevance.py --quick          # smoke run: one repeat

Each table times salience and its peer on the same model, inputs, reference (zeros) and
target (the predicted class). Runs are interleaved, rotating which goes first, after one
warm-up run of each; the table gives the median wall time (``time.perf_counter``) and the
ratio peer / salience (above 1: salience is faster). The conservation gap of each result,
``max |sum(A) - (S(x) - S(x0))| / (|S(x)| + |S(x0)|)``, is printed beside its time.

Budget: DeepLIFT is one forward pass on the reference (no graph) plus one forward and one
backward pass on the input with modified rules, so its time is compared with a plain gradient
plus a no-grad forward pass: ``deeplift / (gradient + forward)`` should be at most 1.3.

Models: ``vgg``, a VGG-style network (conv / ReLU / 2x2 max-pool blocks, widths 16-128,
an MLP head) with random weights, and ``lite0``, the pretrained EfficientNet-Lite0 (ReLU6:
Captum's DeepLift has no rule for it and computes gradient x input there, a wrong map that
is timed for reference only).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

import salience
from bench_gradient import batch_of, interleaved
from salience import models

BUDGET = 1.3


def vgg_style(classes: int = 1000) -> nn.Module:
    """A VGG-11-shaped network at a quarter of the widths, seeded (no download)."""
    layers: list[nn.Module] = []
    channels = 3
    for width in (16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M"):
        if width == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            assert isinstance(width, int)
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
    torch.manual_seed(0)
    model = nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(128 * 7 * 7, 512),
        nn.ReLU(),
        nn.Linear(512, classes),
    )
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.uniform_(m.bias, -0.1, 0.1)
    return model.eval()


def gap(attributions: Tensor, fx: Tensor, f0: Tensor) -> float:
    """Largest relative conservation gap of a batch of attributions."""
    delta = attributions.double().flatten(1).sum(1) - (fx.double() - f0.double())
    return float((delta.abs() / (fx.double().abs() + f0.double().abs())).max())


def bench_deeplift(model: nn.Module, inputs: Tensor, args: argparse.Namespace) -> list[str]:
    """Rows of the DeepLIFT table for one model and batch."""
    from captum import attr as captum_attr

    with torch.no_grad():
        target = model(inputs).argmax(1)
    base = torch.zeros_like(inputs)
    lift = captum_attr.DeepLift(model)

    def ours() -> salience.Attribution:
        return salience.deeplift(model, inputs, target)

    def reveal() -> salience.Attribution:
        return salience.deeplift(model, inputs, target, rule="reveal_cancel")

    def captum() -> Tensor:
        return lift.attribute(inputs, base, target=target)

    def gradient() -> salience.Attribution:
        return salience.gradient(model, inputs, target)

    def gradient_and_forward() -> None:
        salience.gradient(model, inputs, target)
        with torch.no_grad():
            model(base)

    t = interleaved(
        {
            "ours": ours,
            "reveal": reveal,
            "captum": captum,
            "gradient": gradient,
            "budget": gradient_and_forward,
        },
        args.repeats,
    )
    result, revealed = ours(), reveal()
    with torch.no_grad():
        rows = torch.arange(inputs.shape[0])
        fx, f0 = model(inputs)[rows, target], model(base)[rows, target]
    theirs = captum().detach()
    ours_gap, captum_gap = gap(result.values, fx, f0), gap(theirs, fx, f0)
    reveal_gap = gap(revealed.values, fx, f0)
    ratio = t["ours"] / t["budget"]
    verdict = "OK" if ratio <= BUDGET else "OVER"
    return [
        f"| deeplift (rescale) | {t['ours']:.4f} | {ours_gap:.1e} | {t['captum']:.4f} | "
        f"{captum_gap:.1e} | {t['captum'] / t['ours']:.2f} |",
        f"| deeplift (reveal_cancel) | {t['reveal']:.4f} | {reveal_gap:.1e} | — | — | — |",
        "",
        f"salience.gradient {t['gradient']:.4f} s; gradient + no-grad forward "
        f"{t['budget']:.4f} s; deeplift / (gradient + forward) = {ratio:.2f} "
        f"(target <= {BUDGET}): {verdict}; deeplift / gradient = "
        f"{t['ours'] / t['gradient']:.2f}; reveal_cancel / (gradient + forward) = "
        f"{t['reveal'] / t['budget']:.2f} (no target: Captum has no RevealCancel)",
    ]


SECTIONS: dict[str, Callable[[nn.Module, Tensor, argparse.Namespace], list[str]]] = {
    "deeplift": bench_deeplift,
}
HEADERS = {
    "deeplift": [
        "| method | salience (s) | gap | Captum DeepLift (s) | Captum gap | ratio (peer/ours) |",
        "|---|---:|---:|---:|---:|---:|",
    ],
}
MODELS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "vgg": ("VGG-style (random weights)", vgg_style),
    "lite0": ("EfficientNet-Lite0 (pretrained)", lambda: models.load("efficientnet_lite0")),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per method")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    try:
        import captum
    except ImportError as exc:
        print(f"Captum is needed for this benchmark: {exc}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", module=r"captum\..*")
    warnings.filterwarnings("ignore", message=".*did not already require gradients.*")
    warnings.filterwarnings("ignore", message=".*Setting forward, backward hooks.*")
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, captum {captum.__version__}, salience "
        f"{salience.__version__}; {torch.get_num_threads()} threads; median of "
        f"{args.repeats} interleaved runs after 1 warm-up{' (--quick)' if args.quick else ''}"
    )
    lite0 = models.load("efficientnet_lite0")  # for its preprocessing of the sample photos
    start = time.perf_counter()
    for key in args.models:
        label, build = MODELS[key]
        model = build()
        for n in args.batch:
            inputs = batch_of(lite0, n)
            for section in args.sections:
                print(f"\n### {section}: {label}, batch {n}, 224x224\n")
                print("\n".join(HEADERS[section]))
                print("\n".join(SECTIONS[section](model, inputs, args)))
    print(f"\n({time.perf_counter() - start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
