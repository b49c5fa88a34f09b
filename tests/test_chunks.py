"""Rows per pass (``batch_size``): checks, the automatic size on the CPU and a simulated CUDA
device, maps independent of the chunking, noise drawn on the inputs' device."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import salience
import salience._chunks as chunks
from conftest import VGGish, _init
from salience._checks import check_batch_size, cpu_rows
from salience._chunks import MAX_ROWS, Chunker
from salience.metrics import deletion, insertion, max_sensitivity


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


class Fake:
    """A simulated CUDA device: ``per_row`` bytes per row in a pass, ``free`` bytes left."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, free: float, per_row: int) -> None:
        self.free, self.per_row = free, per_row
        self.rows_since_reset = 0
        self.resets = 0
        monkeypatch.setattr(chunks, "_measures_memory", lambda device: True)
        monkeypatch.setattr(chunks, "_cuda_available_bytes", lambda device: int(self.free))
        monkeypatch.setattr(chunks, "_cuda_allocated_bytes", lambda device: 10_000)
        monkeypatch.setattr(chunks, "_cuda_reset_peak", self._reset)
        monkeypatch.setattr(chunks, "_cuda_peak_bytes", self._peak)
        chunks.forget_footprints()

    def _reset(self, device: torch.device) -> None:
        self.resets += 1
        self.rows_since_reset = 0

    def _peak(self, device: torch.device) -> int:
        return 10_000 + self.per_row * self.rows_since_reset

    def seen(self, rows: int) -> None:
        self.rows_since_reset = max(self.rows_since_reset, rows)


class Recording(nn.Module):
    """The model, recording the rows of every forward pass (and telling the fake device)."""

    def __init__(self, fake: Fake | None = None) -> None:
        super().__init__()
        self.net = _init(VGGish(), 0).eval()
        self.passes: list[int] = []
        self.fake = fake

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.passes.append(x.shape[0])
        if self.fake is not None:
            self.fake.seen(x.shape[0])
        return self.net(x)


@pytest.fixture(autouse=True)
def _fresh_footprints() -> Any:
    chunks.forget_footprints()
    yield
    chunks.forget_footprints()


# -- the argument ------------------------------------------------------------------------------


def spans(chunker: Chunker, total: int, unit: int = 1) -> list[tuple[int, int]]:
    """The ``(start, stop)`` of every pass of ``chunker`` over ``total`` rows, each run empty."""
    found = []
    for part in chunker.passes(total, unit):
        with part as span:
            found.append(span)
    return found


def test_check_batch_size_accepts_ints_and_auto() -> None:
    assert check_batch_size("auto") is None
    assert check_batch_size(None) is None  # the old spelling of "auto"
    assert check_batch_size(3) == 3


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-1, ValueError), ("big", ValueError), (2.5, TypeError), (True, TypeError)],
)
def test_bad_batch_sizes_name_the_argument(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="batch_size must be a positive integer or 'auto'"):
        check_batch_size(value)


CHEAP: dict[str, dict[str, Any]] = {
    "smoothgrad": {"samples": 3},
    "integrated_gradients": {"steps": 3},
    "score_cam": {},
    "occlusion": {"window": 8, "stride": 8},
    "rise": {"masks": 8},
}


@pytest.mark.parametrize("method", list(CHEAP))
@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), ("big", ValueError), (2.5, TypeError)]
)
def test_every_chunked_method_checks_batch_size(method: str, value: Any, error: type) -> None:
    model, x = Recording(), images(1)
    with pytest.raises(error, match="batch_size"):
        salience.explain(model, x, method=method, batch_size=value, **CHEAP[method])


