"""The fixed cost of one call: salience and Captum where the arithmetic is nearly free.

On a GPU at batch 1 a small network runs as fast as Python can launch its kernels, so what a
library does around the forward and backward pass (hooks, checks, copies, bookkeeping) decides
who is faster. This script reproduces that regime on the CPU with a small image (64² by
default): each row times salience, Captum's equivalent (where it has one) and a hand-written
forward + backward pass of the same model, interleaved after a warm-up, one thread::

    python bench/bench_overhead.py --repeats 40
    python bench/bench_overhead.py --models lite0 resnet --size 64 --repeats 40
    python bench/bench_overhead.py --device cuda --size 224     # where a GPU is lent

``fixed`` is salience's median minus the hand-written pass's (for Grad-CAM: a forward with one
hook and the backward to that layer); ``peer / salience`` above 1 means salience is faster.

``--models thin`` adds a network with Lite0's count of modules and BatchNorm buffers (16
inverted-residual blocks, 155 modules, 150 buffers) but 4 channels, run at 8²: its arithmetic
is nearly nothing, so its bare pass is the cost of launching its operations, and the fixed
cost is measured against that, as a GPU at batch 1 sees it, on any machine::

    python bench/bench_overhead.py --models thin --repeats 200 --methods gradient grad_cam

``--parts`` says where the gradient's fixed cost goes: the call is timed again with one part
taken out at a time (patched away: the buffers kept, the input and model checks, the TF32
switch, the zero-map check), interleaved with the whole call; each row is what that part costs.
A last row gives the class as an int instead of a tensor on the input's device (what reading
the tensor's classes back costs).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))

import salience
from _results import write_block
from suite import captum_peer, load, machine, measure_side_by_side

METHODS = ("gradient", "guided_backprop", "deconvnet", "grad_cam", "grad_cam_default",
           "grad_cam_first", "deeplift", "lrp", "integrated_gradients", "smoothgrad")  # fmt: skip
STEPS = 8  # IG steps and SmoothGrad samples: one pass each, as a GPU would run them


class Thin(nn.Module):
    """Lite0's count of modules and BatchNorm buffers with 4 channels (see the module doc)."""

    def __init__(self, channels: int = 4, blocks: int = 16, classes: int = 10) -> None:
        super().__init__()
        c = channels

        def block() -> nn.Sequential:
            return nn.Sequential(
                *(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU6()),
                *(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c)),
                *(nn.ReLU6(), nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)),
            )

        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU6())
        self.blocks = nn.ModuleList(block() for _ in range(blocks))
        self.head = nn.Sequential(nn.Conv2d(c, 8, 1), nn.BatchNorm2d(8), nn.ReLU6())
        self.fc = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.fc(self.head(x).mean((2, 3)))


def model_and_size(name: str, size: int) -> tuple[nn.Module, int]:
    """The model ``name`` of the suite, or ``thin`` (at 8², whatever ``size``)."""
    if name == "thin":
        torch.manual_seed(0)
        return Thin().eval(), 8
    return load(name), size


def sizes(models: list[str], size: int) -> str:
    """The input sizes of a run, in words."""
    if models == ["thin"]:
        return "8x8 (thin)"
    return f"{size}x{size}" + (" (thin: 8x8)" if "thin" in models else "")


