"""The same dataset-scale job on Ray Data: one actor per worker (or GPU), each with the model.

Why Ray Data: explaining a dataset is a *batch map with state* — every worker loads the model
once and then maps batches of inputs to maps. Ray Data's ``map_batches`` with a callable class
is exactly that (an actor pool, ``concurrency`` actors, ``num_gpus`` per actor), streams the
inputs with backpressure, retries failed tasks, and runs unchanged from a laptop (a local
cluster started on demand) to a multi-node cluster (``ray_address``). Dask or Spark would
need the model shipped per task or a hand-written actor pool; a home-made multiprocessing
scheduler would have to re-solve retries, placement and backpressure.

The workers read the inputs themselves and write their maps straight into the store: one file
per map (see :mod:`salience.batch.store`) needs no coordination between writers, so the
driver only collects small :class:`~salience.batch.run.Outcome` records. The store must be
on a file system every worker sees (local disk for a local cluster, a shared mount
otherwise). Results are identical to a single-process run (tested).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .._checks import copy_model
from .run import Outcome, _Job

__all__ = ["import_ray", "run_on_ray"]


class _Worker:
    """A Ray actor: holds the job (and the model) once, explains the batches it is given."""

    def __init__(self, job: _Job, gpu: bool) -> None:
        if gpu:
            job.device = torch.device("cuda", torch.cuda.current_device())
            job.model = job.model.to(job.device)
        self.job = job

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        indices = [int(i) for i in batch["index"]]
        outcome = self.job.process([self.job.inputs[i] for i in indices])
        return {
            "inputs": [outcome.inputs],
            "images": [outcome.images],
            "written": [outcome.written],
            "overlays": [outcome.overlays],
            "sources": [[s for s, _ in outcome.failures]],
            "errors": [[e for _, e in outcome.failures]],
        }


def import_ray() -> Any:
    """Return the ``ray`` module with Ray Data loaded.

    :func:`salience.batch.run` calls it before it makes the store, so that a missing Ray is
    said before anything is written.

    Raises:
        ImportError: Ray Data is not installed (``pip install "ray[data]"``).
    """
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError(
            "engine='ray' needs Ray Data: pip install \"ray[data]\" (an optional extra, "
            f"not installed here: {exc})"
        ) from None
    return ray


def run_on_ray(
    job: _Job, todo: Sequence[int], batch_size: int, workers: int, address: str | None
) -> Iterator[Outcome]:
    """Run ``job`` on the inputs ``todo`` with ``workers`` Ray actors; yield each batch's outcome.

    Starts a local Ray cluster (``workers`` CPUs) unless one is running or ``address`` names
    one; a cluster started here is shut down at the end.

    Raises:
        ImportError: Ray Data is not installed (``pip install "ray[data]"``).
    """
    ray = import_ray()
    if not todo:
        return
    workers = max(1, int(workers))
    gpu = torch.device(job.device).type == "cuda"
    started = False
    quiet = logging.getLogger("ray.data")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # Ray Data narrates each execution at INFO
    if not ray.is_initialized():
        main = threading.current_thread() is threading.main_thread()
        before = signal.getsignal(signal.SIGTERM) if main else None
        ray.init(
            address=address,
            num_cpus=None if address else workers,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        if callable(before):
            # Ray puts its own SIGTERM handler (sys.exit) over the caller's: a handler of the
            # caller's (the command line's, which stops as Ctrl-C does) stays in charge
            signal.signal(signal.SIGTERM, before)
        started = True
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.execution_options.preserve_order = True
        cpu_job = job
        if gpu:  # each actor moves its copy to its own GPU; the user's model stays put
            model = copy_model(job.model, "each Ray actor moves a copy to its GPU").cpu()
            cpu_job = _Job(**{**job.__dict__, "model": model, "device": "cpu"})
        data = ray.data.from_items([{"index": i} for i in todo], override_num_blocks=len(todo))
        results = data.map_batches(
            _Worker,
            fn_constructor_args=(cpu_job, gpu),
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=1 if gpu else 0,
            num_cpus=1,
            batch_format="numpy",
        )
        for row in results.iter_rows():
            yield Outcome(
                inputs=int(row["inputs"]),
                images=int(row["images"]),
                written=int(row["written"]),
                overlays=int(row["overlays"]),
                failures=list(zip(row["sources"], row["errors"], strict=True)),
            )
    finally:
        quiet.setLevel(level)
        if started:
            ray.shutdown()
