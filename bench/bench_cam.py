"""CAM speed, side by side in one run: salience vs pytorch-grad-cam 1.5 and torchcam.

Model and input: the pretrained EfficientNet-Lite0 on the bundled cat photo (1x3x224x224),
class 285 (Egyptian cat), on the CPU or ``--device cuda`` (timed with the device synchronized).
The peers need torchvision; run this in an environment that has them (see
tests/test_parity_cam.py); without them only salience's own figures are printed.

    python bench/bench_cam.py [--repeats 5] [--threads 2] [--score-cam-repeats 1] [--device cuda]

Measured (wall-clock, median of repeats, every method on the same layer):

1. Grad-CAM at ``_bn1`` (the last layer that runs once; the peers would pair the wrong calls of
   the reused ``_swish`` module), with upsampling to 224x224 for salience and
   pytorch-grad-cam (torchcam returns the 7x7 map).
1b. CAM (the activated head, ``_swish`` at its last call, with the ``_fc`` weights: torchcam's
   ``CAM``), Grad-CAM++ and Layer-CAM at ``_bn1`` (pytorch-grad-cam's and torchcam's classes),
   each peer's default call, maps upsampled to 224x224 alike.
2. Score-CAM of the activated head features (1280 channels, 7x7). salience explains its
   default layer, ``_swish`` at its last call; pytorch-grad-cam hooks ``_bn1`` with
   ``reshape_transform=ReLU6``, which gives it the same activations. salience skips the
   channels that are zero everywhere (their term ``alpha_k * A_k`` is exactly 0), where
   pytorch-grad-cam forwards a black image for each, and its default chunk (8 rows of
   3x224x224 per pass) suits a CPU's caches better than pytorch-grad-cam's 16; salience with
   ``batch_size=16`` is timed too, to separate the two gains. The same comparison at ``_bn1``
   itself (no zero channel) is printed for honesty.
3. K = 5 targets in one call (one forward, one batched backward) vs 5 calls.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import salience as sl
from salience import models

CLASS = 285
TARGETS = [285, 281, 282, 283, 284]  # Egyptian cat, tabby, tiger cat, Persian, Siamese


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: bool = True
) -> dict[str, tuple[float, Any]]:
    """Return ``{name: (median seconds, last result)}``, the functions run in turn.

    Alternating the contenders makes a busy, shared machine slow them down alike.
    """
    results: dict[str, Any] = {name: fn() for name, fn in fns.items()} if warmup else {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            results[name] = fn()
            _sync()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in fns}


def minmax(values: torch.Tensor) -> torch.Tensor:
    v = values - values.amin()
    return v / v.amax().clamp(min=1e-30)


def corr(a: torch.Tensor, b: torch.Tensor) -> str:
    """Pearson correlation of two maps, as text ("flat" when one map is constant)."""
    a, b = a.detach().cpu().flatten().double(), b.detach().cpu().flatten().double()
    if a.std() == 0 or b.std() == 0:
        return "flat map (ReLU of a negative sum)"
    return f"corr {float(torch.corrcoef(torch.stack([a, b]))[0, 1]):.6f}"


def row(name: str, seconds: float, ours: float | None = None, note: str = "") -> str:
    """A table row; ``ours`` is salience's time, to print how much faster it is."""
    ratio = f"{seconds / ours:.2f}x" if ours else ""
    return f"| {name} | {seconds * 1000:.0f} ms | {ratio} | {note} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--score-cam-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Full float32 on both sides (salience switches TF32 off; the peers follow these flags).
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    model = models.load("efficientnet_lite0").to(args.device)
    x = model.preprocess(models.sample_image("chelsea")).to(args.device)
    try:
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        pgc = None
    try:
        import torchcam.methods as tc
    except ImportError:
        tc = None
    device = torch.cuda.get_device_name() if x.is_cuda else f"CPU, {args.threads} threads"
    print(f"torch {torch.__version__}, {device}, input {tuple(x.shape)}")
    print(
        f"pytorch-grad-cam: {'yes' if pgc else 'missing'}, torchcam: {'yes' if tc else 'missing'}\n"
    )

    # 1. Grad-CAM ----------------------------------------------------------------------------
    contenders: dict[str, Callable[[], Any]] = {
        "salience grad_cam": lambda: sl.grad_cam(model, x, CLASS, layer="_bn1").values[0, 0]
    }
    if pgc is not None:

        def run_pgc() -> Any:
            with pgc.GradCAM(model, [model._bn1]) as cam:
                return torch.from_numpy(cam(x, [ClassifierOutputTarget(CLASS)])[0])

        contenders["pytorch-grad-cam GradCAM"] = run_pgc
    if tc is not None:

        def run_tc() -> Any:
            with tc.GradCAM(model, "_bn1") as cam:
                low = cam(CLASS, model(x))[0]
            return F.interpolate(low[None], size=(224, 224), mode="bilinear")[0, 0]

        contenders["torchcam GradCAM (7x7 map)"] = run_tc
    print("Grad-CAM, layer _bn1, class 285")
    print("| implementation | time | salience faster by | agreement |\n|---|---|---|---|")
    timing = interleaved(contenders, args.repeats)
    ours_t, ours_map = timing["salience grad_cam"]
    for name, (t, result) in timing.items():
        agree = corr(minmax(ours_map), result) if result is not ours_map else ""
        print(row(name, t, None if result is ours_map else ours_t, agree))

    # 1b. CAM, Grad-CAM++ and Layer-CAM at batch 1 -------------------------------------------
    print("\nThe other CAMs at batch 1, class 285 (each peer's default call)")
    print("| method | implementation | time | salience faster by | agreement |")
    print("|---|---|---|---|---|")
    for method, contenders in _other_cams(model, x, pgc, tc).items():
        timing = interleaved(contenders, args.repeats)
        ours_t, ours_map = timing["salience"]
        for name, (t, result) in timing.items():
            agree = corr(minmax(ours_map), result) if result is not ours_map else ""
            ratio = f"{t / ours_t:.2f}x" if result is not ours_map else ""
            print(f"| {method} | {name} | {t * 1000:.1f} ms | {ratio} | {agree} |")

    # 2. Score-CAM ---------------------------------------------------------------------------
    reps = args.score_cam_repeats
    head: dict[str, Callable[[], Any]] = {
        "salience score_cam, default batch_size": lambda: sl.score_cam(model, x, CLASS),
        "salience score_cam, batch_size=16": lambda: sl.score_cam(model, x, CLASS, batch_size=16),
    }
    dense: dict[str, Callable[[], Any]] = {
        "salience score_cam, default batch_size": lambda: sl.score_cam(
            model, x, CLASS, layer="_bn1"
        ),
    }
    if pgc is not None:

        def run_pgc_score(reshape: Any) -> Any:
            with pgc.ScoreCAM(model, [model._bn1], reshape_transform=reshape) as cam:
                return torch.from_numpy(cam(x, [ClassifierOutputTarget(CLASS)])[0])

        head["pytorch-grad-cam ScoreCAM, default (16 rows per pass)"] = lambda: run_pgc_score(
            lambda a: a.clamp(0, 6)
        )
        dense["pytorch-grad-cam ScoreCAM, default (16 rows per pass)"] = lambda: run_pgc_score(None)
    for title, contenders in (
        (
            "the activated head: salience at _swish (last call), pytorch-grad-cam at _bn1 + "
            "ReLU6; 1280 channels at 7x7, most of them zero on this image",
            head,
        ),
        ("_bn1, before the ReLU6 (no zero channel to skip)", dense),
    ):
        print(f"\nScore-CAM of {title}; class 285")
        print("| implementation | time | pytorch-grad-cam / this | masked inputs | agreement |")
        print("|---|---|---|---|---|")
        timing = interleaved(contenders, reps, warmup=False)
        peer = [t for name, (t, _) in timing.items() if name.startswith("pytorch")]
        ours_map = next(iter(timing.values()))[1].values[0, 0]
        for name, (t, result) in timing.items():
            if isinstance(result, sl.Attribution):
                ratio = f"{peer[0] / t:.2f}x" if peer else ""
                print(f"| {name} | {t:.2f} s | {ratio} | {result.extras['masked_inputs']} | |")
            else:
                agree = corr(minmax(ours_map), result)
                print(f"| {name} | {t:.2f} s | | 1280 | {agree} |")

    # 3. K targets -----------------------------------------------------------------------------
    print("\nK = 5 targets (classes 281-285): one call vs 5 calls")
    print("| method | one call, K=5 | 5 calls | speed-up |\n|---|---|---|---|")
    many = torch.tensor([TARGETS], device=x.device)
    for method in ("grad_cam", "grad_cam_plus_plus", "layer_cam"):
        fn = sl.get_method(method).func
        timing = interleaved(
            {
                "many": lambda fn=fn: fn(model, x, many),
                "separate": lambda fn=fn: [fn(model, x, c) for c in TARGETS],
            },
            args.repeats,
        )
        t_many, t_sep = timing["many"][0], timing["separate"][0]
        print(
            f"| {method} | {t_many * 1000:.0f} ms | {t_sep * 1000:.0f} ms | {t_sep / t_many:.2f}x |"
        )
    timing = interleaved(
        {
            "many": lambda: sl.score_cam(model, x, many, batch_size=16),
            "separate": lambda: [sl.score_cam(model, x, c, batch_size=16) for c in TARGETS],
        },
        reps,
        warmup=False,
    )
    t_many, t_sep = timing["many"][0], timing["separate"][0]
    print(f"| score_cam | {t_many:.2f} s | {t_sep:.2f} s | {t_sep / t_many:.2f}x |")


