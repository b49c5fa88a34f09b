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

The maps do not depend on the chunking beyond float rounding (sums in another order). On
CUDA the automatic split depends on the memory free at the time of the call: pass an int
``batch_size`` for passes that are the same on every call. The CUDA probe resets the device's
peak-memory counter (``torch.cuda.max_memory_allocated`` then counts from the probe).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from typing import Any, Literal, TypeAlias

import torch
from torch import Tensor

from ._checks import CPU_IMAGES, check_batch_size, cpu_rows, even_chunks

__all__ = ["CUDA_MEMORY_FRACTION", "MAX_ROWS", "PROBE_ROWS", "BatchSize", "Chunker", "add_rows"]

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


# -- remembered footprints -------------------------------------------------------------------

_FOOTPRINTS: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], float]] = (
    weakref.WeakKeyDictionary()
)


def _remembered(owner: Any, key: tuple[Any, ...]) -> float | None:
    if owner is None:
        return None
    try:
        return _FOOTPRINTS.get(owner, {}).get(key)
    except TypeError:  # not weakly referenceable
        return None


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

    Args:
        like: A row's shape, dtype and device: the inputs (``like[0]`` is one row).
        batch_size: A positive int, ``"auto"`` or ``None`` (``"auto"``); checked here.
        backward: Whether the passes run a backward too (for the CPU rule and the memory
            record).
        owner: What the footprint is remembered for, usually the model (weakly referenced);
            ``None`` remembers nothing.
        kind: Names the kind of pass in the record (``"smoothgrad"``, ``"score_cam"``...).
        name: The argument's name in error messages.
        images: 224² images per pass of the CPU rule (:data:`salience._checks.CPU_IMAGES`).

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
    ) -> None:
        fixed = check_batch_size(batch_size, name)
        self.device = like.device
        self.cpu_rows = cpu_rows(like, images=images)
        self.measured = fixed is None and _measures_memory(self.device)
        self.fixed: int | None = fixed if fixed is not None or self.measured else self.cpu_rows
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
        """Measure the block, a real pass of ``rows`` rows, when the footprint is unknown.

        Elsewhere (an int ``batch_size``, the CPU, a known footprint) it does nothing. A block
        that raises teaches nothing.
        """
        if not self.probing or rows < 1:
            yield
            return
        before = _cuda_allocated_bytes(self.device)
        _cuda_reset_peak(self.device)
        yield
        used = _cuda_peak_bytes(self.device) - before
        self.per_row = max(1.0, used / rows)
        _remember(self._owner, self._key, self.per_row)

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

    def split(self, total: int, unit: int = 1, *, even: bool = True) -> Iterator[tuple[int, int]]:
        """Yield ``(start, stop)`` of the passes over ``total`` rows, in order.

        Passes hold whole groups of ``unit`` rows (a callable target sees whole copies of the
        batch). On CUDA with an automatic size, the first pass is the probe, measured while
        the caller runs it (between this generator's first and second step). ``even``
        splits the rest into passes of equal size (:func:`salience._checks.even_chunks`);
        otherwise full passes and a last, shorter one.
        """
        start = 0
        if self.probing and total > 0:
            stop = min(total, self.probe_rows(unit))
            with self.measure(stop):
                yield 0, stop
            start = stop
        if start >= total:
            return
        left = total - start
        most = self.most(left)
        step = even_chunks(left, most, unit) if even else max(unit, most // unit * unit)
        for begin in range(start, total, step):
            yield begin, min(begin + step, total)


# -- accumulating the rows of a pass ---------------------------------------------------------


def _adds_in_order(device: torch.device) -> bool:
    """Whether ``index_add_`` on ``device`` adds rows one after the other (the CPU does)."""
    return device.type == "cpu"


def add_rows(acc: Tensor, values: Tensor, start: int) -> None:
    """``acc[r % N] += values[r - start]`` for the rows ``r = start, start + 1, ...`` of a pass.

    ``acc`` has ``N`` rows, one per sample; a pass holds consecutive rows of whole or partial
    copies of the batch (row ``r`` belongs to sample ``r % N``). The CPU adds with
    ``index_add_``, row after row. On CUDA ``index_add_`` adds with atomics, in an order that
    changes from run to run (so would the map's last bits): there the rows are laid out as
    copies of the batch (missing rows zero) and summed over the copies, a reduction in a fixed
    order.
    """
    n, rows = acc.shape[0], values.shape[0]
    values = values.to(acc.dtype)
    if _adds_in_order(acc.device):
        sample = torch.arange(start, start + rows, device=acc.device) % n
        acc.index_add_(0, sample, values)
        return
    lead = start % n
    copies = -(-(lead + rows) // n)
    if lead == 0 and rows == copies * n:
        laid = values
    else:
        laid = values.new_zeros((copies * n, *values.shape[1:]))
        laid[lead : lead + rows] = values
    acc += laid.view(copies, n, *values.shape[1:]).sum(0)
