"""Host synchronisations: how often a method reads a value back from the device.

On a GPU every read of a tensor's value into Python (``bool(t)``, ``.item()``, ``.tolist()``,
``torch.equal``, ``nonzero``...) waits until the device has run everything queued before it. A
few per call cost nothing; one per layer, per buffer or per chunk stalls the queue as often,
and at batch 1 a small network then runs at the speed of the round trips. CI has no GPU, so
these tests count the reads on the CPU with the device code paths switched on (the choices
that differ between the CPU and a GPU are made by small functions, patched here), and check
that the count does not grow with the depth of the network or the number of chunks.
"""

from __future__ import annotations

import collections
import functools
import importlib
import traceback
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import salience
from conftest import _init
from salience import _performance
from salience.methods import _incremental_kernels
from salience.targets import resolve_target

# What reads a value back (or may: nonzero and repeat_interleave size their output from it).
_TENSOR_READS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy",
                 "nonzero", "cpu")  # fmt: skip
_TORCH_READS = ("equal", "allclose", "nonzero", "unique", "masked_select", "repeat_interleave")


class Reads:
    """Counts the reads of tensor values into Python, by call site, in any thread."""

    def __init__(self) -> None:
        self.sites: collections.Counter[str] = collections.Counter()
        self.on = False

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def wrap(self, name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.on:
                self.on = False  # a read inside a read (allclose calls equal...) is one
                try:
                    site = next(
                        (
                            f"{f.filename.rsplit('salience/', 1)[-1]}:{f.lineno}"
                            for f in reversed(traceback.extract_stack()[:-1])
                            if "/salience/" in f.filename.replace("\\", "/")
                        ),
                        "?",
                    )
                    self.sites[f"{name} at {site}"] += 1
                    return fn(*args, **kwargs)
                finally:
                    self.on = True
            return fn(*args, **kwargs)

        return counted


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Reads:
    """Count reads, with the code paths of a GPU: grouped buffer checks, branch-free fixes,
    device-side crops for incremental occlusion."""
    counter = Reads()
    for name in _TENSOR_READS:
        monkeypatch.setattr(torch.Tensor, name, counter.wrap(name, getattr(torch.Tensor, name)))
    for name in _TORCH_READS:
        monkeypatch.setattr(torch, name, counter.wrap(name, getattr(torch, name)))
    monkeypatch.setattr(_performance, "worth_a_sync", lambda t: False)
    monkeypatch.setattr(_incremental_kernels, "_row_wise", lambda device: False)
    return counter


class Chain(nn.Module):
    """``depth`` blocks of convolution, BatchNorm and a rectifier, a sigmoid gate, a head."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
        for i in range(depth):
            blocks += [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)]
            blocks.append(nn.ReLU6() if i % 2 else nn.ReLU())
        self.features = nn.Sequential(*blocks)
        self.gate = nn.Sigmoid()
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(self.features(x)).mean((2, 3)))


def chain(depth: int) -> nn.Module:
    return _init(Chain(depth), seed=depth).eval()


OPTIONS: dict[str, dict[str, Any]] = {
    "smoothgrad": {"samples": 4},
    "integrated_gradients": {"steps": 8},
    "rise": {"masks": 16},
}


def count(counter: Reads, model: nn.Module, method: str, **options: Any) -> Reads:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    run = functools.partial(
        salience.explain, model, x, method, 1, **{**OPTIONS.get(method, {}), **options}
    )
    run()  # warm-up: first-call caches
    counter.sites.clear()
    counter.on = True
    try:
        run()
    finally:
        counter.on = False
    return counter


def test_the_counter_sees_reads_in_the_backward_pass(reads: Reads) -> None:
    class Reading(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x * 2

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            bool(g.sum() > 0)
            return g * 2

    x = torch.ones(3, requires_grad=True)
    reads.on = True
    torch.autograd.grad(Reading.apply(x).sum(), x)
    reads.on = False
    assert reads.total == 1, reads.sites


# Incremental occlusion plans a box per layer once per call, from window coordinates read as
# Python ints (the box sizes are tensor shapes): reads grow with the depth there, but not with
# the number of passes (checked below), and a call runs hundreds of windows.
PER_LAYER_PLAN = {"occlusion"}


@pytest.mark.parametrize("method", sorted(set(salience.available_methods()) - PER_LAYER_PLAN))
def test_reads_do_not_grow_with_depth(reads: Reads, method: str) -> None:
    shallow = dict(count(reads, chain(2), method).sites)
    deep = dict(count(reads, chain(8), method).sites)
    assert sum(deep.values()) == sum(shallow.values()), (shallow, deep)
    assert sum(deep.values()) <= 12, deep


def test_a_class_index_target_reads_nothing_back(reads: Reads) -> None:
    """An int target is checked in Python and made on the output's device; a tensor target
    is checked on the device (one read)."""
    output = torch.randn(2, 5)
    for target, expected in ((3, 0), (torch.tensor([3, 1]), 1)):
        reads.sites.clear()
        reads.on = True
        try:
            resolved = resolve_target(target, output, 2)
        finally:
            reads.on = False
        assert reads.total == expected, reads.sites
        assert resolved.classes is not None
        assert resolved.classes.device == output.device
    with pytest.raises(ValueError, match="target class 5 is out of range"):
        resolve_target(5, output, 2)
    with pytest.raises(ValueError, match="target class -1 is out of range"):
        resolve_target(np.int64(-1), output, 2)


@pytest.mark.parametrize(
    ("method", "few", "many"),
    [
        ("integrated_gradients", {"steps": 4, "batch_size": 2}, {"steps": 16, "batch_size": 2}),
        ("smoothgrad", {"samples": 2, "batch_size": 2}, {"samples": 8, "batch_size": 2}),
        ("score_cam", {"batch_size": 8}, {"batch_size": 2}),
        ("rise", {"masks": 8, "batch_size": 4}, {"masks": 32, "batch_size": 4}),
        ("occlusion", {"window": 8, "stride": 8, "batch_size": 2},
         {"window": 8, "stride": 2, "batch_size": 2}),
    ],
)  # fmt: skip
def test_reads_do_not_grow_with_passes(
    reads: Reads, method: str, few: dict[str, Any], many: dict[str, Any]
) -> None:
    model = chain(3)
    a = dict(count(reads, model, method, **few).sites)
    b = dict(count(reads, model, method, **many).sites)
    assert sum(a.values()) == sum(b.values()), (a, b)


# -- the device code paths give the CPU's answers ---------------------------------------------


class Signed(nn.Module):
    """Inputs of both signs into convolutions after a residual sum, a SiLU, a ReLU6 tie."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.SiLU()
        self.clip = nn.ReLU6()
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = self.bn(self.conv(y)) + y  # signed input to the next convolution
        y = self.clip(self.conv(self.act(y)))
        return self.head(y.mean((2, 3)))


CALLS = [
    ("deeplift", {}),
    ("deeplift", {"rule": "reveal_cancel"}),
    ("lrp", {}),
    ("lrp", {"composite": "epsilon_gamma_box"}),
    ("lrp", {"composite": "epsilon_alpha2_beta1"}),
    ("lrp", {"composite": "epsilon_plus_flat"}),
]


@pytest.mark.parametrize("net", [lambda: chain(3), lambda: _init(Signed(), seed=3).eval()])
@pytest.mark.parametrize(("method", "options"), CALLS)
def test_the_device_paths_give_the_same_maps(
    monkeypatch: pytest.MonkeyPatch, net: Any, method: str, options: dict[str, Any]
) -> None:
    model = net()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x[0, :, :4] = 0  # ties: equal inputs at the reference, zeros into the rectifiers
    cpu = salience.explain(model, x, method, 1, **options).values
    monkeypatch.setattr(_performance, "worth_a_sync", lambda t: False)
    device = salience.explain(model, x, method, 1, **options).values
    assert cpu.abs().amax() > 0
    torch.testing.assert_close(device, cpu, rtol=1e-5, atol=1e-6 * float(cpu.abs().amax()))


def test_worth_a_sync_on_the_cpu_and_elsewhere() -> None:
    assert _performance.worth_a_sync(torch.zeros(3))
    assert not _performance.worth_a_sync(torch.empty(3, device="meta"))
    assert _performance.worth_a_sync(torch.empty(1 << 20, device="meta"))


class Counting(nn.Module):
    """Buffers changed three ways: a training BatchNorm (no version bump), an in-place add,
    a write through ``.data`` (no version bump either); one left alone; one replaced."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(3))
        self.register_buffer("still", torch.arange(4.0))
        self.register_buffer("swapped", torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.ema.data.add_(1.0)
        self.swapped = torch.full((2,), 5.0)
        return self.bn(x).mean((2, 3))


def test_buffers_are_restored() -> None:
    model = Counting().train()
    before = {name: b.clone() for name, b in model.named_buffers()}
    objects = {name: b for name, b in model.named_buffers()}
    still_version = model.still._version
    with pytest.warns(UserWarning, match="training mode"):
        salience.gradient(model, torch.randn(2, 3, 4, 4), 0)
    for name, b in model.named_buffers():
        assert b is objects[name], name
        torch.testing.assert_close(b, before[name], rtol=0, atol=0)
    assert model.still._version == still_version  # unchanged buffers are not written


class Signs(nn.Module):
    """Buffers that ``torch.equal`` misjudges: a NaN it calls changed, a zero whose sign is
    flipped (through ``.data``: no version bump) it calls unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("nans", torch.tensor([float("nan"), 1.0]))
        self.register_buffer("zero", torch.zeros(3))
        self.register_buffer("halves", torch.tensor([float("nan"), 0.0], dtype=torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.zero.data.neg_()  # 0.0 -> -0.0: equal by value, not bit for bit
        return x.mean((2, 3))


@pytest.mark.parametrize("alone", [True, False])
def test_buffers_are_compared_bit_for_bit(alone: bool) -> None:
    model = Signs()
    if alone:  # each dtype's group holds one buffer: compared without the flat copy
        del model._buffers["halves"]
        model.register_buffer("count", torch.ones((), dtype=torch.long))
    versions = {name: b._version for name, b in model.named_buffers()}
    salience.gradient(model, torch.randn(1, 3, 4, 4), 0)
    assert torch.equal(torch.signbit(model.zero), torch.zeros(3, dtype=torch.bool))
    assert model.nans[0].isnan()
    assert model.nans[1] == 1.0
    for name in versions.keys() - {"zero"}:
        assert getattr(model, name)._version == versions[name], f"{name} was written"


@pytest.mark.parametrize(
    "dtype",
    [
        *(torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64),
        *(torch.complex128, torch.int64, torch.uint8, torch.bool),
    ],
)
def test_same_bits(dtype: torch.dtype) -> None:
    from salience._forward import _same_bits

    a = torch.tensor([0, 1, 1, 0], dtype=dtype)
    assert _same_bits(a, a.clone())
    assert _same_bits(a.view(2, 2).t(), a.view(2, 2).t().clone())
    b = a.clone()
    b[1] = 0
    assert not _same_bits(a, b)
    if dtype.is_floating_point or dtype.is_complex:
        assert not _same_bits(a, -a)  # signed zeros
        nan = torch.full((2,), float("nan"), dtype=dtype)
        assert _same_bits(nan, nan.clone())


def _both_ways(monkeypatch: pytest.MonkeyPatch, fn: Any) -> tuple[Any, Any]:
    cpu = fn()
    with monkeypatch.context() as m:
        m.setattr(_performance, "worth_a_sync", lambda t: False)
        device = fn()
    return cpu, device


@pytest.mark.parametrize("upper", [None, 6.0])
def test_rectifier_secants_at_ties_either_way(
    monkeypatch: pytest.MonkeyPatch, upper: float | None
) -> None:
    from salience.methods._deeplift_rules import _rectifier_secant

    x0 = torch.tensor([-1.0, 0.5, 2.0, 7.0, -2.0, 1.0, 3.0])
    x = torch.tensor([-1.0, 0.5, 2.0, 7.0, 1.0, -3.0, 3.5])  # four ties, then real secants

    def run() -> torch.Tensor:
        y, y0 = x.clamp(0, upper), x0.clamp(0, upper)
        return _rectifier_secant(y, y0, x - x0, upper)

    cpu, device = _both_ways(monkeypatch, run)
    inside = 1.0 if upper is None else 0.0  # f'(7) is 0 for ReLU6
    torch.testing.assert_close(cpu, torch.tensor([0.0, 1.0, 1.0, inside, 1 / 3, 0.25, 1.0]))
    assert torch.equal(device, cpu)


def test_secants_near_ties_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    from salience.methods._deeplift_rules import _secant

    lo = torch.tensor([0.0, 1.0, -2.0, 0.3])
    dx = torch.tensor([0.0, 1e-12, 1.0, -0.5])

    def run() -> torch.Tensor:
        dy = torch.sigmoid(lo + dx) - torch.sigmoid(lo)
        return _secant(torch.sigmoid, dy, dx.clone(), lo, None, False, None)

    cpu, device = _both_ways(monkeypatch, run)
    slope = torch.sigmoid(lo) * (1 - torch.sigmoid(lo))
    torch.testing.assert_close(cpu[:2], slope[:2])  # the derivative where dx is tiny
    assert torch.equal(device, cpu)


def test_lrp_pass_ratio_at_zero_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    from salience.methods._lrp_layers import _Pass

    x = torch.tensor([0.0, 1.0, -2.0, 0.0, 3.0], requires_grad=True)

    def run() -> torch.Tensor:
        (c,) = torch.autograd.grad(_Pass.apply(x, torch.tanh, None, False).sum(), x)
        return c

    cpu, device = _both_ways(monkeypatch, run)
    torch.testing.assert_close(cpu[[0, 3]], torch.ones(2))  # tanh'(0) = 1, not 0 / 0
    assert torch.equal(device, cpu)


# -- clean rows riding in the first pass (SmoothGrad, Integrated Gradients off the CPU) -------


def _ride_along(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    gradient = importlib.import_module("salience.methods.gradient")
    integrated = importlib.import_module("salience.methods.integrated")

    def rides(device: torch.device, target: Any) -> bool:
        return on and not (callable(target) and not isinstance(target, torch.Tensor))

    monkeypatch.setattr(gradient, "clean_rows_ride_along", rides)
    monkeypatch.setattr(integrated, "clean_rows_ride_along", rides)


class Counted(nn.Module):
    """A model that counts its forward passes and the rows of each; a second input scales."""

    def __init__(self) -> None:
        super().__init__()
        self.net = chain(3)
        self.passes: list[int] = []

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        self.passes.append(x.shape[0])
        out = self.net(x)
        return out if scale is None else out * scale[:, None]


RIDE_CALLS = [
    ("integrated_gradients", {"steps": 6}),
    ("integrated_gradients", {"steps": 6, "batch_size": 4, "quadrature": "riemann_trapezoid"}),
    ("smoothgrad", {"samples": 5}),
    ("smoothgrad", {"samples": 5, "batch_size": 3, "base": "guided_backprop"}),
    ("smoothgrad", {"samples": 4, "variant": "vargrad", "batch_size": 2}),
]


@pytest.mark.parametrize("target", [None, 2, torch.tensor([4, 1, 0])], ids=["top", "int", "each"])
@pytest.mark.parametrize(("method", "options"), RIDE_CALLS)
def test_clean_rows_in_the_first_pass_give_the_same_result(
    monkeypatch: pytest.MonkeyPatch, method: str, options: dict[str, Any], target: Any
) -> None:
    model = Counted()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    scale = torch.tensor([1.0, 2.0, -1.0])
    run = functools.partial(
        salience.explain, model, x, method, target, forward_args=(scale,), **options
    )
    apart = run()
    separate = list(model.passes)
    model.passes.clear()
    _ride_along(monkeypatch, True)
    along = run()
    assert len(model.passes) == len(separate) - 1  # one pass fewer
    assert model.passes[0] == separate[0] + separate[1], (separate, model.passes)
    torch.testing.assert_close(along.target, apart.target, rtol=0, atol=0)
    torch.testing.assert_close(along.values, apart.values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(along.scores, apart.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(along.output, apart.output, rtol=1e-5, atol=1e-6)
    for key in ("delta", "baseline_scores"):
        if key in apart.extras:
            torch.testing.assert_close(along.extras[key], apart.extras[key], rtol=1e-4, atol=1e-5)


def test_a_callable_target_keeps_its_own_clean_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Counted()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    _ride_along(monkeypatch, True)
    salience.smoothgrad(model, x, target=lambda out: out[:, 1], samples=3)
    assert model.passes[0] == 2  # the clean pass, on its own


def test_clean_rows_ride_again_after_an_out_of_memory_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from test_chunks_oom import LIMIT, Fake, Limited, images

    x = images(2)
    reference = salience.integrated_gradients(Limited(limit=10**6), x, steps=6, batch_size=3)
    fake = Fake(monkeypatch)
    model = Limited(fake=fake)
    salience.integrated_gradients(model, x, steps=6)  # learns the footprint (a probe)
    _ride_along(monkeypatch, True)
    model.passes.clear()
    again = salience.integrated_gradients(model, x, steps=6)
    assert model.passes[0] > LIMIT  # the first try, with the endpoints, ran out of memory
    torch.testing.assert_close(again.values, reference.values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again.extras["delta"], reference.extras["delta"], atol=1e-5, rtol=0)


class Quiet(nn.Module):
    """Eval-mode buffers: BatchNorm statistics, and a counter written on request only, either
    in place (its version bumps) or through ``.data`` (it does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.register_buffer("count", torch.zeros(()))
        self.write: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.write == "in place":
            self.count += 1
        elif self.write == "data":
            self.count.data.add_(1)
        return self.bn(x).mean((2, 3))


def _comparisons(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from salience import _forward

    calls: list[int] = []
    put_back = _forward._put_back
    monkeypatch.setattr(
        _forward,
        "_put_back",
        lambda *a: calls.append(1) or put_back(*a),  # type: ignore[func-returns-value]
    )
    return calls


def test_version_counters_spare_the_comparison_once_a_call_showed_them_honest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, x = Quiet().eval(), torch.randn(1, 3, 4, 4)
    calls = _comparisons(monkeypatch)
    salience.gradient(model, x, 0)
    assert len(calls) == 1  # the first call compares
    salience.gradient(model, x, 0)
    assert len(calls) == 1  # no version moved: nothing to compare
    model.write = "in place"  # a write that bumps the version is compared and put back
    salience.gradient(model, x, 0)
    assert len(calls) == 2
    assert model.count == 0
    model.write = None
    salience.gradient(model, x, 0)
    assert len(calls) == 2
    model.bn = nn.BatchNorm2d(3).eval()  # other buffers: compared again
    salience.gradient(model, x, 0)
    assert len(calls) == 3
    model.train()  # native BatchNorm writes its statistics behind the counter
    with pytest.warns(UserWarning, match="training mode"):
        salience.gradient(model, x, 0)
    assert len(calls) == 4
    torch.testing.assert_close(model.bn.running_mean, torch.zeros(3), rtol=0, atol=0)


def test_a_model_that_writes_behind_the_counters_is_compared_at_every_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, x = Quiet().eval(), torch.randn(1, 3, 4, 4)
    model.write = "data"
    calls = _comparisons(monkeypatch)
    for n in range(1, 4):
        salience.gradient(model, x, 0)
        assert len(calls) == n
        assert model.count == 0
    model.write = None
    salience.gradient(model, x, 0)
    assert len(calls) == 4


class Shifted(nn.Module):
    """Two buffers added to the input; written in place on request (versions bumped)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("a", torch.zeros(3))
        self.register_buffer("b", torch.zeros(3))
        self.head = nn.Linear(3, 2)
        self.write = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.write:
            self.a.add_(1)
            self.b.add_(1)
        shift = (self.a + self.b.to(self.a.dtype)).view(1, 3, 1, 1)
        return self.head((x + shift).mean((2, 3)))


class EmptyFirst(nn.Module):
    """An empty vector first in its group, a counter written at every call."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.zeros(0))
        self.register_buffer("calls", torch.zeros(3))
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.conv(x).mean((2, 3))


def test_an_empty_vector_beside_a_buffer_whose_rank_changed() -> None:
    """torch.cat takes an empty vector beside a tensor of any rank: the group is flattened."""
    model, x = EmptyFirst().eval(), torch.randn(1, 3, 8, 8)
    salience.gradient(model, x, 0)
    model.calls.data = torch.zeros(1, 3)  # the same object, now 2-D, behind the record
    salience.gradient(model, x, 0)
    assert model.calls.tolist() == [[0.0] * 3]


def test_the_copy_kept_from_the_last_call_puts_back_what_the_model_writes() -> None:
    from salience import _forward

    model, x = Shifted().eval(), torch.randn(1, 3, 4, 4)
    salience.gradient(model, x, 0)  # compared: the model is honest; its copy is kept
    assert _forward._KNOWN[model].saved is not None
    salience.gradient(model, x, 0)  # nothing copied
    model.write = True
    salience.gradient(model, x, 0)
    assert model.a.tolist() == [0.0] * 3
    assert model.b.tolist() == [0.0] * 3
    # kept again, with the versions after the write back: the next call copies nothing
    assert _forward._KNOWN[model].versions == [model.a._version, model.b._version]
    salience.gradient(model, x, 0)
    assert model.a.tolist() == [0.0] * 3


class Reassigning(Shifted):
    """Gives ``a`` other data through ``.data`` (no version bump) when asked, after calls that
    showed the model honest."""

    def __init__(self) -> None:
        super().__init__()
        self.reassign = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reassign:
            self.a.data = torch.full((3,), 7.0)
        return super().forward(x)


def test_a_data_assignment_of_the_model_is_put_back_with_the_copy_kept() -> None:
    model, x = Reassigning().eval(), torch.randn(1, 3, 4, 4)
    for _ in range(2):
        salience.gradient(model, x, 0)
    a = model.a
    model.reassign = True
    salience.gradient(model, x, 0)
    assert model.a is a
    assert model.a.tolist() == [0.0] * 3


@pytest.mark.parametrize("how", ["in place", "load_state_dict", ".data ="])
def test_a_buffer_you_change_between_calls_is_copied_again(how: str) -> None:
    """Your write bumps the version, or moves the data: the copy kept from the last call is
    not used, and what the model then writes is put back to your value, not the kept one."""
    model, x = Shifted().eval(), torch.randn(1, 3, 4, 4)
    for _ in range(2):
        salience.gradient(model, x, 0)
    if how == "in place":
        model.a.fill_(5.0)
    elif how == "load_state_dict":
        model.load_state_dict({**model.state_dict(), "a": torch.full((3,), 5.0)})
    else:
        model.a.data = torch.full((3,), 5.0)
    model.write = True
    salience.gradient(model, x, 0)
    assert model.a.tolist() == [5.0] * 3
    assert model.b.tolist() == [0.0] * 3


class CallCounter(nn.Module):
    """Counts its calls in a buffer (an honest write), beside BatchNorm statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))


@pytest.mark.parametrize("how", ["through .data", "swapped"])
def test_your_unseen_change_survives_a_call_that_puts_back_another_buffer(how: str) -> None:
    """The kept copy is older than your change, which no counter saw: only what the model
    wrote (the counter) is put back from it."""
    model, x = CallCounter().eval(), torch.randn(1, 3, 8, 8)
    for _ in range(2):
        salience.gradient(model, x, 0)
    if how == "through .data":
        model.bn.running_mean.data.fill_(5.0)
    else:  # the new data may land at the old address, the version may match
        torch.utils.swap_tensors(model.bn.running_mean, torch.full((4,), 5.0))
    salience.gradient(model, x, 0)
    assert model.bn.running_mean.tolist() == [5.0] * 4
    assert model.calls.item() == 0


def test_no_copy_is_kept_in_training_mode_or_when_large(monkeypatch: pytest.MonkeyPatch) -> None:
    from salience import _forward

    model, x = Shifted().train(), torch.randn(2, 3, 4, 4)
    salience.gradient(model, x, 0)
    assert _forward._KNOWN[model].saved is None
    model.eval()
    monkeypatch.setattr(_forward, "_KEPT_BYTES", 16)  # the two buffers: 24 bytes
    salience.gradient(model, x, 0)
    assert _forward._KNOWN[model].saved is None
    monkeypatch.setattr(_forward, "_KEPT_BYTES", 24)
    salience.gradient(model, x, 0)
    assert _forward._KNOWN[model].saved is not None


def test_a_buffer_given_another_dtype_through_data_is_regrouped() -> None:
    model, x = Shifted().eval(), torch.randn(1, 3, 4, 4)
    salience.gradient(model, x, 0)  # remembered: a and b in one float32 copy
    model.b.data = torch.full((3,), 2**40 + 1, dtype=torch.int64)  # same object, other dtype
    model.write = True
    salience.gradient(model, x, 0)
    assert model.a.tolist() == [0.0] * 3
    assert model.b.dtype == torch.int64
    assert model.b.tolist() == [2**40 + 1] * 3  # not rounded through a float32 copy


class Scalars(nn.Module):
    """Vector and scalar buffers (copied by concatenation and by stacking) written in place."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("a", "b"):
            self.register_buffer(name, torch.zeros(3))
        for name in ("c", "d"):
            self.register_buffer(name, torch.zeros((), dtype=torch.long))
        self.write = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.write:
            for buffer in (self.a, self.b, self.c, self.d):
                buffer.add_(1)
        return x.mean((2, 3)) + sum(b.sum() for b in (self.a, self.b, self.c, self.d))


def test_vector_and_scalar_buffers_are_put_back_also_after_their_ranks_changed() -> None:
    model, x = Scalars().eval(), torch.randn(1, 3, 4, 4)
    salience.gradient(model, x, 0)  # remembered: a and b concatenated, c and d stacked
    model.write = True
    salience.gradient(model, x, 0)
    assert [model.a.tolist(), model.b.tolist(), model.c.item(), model.d.item()] == [
        [0.0] * 3,
        [0.0] * 3,
        0,
        0,
    ]
    # same objects, other ranks (behind the record's back): the copies fall back to flattening
    model.b.data = torch.zeros(1, 3)
    model.d.data = torch.zeros(2, dtype=torch.long)
    salience.gradient(model, x, 0)
    assert [model.a.tolist(), model.b.tolist(), model.c.item(), model.d.tolist()] == [
        [0.0] * 3,
        [[0.0] * 3],
        0,
        [0, 0],
    ]


def test_buffers_that_are_inference_tensors_are_compared_every_time() -> None:
    with torch.inference_mode():
        model = Shifted().eval()  # built under inference_mode: no version counters
    model.write = True
    x = torch.randn(1, 3, 4, 4)
    for method in ("occlusion", "rise"):  # forward-only methods can run such a model
        salience.explain(
            model, x, method, 0, **({"masks": 8, "cells": 2} if method == "rise" else {})
        )
        assert model.a.tolist() == [0.0] * 3


def test_the_model_can_swap_its_tensors_after_a_call() -> None:
    # torch.utils.swap_tensors (load_state_dict may use it) refuses a tensor with a weak
    # reference: what a call remembers of the buffers holds none
    model = Quiet().eval()
    salience.gradient(model, torch.randn(1, 3, 4, 4), 0)
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    torch.utils.swap_tensors(model.count, torch.ones(()))
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.load_state_dict(state)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert model.count == state["count"]


def test_a_target_tensor_on_a_device_is_read_before_the_passes(
    reads: Reads, monkeypatch: pytest.MonkeyPatch
) -> None:
    from salience import targets

    monkeypatch.setattr(targets, "_on_a_device", lambda t: True)
    model, x = chain(2), torch.randn(2, 3, 16, 16)
    target = torch.tensor([1, 4])
    for method in ("gradient", "grad_cam", "integrated_gradients", "deeplift", "lrp"):
        salience.explain(model, x, method, target, **OPTIONS.get(method, {}))
        reads.sites.clear()
        reads.on = True
        try:
            salience.explain(model, x, method, target, **OPTIONS.get(method, {}))
        finally:
            reads.on = False
        where = " ".join(reads.sites)
        assert "targets.py" in where, (method, where)  # the early read
        late = [s for s in reads.sites if "targets.py" in s and "__bool__" in s]
        assert not late, (method, dict(reads.sites))  # no read of the check after the pass


@pytest.mark.parametrize(("classes", "named"), [([1, 5], "5"), ([-1, 2], "-1")])
def test_a_target_read_early_is_still_checked(
    monkeypatch: pytest.MonkeyPatch, classes: list[int], named: str
) -> None:
    from salience import targets

    monkeypatch.setattr(targets, "_on_a_device", lambda t: True)
    with pytest.raises(ValueError, match=f"target class {named} is out of range"):
        salience.gradient(chain(1), torch.randn(2, 3, 8, 8), torch.tensor(classes))


def test_a_module_replaced_is_compared_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # a new module may write behind the counters: its first call compares, even where the
    # buffers stayed the same objects
    model, x = Shifted().eval(), torch.randn(1, 3, 4, 4)
    calls = _comparisons(monkeypatch)
    salience.gradient(model, x, 0)
    salience.gradient(model, x, 0)
    assert len(calls) == 1
    model.head = nn.Linear(3, 2).eval()  # no buffer of its own: only the module changed
    salience.gradient(model, x, 0)
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.uint16, torch.uint64])
def test_target_dtypes_on_a_device(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    from salience import targets

    monkeypatch.setattr(targets, "_on_a_device", lambda t: True)
    model, x = chain(1), torch.randn(2, 3, 8, 8)
    ok = salience.gradient(model, x, torch.tensor([1, 4], dtype=dtype))
    assert ok.target.tolist() == [1, 4]
    with pytest.raises(ValueError, match="target class 7 is out of range"):
        salience.gradient(model, x, torch.tensor([1, 7], dtype=dtype))


def test_a_method_called_by_another_reads_the_target_once(
    reads: Reads, monkeypatch: pytest.MonkeyPatch
) -> None:
    from salience import targets

    monkeypatch.setattr(targets, "_on_a_device", lambda t: True)
    model, x, target = chain(2), torch.randn(2, 3, 16, 16), torch.tensor([1, 4])
    salience.guided_grad_cam(model, x, target)  # runs grad_cam and guided backprop
    reads.sites.clear()
    reads.on = True
    try:
        salience.guided_grad_cam(model, x, target)
    finally:
        reads.on = False
    assert sum(n for site, n in reads.sites.items() if "targets.py" in site) == 1, reads.sites


# -- buffers of every kind ------------------------------------------------------------------


class Unusual(nn.Module):
    """A lazy conjugate view, quantized vectors of different scales, a sparse buffer, and a
    forward pass that resizes one buffer in place, registers another, fills a None one and
    gives a quantized one other data."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kernel", torch.fft.rfft2(torch.randn(4, 4)).conj())
        for name, scale in (("q1", 0.1), ("q2", 0.37)):
            quantized = torch.quantize_per_tensor(torch.randn(4), scale, 0, torch.qint8)
            self.register_buffer(name, quantized)
        self.register_buffer("sparse", torch.eye(3).to_sparse())
        self.register_buffer("observed", torch.zeros(2))
        self.register_buffer("empty", None)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observed.resize_(5).fill_(1.0)  # a per-channel observer grows its statistics
        self.q1.data = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
        self.register_buffer("made", torch.ones(1))
        self.empty = torch.ones(2)
        return self.conv(x).mean((2, 3))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_buffers_of_every_kind_are_kept() -> None:
    model, x = Unusual().eval(), torch.randn(1, 3, 8, 8)
    objects = dict(model.named_buffers())
    before = {name: b.clone() for name, b in objects.items()}
    versions = {name: b._version for name, b in objects.items() if name != "sparse"}
    for _ in range(2):  # the first call compares; the second reads the record
        salience.gradient(model, x, 0)
        assert dict(model.named_buffers()) == objects  # same names, same objects, no "made"
        assert model.empty is None
        for name, value in before.items():
            now = objects[name]
            if now.layout != torch.strided:
                now, value = now.to_dense(), value.to_dense()
            if now.is_quantized:
                now, value = now.dequantize(), value.dequantize()
            assert now.shape == value.shape, name
            assert torch.equal(now.resolve_conj(), value.resolve_conj()), name
        for name in ("kernel", "q2"):  # unchanged: not written (q1 is put back)
            assert objects[name]._version == versions[name], name


class Registering(nn.Module):
    """Registers buffers during its forward pass: persistent ones on modules that held none,
    and a cache (non-persistent) made lazily, with the flag that goes with it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 2)
        self.ready = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.conv.register_buffer("seen", x.detach().mean().reshape(1))
        self.head.register_buffer("seen", torch.ones(2))
        self.head.register_buffer("seen", torch.zeros(2))  # registered again
        if not self.ready:  # a cache made at the first pass: the model's own from then on
            self.register_buffer("cache", torch.ones(2), persistent=False)
            self.ready = True
        return self.head(self.conv(x).mean((2, 3))) + self.cache.sum()


@pytest.mark.parametrize("method", ["gradient", "grad_cam"])
def test_buffers_registered_during_a_call_are_removed_but_caches(method: str) -> None:
    from torch.nn.modules import module as torch_module

    hooks_before = dict(torch_module._global_buffer_registration_hooks)
    model, x = Registering().eval(), torch.randn(1, 3, 8, 8)
    state = model.state_dict().keys()
    for _ in range(2):
        getattr(salience, method)(model, x, 0)
        assert [name for name, _ in model.named_buffers()] == ["cache"]  # no "seen"
        assert model.state_dict().keys() == state
    model(x)  # the cache and its flag agree: the model still runs (and registers "seen")
    seen = {name: b for name, b in model.named_buffers() if name.endswith("seen")}
    getattr(salience, method)(model, x, 0)  # its registrations again: your objects put back
    assert {name: b for name, b in model.named_buffers() if name.endswith("seen")} == seen
    for module in (model.conv, model.head):
        del module.seen
    model.register_buffer("scratch", torch.ones(1))  # yours, registered between calls: kept
    salience.gradient(model, x, 0)
    assert [name for name, _ in model.named_buffers()] == ["cache", "scratch"]
    assert "scratch" in model.state_dict()
    with pytest.raises(ValueError, match="out of range"):  # raised after the forward pass
        salience.gradient(model, x, 5)
    assert [name for name, _ in model.named_buffers()] == ["cache", "scratch"]
    assert dict(torch_module._global_buffer_registration_hooks) == hooks_before  # none added
    assert salience.hooks._watchers == ()


class Recaching(nn.Module):
    """Deletes its non-persistent cache and makes it again, larger, when the input grows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)
        self.register_buffer("pe", torch.zeros(1, 4, 1, 1), persistent=False)
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.pe.shape[-1] != h.shape[-1]:
            del self.pe
            self.register_buffer("pe", torch.zeros(1, 4, *h.shape[-2:]), persistent=False)
        self.register_buffer("scale", self.scale, persistent=False)  # persistence changed
        return self.fc((h + self.pe).mean((2, 3)) * self.scale)


def test_a_buffer_made_again_is_put_back_with_its_persistence() -> None:
    model, x = Recaching().eval(), torch.randn(1, 3, 8, 8)
    pe = model.pe
    salience.gradient(model, x, 0)
    assert model.pe is pe  # as it was (the model makes it again at its next pass)
    assert list(model.state_dict()) == ["scale", "conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    Recaching().load_state_dict(model.state_dict())  # pe stays out, scale in
    model(x)


class RunningMean(nn.Module):
    """Running state in a non-persistent buffer, reassigned at every pass (not a cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)
        self.register_buffer("mu", torch.zeros(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mu = 0.5 * self.mu + 0.5 * x.detach().mean((0, 2, 3), keepdim=True)
        return self.fc(torch.relu(self.conv(x - self.mu)).mean((2, 3)))


def test_a_non_persistent_buffer_reassigned_by_the_model_is_put_back() -> None:
    model, x = RunningMean().eval(), torch.randn(2, 3, 8, 8)
    mu = model.mu
    first = salience.gradient(model, x, 0).values
    assert model.mu is mu
    assert not mu.any()
    torch.testing.assert_close(salience.gradient(model, x, 0).values, first)  # same model


class _Fragile(torch.Tensor):
    """A buffer whose copy fails (as an out-of-memory error would, while salience copies)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.Tensor.clone:
            raise MemoryError("simulated")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_call_that_fails_before_its_pass_leaves_no_watcher() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    model.register_buffer("stat", torch.zeros(3).as_subclass(_Fragile))
    with pytest.raises(MemoryError):
        salience.gradient(model, torch.randn(1, 3, 2, 2), 0)
    assert salience.hooks._watchers == ()


def test_lazy_modules_not_made_yet_are_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d(), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match=r"lazy modules .*\(1, 3\).*model\(x\)"):
        salience.gradient(model.eval(), torch.randn(1, 3, 8, 8), 0)
    assert isinstance(model[1], nn.LazyBatchNorm2d)  # nothing was made
    model(torch.randn(1, 3, 8, 8))  # made by a pass of yours: explained
    assert salience.gradient(model.eval(), torch.randn(1, 3, 8, 8), 0).values.shape == (1, 3, 8, 8)


def test_calls_from_several_threads_on_a_model_in_training_mode_take_turns() -> None:
    """Each call copies the buffers at its start and puts them back at its end: two threads
    at once on a model that writes them (BatchNorm in training mode) left the other's writes
    behind (one thread's copy held them, and was put back last)."""
    import threading

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)
    )
    model.train()
    start = {name: b.clone() for name, b in model.named_buffers()}
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        try:
            for _ in range(40):
                salience.gradient(model, x, 0)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the training-mode warning
        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    for name, b in model.named_buffers():
        assert torch.equal(b, start[name]), name
