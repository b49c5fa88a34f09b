"""One command for every registered method and its peers, on CPU or CUDA: bench/RESULTS.md.

    python bench/suite.py                         # Lite0, VGG-, ResNet-style; batch 1 and 8
    python bench/suite.py --device cuda --batch 1 8 32
    python bench/suite.py --models lite0 --batch 1 --quick

For each model and batch size, every registered method runs on the same 224 x 224 inputs and
target (the predicted class) as its peer equivalents where one is installed (Captum 0.9 in the
main environment; pytorch-grad-cam and torchcam in the peers' one), interleaved, after a warm-up:
the median wall time of ``--repeats`` runs, the peak memory of the call (CUDA:
``max_memory_allocated``; CPU: the resident set sampled every 2 ms, above its level before the
call), and the answers compared in the same run (Pearson correlation of the two maps, so a
speed-up never hides a different map). For the multi-pass methods the table also gives the
*limit*: passes x the time of one forward + backward pass of the same model and batch.

The results go to ``--out`` (default ``bench/RESULTS.md``) with a description of the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import salience
from _results import write_block
from salience import models

# Options of salience's methods in the suite, and what their peers are given to do the same work.
OPTIONS: dict[str, dict[str, Any]] = {
    "smoothgrad": {"samples": 32},
    "integrated_gradients": {"steps": 50},
    "occlusion": {"window": 16, "stride": 8},
    "rise": {"masks": 1000},
}
# Passes of one forward + backward (or forward only, ~1/3) each method needs: its limit.
PASSES: dict[str, float] = {"smoothgrad": 32, "integrated_gradients": 50}


# -- models ----------------------------------------------------------------------------------


class VGGStyle(nn.Module):
    """VGG-style: 3x3 convolutions and max-pooling, most of the work at high resolution."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width, convs in ((32, 2), (64, 2), (128, 2), (128, 2)):
            for _ in range(convs):
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1000))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.skip(x))