def test_every_chunked_metric_checks_batch_size() -> None:
    model, x = Recording(), images(1)
    maps = torch.rand(1, 16, 16)
    with pytest.raises(ValueError, match="batch_size"):
        deletion(model, x, maps, steps=4, batch_size=0)
    with pytest.raises(TypeError, match="batch_size"):
        insertion(model, x, maps, steps=4, batch_size=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        max_sensitivity(model, x, samples=2, batch_size="many")
    with pytest.raises(ValueError, match="batch_size"):
        salience.metrics.fragility(model, x, epsilon=0.1, steps=1, batch_size=-2)


def test_cli_option_value_auto_reaches_the_method() -> None:
    from salience.cli._options import method_options

    options = method_options(["smoothgrad.batch_size=auto"], ["smoothgrad"], None)
    assert options["smoothgrad"]["batch_size"] == "auto"


# -- the CPU rule ------------------------------------------------------------------------------


def test_cpu_rule_is_four_224_images_per_pass() -> None:
    big = torch.zeros(1, 3, 224, 224)
    assert cpu_rows(big) == 4
    assert cpu_rows(big, images=10) == 10
    assert cpu_rows(torch.zeros(1, 3, 448, 448)) == 1
    assert cpu_rows(torch.zeros(1, 3, 8, 8)) == 256  # capped
    model = Recording()
    salience.smoothgrad(model, images(1), samples=300)
    assert model.passes == [1, 150, 150]  # at most 256 rows, in equal passes


def test_auto_none_and_default_are_the_same_on_the_cpu() -> None:
    x = images(2)
    runs = []
    for value in ("auto", None, "default"):
        model = Recording()
        options = {} if value == "default" else {"batch_size": value}
        runs.append(salience.smoothgrad(model, x, samples=6, **options).values)
        assert model.passes == [2, 12]  # the clean pass, then every row at once
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], runs[2])


# -- maps do not depend on the chunking ------------------------------------------------------


RUNS: dict[str, Any] = {
    "smoothgrad": lambda m, x, b: salience.smoothgrad(m, x, samples=7, batch_size=b).values,
    "integrated_gradients": lambda m, x, b: (
        salience.integrated_gradients(m, x, steps=9, batch_size=b).values
    ),
    "ig_adaptive": lambda m, x, b: (
        salience.integrated_gradients(
            m, x, steps=4, tolerance=1e-3, max_steps=24, batch_size=b
        ).values
    ),
    "score_cam": lambda m, x, b: (
        salience.score_cam(m, x, layer="net.features.3", batch_size=b).values
    ),
    "occlusion": lambda m, x, b: (
        salience.occlusion(m, x, window=4, stride=4, incremental=False, batch_size=b).values
    ),
    "rise": lambda m, x, b: salience.rise(m, x, masks=20, batch_size=b).values,
    "deletion": lambda m, x, b: deletion(m, x, x.abs().sum(1), steps=8, batch_size=b).curve,
    "insertion": lambda m, x, b: insertion(m, x, x[:, 0], steps=8, batch_size=b).curve,
    "max_sensitivity": lambda m, x, b: max_sensitivity(m, x, samples=5, batch_size=b).max,
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(RUNS))
def test_maps_do_not_depend_on_the_chunking(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = images(2)
    run = RUNS[name]
    reference = run(Recording(), x, 1)
    # occlusion's map is a difference of two scores: their float32 error, which depends on
    # the rows per pass on some CPUs (3e-6 here without AVX-512, on differences of 0.2)
    atol = 1e-5 if name == "occlusion" else 1e-6
    for value in (3, "auto"):
        torch.testing.assert_close(run(Recording(), x, value), reference, rtol=1e-5, atol=atol)
    # A simulated CUDA device with room for 2, then 8 rows per pass (after the probe).
    for room in (2, 8):
        fake = Fake(monkeypatch, free=2 * room * 1000, per_row=1000)
        model = Recording(fake)
        torch.testing.assert_close(run(model, x, "auto"), reference, rtol=1e-5, atol=atol)
        assert fake.resets >= 1 or name == "max_sensitivity"
        assert max(model.passes) <= max(room, 4, 2)


# -- the planner on a simulated CUDA device -------------------------------------------------


def test_probe_then_passes_that_fit_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake(monkeypatch, free=2 * 8 * 1000 + 500, per_row=1000)  # 8 rows fit, not 9
    model = Recording(fake)
    x = images(2)
    first = salience.smoothgrad(model, x, samples=20).values  # 40 rows
    # The clean pass, the probe (4 rows, kept), then 36 rows in equal passes of at most 8.
    assert model.passes == [2, 4, 8, 8, 8, 8, 4]
    assert fake.resets == 1
    # The footprint is remembered: the next call has no probe.
    model.passes.clear()
    second = salience.smoothgrad(model, x, samples=20).values
    assert model.passes == [2, 8, 8, 8, 8, 8]
    assert fake.resets == 1
    torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-6)
    reference = salience.smoothgrad(Recording(), x, samples=20, batch_size=1).values
    torch.testing.assert_close(first, reference, rtol=1e-5, atol=1e-6)