def interleaved(
    runs: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median seconds of each run, alternating the order, after one warm-up run of each."""
    timed = measure_side_by_side(runs, device, repeats, memory=False)
    return {name: seconds for name, (seconds, _, _) in timed.items()}


def bare(model: nn.Module, x: Tensor, target: Tensor, method: str, layer: nn.Module) -> Callable:
    """The hand-written pass a method cannot do with less: forward + backward."""
    index = target[:, None]

    def gradient() -> Tensor:
        leaf = x.detach().clone().requires_grad_(True)
        out = model(leaf)
        return torch.autograd.grad(out.gather(1, index).sum(), leaf)[0]

    def to_layer() -> Tensor:
        kept: list[Tensor] = []
        handle = layer.register_forward_hook(lambda m, i, o: kept.append(o))
        try:
            out = model(x)
        finally:
            handle.remove()
        return torch.autograd.grad(out.gather(1, index).sum(), kept[-1])[0]

    def batched() -> Tensor:
        leaf = x.detach().expand(STEPS, *x.shape[1:]).clone().requires_grad_(True)
        out = model(leaf)
        return torch.autograd.grad(out.gather(1, index.expand(STEPS, 1)).sum(), leaf)[0]

    if method.startswith("grad_cam"):
        return to_layer
    if method in ("integrated_gradients", "smoothgrad"):
        return batched
    return gradient


def ours(model: nn.Module, x: Tensor, target: Tensor, method: str, layer: str) -> Callable:
    options: dict = {
        "grad_cam": {"layer": layer},
        "integrated_gradients": {"steps": STEPS},
        "smoothgrad": {"samples": STEPS},
    }.get(method, {})
    name = "grad_cam" if method.startswith("grad_cam") else method
    first = method == "grad_cam_first"

    def run() -> Tensor:
        if first:  # a first call on the model: the layer search runs
            salience.layers._MEMO.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return salience.explain(model, x, name, target, **options).values

    return run


def parts(model: nn.Module, x: Tensor, target: Tensor, repeats: int, device: torch.device) -> str:
    """The gradient's call timed with each part taken out: what each part costs (a table)."""
    forward = importlib.import_module("salience._forward")
    gradient = importlib.import_module("salience.methods.gradient")
    taken_out: dict[str, list[tuple[object, str, object]]] = {
        "buffers kept": [(forward, "kept_buffers", lambda *a, **k: contextlib.nullcontext())],
        "input and model checks": [
            (forward, "check_inputs", lambda inputs: inputs),
            (forward, "check_model", lambda *a, **k: None),
        ],
        "TF32 switch": [(forward, "full_float32", lambda *a, **k: contextlib.nullcontext())],
        "zero-map check": [(gradient, "warn_zero_maps", lambda *a, **k: None)],
    }

    def call() -> Tensor:
        return salience.gradient(model, x, target).values

    def without(patches: list[tuple[object, str, object]]) -> Callable[[], Tensor]:
        def run() -> Tensor:
            kept = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
            for owner, name, new in patches:
                setattr(owner, name, new)
            try:
                return call()
            finally:
                for owner, name, old in kept:
                    setattr(owner, name, old)

        return run

    runs = {"whole call": call, **{part: without(p) for part, p in taken_out.items()}}
    # the class as an int: no tensor to read back (the call's target is a tensor on x's device)
    index = int(target.flatten()[0]) if target.numel() == 1 else None
    if index is not None:
        runs["the target as an int"] = lambda: salience.gradient(model, x, index).values
    runs["bare pass"] = bare(model, x, target, "gradient", model)
    t = interleaved(runs, repeats, device)
    lines = [
        f"gradient: bare pass {t['bare pass'] * 1e3:.2f} ms, whole call "
        f"{t['whole call'] * 1e3:.2f} ms (+{(t['whole call'] - t['bare pass']) * 1e3:.2f} ms)",
        "",
        "| part taken out | call without it | the part costs |",
        "|---|---:|---:|",
    ]
    for part in [*taken_out, *(["the target as an int"] if index is not None else [])]:
        lines.append(
            f"| {part} | {t[part] * 1e3:.2f} ms | {(t['whole call'] - t[part]) * 1e3:+.2f} ms |"
        )
    return "\n".join(lines)


def theirs(model: nn.Module, x: Tensor, target: Tensor, method: str, layer: nn.Module):
    if method in ("grad_cam_default", "grad_cam_first"):
        return None
    if method in ("integrated_gradients", "smoothgrad"):
        from captum import attr

        if method == "integrated_gradients":
            ig = attr.IntegratedGradients(model)
            return lambda: ig.attribute(x, target=target, n_steps=STEPS, method="riemann_trapezoid")
        nt = attr.NoiseTunnel(attr.Saliency(model))
        return lambda: nt.attribute(
            x, target=target, nt_type="smoothgrad", nt_samples=STEPS, stdevs=0.15, abs=False
        )
    peer = captum_peer(method, model, layer)
    if peer is None:
        return None
    try:
        peer(x, target)
    except Exception as error:  # Captum refuses some models: say so
        return str(error).splitlines()[0][:60]
    return lambda: peer(x, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lite0", "resnet"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    parser.add_argument("--block", default=None, help="write the table into this block of --out")
    parser.add_argument("--parts", action="store_true", help="where the gradient's cost goes")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # Captum warns on every call
    torch.set_num_threads(args.threads)
    # full float32 on both sides (salience's default; Captum follows the global flags)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device(args.device)
    header = (
        "| model | method | bare pass | salience | fixed | Captum | Captum / salience |\n"
        "|---|---|---:|---:|---:|---:|---:|"
    )
    print(header)
    lines: list[str] = []
    found: list[str] = []  # --parts: where the gradient's cost goes, per model
    for name in args.models:
        model, size = model_and_size(name, args.size)
        model = model.to(device)
        torch.manual_seed(0)
        x = torch.rand(1, 3, size, size, device=device) * 2 - 1
        target = model(x).argmax(1)
        layer_name = salience.grad_cam(model, x, target).layer
        layer = model.get_submodule(layer_name)
        for method in args.methods:
            runs = {
                "bare": bare(model, x, target, method, layer),
                "ours": ours(model, x, target, method, layer_name),
            }
            peer = theirs(model, x, target, method, layer)
            if callable(peer):
                runs["peer"] = peer
            t = interleaved(runs, args.repeats, device)
            fixed = t["ours"] - t["bare"]
            if callable(peer):
                captum = f"{t['peer'] * 1e3:.2f} ms | {t['peer'] / t['ours']:.2f}"
            else:
                captum = f"{peer or '—'} | "
            line = (
                f"| {name} | {method} | {t['bare'] * 1e3:.2f} ms | {t['ours'] * 1e3:.2f} ms | "
                f"{fixed * 1e3:+.2f} ms | {captum} |"
            )
            lines.append(line)
            print(line, flush=True)
        if args.parts:
            found.append(f"{name}, " + parts(model, x, target, args.repeats, device))
            print(f"\n{found[-1]}\n", flush=True)
    if args.block:
        command = " ".join(argv if argv is not None else sys.argv[1:])
        text = (
            f"`python bench/bench_overhead.py {command}` on {machine(device)}, device {device}, "
            f"{time.strftime('%Y-%m-%d')}. "
            f"{sizes(args.models, args.size)}, batch 1, float32, median of {args.repeats} "
            f"interleaved "
            f"runs; `grad_cam` at the layer salience picks by default, given to both; "
            f"`grad_cam_default` lets salience pick it (later calls: the layer found is "
            f"remembered), `grad_cam_first` too, as a first call on the model (the search "
            f"forgotten before each call); IG and SmoothGrad with {STEPS} steps / "
            f"samples in one pass.\n\n" + header + "\n" + "\n".join(lines) + "\n"
        )
        if found:
            text += "\n" + "\n\n".join(found) + "\n"
        write_block(args.out, args.block, text, title="Benchmark results")
        print(f"wrote the {args.block} block of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
