"""Rows per pass of the batched methods: ``batch_size="auto"`` follows the device.

Integrated Gradients, SmoothGrad, Score-CAM, occlusion, RISE, the deletion and insertion
curves and max-sensitivity run many rows (steps, noisy copies, masked images) through the
model, ``batch_size`` rows per forward pass. An int fixes it; ``"auto"`` (the default, and
``None``, its old spelling) picks it from the device:

- **CPU** (and any device other than CUDA): a fixed number of rows, about four 224² images
  per pass (:func:`salience._checks.cpu_rows`, measured on two cores: small chunks keep their
  activations in cache; incremental occlusion, cheap per row, takes ten).
- **CUDA**: from the free memory and the measured footprint of one row. The first pass of a
  call is a probe of at most :data:`PROBE_ROWS` rows, a real pass whose result is kept; its
  peak allocation over what was allocated before it (``torch.cuda.reset_peak_memory_stats``
  and ``max_memory_allocated``), divided by its rows, is the footprint of a row. The
  following passes take ``budget / footprint`` rows, rounded down to a power of two, where
  the budget is :data:`CUDA_MEMORY_FRACTION` of the memory left: free device memory
  (``torch.cuda.mem_get_info``) plus what PyTorch's caching allocator holds without using.
  Passes are capped at :data:`MAX_ROWS` rows and at the rows still to do, so that work that
  fits runs in one pass. The footprint is remembered per model, input shape, dtype and kind
  of pass, so later calls skip the probe and run everything that fits in one pass.

**Out of memory.** A probe of a few rows cannot see everything (workspaces that grow with
the batch, fragmentation, other work on the device). On CUDA with ``"auto"``, a pass that
runs out of memory (:class:`torch.OutOfMemoryError`) is redone: the cache is emptied, the
remembered footprint is raised so that the plan gives at most half the rows (for this call
and the later ones), and the failed rows and the rest run in passes of half the size,
halving again down to one row (or one copy of the batch for a callable target); a pass of
that size that still fails raises :class:`OutOfMemoryError`, which says so. A failed
pass adds nothing: the call sites write their results only once the model has run and the
values are computed, so the maps are those of a run without the failure. Occlusion and
RISE, whose passes follow their own plan, redo the plan with half the rows per pass.
:attr:`Chunker.retries` counts the passes redone. With an int ``batch_size``, chosen by the
user, nothing is redone: the error names ``batch_size`` and the rows of the pass. A clean
pass of the inputs, run in one batch (the probe of occlusion, RISE and the curves), cannot
be split: it raises an error saying so. The CPU is left alone (its allocation failures are
not :class:`torch.OutOfMemoryError`).

The maps do not depend on the chunking beyond float rounding (sums in another order). On
CUDA the automatic split depends on the memory free at the time of the call: pass an int
``batch_size`` for passes that are the same on every call. The CUDA probe resets the device's
peak-memory counter (``torch.cuda.max_memory_allocated`` then counts from the probe).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Generic, Literal, TypeAlias, TypeVar

import torch
from torch import Tensor

from ._checks import CPU_IMAGES, check_batch_size, cpu_rows, even_chunks
from ._weak import ByIdentity

__all__ = [
    "CUDA_MEMORY_FRACTION",
    "MAX_ROWS",
    "PROBE_ROWS",
    "BatchSize",
    "Chunker",
    "OutOfMemoryError",
    "Pass",
    "add_rows",
]

BatchSize: TypeAlias = "int | Literal['auto'] | None"
"""Rows per pass: a positive int, or ``"auto"`` (``None`` means ``"auto"`` too)."""

CUDA_MEMORY_FRACTION = 0.5
"""Share of the memory left on a CUDA device that one automatic pass may use. Half leaves
room for what a probe of a few rows does not show (larger convolution workspaces for larger
batches, fragmentation) and for other work on the device."""

MAX_ROWS = 1024
"""Most rows in one automatic pass on CUDA: beyond this a GPU gains nothing from more rows."""

PROBE_ROWS = 4
"""Rows of the first, measured pass on CUDA (fewer when the CPU rule allows fewer)."""

# -- device queries (small functions, so that tests can simulate a device) ------------------


def _cuda_available_bytes(device: torch.device) -> int:
    """Free device memory plus what the caching allocator holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free) + max(0, int(cached))


