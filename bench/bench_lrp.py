"""Speed of salience's LRP against Captum 0.9's LRP, Zennit 0.5 and salience's plain gradient.

Run on an idle machine::

    python bench/bench_lrp.py --repeats 15 --batch 1 8
    python bench/bench_lrp.py --quick            # smoke run: one repeat, 64x64 inputs
    python bench/bench_lrp.py --device cuda
    .venv-peers/bin/python bench/bench_lrp.py    # Zennit rows (peers' environment)

On a VGG-style network (conv / ReLU / max-pool blocks, an MLP head, 224x224 inputs), every row
times, on the same inputs and targets: salience's LRP (ε everywhere, the ``"epsilon"``
composite, which is what Captum computes; the default ``"epsilon_plus"``: z⁺ on
convolutions; ``"epsilon_gamma_box"``), Captum's ``LRP`` (ε = 1e-9 on every layer), Zennit's
``Gradient`` attributor with the same rules (ε = 1e-6 everywhere, and z⁺ on convolutions with
``zero_params="bias"``, as the papers and salience leave the bias out of z⁺; the answers are
compared in the same run) and ``salience.gradient``. Runs are
interleaved after a warm-up; the table gives the median time (wall, or with ``--clock cpu`` the
process's CPU time, steadier on a shared machine) and the ratios. The target
is LRP ≤ 1.3 x the gradient's time: LRP is one forward and one backward pass. On the pretrained
EfficientNet-Lite0 (where Captum's LRP raises) LRP is timed against the gradient and Zennit,
whose BatchNorms are merged with a canonizer that pairs each convolution with its BatchNorm by
name (Zennit's ``SequentialMergeBatchNorm`` finds no pair there: the convolutions have a
padding child); without it Zennit's ε relevance is NaN, which the run prints. There the
timings compare the same rules, not the same answers: Zennit's ε explodes (sum ~1e16) and its
z⁺ sums to ~10x the logit (its rules hand relevance on as a gradient, which a functional
residual addition copies to both branches unless it is a Zennit ``Sum`` module).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

import salience

TARGET = 1.3


class VGGStyle(nn.Module):
    """VGG-style: four conv blocks (16-128 channels) with max-pooling, flatten, MLP head."""

    def __init__(self, size: int, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in (16, 32, 64, 128):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        side = size // 16
        self.fc1 = nn.Linear(128 * side * side, 256)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(256, classes)

    def forward(self, x: Tensor) -> Tensor:
        # Functional flatten: Captum's LRP has no rule for nn.Flatten.
        return self.fc2(self.relu(self.fc1(torch.flatten(self.features(x), 1))))


CLOCK: Callable[[], float] = time.perf_counter


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run in turn (rotating the order), after a warm-up."""
    for fn in runs.values():
        fn()
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            start = CLOCK()
            runs[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(CLOCK() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def zennit_rows(
    model: nn.Module, x: Tensor, target: list[int], canonizers: list[object] | None = None
) -> dict[str, Callable[[], object]]:
    """Zennit's ε and ε-z⁺ on a copy of ``model``, checked against salience in the same run.

    Zennit starts from the one-hot output, salience from the logit: the rules being linear in
    the relevance, salience's map is the logit times Zennit's.
    """
    try:
        from zennit import rules as zr
        from zennit.attribution import Gradient
        from zennit.composites import LayerMapComposite, layer_map_base
        from zennit.types import Convolution
    except ImportError:
        print("  zennit not installed (it is in .venv-peers): no Zennit row")
        return {}
    theirs_model = copy.deepcopy(model)
    for m in theirs_model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False  # Zennit's hooks need out-of-place activations
    onehot = torch.eye(model(x).shape[1], device=x.device)[target]
    composites = {
        "epsilon": [(Convolution, zr.Epsilon(1e-6)), (nn.Linear, zr.Epsilon(1e-6))],
        "epsilon_plus": [
            (Convolution, zr.ZPlus(stabilizer=1e-6, zero_params="bias")),
            (nn.Linear, zr.Epsilon(1e-6)),
        ],
    }
    runs: dict[str, Callable[[], object]] = {}
    for name, layer_map in composites.items():

        def run(
            layer_map: list[object] = layer_map, canon: list[object] | None = canonizers
        ) -> Tensor:
            composite = LayerMapComposite(layer_map_base(1e-6) + layer_map, canonizers=canon)
            with Gradient(model=theirs_model, composite=composite) as attributor:
                _, relevance = attributor(x.clone(), onehot)
            return relevance

        ours = salience.lrp(model, x, target=target, composite=name)
        theirs = run()
        logit = ours.scores.view(-1, *([1] * (x.ndim - 1)))
        expected = logit * theirs
        scale = float(expected.abs().max())
        diff = float((ours.values - expected).abs().max()) / scale
        print(
            f"  Zennit {name}: sum of relevance {float(expected.sum()):.4g} (ours "
            f"{float(ours.values.sum()):.4g}, logits {float(ours.scores.sum()):.4g}), "
            f"max |diff| / max |R| = {diff:.1e}"
        )
        if canonizers is not None:
            bare = run(canon=None)
            print(f"    without BatchNorm merging: finite = {bool(bare.isfinite().all())}")
        runs[f"zennit {name}"] = run
    return runs


def lite0_canonizer() -> list[object]:
    """A Zennit canonizer merging EfficientNet-Lite0's BatchNorms, pairs found by name."""
    from zennit.canonizers import MergeBatchNorm

    pairs = {
        "_conv_stem": "_bn0",
        "_expand_conv": "_bn0",
        "_depthwise_conv": "_bn1",
        "_project_conv": "_bn2",
        "_conv_head": "_bn1",
    }

    class ByName(MergeBatchNorm):  # type: ignore[misc]
        def apply(self, root_module: nn.Module) -> list[object]:
            instances = []
            for module in root_module.modules():
                for conv, bn in pairs.items():
                    if getattr(module, conv, None) is not None and hasattr(module, bn):
                        instance = self.copy()
                        instance.register((getattr(module, conv),), getattr(module, bn))
                        instances.append(instance)
            return instances

    return [ByName()]


def bench_vgg(size: int, batch: int, repeats: int, device: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = VGGStyle(size).to(device).eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    target = model(x).argmax(1).tolist()
    runs: dict[str, Callable[[], object]] = {
        "gradient": lambda: salience.gradient(model, x, target=target),
        "lrp epsilon": lambda: salience.lrp(model, x, target=target, composite="epsilon"),
        "lrp epsilon_plus": lambda: salience.lrp(model, x, target=target),
        "lrp epsilon_gamma_box": lambda: salience.lrp(
            model, x, target=target, composite="epsilon_gamma_box"
        ),
    }
    runs.update(zennit_rows(model, x, target))
    try:
        from captum.attr import LRP

        captum_model = copy.deepcopy(model)

        def captum() -> object:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return LRP(captum_model).attribute(x.clone(), target=target)

        runs["captum LRP"] = captum
        ours = salience.lrp(model, x, target=target, composite="epsilon", epsilon=1e-9).values
        theirs = captum().detach()  # type: ignore[union-attr]
        scale = float(theirs.abs().max())
        print(
            f"  parity with Captum (ε=1e-9): max |diff| / max |R| = "
            f"{float((ours - theirs).abs().max()) / scale:.1e}"
        )
    except ImportError:
        print("  captum not installed: no peer row")
    return interleaved(runs, repeats)


def bench_lite0(batch: int, repeats: int, device: str) -> dict[str, float] | None:
    try:
        from salience import models

        model = models.load("efficientnet_lite0").to(device)
    except Exception as error:  # the weights may be missing: skip the row
        print(f"  EfficientNet-Lite0 unavailable ({error}); skipped")
        return None
    cat = model.preprocess(models.sample_image("chelsea")).to(device)
    x = cat.repeat(batch, 1, 1, 1)
    target = model(x).argmax(1).tolist()
    runs: dict[str, Callable[[], object]] = {
        "gradient": lambda: salience.gradient(model, x, target=target),
        "lrp epsilon": lambda: salience.lrp(model, x, target=target, composite="epsilon"),
        "lrp epsilon_plus": lambda: salience.lrp(model, x, target=target),
        "lrp epsilon_gamma_box": lambda: salience.lrp(
            model, x, target=target, composite="epsilon_gamma_box"
        ),
    }
    try:
        runs.update(zennit_rows(model, x, target, lite0_canonizer()))
    except ImportError:
        print("  zennit not installed (it is in .venv-peers): no Zennit row")
    return interleaved(runs, repeats)


def report(title: str, times: dict[str, float]) -> bool:
    print(f"\n{title}")
    base = times["gradient"]
    ok = True
    for name, t in times.items():
        line = f"  {name:22s} {t * 1000:9.1f} ms   {t / base:5.2f} x gradient"
        if "captum LRP" in times and name == "lrp epsilon":
            line += f"   captum / ours = {times['captum LRP'] / t:5.2f}"
        peer = times.get(name.replace("lrp", "zennit", 1))
        if name.startswith("lrp") and peer is not None:
            line += f"   zennit / ours = {peer / t:5.2f}"
        print(line)
        if name == "lrp epsilon" and t / base > TARGET:
            ok = False
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="one repeat, 64x64 inputs")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or the process's CPU time (steadier on a shared CPU machine)",
    )
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.size, args.batch = 1, 64, [1]
    print(
        f"torch {torch.__version__}, device {args.device}, {args.threads} threads, "
        f"{args.clock} clock, median of {args.repeats}, load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    ok = True
    for batch in args.batch:
        print(f"\nVGG-style, batch {batch}, {args.size}x{args.size}:")
        ok &= report(
            f"VGG-style batch {batch}", bench_vgg(args.size, batch, args.repeats, args.device)
        )
        if not args.quick:
            times = bench_lite0(batch, args.repeats, args.device)
            if times is not None:
                ok &= report(f"EfficientNet-Lite0 batch {batch}", times)
    print(f"\nLRP (ε) within {TARGET} x the gradient: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