def test_work_that_fits_runs_in_one_pass_after_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Recording(Fake(monkeypatch, free=1e12, per_row=1000))
    salience.integrated_gradients(model, images(1), steps=50)
    assert model.passes == [2, 4, 46]  # S(x) and S(x') together, the probe, the rest


def test_rows_are_capped_and_a_power_of_two(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake(monkeypatch, free=1e12, per_row=1)
    chunker = Chunker(images(1), "auto")
    chunker.per_row = 1.0
    assert chunker.most() == MAX_ROWS
    assert chunker.most(remaining=7) == 7
    fake.free = 2 * 1000 * 100  # 100 rows of 1000 bytes in the budget: 64
    chunker.per_row = 1000.0
    assert chunker.most() == 64
    fake.free = 10  # not even one row: still one
    assert chunker.most() == 1
    fake.free = 1e12
    passes = [stop - start for start, stop in spans(Chunker(images(1), "auto"), 3000)]
    # The probe: 4 rows (the fake sees no pass, so its footprint is the 1-byte floor).
    assert passes[0] == 4
    assert sum(passes) == 3000
    assert max(passes[1:]) <= MAX_ROWS
    assert len(passes) == 1 + math.ceil(2996 / MAX_ROWS)


def test_probe_holds_whole_groups_and_an_int_never_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake(monkeypatch, free=2 * 6 * 1000, per_row=1000)
    passes = spans(Chunker(images(1), "auto"), 18, unit=3)
    assert passes[0] == (0, 3)  # 4 rows rounded down to whole groups of 3
    assert all((stop - start) % 3 == 0 for start, stop in passes)
    assert passes[-1][1] == 18
    resets = fake.resets
    assert spans(Chunker(images(1), 5), 10) == [(0, 5), (5, 10)]
    assert fake.resets == resets


def test_a_failed_probe_teaches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    Fake(monkeypatch, free=1e9, per_row=1000)
    chunker = Chunker(images(1), "auto")
    part = next(chunker.passes(10))
    assert part.value == (0, 4)

    def fail() -> None:
        with part:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail()
    assert chunker.probing


def test_the_clean_pass_is_the_probe_of_forward_only_methods(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = Fake(monkeypatch, free=2 * 5 * 1000, per_row=1000)  # 5 rows fit: passes of 4
    model = Recording(fake)
    salience.rise(model, images(2), masks=12)
    assert model.passes[0] == 2
    assert fake.resets == 1
    assert max(model.passes[1:]) == 4


# -- noise and masks on the inputs' device ---------------------------------------------------


@pytest.mark.parametrize("method", ["smoothgrad", "rise", "max_sensitivity"])
def test_noise_is_drawn_on_the_inputs_device(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real_generator, real_randn, real_rand = torch.Generator, torch.randn, torch.rand
    generators: list[Any] = []
    draws: list[Any] = []

    def generator(*args: Any, **kwargs: Any) -> torch.Generator:
        generators.append(kwargs.get("device", args[0] if args else None))
        return real_generator(*args, **kwargs)

    def spy(real: Any) -> Any:
        def draw(*args: Any, **kwargs: Any) -> torch.Tensor:
            if "generator" in kwargs:
                draws.append(kwargs.get("device"))
            return real(*args, **kwargs)

        return draw

    x = images(1)
    model = Recording()
    monkeypatch.setattr(torch, "Generator", generator)
    monkeypatch.setattr(torch, "randn", spy(real_randn))
    monkeypatch.setattr(torch, "rand", spy(real_rand))
    if method == "max_sensitivity":
        max_sensitivity(model, x, samples=3)
    else:
        salience.explain(model, x, method=method, **CHEAP[method])
    assert generators
    assert all(d == x.device for d in generators), generators
    assert draws
    assert all(d == x.device for d in draws), draws


def test_smoothgrad_is_seeded_and_unchanged_on_the_cpu() -> None:
    model, x = Recording(), images(2)
    a = salience.smoothgrad(model, x, samples=4, seed=3, noise_level=0.2)
    b = salience.smoothgrad(model, x, samples=4, seed=3, noise_level=0.2, batch_size=1)
    c = salience.smoothgrad(model, x, samples=4, seed=4, noise_level=0.2)
    torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a.values, c.values)
    # An independent reference with the CPU generator of the earlier versions: the maps on
    # the CPU are those of before the noise moved to the device.
    noise = torch.randn((4, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    sigma = 0.2 * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    target = model.net(x).argmax(1)
    expected = torch.zeros_like(x)
    for i in range(2):
        for k in range(4):
            noisy = (x[i] + sigma[i] * noise[k]).unsqueeze(0).requires_grad_(True)
            (grad,) = torch.autograd.grad(model.net(noisy)[0, target[i]], noisy)
            expected[i] += grad[0] / 4
    torch.testing.assert_close(a.values, expected, rtol=1e-5, atol=1e-6)


def test_cuda_queries_budget_free_plus_cached_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5_000, 80_000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3_000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1_000)
    # Free memory, plus what the caching allocator holds without using it.
    assert chunks._cuda_available_bytes(torch.device("cuda")) == 5_000 + 2_000
    assert chunks._measures_memory(torch.device("cuda", 1))
    assert not chunks._measures_memory(torch.device("cpu"))
    assert not chunks._measures_memory(torch.device("meta"))


def test_footprints_are_remembered_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake(monkeypatch, free=1e9, per_row=1000)
    x = images(1)
    salience.integrated_gradients(Recording(fake), x, steps=8)
    assert fake.resets == 1
    other = Recording(fake)
    salience.integrated_gradients(other, x, steps=8)  # another model: probed again
    assert fake.resets == 2
    salience.integrated_gradients(other, x, steps=8)
    salience.integrated_gradients(other, images(2), steps=8)  # rows of the same shape
    assert fake.resets == 2
    chunks.forget_footprints()
    salience.integrated_gradients(other, x, steps=8)
    assert fake.resets == 3


@pytest.mark.parametrize("in_order", [True, False])
@pytest.mark.parametrize(("start", "rows"), [(0, 6), (0, 4), (2, 1), (2, 7), (4, 3), (5, 10)])
def test_add_rows_adds_each_row_to_its_sample(
    in_order: bool, start: int, rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunks, "_adds_in_order", lambda device: in_order)
    n = 3
    values = torch.randn(rows, 2, 4, 4, generator=torch.Generator().manual_seed(rows))
    acc = torch.ones(n, 2, 4, 4, dtype=torch.float64)
    expected = acc.clone()
    for i in range(rows):  # the definition, one row at a time
        expected[(start + i) % n] += values[i].double()
    chunks.add_rows(acc, values, start)
    torch.testing.assert_close(acc, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients"])
def test_fixed_order_sums_give_the_same_maps(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = images(3)
    run = RUNS[method]
    reference = run(Recording(), x, 1)
    monkeypatch.setattr(chunks, "_adds_in_order", lambda device: False)  # CUDA's way
    for value in (1, 2, 4, "auto"):
        torch.testing.assert_close(run(Recording(), x, value), reference, rtol=1e-5, atol=1e-6)


def test_a_nested_probe_does_not_hide_the_outer_peak(monkeypatch) -> None:
    """A method run inside a metric's measured pass probes too (resetting the peak counter):
    the outer pass still counts the peak it reached before."""
    fake = Fake(monkeypatch, free=1e9, per_row=1_000)
    outer = Chunker(images(8), "auto", kind="outer")
    with outer.measure(2):
        fake.seen(2)  # the outer pass peaks at two rows' worth ...
        inner = Chunker(images(8), "auto", kind="inner")
        with inner.measure(1):  # ... then a nested probe resets the counter
            fake.seen(1)
    assert inner.per_row == pytest.approx(1_000)
    assert outer.per_row == pytest.approx(1_000)  # 2 000 bytes over 2 rows, not 1 000
    # the same through passes(): the nested probe's pass inside the outer probe's pass
    fake2 = Fake(monkeypatch, free=1e9, per_row=500)
    outer = Chunker(images(8), "auto", kind="outer2")
    for part in outer.passes(4):
        with part as (start, stop):
            fake2.seen(stop - start)
            with Chunker(images(8), "auto", kind="inner2").measure(1):
                fake2.seen(1)
    assert outer.per_row == pytest.approx(500)