def _cuda_allocated_bytes(device: torch.device) -> int:
    return int(torch.cuda.memory_allocated(device))


def _cuda_reset_peak(device: torch.device) -> None:
    torch.cuda.reset_peak_memory_stats(device)


def _cuda_peak_bytes(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device))


def _measures_memory(device: torch.device) -> bool:
    """Whether the automatic chunk size measures memory on ``device`` (CUDA only)."""
    return device.type == "cuda"


def _cuda_empty_cache(device: torch.device) -> None:
    """Hand the blocks the caching allocator holds without using back to the device."""
    torch.cuda.empty_cache()


class OutOfMemoryError(torch.OutOfMemoryError):
    """A pass of a batched method ran out of memory and nothing smaller can be tried.

    Raised with an int ``batch_size`` (the user's choice: nothing is redone), when a pass of
    the fewest rows still fails, or when a pass that is never split (the clean inputs) fails.
    A subclass of :class:`torch.OutOfMemoryError`: code that catches that still catches it;
    an enclosing chunked loop (max-sensitivity around a chunked method) lets it through.
    """


# -- probes: peak allocation over a block, also when probes nest ----------------------------

_OPEN = threading.local()


class _Probe:
    """The peak allocation of a block over what was allocated before it.

    A probe resets the device's peak counter. A probe inside another one (a chunked method run
    by a metric's pass, by fragility's attack) would hide the outer block's peak so far:
    every reset first folds the peak reached until then into the open probes of the device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seen = 0
        probes: list[_Probe] = getattr(_OPEN, "probes", [])
        _OPEN.probes = probes
        peak = _cuda_peak_bytes(device) if probes else 0
        for outer in probes:
            if outer.device == device:
                outer.seen = max(outer.seen, peak)
        self.before = _cuda_allocated_bytes(device)
        _cuda_reset_peak(device)
        probes.append(self)

    def close(self) -> int:
        """Stop measuring; return the block's peak over the allocation before it."""
        probes: list[_Probe] = _OPEN.probes
        if self in probes:
            probes.remove(self)
        return max(self.seen, _cuda_peak_bytes(self.device)) - self.before


# -- remembered footprints -------------------------------------------------------------------

_FOOTPRINTS: ByIdentity[Any, dict[tuple[Any, ...], float]] = ByIdentity()


def _remembered(owner: Any, key: tuple[Any, ...]) -> float | None:
    # an owner that takes no weak reference (None included) is never remembered: not found
    return _FOOTPRINTS.get(owner, {}).get(key)


def _remember(owner: Any, key: tuple[Any, ...], value: float) -> None:
    if owner is None:
        return
    with contextlib.suppress(TypeError):
        _FOOTPRINTS.setdefault(owner, {})[key] = value


def forget_footprints() -> None:
    """Forget every measured footprint (the next call on CUDA probes again)."""
    _FOOTPRINTS.clear()


