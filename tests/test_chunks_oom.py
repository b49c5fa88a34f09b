"""Running out of memory in a batched pass (``batch_size="auto"`` on CUDA): the pass is redone
in smaller passes, the maps are unchanged, the footprint is raised for later calls; an int
``batch_size`` and a pass of the fewest rows raise a clear error. CUDA is simulated on the CPU
(the device queries of :mod:`salience._chunks` are patched, as in ``test_chunks.py``), and
the model raises :class:`torch.OutOfMemoryError` on passes of more than ``limit`` rows."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import salience
import salience._chunks as chunks
import salience.methods.perturbation as perturbation
from conftest import VGGish, _init
from salience._chunks import Chunker, OutOfMemoryError
from salience.metrics import max_sensitivity
from test_chunks import RUNS as CHUNKED
from test_chunks import _fresh_footprints  # noqa: F401  (autouse: every test starts afresh)

ROW = 1000  # simulated bytes per row
ROOM = 16  # rows that the plan gives: the budget is half the free memory
LIMIT = 8  # rows that really fit


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


class Fake:
    """A simulated CUDA device: ``ROW`` bytes per row, room for ``ROOM`` rows in the budget."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows_since_reset = 0
        self.empties = 0
        monkeypatch.setattr(chunks, "_measures_memory", lambda device: True)
        monkeypatch.setattr(chunks, "_cuda_available_bytes", lambda device: 2 * ROOM * ROW)
        monkeypatch.setattr(chunks, "_cuda_allocated_bytes", lambda device: 10_000)
        monkeypatch.setattr(chunks, "_cuda_reset_peak", self._reset)
        monkeypatch.setattr(
            chunks, "_cuda_peak_bytes", lambda d: 10_000 + ROW * self.rows_since_reset
        )
        monkeypatch.setattr(chunks, "_cuda_empty_cache", self._empty)

    def _reset(self, device: torch.device) -> None:
        self.rows_since_reset = 0

    def _empty(self, device: torch.device) -> None:
        self.empties += 1


class Limited(nn.Module):
    """A tiny model that runs out of memory on passes of more than ``limit`` rows, and on every
    call from the ``fail_from``-th on (0-based); it records the rows of every call."""

    def __init__(
        self, limit: int = LIMIT, fake: Fake | None = None, fail_from: int | None = None
    ) -> None:
        super().__init__()
        self.net = _init(VGGish(), 0).eval()
        self.limit, self.fake, self.fail_from = limit, fake, fail_from
        self.passes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        self.passes.append(rows)
        if rows > self.limit or (self.fail_from is not None and len(self.passes) > self.fail_from):
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated, {rows} rows)")
        if self.fake is not None:
            self.fake.rows_since_reset = max(self.fake.rows_since_reset, rows)
        return self.net(x)


