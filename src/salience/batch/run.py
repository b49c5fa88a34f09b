"""Explaining a whole dataset: stream the images, run the methods, store every map.

:func:`run` reads the inputs with a :class:`torch.utils.data.DataLoader` (``num_workers``
processes decode and preprocess while the model works), runs each method on batches, and
writes each map to a :class:`~salience.batch.Store` as soon as it is computed. A rerun with the
same ``out`` skips the maps already stored, so an interrupted job resumes where it stopped; an
entry is never half-written. An input that cannot be read or explained is recorded in
``failures.csv`` with the reason, and the run goes on.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import warn
from .._io import Progress
from ..registry import check_options, explain, get_method
from ..targets import _is_index
from .store import Store, entry_key

__all__ = ["IMAGE_EXTENSIONS", "BatchSummary", "Outcome", "find_images", "run"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
"""File endings :func:`find_images` picks up in a directory (case does not matter)."""


@dataclass
class BatchSummary:
    """What a :func:`run` did.

    Attributes:
        store: The store the maps are in.
        written: Maps computed and written by this run.
        skipped: Maps already in the store (from an earlier run), not recomputed.
        failures: ``(source, reason)`` of every input or map that failed.
        seconds: Wall time of the run.
        images: Inputs this run computed maps of, with no method failing on them (what
            :attr:`images_per_second` counts).
        overlays: Overlays drawn from maps an earlier run stored (asked for with
            ``overlays=True`` after a run without, or lost to an interruption).
    """

    store: Store
    written: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    images: int = 0
    overlays: int = 0

    @property
    def images_per_second(self) -> float:
        """Inputs explained (by every method) per second of this run; failed ones do not count."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def __repr__(self) -> str:
        return (
            f"BatchSummary(written={self.written}, skipped={self.skipped}, "
            f"failed={len(self.failures)}, images/s={self.images_per_second:.2f}, "
            f"store={os.fspath(self.store.path)!r})"
        )