class ResNetStyle(nn.Module):
    """ResNet-18-like at a quarter width: residual blocks with BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )  # fmt: skip
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (16, 1), (32, 2), (32, 1), (64, 2), (64, 1), (128, 2)):
            blocks.append(Block(cin, cout, stride))
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.stem(x)))


def load(name: str) -> nn.Module:
    if name == "lite0":
        return models.load("efficientnet_lite0")
    torch.manual_seed(0)
    model = {"vgg": VGGStyle, "resnet": ResNetStyle}[name]()
    for module in model.modules():  # trained-like BatchNorm statistics, not the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def inputs_for(model: nn.Module, n: int) -> Tensor:
    lite = models.load("efficientnet_lite0") if not hasattr(model, "preprocess") else model
    pool = [lite.preprocess(models.sample_image(s)) for s in ("chelsea", "coffee")]
    pool += [p.flip(-1) for p in pool]
    return torch.cat([pool[i % len(pool)] for i in range(n)])


# -- peers -----------------------------------------------------------------------------------


def captum_peer(
    name: str, model: nn.Module, layer: nn.Module | None, tuned: bool = True
) -> Callable | None:
    """Captum's equivalent of ``name``; ``tuned``: with the chunk sizes best on 2 CPU cores
    (``internal_batch_size=10``, ``nt_samples_batch_size=8``), else Captum's defaults (every
    step or sample in one pass, the fair reference on a GPU)."""
    try:
        from captum import attr
    except ImportError:
        return None
    ig_batch = 10 if tuned else None
    nt_batch = 8 if tuned else None
    peers: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "gradient": lambda x, t: attr.Saliency(model).attribute(x, target=t, abs=False),
        "input_x_gradient": lambda x, t: attr.InputXGradient(model).attribute(x, target=t),
        "guided_backprop": lambda x, t: attr.GuidedBackprop(model).attribute(x, target=t),
        "deconvnet": lambda x, t: attr.Deconvolution(model).attribute(x, target=t),
        "integrated_gradients": lambda x, t: attr.IntegratedGradients(model).attribute(
            x, target=t, n_steps=50, method="riemann_trapezoid", internal_batch_size=ig_batch
        ),
        "smoothgrad": lambda x, t: attr.NoiseTunnel(attr.Saliency(model)).attribute(
            x,
            target=t,
            nt_type="smoothgrad",
            nt_samples=32,
            nt_samples_batch_size=nt_batch,
            stdevs=0.15 * float(x.max() - x.min()),
            abs=False,
        ),
        "deeplift": lambda x, t: attr.DeepLift(model).attribute(x, target=t),
        "lrp": lambda x, t: attr.LRP(model).attribute(x, target=t),
        "occlusion": lambda x, t: attr.Occlusion(model).attribute(
            x,
            target=t,
            sliding_window_shapes=(3, 16, 16),
            strides=(3, 8, 8),
            perturbations_per_eval=1,  # Captum's default; its fastest of 1/8/32 on 2 CPU cores
        ),
    }
    if layer is not None:
        peers["grad_cam"] = lambda x, t: attr.LayerAttribution.interpolate(
            attr.LayerGradCam(model, layer).attribute(x, target=t, relu_attributions=True),
            x.shape[-2:], "bilinear",
        )  # fmt: skip
    return peers.get(name)


# -- measuring -------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    batch: int
    method: str
    ours: float
    ours_mem: float
    peer: str = ""
    theirs: float = float("nan")
    theirs_mem: float = float("nan")
    agreement: float = float("nan")
    limit: float = float("nan")
    note: str = ""


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """The highest resident set size seen (sampled every 2 ms) while the block runs."""

    def __enter__(self) -> _PeakRSS:
        self.base = self.high = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.high = max(self.high, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.high = max(self.high, _rss())


def _once(
    fn: Callable[[], Any], device: torch.device, memory: bool = True
) -> tuple[float, float, Any]:
    """Seconds and peak memory in MB of one run (0 without ``memory``), and its result."""
    if not memory:  # no sampling thread beside a call of a few milliseconds
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, 0.0, result
    if device.type == "cuda":  # the counters of this device (--device cuda:1 too)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        return elapsed, (torch.cuda.max_memory_allocated(device) - base) / 2**20, result
    with _PeakRSS() as rss:
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
    return elapsed, (rss.high - rss.base) / 2**20, result


def measure(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, float, Any]:
    """Median seconds over ``repeats`` runs after a warm-up, peak memory in MB, the last result."""
    return measure_side_by_side({"one": fn}, device, repeats)["one"]


def measure_side_by_side(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    repeats: int,
    warmed: dict[str, Any] | None = None,
    *,
    memory: bool = True,
) -> dict[str, tuple[float, float, Any]]:
    """``measure`` for several runs at once, alternating them (the first of each round changes).

    Each is warmed up first (``warmed``: the results of warm-ups already run). Timed in a block
    of its own, a side pays for the first touches of memory that the next side then reuses
    (measured: Lite0's gradient at batch 32 read 0.80x Captum in blocks, 0.99x alternating).
    ``memory=False`` times only (no peak memory: no sampling thread beside the calls).
    """
    results = dict(warmed) if warmed is not None else {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks = dict.fromkeys(fns, 0.0)
    names = list(fns)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            elapsed, peak, results[name] = _once(fns[name], device, memory)
            times[name].append(elapsed)
            peaks[name] = max(peaks[name], peak)
    return {name: (statistics.median(times[name]), peaks[name], results[name]) for name in fns}


def _forward_backward(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    leaf = x.detach().clone().requires_grad_(True)
    out = model(leaf)
    return torch.autograd.grad(out.gather(1, target[:, None]).sum(), leaf)[0]


def _ours(model: nn.Module, x: Tensor, method: str, target: Tensor, options: dict) -> Tensor:
    """salience's map (the methods switch TF32 off unless ``allow_tf32`` is in ``options``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return salience.explain(model, x, method, target, **options).values


def _theirs(peer: Callable, x: Tensor, target: Tensor) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peer(x, target)


def agreement(a: Any, b: Any) -> float:
    """Pearson correlation of two maps (channels summed), or NaN when they cannot compare."""
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        return float("nan")
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        if a.ndim == 4 and b.ndim == 4 and a.shape[-2:] == b.shape[-2:]:
            a, b = a.sum(1), b.sum(1)
        else:
            return float("nan")
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    den = float(a.norm() * b.norm())
    return float((a @ b) / den) if den > 0 else float("nan")


def run(args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    rows: list[Row] = []
    methods = args.methods or list(salience.available_methods())
    for model_name in args.models:
        model = load(model_name).to(device)
        layer = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cam = salience.grad_cam(model, inputs_for(model, 1).to(device))
        layer = model.get_submodule(cam.layer) if cam.layer else None
        for n in args.batch:
            x = inputs_for(model, n).to(device)
            with torch.no_grad():
                target = model(x).argmax(1)

            one, _, _ = measure(partial(_forward_backward, model, x, target), device, args.repeats)
            for method in methods:
                options = dict(OPTIONS.get(method, {}))
                if args.tf32 == "on":
                    options["allow_tf32"] = True
                heavy = method in ("score_cam", "occlusion", "rise")
                if heavy and (args.quick or n not in args.heavy_batches):
                    continue
                runs = {"ours": partial(_ours, model, x, method, target, options)}
                warmed = {}
                try:
                    warmed["ours"] = runs["ours"]()  # the warm-up, and a failure before timing
                except Exception as exc:
                    note = f"raises: {str(exc).splitlines()[0][:80]}"
                    rows.append(Row(model_name, n, method, float("nan"), float("nan"), note=note))
                    continue
                note = ""
                peer = captum_peer(method, model, layer, tuned=args.peer_batch == "tuned")
                if peer is not None:
                    runs["theirs"] = partial(_theirs, peer, x, target)
                    try:
                        warmed["theirs"] = runs["theirs"]()
                    except Exception as exc:
                        note = f"Captum raises: {str(exc).splitlines()[0][:60]}"
                        del runs["theirs"]
                measured = measure_side_by_side(runs, device, args.repeats, warmed)
                t, mem, ours_map = measured["ours"]
                row = Row(model_name, n, method, t, mem, note=note)
                if method in PASSES:
                    row.limit = PASSES[method] * one
                if peer is not None:
                    row.peer = "Captum"
                if "theirs" in measured:
                    row.theirs, row.theirs_mem, theirs_map = measured["theirs"]
                    row.agreement = agreement(ours_map, theirs_map)
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


def format_row(r: Row) -> str:
    ratio = r.theirs / r.ours if r.ours == r.ours and r.theirs == r.theirs else float("nan")
    limit = r.ours / r.limit if r.limit == r.limit else float("nan")
    cells = [
        r.model, str(r.batch), r.method, _s(r.ours), _mb(r.ours_mem),
        r.peer, _s(r.theirs), _mb(r.theirs_mem), _x(ratio), _f(r.agreement), _x(limit), r.note,
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def _s(v: float) -> str:
    return "" if v != v else (f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s")


def _mb(v: float) -> str:
    return "" if v != v else f"{v:.0f} MB"


def _x(v: float) -> str:
    return "" if v != v else f"{v:.2f}"


def _f(v: float) -> str:
    return "" if v != v else f"{v:.4f}"


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if "model name" in line]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    text = (
        f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def precision(device: torch.device, args: argparse.Namespace) -> str:
    """What the header says about TF32 and the peers' chunk sizes."""
    peers = (
        "peers with their default chunk sizes"
        if args.peer_batch == "default"
        else "peers with the chunk sizes best on 2 CPU cores"
    )
    if device.type != "cuda":
        return f"Float32; {peers}."
    tf32 = (
        "TF32 on for both sides (salience allow_tf32=True)"
        if args.tf32 == "on"
        else "TF32 off for both sides (full float32)"
    )
    return (
        f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; {tf32}; {peers}; "
        "salience's batch_size='auto' (probe-measured chunks)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lite0", "vgg", "resnet"],
                        choices=["lite0", "vgg", "resnet"])  # fmt: skip
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="skip the slowest methods")
    parser.add_argument("--heavy-batches", nargs="+", type=int, default=[1],
                        help="batch sizes at which Score-CAM, occlusion and RISE run")  # fmt: skip
    parser.add_argument("--tf32", choices=["off", "on"], default="off",
                        help="TF32 for both sides on CUDA (off: full float32, salience's "
                        "default; peers run under the same global flags)")  # fmt: skip
    parser.add_argument("--peer-batch", choices=["tuned", "default"], default=None,
                        help="peers' chunk sizes: tuned for 2 CPU cores, or their defaults "
                        "(default: tuned on the CPU, the peers' defaults on CUDA)")  # fmt: skip
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    parser.add_argument("--block", default="suite",
                        help="the block of --out to replace (runs with other settings keep "
                        "their own block, e.g. suite-batch8)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.peer_batch is None:
        args.peer_batch = "default" if device.type == "cuda" else "tuned"
    # The peers follow the global TF32 flags (PyTorch's default: TF32 on for cuDNN
    # convolutions): set them as salience runs, so that both sides do the same arithmetic.
    torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    header = (
        "| model | batch | method | salience | memory | peer | peer time | peer memory | "
        "peer / salience | agreement | salience / limit | note |\n"
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---|"
    )
    print(header, flush=True)
    rows = run(args)
    text = (
        f"`python bench/suite.py {' '.join(argv if argv is not None else sys.argv[1:])}` on "
        f"{machine(device)}, device {device}, {time.strftime('%Y-%m-%d')}. "
        f"{precision(device, args)}\n\n"
        "Median of the repeats after a warm-up, salience and Captum alternating; memory is the "
        "peak above the level before the "
        "call; agreement is the Pearson correlation of the two maps (channels summed where the "
        "shapes differ); limit = passes x one forward + backward of the same batch.\n\n"
        + header
        + "\n"
        + "\n".join(format_row(r) for r in rows)
        + "\n"
    )
    # Only the block of the suite is replaced: the notes around it are written by hand.
    write_block(args.out, args.block, text, title="Benchmark results")
    print(f"wrote the {args.block} block of {args.out}; then: python bench/readme_speed.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