@pytest.fixture
def chunkers(monkeypatch: pytest.MonkeyPatch) -> list[Chunker]:
    """Every :class:`Chunker` made during the test."""
    made: list[Chunker] = []
    init = Chunker.__init__

    def record(self: Chunker, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(Chunker, "__init__", record)
    return made


# Every chunked method and metric (test_chunks.py's table), with work that the plan puts in
# passes of more than LIMIT rows (after the clean pass and the probe, which fit).
RUNS: dict[str, Any] = {
    **CHUNKED,
    "smoothgrad_vargrad": lambda m, x, b: (
        salience.smoothgrad(m, x, samples=10, variant="vargrad", batch_size=b).values
    ),
    "ig_adaptive": lambda m, x, b: (  # runs every refinement, up to 16 steps
        salience.integrated_gradients(
            m, x, steps=8, tolerance=1e-9, max_steps=16, batch_size=b
        ).values
    ),
    "rise_callable": lambda m, x, b: (
        salience.rise(m, x, target=lambda out: out[:, 0], masks=10, batch_size=b).values
    ),
}


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(RUNS))
def test_a_pass_out_of_memory_is_redone_smaller(
    name: str, monkeypatch: pytest.MonkeyPatch, chunkers: list[Chunker]
) -> None:
    run, x = RUNS[name], images(2)
    reference = run(Limited(limit=10**6), x, 3)  # fixed passes, no failure
    fake = Fake(monkeypatch)
    model = Limited(fake=fake)
    close(run(model, x, "auto"), reference)
    # The plan asked for more than fits once; the pass was redone, never tried that big again.
    assert sum(rows > LIMIT for rows in model.passes) == 1, model.passes
    assert sum(c.retries for c in chunkers) == 1
    assert fake.empties == 1
    # The raised footprint: the next call of the same model plans passes that fit.
    model.passes.clear()
    close(run(model, x, "auto"), reference)
    assert max(model.passes) <= LIMIT, model.passes
    assert sum(c.retries for c in chunkers) == 1


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.parametrize("cuda", [True, False])
def test_an_int_batch_size_is_not_redone(
    name: str, cuda: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if cuda:
        Fake(monkeypatch)
    model = Limited(limit=4)  # the clean passes (up to 4 rows) fit
    with pytest.raises(OutOfMemoryError, match=r"batch_size=6: pass a smaller batch_size") as err:
        RUNS[name](model, images(2), 6)
    assert "'auto'" in str(err.value)
    assert isinstance(err.value, torch.OutOfMemoryError)  # still caught as one
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)
    assert "simulated" in str(err.value.__cause__)
    assert sum(rows > 4 for rows in model.passes) == 1, model.passes  # tried once, not halved


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(RUNS))
def test_a_pass_of_the_fewest_rows_out_of_memory_says_so(
    name: str, monkeypatch: pytest.MonkeyPatch, chunkers: list[Chunker]
) -> None:
    fake = Fake(monkeypatch)
    model = Limited(fake=fake, fail_from=1)  # the first (clean) pass fits, none after it
    x = images(1)
    with pytest.raises(OutOfMemoryError, match=r"even with \d row\(s\) per pass") as err:
        RUNS[name](model, x, "auto")
    text = str(err.value).lower()
    assert "out of memory on cpu" in text  # the device (a simulated one here)
    for advice in ("free memory", "smaller or fewer inputs", "another device"):
        assert advice in text
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)
    assert "simulated" in str(err.value.__cause__)
    # Halved down to the fewest rows (1, 2 for occlusion: a clean row and an occluded one).
    fewest = 2 if name == "occlusion" else 1
    assert f"even with {fewest} row(s)" in text
    assert min(model.passes[1:]) <= fewest
    assert fake.empties >= 1


@pytest.mark.parametrize("name", ["smoothgrad", "occlusion", "deletion"])
def test_the_cpu_is_left_alone(name: str) -> None:
    model = Limited(limit=4)
    with pytest.raises(torch.OutOfMemoryError, match="simulated") as err:
        RUNS[name](model, images(2), "auto")
    assert type(err.value) is torch.OutOfMemoryError  # not caught, not wrapped
    assert sum(rows > 4 for rows in model.passes) == 1


@pytest.mark.parametrize("name", ["occlusion", "rise", "deletion"])
def test_a_clean_pass_out_of_memory_says_it_is_not_split(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    Fake(monkeypatch)
    model = Limited(limit=2)
    with pytest.raises(OutOfMemoryError, match="clean pass of the 3 inputs") as err:
        RUNS[name](model, images(3), "auto")
    assert "batch_size does not split it" in str(err.value)
    assert "fewer inputs" in str(err.value)
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)
    assert model.passes == [3]