class Chunker:
    """Plan the passes of one batched loop: how many rows each forward pass takes.

    A loop over ``total`` rows reads ``for part in chunker.passes(total): with part as
    (start, stop): ...``: the ``with`` block is the pass, and an out-of-memory error in it
    is handled as the module docstring says (on CUDA with ``"auto"``: the rows are redone
    in smaller passes). The block must write nothing that a redone pass would write twice:
    every allocation (the model, the products of its values) comes before the first write.

    Args:
        like: A row's shape, dtype and device: the inputs (``like[0]`` is one row).
        batch_size: A positive int, ``"auto"`` or ``None`` (``"auto"``); checked here.
        backward: Whether the passes run a backward too (for the CPU rule and the memory
            record).
        owner: What the footprint is remembered for, usually the model (weakly referenced);
            ``None`` remembers nothing.
        kind: Names the kind of pass in the record and in errors (``"smoothgrad"``...).
        name: The argument's name in error messages.
        images: 224² images per pass of the CPU rule (:data:`salience._checks.CPU_IMAGES`).
        cost: Rows of the model that each row of the loop stands for (the CPU rule and the
            probe take that many times fewer): a sample attacked by fragility runs its
            method's rows twice per step.

    Raises:
        TypeError, ValueError: a bad ``batch_size``, naming ``name``.
    """

    def __init__(
        self,
        like: Tensor,
        batch_size: BatchSize,
        *,
        backward: bool = False,
        owner: Any = None,
        kind: str = "",
        name: str = "batch_size",
        images: int = CPU_IMAGES,
        cost: int = 1,
    ) -> None:
        fixed = check_batch_size(batch_size, name)
        self.device = like.device
        self.cpu_rows = max(1, cpu_rows(like, images=images) // max(1, cost))
        self.measured = fixed is None and _measures_memory(self.device)
        self.batch_size = fixed
        self.fixed: int | None = fixed if fixed is not None or self.measured else self.cpu_rows
        self.name = name
        self.kind = kind
        self.retries = 0
        """Passes (or plans) redone with fewer rows after running out of memory."""
        self._floor = 1.0  # the least footprint that a failed probe implies
        self._owner = owner
        self._key = (kind, tuple(like.shape[1:]), like.dtype, str(self.device), backward)
        self.per_row: float | None = _remembered(owner, self._key) if self.measured else None

    @property
    def probing(self) -> bool:
        """Whether the next pass is a probe (CUDA, automatic, footprint not yet known)."""
        return self.measured and self.per_row is None

    def probe_rows(self, unit: int = 1) -> int:
        """Rows of a probe pass: whole groups of ``unit`` rows, at least one group."""
        rows = min(PROBE_ROWS, self.cpu_rows)
        return max(unit, rows // unit * unit)

    @contextlib.contextmanager
    def measure(self, rows: int) -> Iterator[None]:
        """Run the block, a clean pass of ``rows`` rows in one batch; measure it as a probe.

        The block is measured when the footprint is unknown (CUDA, ``"auto"``); elsewhere
        (an int ``batch_size``, the CPU, a known footprint) it runs as it is. A block that
        raises teaches nothing. The pass cannot be split: running out of memory in it raises
        :class:`OutOfMemoryError` saying so (except on the CPU with ``"auto"``, left alone).
        """
        try:
            if not self.probing or rows < 1:
                yield
                return
            probe = _Probe(self.device)
            try:
                yield
            finally:
                used = probe.close()
            self._learn(used, rows)
        except torch.OutOfMemoryError as exc:
            if isinstance(exc, OutOfMemoryError) or not self._guards:
                raise
            if self.measured:
                _cuda_empty_cache(self.device)
            raise OutOfMemoryError(
                f"{self._what}: out of memory on {self.device} in the clean pass of the {rows} "
                f"inputs, which runs them in one batch ({self.name} does not split it): pass "
                "fewer inputs per call or smaller inputs, free memory on the device (other "
                "tensors, other processes), or run on another device"
            ) from exc

    def most(self, remaining: int | None = None) -> int:
        """Rows per pass from now on, at most ``remaining`` (when given), at least 1."""
        if self.fixed is not None:
            rows = self.fixed
        elif self.per_row is None:
            rows = self.probe_rows()
        else:
            budget = CUDA_MEMORY_FRACTION * _cuda_available_bytes(self.device)
            fit = max(1, int(budget // self.per_row))
            rows = min(MAX_ROWS, 2 ** int(math.log2(fit)))
        if remaining is not None:
            rows = min(rows, max(1, remaining))
        return rows

    def passes(
        self, total: int, unit: int = 1, *, even: bool = True
    ) -> Iterator[Pass[tuple[int, int]]]:
        """Yield the passes over ``total`` rows, in order: ``with part as (start, stop):``.

        Passes hold whole groups of ``unit`` rows (a callable target sees whole copies of the
        batch). On CUDA with an automatic size, the first pass is the probe, measured inside
        its ``with``. ``even`` splits the rest into passes of equal size
        (:func:`salience._checks.even_chunks`); otherwise full passes and a last, shorter one.
        A pass that ran out of memory (and was swallowed by its ``with``) is followed by the
        same rows in passes of half its size (whole groups, at least one), then by the rest,
        planned again with the raised footprint.
        """
        start, step, cap = 0, 0, total
        while start < total:
            left = total - start
            probe = self.probing
            if probe:
                rows = min(left, self.probe_rows(unit), cap)
            else:
                if not step:
                    most = min(self.most(left), cap)
                    step = even_chunks(left, most, unit) if even else max(unit, most // unit * unit)
                rows = min(step, left)
            part = Pass(self, (start, start + rows), rows, unit, probe=probe)
            yield part
            if part.failed:
                cap = max(unit, rows // 2 // unit * unit)
                self._shrink(rows, probe)
                step = 0
            else:
                start += rows

    def plans(self, unit: int = 1) -> Iterator[Pass[int]]:
        """Yield tries at work that plans its own passes: ``with plan as most:``.

        For loops that are not a plain run of rows (occlusion's windows, RISE's masks): the
        block runs the whole work with at most ``most`` rows per pass (:meth:`most`). When it
        runs out of memory (CUDA, ``"auto"``), the work is redone from the start with half the
        rows per pass, down to ``unit`` rows, the fewest its plan can run; the block must
        start from nothing each time. A block that succeeds ends the loop.
        """
        cap: int | None = None
        while True:
            most = self.most() if cap is None else min(self.most(), cap)
            part = Pass(self, most, most, unit, probe=False)
            yield part
            if not part.failed:
                return
            cap = max(unit, most // 2)
            self._shrink(most, probe=False)

    # -- out of memory ---------------------------------------------------------------------

    @property
    def _guards(self) -> bool:
        """Whether out-of-memory errors are handled: CUDA with ``"auto"``, or an int."""
        return self.measured or self.batch_size is not None

    @property
    def _what(self) -> str:
        return self.kind or "a batched method"

    def _learn(self, used: int, rows: int) -> None:
        """Record the footprint of a row from a probe of ``rows`` rows that used ``used`` bytes."""
        self.per_row = max(self._floor, used / rows)
        _remember(self._owner, self._key, self.per_row)

    def _shrink(self, rows: int, probe: bool) -> None:
        """After a pass of ``rows`` rows ran out of memory: empty the cache, raise the footprint.

        The raised footprint plans at most half of ``rows`` in the memory left now (and at
        least halves the plan): later calls of the same model do not overshoot again. A
        probe that failed is not measured: the next, smaller probe measures, and its
        footprint is raised to what the failure implies.
        """
        _cuda_empty_cache(self.device)
        implied = _cuda_available_bytes(self.device) / max(1, rows)
        if probe or self.per_row is None:
            self._floor = max(self._floor, implied)
            return
        self.per_row = max(2 * self.per_row, implied)
        _remember(self._owner, self._key, self.per_row)

    def _out_of_memory(self, exc: BaseException, rows: int, unit: int) -> bool:
        """Handle running out of memory in a pass of ``rows`` rows: ``True`` to redo it.

        Raises:
            OutOfMemoryError: with an int ``batch_size``, or when ``rows`` is the fewest.
        """
        if self.batch_size is not None:
            raise OutOfMemoryError(
                f"{self._what}: out of memory on {self.device} in a pass of {rows} rows with "
                f"{self.name}={self.batch_size}: pass a smaller {self.name}, or "
                f"{self.name}='auto' to fit the passes to the memory left (halving them after "
                "running out of memory)"
            ) from exc
        if not self.measured:
            return False
        if rows <= unit:
            _cuda_empty_cache(self.device)
            raise OutOfMemoryError(
                f"{self._what}: out of memory on {self.device} even with {rows} row(s) per "
                f"pass, the fewest this call can run ({self.retries} earlier pass(es) redone "
                "with fewer rows): the memory left on the device does not hold this model at "
                "this input size. Free memory on the device (other tensors, other processes), "
                "use smaller or fewer inputs per call, or run on another device"
            ) from exc
        self.retries += 1
        return True


T = TypeVar("T")


class Pass(Generic[T]):
    """One pass of a :class:`Chunker` loop (or one try of a plan), run as a ``with`` block.

    Entering gives ``value``: ``(start, stop)`` from :meth:`Chunker.passes`, the rows per
    pass from :meth:`Chunker.plans`. A probe is measured. On CUDA with ``"auto"`` an
    out-of-memory error of a pass that can still be halved is swallowed and the pass marked
    :attr:`failed`: its generator then redoes the rows (nothing after the ``with`` in the
    loop body may assume that it ran). With an int ``batch_size`` or at the fewest rows, the
    error becomes an :class:`OutOfMemoryError` that says what to do.
    """

    def __init__(self, chunker: Chunker, value: T, rows: int, unit: int, *, probe: bool) -> None:
        self.chunker = chunker
        self.value = value
        self.rows = rows
        self.unit = unit
        self.probe = probe
        self.failed = False
        self._probe: _Probe | None = None

    def __enter__(self) -> T:
        if self.probe:
            self._probe = _Probe(self.chunker.device)
        return self.value

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        used = self._probe.close() if self._probe is not None else 0
        if exc is None:
            if self._probe is not None:
                self.chunker._learn(used, self.rows)
            return False
        if not isinstance(exc, torch.OutOfMemoryError) or isinstance(exc, OutOfMemoryError):
            return False  # other errors, and a nested loop's verdict, go through
        self.failed = self.chunker._out_of_memory(exc, self.rows, self.unit)
        return self.failed


# -- accumulating the rows of a pass ---------------------------------------------------------


def _adds_in_order(device: torch.device) -> bool:
    """Whether ``index_add_`` on ``device`` adds rows one after the other (the CPU does)."""
    return device.type == "cpu"


def add_rows(acc: Tensor, values: Tensor, start: int, *more: tuple[Tensor, Tensor]) -> None:
    """``acc[r % N] += values[r - start]`` for the rows ``r = start, start + 1, ...`` of a pass.

    ``acc`` has ``N`` rows, one per sample; a pass holds consecutive rows of whole or partial
    copies of the batch (row ``r`` belongs to sample ``r % N``). The CPU adds with
    ``index_add_``, row after row. On CUDA ``index_add_`` adds with atomics, in an order that
    changes from run to run (so would the map's last bits): there the rows are laid out as
    copies of the batch (missing rows zero) and summed over the copies, a reduction in a fixed
    order.

    ``more`` are further ``(acc, values)`` pairs of the same pass. Every sum is computed
    before the first is added: a pass that runs out of memory here adds nothing, and is
    redone whole (see :meth:`Chunker.passes`).
    """
    pairs = [(acc, values), *more]
    if _adds_in_order(acc.device):
        n, rows = acc.shape[0], values.shape[0]
        sample = torch.arange(start, start + rows, device=acc.device) % n
        cast = [v.to(a.dtype) for a, v in pairs]
        for (a, _), v in zip(pairs, cast, strict=True):
            a.index_add_(0, sample, v)
        return
    sums = [_copy_sum(a, v, start) for a, v in pairs]
    for (a, _), total in zip(pairs, sums, strict=True):
        a += total


def _copy_sum(acc: Tensor, values: Tensor, start: int) -> Tensor:
    """Sum the rows of a pass over the copies of the batch, in a fixed order: ``(N, ...)``."""
    n, rows = acc.shape[0], values.shape[0]
    values = values.to(acc.dtype)
    lead = start % n
    copies = -(-(lead + rows) // n)
    if lead == 0 and rows == copies * n:
        laid = values
    else:
        laid = values.new_zeros((copies * n, *values.shape[1:]))
        laid[lead : lead + rows] = values
    return laid.view(copies, n, *values.shape[1:]).sum(0)
