"""Speed settings (salience.performance): channels-last inputs and torch.compile.

The maps must equal the eager, contiguous ones to float tolerance; the compiled model may run
only where salience has no hook active (a compiled graph could skip a hook: a wrong map).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import salience
from conftest import ResNetish, _init
from salience import _performance, cli, hooks
from salience._forward import model_scope
from salience.cli import parser as cli_parser

# Cheaper options for the slow methods (as in test_contract.py).
FAST: dict[str, dict[str, Any]] = {
    "smoothgrad": {"samples": 4},
    "integrated_gradients": {"steps": 8},
    "score_cam": {"batch_size": 4},
    "rise": {"masks": 256},
}
HOOKED = ["guided_backprop", "deconvnet", "grad_cam", "grad_cam_plus_plus", "lrp", "deeplift"]
PLAIN = ["gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "occlusion", "rise"]


@pytest.fixture(autouse=True)
def _default_settings():
    """Every test starts and ends with the process-wide default off."""
    salience.set_performance(channels_last=False, compile=False)
    yield
    salience.set_performance(channels_last=False, compile=False)


class Probe(nn.Module):
    """Records whether each input it sees is channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return x


class Probed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.probe = Probe()
        self.net = _init(ResNetish(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.probe(x))


class Counting:
    """A torch.compile backend that runs the traced graph as it is and counts."""

    def __init__(self) -> None:
        self.compiles = 0
        self.runs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        self.compiles += 1

        def run(*args: Any) -> Any:
            self.runs += 1
            return gm.forward(*args)

        return run


def model() -> nn.Module:
    return _init(ResNetish(), 1)


def inputs(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(3))


KINKED = {"integrated_gradients"}
"""Methods whose rows may land within float32 rounding of a ReLU's kink on some CPU: a row of
IG's path did here (without AVX-512), its gate flipped between the two layouts and its
gradient moved by 5e-4 (torch's own autograd too). Compared in float64."""


def precise(name: str, net: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """``net`` and ``x`` in float64 for the methods of :data:`KINKED`, else as they are."""
    return (net.double(), x.double()) if name in KINKED else (net, x)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Max-abs difference within ``rel`` of the reference's max-abs value."""
    return bool((a - b).abs().max() <= rel * b.abs().max().clamp_min(1e-30))


def explain(name: str, net: nn.Module, x: torch.Tensor) -> salience.Attribution:
    return salience.explain(net, x, method=name, **FAST.get(name, {}))


# -- settings --------------------------------------------------------------------------------


def test_settings_nest_and_are_restored_also_on_error():
    assert salience.get_performance() == salience.PerformanceSettings()
    assert not salience.get_performance().active
    with salience.performance(channels_last=True) as outer:
        assert outer.channels_last
        assert outer.compile is None
        with salience.performance(compile="max-autotune") as inner:
            assert inner.channels_last  # inherited
            assert dict(inner.compile) == {"mode": "max-autotune"}
            with salience.performance(channels_last=False, compile=False):
                assert salience.get_performance() == salience.PerformanceSettings()
            assert salience.get_performance() is inner
        assert salience.get_performance() is outer
        with pytest.raises(KeyError), salience.performance(compile={"backend": "aot_eager"}):
            raise KeyError("inside")
        assert salience.get_performance() is outer
    assert not salience.get_performance().active
    assert dict(_performance._compile_options(True)) == {}
    with pytest.raises(TypeError):
        salience.get_performance().compile["mode"] = "x"  # type: ignore[index]


def test_process_default_and_thread_isolation():
    seen: dict[str, Any] = {}
    entered, release = threading.Event(), threading.Event()

    def other() -> None:
        with salience.performance(compile={"backend": "aot_eager"}):
            seen["other inside"] = salience.get_performance()
            entered.set()
            release.wait(10)

    salience.set_performance(channels_last=True)
    thread = threading.Thread(target=other)
    with salience.performance(channels_last=False):
        thread.start()
        assert entered.wait(10)
        # The other thread's block does not leak here, nor ours there.
        assert salience.get_performance() == salience.PerformanceSettings()
        release.set()
        thread.join(10)
    assert seen["other inside"].channels_last  # it started from the process default
    assert seen["other inside"].compile is not None
    assert salience.get_performance().channels_last  # the default, outside any block

    async def task() -> salience.PerformanceSettings:
        with salience.performance(channels_last=False):
            await asyncio.sleep(0)
            return salience.get_performance()

    async def both() -> tuple[Any, Any]:
        inner = asyncio.create_task(task())
        await asyncio.sleep(0)
        mine = salience.get_performance()
        return mine, await inner

    mine, theirs = asyncio.run(both())
    assert mine.channels_last
    assert not theirs.channels_last


def test_bad_settings_are_clear_errors():
    with pytest.raises(TypeError, match="channels_last"):
        salience.set_performance(channels_last="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="compile must be"):
        salience.performance(compile=3).__enter__()  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="no argument backnd"):
        salience.performance(compile={"backnd": "aot_eager"}).__enter__()
    with pytest.raises(ValueError, match="Unrecognized mode") as info:
        salience.performance(compile="fastest").__enter__()
    assert "compile='fastest'" in str(info.value)
    assert info.value.__cause__ is not None
    with pytest.raises(ValueError, match="Invalid backend"):
        salience.performance(compile={"backend": "no_such_backend"}).__enter__()
    with pytest.raises(TypeError, match="hashable"):
        salience.performance(compile={"options": {"x": bytearray(2)}}).__enter__()
    assert not salience.get_performance().active


# -- channels-last ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*PLAIN, "score_cam"])
def test_channels_last_maps_equal_eager(name):
    net, x = precise(name, Probed(), inputs())
    params = {k: v.clone() for k, v in net.state_dict().items()}
    layouts = {k: v.stride() for k, v in net.state_dict().items()}
    x_before = x.clone()
    eager = explain(name, net, x)
    assert not any(net.probe.seen)
    net.probe.seen.clear()
    with salience.performance(channels_last=True):
        fast = explain(name, net, x)
    assert net.probe.seen
    assert all(net.probe.seen)
    assert close(fast.values, eager.values), (fast.values - eager.values).abs().max()
    assert fast.values.shape == eager.values.shape
    assert fast.values.stride() == eager.values.stride()  # the map's layout is unchanged
    assert fast.extras["performance"] == {
        "channels_last": True,
        "compiled": False,
        "passes": len(net.probe.seen),
        "compiled_passes": 0,
    }
    assert "performance" not in eager.extras
    # The user's model and inputs are untouched: values and layouts.
    for k, v in net.state_dict().items():
        assert torch.equal(v, params[k]), k
        assert v.stride() == layouts[k], k
    assert torch.equal(x, x_before)
    assert x.is_contiguous()


@pytest.mark.parametrize("name", sorted(salience.available_methods()))
def test_every_method_under_channels_last(name):
    """Hooks, rules and CAM captures see channels-last activations: same maps."""
    net, x = precise(name, model(), inputs())
    eager = explain(name, net, x)
    with salience.performance(channels_last=True):
        fast = explain(name, net, x)
    assert fast.values.shape == eager.values.shape
    assert close(fast.values, eager.values, 1e-4), (fast.values - eager.values).abs().max()
    assert fast.extras["performance"]["channels_last"]


@pytest.mark.parametrize("name", ["guided_backprop", "deconvnet"])
def test_rectifier_rules_stay_at_the_nodes_under_channels_last(name):
    """The channels-last boundary is an autograd function with no rectifier inside: the walk
    goes through it (one pass), and the map is the mode's."""
    net, x = model(), inputs()
    with salience.performance(channels_last=True):
        fast = explain(name, net, x)
        assert net not in hooks._MODE_ONLY
        assert fast.extras["performance"]["passes"] == 1
        hooks._MODE_ONLY[net] = True
        mode = explain(name, net, x)
    assert torch.equal(fast.values, mode.values)
    assert fast.extras["rectifiers"] == mode.extras["rectifiers"] > 0


def test_channels_last_second_derivatives():
    """Fragility differentiates maps (create_graph=True): the input boundary is differentiable."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 4, 3), nn.Softplus(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).eval()  # fmt: skip
    x = inputs()

    def second(channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with salience.performance(channels_last=channels_last), model_scope(net, x) as fwd:
            z = x.clone().requires_grad_(True)
            out = fwd(z.clone())
            (g,) = torch.autograd.grad(out[:, 0].sum(), z, create_graph=True)
            (h,) = torch.autograd.grad((g**2).sum(), z)
        return g.detach(), h

    g0, h0 = second(False)
    g1, h1 = second(True)
    assert g1.is_contiguous()
    assert h1.is_contiguous()
    assert close(g1, g0)
    assert close(h1, h0)


# -- compile ---------------------------------------------------------------------------------


def _eager_and_compiled(name):
    """The map of ``name`` on the eager model and under a counting compile backend."""
    net, x, backend = model(), inputs(), Counting()
    eager = explain(name, net, x)
    with salience.performance(compile={"backend": backend}):
        fast = explain(name, net, x)
    return eager, fast, backend


@pytest.mark.parametrize("name", PLAIN)
def test_compiled_model_runs_for_plain_autograd_methods(name):
    eager, fast, backend = _eager_and_compiled(name)
    assert backend.compiles >= 1
    assert backend.runs == fast.extras["performance"]["passes"] >= 1
    assert fast.extras["performance"] == {
        "channels_last": False,
        "compiled": True,
        "passes": backend.runs,
        "compiled_passes": backend.runs,
    }
    assert close(fast.values, eager.values), (fast.values - eager.values).abs().max()
    assert close(fast.scores, eager.scores)


@pytest.mark.parametrize("name", HOOKED)
def test_compiled_model_never_runs_under_salience_hooks(name):
    """Rectifier rules, CAM captures and LRP/DeepLIFT call rules need the eager model."""
    eager, fast, backend = _eager_and_compiled(name)
    assert backend.runs == 0
    report = fast.extras["performance"]
    assert report["compiled"] is False
    assert report["compiled_passes"] == 0
    assert report["passes"]
    assert torch.equal(fast.values, eager.values)
    assert hooks.active_scopes() == 0


def test_score_cam_compiles_its_masked_passes_only():
    net, x, backend = model(), inputs(), Counting()
    eager = explain("score_cam", net, x)
    with salience.performance(compile={"backend": backend}, channels_last=True):
        fast = explain("score_cam", net, x)
    report = fast.extras["performance"]
    assert report["channels_last"]
    assert report["compiled"]
    assert 0 < report["compiled_passes"] == backend.runs < report["passes"]  # capture: eager
    assert close(fast.values, eager.values)


def test_a_hook_scope_in_another_thread_keeps_the_eager_model():
    net, x, backend = model(), inputs(), Counting()
    other = nn.Linear(2, 2)
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with hooks.forward_hooks([("lin", other)], lambda *a: None):
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert entered.wait(10)
        with salience.performance(compile={"backend": backend}):
            during = salience.gradient(net, x)
    finally:
        release.set()
        thread.join(10)
    assert during.extras["performance"]["compiled"] is False
    assert backend.runs == 0
    assert hooks.active_scopes() == 0
    with salience.performance(compile={"backend": backend}):
        after = salience.gradient(net, x)
    assert after.extras["performance"]["compiled"] is True
    assert backend.runs == 1
    assert close(after.values, during.values)


def test_the_counter_is_what_keeps_the_compiled_model_out(monkeypatch):
    """Without the guard the compiled forward would run under guided backprop's rule.

    (PyTorch 2.13's dynamo traces the mode correctly here, in graph fragments; the guard keeps
    the maps independent of what a PyTorch version or backend does with modes and hooks.)
    """
    net, x, backend = model(), inputs(), Counting()
    monkeypatch.setattr("salience._forward.active_scopes", lambda: 0)
    # (dynamo may refuse the mode, loudly: not the point here)
    with salience.performance(compile={"backend": backend}), contextlib.suppress(Exception):
        salience.guided_backprop(net, x)
    # the compiled forward ran inside the rule's scope (in the rectifier modules' pass, and
    # in the mode's if the compiled forward left the modules' hooks out)
    assert backend.runs >= 1


def test_compiled_models_are_cached_per_model_and_setting():
    net, x, backend = model(), inputs(), Counting()
    with salience.performance(compile={"backend": backend}):
        salience.gradient(net, x)
        salience.gradient(net, x)
    assert backend.compiles == 1
    assert backend.runs == 2
    entries = _performance._compiled[net]
    assert len(entries) == 1
    with salience.performance(compile={"backend": backend, "dynamic": False}):
        salience.gradient(net, x)
    assert len(entries) == 2
    with salience.performance(compile={"backend": backend}):
        salience.gradient(model(), x)  # another model: its own entry
    assert backend.compiles == 3


def test_the_cache_does_not_keep_the_model_alive():
    net, x, backend = model(), inputs(), Counting()
    ref = weakref.ref(net)
    with salience.performance(compile={"backend": backend}):
        result = salience.integrated_gradients(net, x, steps=4)
    assert result.extras["performance"]["compiled"]
    assert net in _performance._compiled
    before = len(_performance._compiled)
    del net
    gc.collect()
    assert ref() is None
    # its entry went (and maybe others', of models of earlier tests collected now too)
    assert len(_performance._compiled) <= before - 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compile_failures_raise_naming_the_setting():
    def broken(gm: Any, example_inputs: Any) -> Any:
        raise ValueError("no C++ compiler here")

    net, x = model(), inputs()
    with (
        salience.performance(compile={"backend": broken}),
        pytest.raises(RuntimeError, match=r"compile=.*torch.compile failed on ResNetish") as info,
    ):
        salience.gradient(net, x)
    assert "ValueError: no C++ compiler here" in str(info.value)
    assert isinstance(info.value.__cause__, torch._dynamo.exc.TorchDynamoException)
    assert hooks.active_scopes() == 0
    scripted = torch.jit.script(net)
    with (
        salience.performance(compile={"backend": "aot_eager"}),
        pytest.raises(TypeError, match="TorchScript"),
    ):
        salience.gradient(scripted, x)

    def function_model(t: torch.Tensor) -> torch.Tensor:
        return net(t)

    with (
        salience.performance(compile={"backend": "aot_eager"}),
        pytest.raises(TypeError, match=r"nn\.Module"),
    ):
        salience.gradient(function_model, x)
    salience.gradient(function_model, x)  # without the setting: fine


def test_aot_eager_backward_matches():
    """aot_eager traces the backward too (AOTAutograd), as inductor does."""
    net, x = precise("integrated_gradients", model(), inputs())
    eager = salience.integrated_gradients(net, x, steps=8)
    with salience.performance(compile={"backend": "aot_eager"}, channels_last=True):
        fast = salience.integrated_gradients(net, x, steps=8)
    assert fast.extras["performance"]["compiled"]
    assert close(fast.values, eager.values)
    assert close(fast.extras["delta"], eager.extras["delta"], 1e-3)


def test_inductor_on_the_cpu():
    """The real default backend (C++ code generated and built with gcc), forward only."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()  # fmt: skip
    x = torch.randn(1, 3, 8, 8)
    eager = salience.occlusion(net, x, window=4, stride=4)
    start = time.perf_counter()
    with salience.performance(compile=True):
        fast = salience.occlusion(net, x, window=4, stride=4)
    assert time.perf_counter() - start < 120
    assert fast.extras["performance"]["compiled"]
    assert close(fast.values, eager.values)


# -- command line ----------------------------------------------------------------------------


def _tiny_file(path: Path) -> str:
    torch.manual_seed(10)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()  # fmt: skip
    torch.save(net, path)
    return str(path)


@pytest.mark.filterwarnings("ignore:unpickling:UserWarning")
def test_cli_channels_last_writes_the_same_maps(tmp_path, capsys):
    model_file = _tiny_file(tmp_path / "tiny.pt")
    rgb = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    image = str(tmp_path / "a.png")
    Image.fromarray(rgb).save(image)
    common = ["--model", model_file, "--trust-model", "--input-size", "16", "--resize", "20"]
    common += ["-q", "-m", "gradient", "-t", "3"]
    assert cli.main(["explain", image, "-o", str(tmp_path / "plain"), *common]) == 0
    argv = ["explain", image, "-o", str(tmp_path / "fast"), "--channels-last", *common]
    assert cli.main(argv) == 0, capsys.readouterr().err
    plain = np.load(tmp_path / "plain" / "a.gradient.3.npy")
    fast = np.load(tmp_path / "fast" / "a.gradient.3.npy")
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-6 * np.abs(plain).max())
    assert not salience.get_performance().active  # the command's settings do not linger


def test_cli_speed_options_build_the_settings(capsys):
    build = cli.build_parser()

    def settings(*flags: str) -> Any:
        args = build.parse_args(["explain", "img.png", *flags])
        with cli_parser._performance(args) as s:
            return s

    assert settings() is None
    assert settings("--channels-last") == salience.PerformanceSettings(channels_last=True)
    assert dict(settings("--compile").compile) == {}
    both = settings("--channels-last", "--compile-mode", "reduce-overhead")
    assert both.channels_last
    assert dict(both.compile) == {"mode": "reduce-overhead"}
    code = cli.main(["batch", "x", "--engine", "ray", "--compile", "-o", "unused"])
    assert code == cli.EXIT_USAGE
    assert "local engine" in capsys.readouterr().err