def find_images(sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Expand directories (recursively, :data:`IMAGE_EXTENSIONS`) and glob patterns into files.

    Files named explicitly are kept whatever their ending, and so are names of files that do
    not exist, and broken links in a directory: each fails later, reported, while the run goes
    on with the others (as ``salience explain`` does).

    Raises:
        FileNotFoundError: a glob pattern that matches no file, or no source that exists.
    """
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    files: list[str] = []
    missing: list[str] = []
    for source in sources:
        text = os.fspath(source)
        path = Path(text)
        if path.is_dir():
            files.extend(
                sorted(
                    os.fspath(p)
                    for p in path.rglob("*")
                    if p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_file() or p.is_symlink())
                )
            )
        elif path.is_file():
            files.append(text)
        elif glob.has_magic(text):
            matched = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matched:
                raise FileNotFoundError(f"{text}: no file matches this pattern")
            files.extend(matched)
        else:
            missing.append(text)
            files.append(text)  # reported when it is read
    if missing and len(missing) == len(files):
        raise FileNotFoundError(f"{missing[0]}: no such file or directory")
    return list(dict.fromkeys(files))  # each file once, in the order found


class _Inputs(torch.utils.data.Dataset):
    """The items of a run: ``(position, source, input, image, label, error)``.

    Reading errors are returned, not raised, so that a worker never stops the loader.
    """

    def __init__(
        self,
        items: Sequence[Any],
        sources: Sequence[str],
        preprocess: Callable[[Any], Tensor] | None,
        crop: Callable[[Any], Any] | None,
        max_pixels: int | None,
    ) -> None:
        self.items = items
        self.sources = sources
        self.preprocess = preprocess
        self.crop = crop
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, str, Tensor | None, Any, Any, str | None]:
        source = self.sources[i]
        try:
            item = self.items[i]
            label = None
            image = None
            if isinstance(item, str | os.PathLike):
                from .._io import load_image

                image = load_image(item, max_pixels=self.max_pixels)
                if self.preprocess is None:
                    raise ValueError("files need a preprocess function (or a model that has one)")
                x = self.preprocess(image)
                image = self.crop(image) if self.crop is not None else None
            else:
                if isinstance(item, tuple | list):
                    item, label = item[0], (item[1] if len(item) > 1 else None)
                x = self.preprocess(item) if self.preprocess is not None else item
            if not isinstance(x, Tensor):
                raise TypeError(f"the input is a {type(x).__name__}, not a tensor")
            x = x.detach().cpu()
            if x.ndim == 4 and x.shape[0] == 1:
                x = x[0]
            if x.ndim != 3:
                raise ValueError(f"an input must be (C, H, W), got shape {tuple(x.shape)}")
            if isinstance(label, Tensor):
                label = int(label)
            return i, source, x, image, label, None
        except Exception as exc:
            text = str(exc).removeprefix(f"{source}: ")  # the source is said once, by the caller
            text = " ".join(text.split()) or type(exc).__name__
            return i, source, None, None, None, text


def _collate(batch: list[Any]) -> list[Any]:
    return batch


_OVERLAY_OPTIONS = frozenset({"style", "cmap", "alpha", "percentile"})
"""Keyword arguments of :func:`salience.viz.render` that ``overlay_options`` may set."""


def _drop_duplicates(
    sources: list[str], identities: list[str | None]
) -> tuple[list[str], list[str], list[str | None]]:
    """Keep the first of the inputs that are one file typed differently (``a.png ./a.png``).

    They are one entry of the store: explaining each would compute the same map again and
    count it as written each time, while the store holds it once. A warning names them.
    """
    first: dict[str | None, str] = {}
    again: list[str] = []
    for source, identity in zip(sources, identities, strict=True):
        if identity in first:
            again.append(f"{source} (= {first[identity]})")
        else:
            first[identity] = source
    if again:
        are = "input is a file" if len(again) == 1 else "inputs are a file"
        warn(f"{len(again)} {are} given earlier, explained once: {', '.join(again)}")
    kept = list(first.values())
    return kept, list(kept), list(first)


def run(
    model: nn.Module,
    dataset: str | os.PathLike[str] | Sequence[Any] | torch.utils.data.Dataset,
    methods: Sequence[str],
    out: str | os.PathLike[str],
    *,
    target: int | str | Callable[..., Any] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    preprocess: Callable[[Any], Tensor] | None = None,
    crop: Callable[[Any], Any] | None = None,
    overlays: bool = False,
    overlay_options: Mapping[str, Any] | None = None,
    max_pixels: int | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    engine: str = "local",
    ray_address: str | None = None,
) -> BatchSummary:
    """Explain every input of ``dataset`` with ``methods`` and store the maps in ``out``.

    Args:
        model: A classifier, in eval mode.
        dataset: A directory, a glob pattern or a list of image files (decoded and
            preprocessed in the loader's workers), or a map-style dataset / sequence of
            ``(C, H, W)`` tensors or ``(tensor, label)`` pairs.
        methods: Registered method names.
        out: The store directory (created if new; an existing store is resumed, or extended
            with more methods: its model, target and each method's options must be the same).
        target: ``None``: the predicted class; a class index; ``"label"``: the dataset's
            label of each input; or a callable target (see :mod:`salience.targets`). One class
            per input comes with the dataset: ``(input, label)`` pairs and ``"label"``.
        options: ``{method: {option: value}}`` for methods of ``methods``.
        batch_size: Inputs per batch (each method runs on a batch at once).
        num_workers: Loader processes decoding images (0: in this process).
        preprocess: ``image -> (1, C, H, W) or (C, H, W)`` tensor, run in the workers;
            default the model's ``preprocess`` for files. It should return a CPU tensor.
        crop: ``image -> the PIL image the model sees``, for overlays; default ``model.crop``.
        overlays: Also write each map drawn over the image as a PNG. A rerun draws the
            overlays missing from maps already stored (they are not recomputed).
        overlay_options: Keyword arguments of :func:`salience.viz.render` for the overlays:
            ``style``, ``cmap``, ``alpha``, ``percentile``.
        max_pixels: Refuse larger images (decompression-bomb guard; ``None``: Pillow's limit).
        device: Where the model runs; default the device of its parameters.
        progress: Show a progress bar with images/s on stderr (``None``: on a terminal).
        log: Called with a line for each failure (the CLI prints them); default silent.
        engine: ``"local"`` (this process, with ``num_workers`` loader processes) or
            ``"ray"``: the same job on Ray Data, ``num_workers`` actors each holding a copy
            of the model (one GPU each when the model is on CUDA); see
            :mod:`salience.batch.ray_engine`. Needs ``pip install "ray[data]"``.
        ray_address: The Ray cluster to join (``None``: a local one is started).

    Returns:
        A :class:`BatchSummary`; ``summary.store`` reads the maps back.

    Raises:
        ValueError: unknown methods, options for a method not run, a ``target`` of the wrong
            kind, ``out`` an existing directory that is not a store or a store of another
            model, target or options — before anything is computed.
        TypeError: an option the method does not take.
        FileNotFoundError: a file, directory or pattern that does not exist.
    """
    specs = {name: get_method(name) for name in methods}
    if not specs:
        raise ValueError("run needs at least one method")
    stray = sorted(set(options or {}) - set(methods))
    if stray:
        raise ValueError(f"options for {', '.join(stray)}, which this run does not use")
    opts = {name: dict((options or {}).get(name, {})) for name in methods}
    for name, spec in specs.items():
        check_options(spec, opts[name])
    if not (target is None or target == "label" or callable(target) or _is_index(target)):
        raise ValueError(
            "target must be None, a class index, 'label' (the dataset's label of each input) "
            f"or a callable; got {target!r}"
        )
    if isinstance(dataset, str | os.PathLike) or (
        isinstance(dataset, Sequence) and dataset and isinstance(dataset[0], str | os.PathLike)
    ):
        items: Sequence[Any] = find_images(dataset)  # type: ignore[arg-type]
        sources = list(items)
        # a file is the same entry however its path is typed (photos/, ./photos, /abs/photos)
        identities: list[str | None] = [os.path.realpath(s) for s in sources]
        preprocess = preprocess or getattr(model, "preprocess", None)
        crop = crop or getattr(model, "crop", None)
        sources, items, identities = _drop_duplicates(sources, identities)
    else:
        items = dataset  # type: ignore[assignment]
        sources = [f"item {i}" for i in range(len(items))]  # type: ignore[arg-type]
        identities = [None] * len(sources)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    if engine == "ray":
        from .ray_engine import import_ray

        import_ray()  # before the store is made: a failed run leaves nothing behind
    drawing = dict(overlay_options or {})
    stray = sorted(set(drawing) - _OVERLAY_OPTIONS)
    if stray:
        raise ValueError(
            f"overlay_options takes {', '.join(sorted(_OVERLAY_OPTIONS))}, not {', '.join(stray)}"
        )
    described = {
        "methods": list(methods),
        "model": _fingerprint(model),
        "target": _plain(target),
        "options": {name: _plain(opts[name]) for name in methods},
    }
    store = Store(out, create=True, description=json.loads(json.dumps(described)))
    job = _Job(
        model=model,
        inputs=_Inputs(items, sources, preprocess, crop, max_pixels),
        methods=tuple(methods),
        options=opts,
        target=target,
        keys=[entry_key(s, i) for s, i in zip(sources, identities, strict=True)],
        store=store,
        device=device,
        overlays=overlays,
        overlay_options=drawing,
    )
    summary = BatchSummary(store)
    say = log or (lambda _line: None)
    todo = [i for i, key in enumerate(job.keys) if any(job.missing(key, m) for m in methods)]
    summary.skipped = sum(store.has(key, m) for key in job.keys for m in methods)
    start = time.perf_counter()
    finished = False
    outcomes: Any = None
    try:
        with Progress(len(todo), "batch", enabled=progress) as bar:
            if engine == "ray":
                from .ray_engine import run_on_ray

                outcomes = run_on_ray(job, todo, max(1, int(batch_size)), num_workers, ray_address)
            else:
                outcomes = _run_here(job, todo, max(1, int(batch_size)), num_workers)
            for outcome in outcomes:
                summary.written += outcome.written
                summary.images += outcome.images
                summary.overlays += outcome.overlays
                for source, error in outcome.failures:
                    summary.failures.append((source, error))
                    say(f"{source}: {error}")
                elapsed = time.perf_counter() - start
                rate = summary.images / elapsed if elapsed > 0 else 0.0
                bar.update(outcome.inputs, label=f"batch {rate:.1f} images/s")
        finished = True
    finally:
        if outcomes is not None:
            outcomes.close()  # Ray's engine shuts down here, not at interpreter exit
        # the index and failures of what was done, also when interrupted
        summary.seconds = time.perf_counter() - start
        summary.failures.sort()
        try:
            store.write_order(job.keys)
            store.write_index()
            store.write_failures(summary.failures)
        except Exception:
            if finished:
                raise  # else the interruption is what the caller must see
    return summary


def _run_here(job: _Job, todo: list[int], batch_size: int, workers: int) -> Iterator[Outcome]:
    """Explain the inputs ``todo`` in this process, loaded by ``workers`` loader processes.

    A loader process that dies (out of memory, or of shared memory: Docker's default
    ``/dev/shm`` is 64 MB) takes its batches with it and stops the loader: the inputs not yet
    explained are then loaded in this process, and the run goes on (with a warning).
    """
    left = list(todo)
    while left:
        loader = torch.utils.data.DataLoader(
            job.inputs, batch_size=batch_size, sampler=left, num_workers=workers,
            collate_fn=_collate,
        )  # fmt: skip
        done: set[int] = set()
        batches = iter(loader)  # starts the workers (and installs torch's SIGCHLD handler)
        with _no_sigchld_raise(workers):
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except RuntimeError as exc:
                    if workers == 0 or "DataLoader worker" not in str(exc):
                        raise
                    del batches
                    left = [i for i in left if i not in done]
                    warn(
                        f"a loader process died ({str(exc).splitlines()[0].strip()}); the "
                        f"{len(left)} inputs left are loaded in this process"
                    )
                    workers = 0
                    break
                done.update(item[0] for item in batch)
                yield job.process(batch)


@contextlib.contextmanager
def _no_sigchld_raise(workers: int) -> Iterator[None]:
    """Keep torch's SIGCHLD handler from raising a worker's death anywhere in this thread.

    Torch's handler raises in the main thread wherever it is: inside a method (the batch would
    be recorded as failed), in the caller's loop (the run would stop). The loader still
    reports the death from ``next()`` (within its status check, about five seconds).
    """
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGCHLD) if main and hasattr(signal, "SIGCHLD") else None
    if workers == 0 or before is None:  # no handler of Python's to set aside
        yield
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, before)


@dataclass
class Outcome:
    """What processing one batch of inputs did (picklable, for remote workers)."""

    inputs: int = 0
    images: int = 0
    written: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    overlays: int = 0


@dataclass
class _Job:
    """Everything needed to explain a batch of inputs, in this process or a remote worker."""

    model: nn.Module
    inputs: _Inputs
    methods: tuple[str, ...]
    options: Mapping[str, Mapping[str, Any]]
    target: Any
    keys: Sequence[str]
    store: Store
    device: Any
    overlays: bool
    overlay_options: Mapping[str, Any] = field(default_factory=dict)

    def missing(self, key: str, method: str) -> bool:
        """Whether the input ``key`` needs work for ``method``: its map, or its overlay."""
        store = self.store
        if not store.has(key, method):
            return True
        return self.overlays and not store.overlay_path(key, method).is_file()

    def process(self, batch: list[Any]) -> Outcome:
        """Explain loaded items ``(i, source, x, image, label, error)``; write their maps."""
        outcome = Outcome(inputs=len(batch))
        good = []
        for i, source, x, image, label, error in batch:
            if error is not None:
                outcome.failures.append((source, error))
            else:
                good.append((i, source, x, image, label))
        for group in _same_size(good):
            _explain_group(self, group, outcome)
        return outcome


def _same_size(items: list[Any]) -> list[list[Any]]:
    """Split a batch into runs of inputs of one shape (each method needs a tensor batch)."""
    groups: dict[tuple[int, ...], list[Any]] = {}
    for item in items:
        groups.setdefault(tuple(item[2].shape), []).append(item)
    return list(groups.values())


def _explain_group(job: _Job, group: list[Any], outcome: Outcome) -> None:
    """Run every method on one batch of same-size inputs and store each map.

    A method that fails on the batch is run again on each input alone: one input it cannot
    explain (a NaN in it, a target out of range) must not fail the others of its batch.
    """
    if job.target == "label":
        for item in [item for item in group if item[4] is None]:
            outcome.failures.append((item[1], "target='label' but the dataset gives no label"))
        group = [item for item in group if item[4] is not None]
        if not group:
            return
    x = torch.stack([item[2] for item in group]).to(job.device)
    chosen: Any = job.target
    if job.target == "label":
        chosen = torch.tensor([int(item[4]) for item in group], device=x.device)
    explained: set[int] = set()
    failed: set[int] = set()
    for method in job.methods:
        if job.overlays:  # maps stored by an earlier run, their overlays not: draw them
            for n, item in enumerate(group):
                key = job.keys[item[0]]
                if not (job.store.has(key, method) and job.missing(key, method)):
                    continue
                try:
                    stored = job.store.load(key, method)  # (a damaged file is named)
                except ValueError as exc:
                    outcome.failures.append((item[1], f"{method}: {_one_line(exc)}"))
                    failed.add(n)
                    continue
                _write_overlay(job, key, method, stored, 0, item[3])
                outcome.overlays += 1
        rows = [n for n, item in enumerate(group) if not job.store.has(job.keys[item[0]], method)]
        for part, result in _explain_rows(job, method, x, chosen, rows, group, outcome):
            if result is None:
                failed.update(part)
                continue
            for j, n in enumerate(part):
                i, source, _x, image, _label = group[n]
                job.store.write(job.keys[i], source, result, j, position=i)
                if job.overlays:
                    _write_overlay(job, job.keys[i], method, result, j, image)
                outcome.written += 1
                explained.add(n)
    outcome.images += len(explained - failed)


def _explain_rows(
    job: _Job,
    method: str,
    x: Tensor,
    chosen: Any,
    rows: list[int],
    group: list[Any],
    outcome: Outcome,
) -> Iterator[tuple[list[int], Any]]:
    """Yield ``(rows, result)`` of ``method`` on the inputs ``rows`` of ``x``, together if it can.

    When the batch fails, each input is run alone; an input that fails alone is recorded in
    ``outcome`` and yielded with ``None``.
    """
    if not rows:
        return
    parts = [rows]
    while parts:
        part = parts.pop(0)
        picked = chosen[part] if isinstance(chosen, Tensor) else chosen
        try:
            result = explain(job.model, x[part], method, picked, **job.options[method])
        except Exception as exc:
            if len(part) > 1:
                parts = [[n] for n in part] + parts
                continue
            outcome.failures.append((group[part[0]][1], f"{method}: {_one_line(exc)}"))
            yield part, None
            continue
        yield part, result


def _one_line(exc: BaseException) -> str:
    """Return an error's message on one line (the log and failures.csv have one per input)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _fingerprint(model: nn.Module) -> str:
    """Return the model's class and a digest of its parameters and buffers (what made a store)."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode("utf-8"))
        if isinstance(tensor, Tensor):
            digest.update(_bytes(tensor))
    kind = type(model)
    return f"{kind.__module__}.{kind.__qualname__} {digest.hexdigest()[:16]}"


def _bytes(tensor: Tensor) -> bytes:
    """Return the bytes of a tensor's values (0-dim ones too: BatchNorm's counter)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _plain(value: Any) -> Any:
    """Return a JSON form of an option or target, to compare a rerun with the store's."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        digest = hashlib.sha1(_bytes(value)).hexdigest()[:16]
        return f"tensor {list(value.shape)} {value.dtype} {digest}"
    if callable(value):
        return f"callable {getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}"
    return repr(value)


def _write_overlay(job: _Job, key: str, method: str, result: Any, index: int, image: Any) -> None:
    """Draw map ``index`` of ``result`` over ``image``, written atomically (as the maps are).

    A run interrupted while drawing leaves no half-written PNG: a rerun sees the overlay
    missing and draws it from the stored map.
    """
    from .. import viz
    from .._io import save_png

    picture = viz.render(result, image, index=index, **job.overlay_options)
    save_png(picture, job.store.overlay_path(key, method))
