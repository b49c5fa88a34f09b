"""GPU check of the batched methods: automatic chunks, host syncs, copies, answers, speed.

    python bench/check_cuda.py                      # VGG- and ResNet-style, 224 x 224, batch 1
    python bench/check_cuda.py --batch 1 32 --models vgg resnet lite0
    python bench/check_cuda.py --device cpu --size 32 --repeats 1   # a smoke test on the CPU
    python bench/check_cuda.py --oom                # also a real out-of-memory error, redone

For SmoothGrad-50, IG-50, Score-CAM, occlusion and RISE on each model, one line each:

- the passes ``batch_size="auto"`` ran (rows per forward pass: on CUDA the probe, then what
  fits) and the footprint per row it measured;
- the median time of ``"auto"``, of ``batch_size=64`` and of Captum's default where it has the
  method, and the peak memory of ``"auto"`` (``suite.measure``: CUDA's peak allocation, or the
  resident set on the CPU);
- the host synchronisations of one call (``torch.cuda.set_sync_debug_mode("warn")``) and the
  host-to-device copies (the profiler's ``Memcpy HtoD``): a per-chunk sync or copy shows up as
  a count that grows with the passes;
- the largest difference between the ``"auto"`` map and the map with ``batch_size=8``,
  relative to the map's largest value (the chunking must not change the answer), and whether
  two calls give the same bits (cuDNN may choose nondeterministic algorithms: then not).

Then, per model, guided backprop and DeconvNet with the rule at the rectifiers' backward nodes
and under the function mode: both times, and whether the maps have the same bits.

Exit status 1 if a map depends on the chunking beyond 1e-4, or the two ways of the rectifier
rules differ. Nothing is written to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import salience
import salience._chunks as chunks
from salience import hooks
from suite import load, measure

METHODS: dict[str, dict[str, Any]] = {
    "smoothgrad": {"samples": 50},
    "integrated_gradients": {"steps": 50, "quadrature": "riemann_trapezoid"},
    "score_cam": {},
    "occlusion": {"window": 16, "stride": 8},
    "rise": {"masks": 1000},
}


class Recording(nn.Module):
    """The model, recording the rows of each forward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.passes: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.passes.append(int(x.shape[0]))
        return self.model(x)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def syncs_and_copies(fn: Callable[[], Any], device: torch.device) -> tuple[int, int]:
    """Host synchronisations and host-to-device copies of one call (CUDA; else -1)."""
    if device.type != "cuda":
        return -1, -1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        sync(device)
    copies = sum(e.count for e in prof.key_averages() if "HtoD" in e.key)
    return syncs, copies


def captum_default(method: str, model: nn.Module) -> Callable[[Tensor, Tensor], Any] | None:
    try:
        from captum import attr
    except ImportError:
        return None
    if method == "integrated_gradients":
        ig = attr.IntegratedGradients(model)
        return lambda x, t: ig.attribute(x, target=t, n_steps=50, method="riemann_trapezoid")
    if method == "smoothgrad":
        nt = attr.NoiseTunnel(attr.Saliency(model))
        return lambda x, t: nt.attribute(
            x, target=t, nt_type="smoothgrad", nt_samples=50, stdevs=0.15, abs=False
        )
    return None