def test_incremental_occlusion_is_redone_with_fewer_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The box-by-box path runs the layers itself: its failure is simulated on its plan."""
    x = images(2)
    model = _init(VGGish(), 0).eval()
    reference = salience.occlusion(model, x, window=4, stride=4, batch_size=3)
    assert isinstance(reference.extras["incremental"], list)  # layers run box by box
    Fake(monkeypatch)  # sees no pass: the footprint is the 1-byte floor, the plan the cap
    real = perturbation.occlusion_scores
    tried: list[int] = []

    def scores(*args: Any, **kwargs: Any) -> Any:
        most = args[8]
        tried.append(most)
        if most > LIMIT:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(perturbation, "occlusion_scores", scores)
    result = salience.occlusion(model, x, window=4, stride=4)
    assert tried == [1024, 512, 256, 128, 64, 32, 16, 8]  # redone from the start, halved
    close(result.values, reference.values)
    assert result.extras["incremental"] == reference.extras["incremental"]


class NoBackward(Limited):
    """Runs out of memory on every pass that will be differentiated (gradients, not scores)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.passes.append(x.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory (simulated, backward)")
        return self.net(x)


def test_a_nested_methods_verdict_goes_through_the_metric(
    monkeypatch: pytest.MonkeyPatch, chunkers: list[Chunker]
) -> None:
    Fake(monkeypatch)
    model = NoBackward()
    with pytest.raises(OutOfMemoryError, match=r"^integrated_gradients: .* even with 1 row"):
        max_sensitivity(
            model, images(1), method="integrated_gradients", samples=2,
            method_options={"steps": 8},
        )  # fmt: skip
    outer = next(c for c in chunkers if c.kind.startswith("max_sensitivity"))
    inner = next(c for c in chunkers if c.kind == "integrated_gradients")
    assert inner.retries == 2  # the probe of 4 rows, then 2, then 1: the fewest
    assert model.passes == [4, 2, 1]
    assert outer.retries == 0  # not redone by the metric: fewer rows cannot help


# -- the planner ------------------------------------------------------------------------------


def run_passes(chunker: Chunker, total: int, limit: int, unit: int = 1) -> list[tuple[int, int]]:
    """The ranges of the passes that ran (the ones over ``limit`` rows run out of memory)."""
    done = []
    for part in chunker.passes(total, unit):
        with part as (start, stop):
            if stop - start > limit:
                raise torch.OutOfMemoryError("simulated")
            done.append((start, stop))
    return done


def test_the_failed_range_is_redone_in_halves_then_replanned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = Fake(monkeypatch)
    chunker = Chunker(images(1), "auto")
    chunker.per_row = float(ROW)  # known: no probe; the plan gives 16 rows
    done = run_passes(chunker, 40, limit=5)
    # Every row once, in order: 3 equal passes of 14 planned, the first failed; the raised
    # footprint, max(2 x ROW, available / 14), plans passes of 4 for the failed rows and on.
    assert [r for a, b in done for r in range(a, b)] == list(range(40))
    assert {b - a for a, b in done} == {4}
    assert chunker.retries == 1
    assert fake.empties == 1
    assert chunker.most() == 4
    # Halving again when the smaller pass fails too: 14 fails, the plan's 4 too, 2 fits.
    chunker.per_row = float(ROW)
    done = run_passes(chunker, 40, limit=3)
    assert [r for a, b in done for r in range(a, b)] == list(range(40))
    assert max(b - a for a, b in done) == 2
    assert chunker.retries == 3
    assert chunks._remembered(None, chunker._key) is None  # no owner: nothing remembered


def test_a_probe_out_of_memory_probes_again_smaller(monkeypatch: pytest.MonkeyPatch) -> None:
    Fake(monkeypatch)
    chunker = Chunker(images(1), "auto")
    done = run_passes(chunker, 10, limit=1)
    assert done[0] == (0, 1)  # probes of 4 and 2 rows failed; 1 row was measured
    assert chunker.retries == 2
    assert not chunker.probing
    # The fake saw no pass (1-byte floor): the footprint is what 2 rows failing implies.
    assert chunker.per_row == 2 * ROOM * ROW / 2
    assert chunker.most() == 1  # with half the memory left as the budget
    assert [r for a, b in done for r in range(a, b)] == list(range(10))


def test_whole_groups_and_the_fewest_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    Fake(monkeypatch)
    chunker = Chunker(images(1), "auto")
    chunker.per_row = float(ROW)
    done = run_passes(chunker, 30, limit=7, unit=3)  # 15 fails, 6 (not 7.5) fits
    assert all((b - a) % 3 == 0 and b - a <= 7 for a, b in done)
    assert [r for a, b in done for r in range(a, b)] == list(range(30))
    with pytest.raises(OutOfMemoryError, match=r"even with 3 row\(s\) per pass") as err:
        run_passes(Chunker(images(1), "auto"), 30, limit=2, unit=3)
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)


