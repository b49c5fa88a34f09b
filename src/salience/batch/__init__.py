"""Dataset-scale runs: every image of a dataset, every method, every map stored on disk.

- :func:`run` streams a folder, a glob or a dataset through a DataLoader, runs the methods
  in batches and writes each map as soon as it is computed; a rerun resumes.
- :class:`Store` is the on-disk result (one compressed file per map and an index table),
  read back into :class:`~salience.Attribution` objects or stacked for the metrics.

``salience batch DIR|GLOB -m ... --out STORE`` is the command line.
"""

from __future__ import annotations

from .run import IMAGE_EXTENSIONS, BatchSummary, find_images, run
from .store import Entry, Store, entry_key

__all__ = ["IMAGE_EXTENSIONS", "BatchSummary", "Entry", "Store", "entry_key", "find_images", "run"]