def check(model_name: str, n: int, args: argparse.Namespace, device: torch.device) -> bool:
    net = load(model_name).to(device)
    model = Recording(net).eval()
    x = torch.randn(n, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    with torch.no_grad():
        target = net(x).argmax(1)
    ok = True
    for method, options in METHODS.items():
        if args.methods and method not in args.methods:
            continue

        def ours(batch_size: Any = "auto", m: str = method, o: dict = options) -> Tensor:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return salience.explain(model, x, m, target, batch_size=batch_size, **o).values

        chunks.forget_footprints()
        model.passes.clear()
        auto_map = ours()  # the first call: on CUDA, with the probe
        first = list(model.passes)
        model.passes.clear()
        again = ours()
        later = list(model.passes)
        repeat = "bitwise" if torch.equal(again, ours()) else "NOT bitwise"
        footprint = [v for d in chunks._FOOTPRINTS.values() for v in d.values()]
        t_auto, mem, _ = measure(ours, device, args.repeats)  # warm-up, median, peak memory
        t_64 = measure(lambda: ours(64), device, args.repeats)[0]
        syncs, copies = syncs_and_copies(ours, device)
        ref = ours(8)
        scale = float(ref.abs().max()) or 1.0
        diff = float((auto_map - ref).abs().max()) / scale
        ok &= diff <= 1e-4
        peer = captum_default(method, net)
        t_peer = float("nan")
        if peer is not None:
            t_peer = measure(lambda p=peer: p(x, target), device, args.repeats)[0]
        print(
            f"{model_name} batch {n} {method}: auto {t_auto * 1e3:.1f} ms, batch_size=64 "
            f"{t_64 * 1e3:.1f} ms, Captum default {t_peer * 1e3:.1f} ms; peak {mem:.0f} MB; "
            f"passes first call {_short(first)}, later {_short(later)}; footprint/row "
            f"{[f'{v / 2**20:.1f} MB' for v in footprint]}; syncs {syncs}, HtoD copies "
            f"{copies}; map vs batch_size=8: {diff:.1e}{'' if diff <= 1e-4 else '  <-- DIFFERS'}; "
            f"two calls: {repeat}",
            flush=True,
        )
    return ok


def check_rules(model_name: str, args: argparse.Namespace, device: torch.device) -> bool:
    """Guided backprop and DeconvNet with the rule at the rectifiers' nodes and under the mode.

    The two ways (see :mod:`salience.hooks`) must give the same bits on the device too
    (masking and ``relu`` are exact), with cuDNN's deterministic algorithms (its default
    backward kernels may add in another order at each call: two calls of one way differ);
    one line per rule with both times (those with cuDNN's default algorithms) and the largest
    difference relative to the map's largest value.
    """
    net = load(model_name).to(device)
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    ok = True
    for method in ("guided_backprop", "deconvnet"):

        def run(mode: bool, m: str = method) -> Tensor:
            if mode:
                hooks._MODE_ONLY[net] = True
            try:
                return salience.explain(net, x, m, 0).values
            finally:
                hooks._MODE_ONLY.pop(net, None)

        deterministic = torch.backends.cudnn.deterministic
        torch.backends.cudnn.deterministic = True
        try:
            nodes, mode = run(False), run(True)
        finally:
            torch.backends.cudnn.deterministic = deterministic
        same = torch.equal(nodes, mode)
        off = ((nodes - mode).abs().max() / nodes.abs().max()).item()
        ok &= same
        t_nodes = measure(lambda: run(False), device, args.repeats)[0]
        t_mode = measure(lambda: run(True), device, args.repeats)[0]
        print(
            f"{model_name} {method}: rule at the nodes {t_nodes * 1e3:.1f} ms, under the mode "
            f"{t_mode * 1e3:.1f} ms; same bits: {same} (largest difference {off:.1e})"
            + ("" if same else "  <-- DIFFERS"),
            flush=True,
        )
    return ok


def check_oom(model_name: str, args: argparse.Namespace, device: torch.device) -> bool:
    """A real out-of-memory error on the device, and the fallback of ``batch_size="auto"``.

    About 2 GB are left free and the planner is told there is 64 times that, so that its first
    full pass of Integrated Gradients (1024 steps) overshoots: the pass must be redone in
    halves, the map equal the ``batch_size=8`` one, and the memory still allocated after the
    call be what it was before (nothing held by the failed pass).
    """
    if device.type != "cuda":
        print("out-of-memory check: CUDA only, skipped")
        return True
    net = load(model_name).to(device)
    model = Recording(net).eval()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    options = {"steps": 1024, "quadrature": "riemann_trapezoid"}
    made: list[chunks.Chunker] = []
    init = chunks.Chunker.__init__

    def record(self: chunks.Chunker, *a: Any, **kw: Any) -> None:
        init(self, *a, **kw)
        made.append(self)

    real = chunks._cuda_available_bytes
    chunks.forget_footprints()
    # Leave about 2 GB free, so that 1024 rows of any of the models cannot fit.
    free, _ = torch.cuda.mem_get_info(device)
    blocker = torch.empty(max(0, int(free) - 2 * 2**30), dtype=torch.uint8, device=device)
    before = torch.cuda.memory_allocated(device)
    chunks.Chunker.__init__ = record  # type: ignore[method-assign]
    chunks._cuda_available_bytes = lambda d: 64 * real(d)  # type: ignore[assignment]
    try:
        got = salience.integrated_gradients(model, x, 0, **options).values
    finally:
        chunks.Chunker.__init__ = init  # type: ignore[method-assign]
        chunks._cuda_available_bytes = real  # type: ignore[assignment]
    after = torch.cuda.memory_allocated(device)
    del blocker
    passes = list(model.passes)
    ref = salience.integrated_gradients(net, x, 0, batch_size=8, **options).values
    diff = float((got - ref).abs().max()) / (float(ref.abs().max()) or 1.0)
    retries = sum(c.retries for c in made)
    held = (after - before - got.numel() * got.element_size()) / 2**20
    ok = diff <= 1e-4 and retries >= 1
    print(
        f"out-of-memory check, {model_name}: retries {retries}, passes {_short(passes)}, map vs "
        f"batch_size=8 {diff:.1e}, memory held after the call beyond the map {held:.1f} MB"
        + ("" if ok else "  <-- FAILED (no retry, or the map differs)"),
        flush=True,
    )
    return ok


def _short(passes: list[int]) -> str:
    return str(passes) if len(passes) <= 8 else f"{passes[:6]} ... ({len(passes)} passes)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", default=["vgg", "resnet"],
                        choices=["lite0", "vgg", "resnet"])  # fmt: skip
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--oom", action="store_true", help="also force a real out-of-memory error (CUDA)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    # salience switches TF32 off in its calls; Captum follows the global flags: set them so.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, TF32 off")
    ok = all([check(m, n, args, device) for m in args.models for n in args.batch])
    ok &= all([check_rules(m, args, device) for m in args.models])
    if args.oom:
        ok &= check_oom(args.models[0], args, device)
    print(
        "OK"
        if ok
        else "FAILED: a map depends on the chunking, the fallback failed, or the "
        "rectifier rules differ"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