def _other_cams(model: Any, x: torch.Tensor, pgc: Any, tc: Any) -> dict[str, dict[str, Any]]:
    """CAM, Grad-CAM++ and Layer-CAM: salience and each peer's own class, one call each.

    CAM explains the activated head (``_swish`` at its last call, the map the classifier
    pools) with the ``_fc`` weights; the gradient CAMs explain ``_bn1``. Maps at 224x224 (the
    peers' small maps are upsampled as salience does, bilinear).
    """
    size = tuple(x.shape[-2:])

    def up(low: torch.Tensor) -> torch.Tensor:
        return F.interpolate(low[None], size=size, mode="bilinear", align_corners=False)[0, 0]

    runs: dict[str, dict[str, Any]] = {
        "cam": {"salience": lambda: sl.cam(model, x, CLASS).values[0, 0]},
        "grad_cam_plus_plus": {
            "salience": lambda: sl.grad_cam_plus_plus(model, x, CLASS, layer="_bn1").values[0, 0]
        },
        "layer_cam": {"salience": lambda: sl.layer_cam(model, x, CLASS, layer="_bn1").values[0, 0]},
    }
    if pgc is not None:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        def pgc_run(kind: Any) -> Callable[[], Any]:
            def run() -> Any:
                with kind(model, [model._bn1]) as cam:
                    return torch.from_numpy(cam(x, [ClassifierOutputTarget(CLASS)])[0])

            return run

        runs["grad_cam_plus_plus"]["pytorch-grad-cam GradCAMPlusPlus"] = pgc_run(
            pgc.GradCAMPlusPlus
        )
        runs["layer_cam"]["pytorch-grad-cam LayerCAM"] = pgc_run(pgc.LayerCAM)
    if tc is not None:

        def tc_run(kind: Any, layer: str, **options: Any) -> Callable[[], Any]:
            def run() -> Any:
                with kind(model, layer, **options) as cam:
                    return up(cam(CLASS, model(x))[0])

            return run

        runs["cam"]["torchcam CAM"] = tc_run(tc.CAM, "_swish", fc_layer="_fc")
        runs["grad_cam_plus_plus"]["torchcam GradCAMpp"] = tc_run(tc.GradCAMpp, "_bn1")
        runs["layer_cam"]["torchcam LayerCAM"] = tc_run(tc.LayerCAM, "_bn1")
    return runs


if __name__ == "__main__":
    main()