def test_other_errors_and_a_nested_verdict_go_through(monkeypatch: pytest.MonkeyPatch) -> None:
    Fake(monkeypatch)
    chunker = Chunker(images(1), "auto")
    chunker.per_row = float(ROW)

    def fail(error: Exception) -> None:
        for part in chunker.passes(40):
            with part:
                raise error

    for error in (ValueError("bad"), OutOfMemoryError("inner: even with 1 row(s) per pass")):
        with pytest.raises(type(error)) as err:
            fail(error)
        assert err.value is error
    assert chunker.retries == 0


def test_a_plan_is_redone_from_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    Fake(monkeypatch)
    chunker = Chunker(images(1), "auto")
    chunker.per_row = float(ROW)
    tried = []
    for plan in chunker.plans(unit=2):
        with plan as most:
            tried.append(most)
            if most > 3:
                raise torch.OutOfMemoryError("simulated")
    assert tried == [16, 8, 4, 2]
    assert chunker.retries == 3

    def fail() -> None:
        for plan in chunker.plans(unit=2):
            with plan:
                raise torch.OutOfMemoryError("simulated")

    with pytest.raises(OutOfMemoryError, match=r"even with 2 row\(s\)"):
        fail()


@pytest.mark.parametrize("in_order", [True, False])
def test_add_rows_adds_every_pair_of_a_pass(
    in_order: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunks, "_adds_in_order", lambda device: in_order)
    values = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    acc, acc_sq = torch.ones(3, 2, 3), torch.ones(3, 2, 3, dtype=torch.float64)
    expected, expected_sq = acc.clone(), acc_sq.clone()
    chunks.add_rows(expected, values, 4)
    chunks.add_rows(expected_sq, values * values, 4)
    chunks.add_rows(acc, values, 4, (acc_sq, values * values))
    assert torch.equal(acc, expected)
    assert torch.equal(acc_sq, expected_sq)


class GradLimited(Limited):
    """Runs out of memory only on passes with autograd of more than ``limit`` rows (the clean
    no-grad pass of all inputs fits)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        return self.net(x)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fragility_attacks_fewer_samples_after_running_out_of_memory(
    monkeypatch: pytest.MonkeyPatch, chunkers: list[Chunker]
) -> None:
    from salience.metrics import fragility

    x = images(24)

    def run(model: nn.Module, batch_size: Any) -> tuple[torch.Tensor, ...]:
        found = fragility(model, x, "gradient", epsilon=0.05, steps=2, batch_size=batch_size)
        return found.attacked_map, found.perturbed, found.attacked.top_k_intersection

    reference = run(GradLimited(limit=10**6), 3)
    fake = Fake(monkeypatch)
    model = GradLimited(fake=fake)
    for got, want in zip(run(model, "auto"), reference, strict=True):
        close(got, want)
    # probe of 4 samples, then 16 (more than fit), redone as 8 + 8 + 4 ...
    assert sum(rows > LIMIT for rows in model.passes) == 1, model.passes
    assert sum(c.retries for c in chunkers) == 1
    model.passes.clear()  # ... and the next call plans passes that fit
    for got, want in zip(run(model, "auto"), reference, strict=True):
        close(got, want)
    assert max(model.passes) <= LIMIT, model.passes
