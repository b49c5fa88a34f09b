"""The on-disk store of a dataset-scale run: one compressed file per map, and an index.

Layout of a store directory::

    salience-store.json          what wrote the store (format version, model, methods,
                                 target, options): a rerun must match it
    maps/<method>/<key>.npz      one map: its values and its metadata, compressed
    overlays/<method>/<key>.png  the map drawn over the image (only when asked for)
    index.csv                    one row per map: position, key, source, method, target,
                                 score, shape, file
    order.json                   the position of each input in the last run's inputs
    failures.csv                 the inputs that could not be read or explained, and why

Why one file per map rather than one chunked array (Zarr, HDF5): a dataset-scale run is
interrupted, resumed, and run by several workers at once. With one file per map, written to
a temporary name and renamed (:func:`salience._io.atomic_write`), an entry is either complete
or absent, a rerun skips exactly the entries that exist, and concurrent writers (processes,
Ray actors) need no lock: they never write the same file. Images of different sizes need no
padding. The index is a summary rebuilt from the entries at the end of each run, so a run
killed between two writes loses nothing but the map it was computing. The cost — many small
files — is what an image dataset already is; the maps are float32, compressed (``np.savez_
compressed``), and read back exactly. No dependency beyond NumPy.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._io import atomic_write
from ..attribution import Attribution

__all__ = ["Entry", "Store", "entry_key"]

FORMAT = "salience-store"
VERSION = 1
_INDEX_FIELDS = ("position", "key", "source", "method", "target", "score", "shape", "file")


def entry_key(source: str, identity: str | None = None) -> str:
    """Return a file-name-safe key for an input, unique and the same in every run.

    ``"cats/tabby 1.jpg"`` → ``"tabby-1-3f2a9c1e"``: the readable stem and a hash of the
    whole source (or of ``identity``: a file's real path, however it was typed), so that
    ``a/x.jpg`` and ``b/x.jpg`` do not collide.
    """
    stem = Path(source).stem if source else "input"
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.")[:60] or "input"
    digest = hashlib.sha1((identity or source).encode("utf-8")).hexdigest()[:8]
    return f"{readable}-{digest}"


@dataclass(frozen=True)
class Entry:
    """One map in a store: which input (its position in the dataset), which method, which file."""

    key: str
    source: str
    method: str
    target: int | None
    score: float
    shape: tuple[int, ...]
    file: str
    position: int | None = None


class Store:
    """A directory of maps written by :func:`salience.batch.run` (see the module docstring).

    Read it back with :meth:`load` (one :class:`~salience.Attribution`), :meth:`maps` (one
    method's maps stacked, for the metrics) or by iterating over :meth:`entries`.

    Args:
        path: The store directory; created when ``create=True``.
        create: Make the directory (and its description file) if it does not exist.
        description: What to record in ``salience-store.json`` when it is created.

    Raises:
        FileNotFoundError: no store at ``path`` and ``create`` is false.
        ValueError: ``path`` holds something that is not a salience store.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = False,
        description: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        marker = self.path / "salience-store.json"
        if marker.exists():
            try:
                info = json.loads(marker.read_text("utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"{marker}: unreadable store description ({exc})") from None
            if info.get("format") != FORMAT:
                raise ValueError(
                    f"{self.path}: not a salience store ({marker.name} says otherwise)"
                )
            self.info: dict[str, Any] = info
            if description is not None:
                self._extend(marker, description)
            return
        if not create:
            raise FileNotFoundError(f"{self.path}: no salience store here ({marker.name} missing)")
        if self.path.exists() and any(self.path.iterdir()):
            raise ValueError(
                f"{self.path}: exists and is not a salience store; choose a new or empty "
                "directory for --out"
            )
        self.info = {"format": FORMAT, "version": VERSION, **dict(description or {})}
        atomic_write(marker, json.dumps(self.info, indent=2).encode("utf-8"))

    def __repr__(self) -> str:
        return f"Store({os.fspath(self.path)!r}, maps={len(self.entries())})"

    def _extend(self, marker: Path, description: Mapping[str, Any]) -> None:
        """Check a rerun against what wrote the store; record the methods it adds.

        The model, the target and the options of a method already in the store must be the
        same: a store whose maps answer different questions would mix them silently. Only maps
        make a question binding: the description is written before the first input is read,
        so a run whose every map failed (an option a method refuses, a wrong layer) leaves a
        description and no map, and the corrected rerun must be able to replace it. A store
        with no map takes the new model and target; a method with no map, the new options.
        """
        info = self.info
        empty = not self._holds_maps()
        for what in ("model", "target") if not empty else ():
            if what in info and what in description and info[what] != description[what]:
                raise ValueError(
                    f"{self.path}: this store holds maps of {what} {info[what]!r}, not "
                    f"{description[what]!r}; rerun with the same {what} or choose a new --out"
                )
        options = dict(info.get("options", {}))
        for method, given in dict(description.get("options", {})).items():
            if method in options and options[method] != given and self._holds_maps(method):
                raise ValueError(
                    f"{self.path}: this store holds maps of {method} with options "
                    f"{options[method]!r}, not {given!r}; rerun with the same options or "
                    "choose a new --out"
                )
            options[method] = given
        methods = list(dict.fromkeys([*info.get("methods", []), *description.get("methods", [])]))
        replaced = {k: v for k, v in description.items() if empty or k not in info}
        replaced.pop("methods", None)
        replaced.pop("options", None)
        if (
            methods == info.get("methods")
            and options == info.get("options", options)
            and all(info.get(k) == v for k, v in replaced.items())
        ):
            return
        self.info = {**info, **replaced}
        self.info.update(methods=methods, options=options)
        atomic_write(marker, json.dumps(self.info, indent=2).encode("utf-8"))

    def _holds_maps(self, method: str | None = None) -> bool:
        """Whether any map (of ``method``) is stored; cheaper than :meth:`entries`."""
        root = self.path / "maps"
        folders = [root / method] if method is not None else [root]
        return any(
            folder.is_dir() and next(folder.rglob("*.npz"), None) is not None for folder in folders
        )

    # -- writing -------------------------------------------------------------------------------

    def map_path(self, key: str, method: str) -> Path:
        """Where the map of ``key`` by ``method`` lives."""
        return self.path / "maps" / method / f"{key}.npz"

    def overlay_path(self, key: str, method: str) -> Path:
        """Where the overlay picture of ``key`` by ``method`` lives."""
        return self.path / "overlays" / method / f"{key}.png"

    def has(self, key: str, method: str) -> bool:
        """Whether a complete map of ``key`` by ``method`` is stored (what a rerun skips)."""
        return self.map_path(key, method).is_file()

    def write(
        self,
        key: str,
        source: str,
        attribution: Attribution,
        index: int = 0,
        position: int | None = None,
    ) -> Path:
        """Store sample ``index`` of ``attribution`` as the map of ``key``, atomically.

        ``position``: the input's place in the dataset, the order :meth:`entries` and
        :meth:`maps` give back.
        """
        values = attribution.values[index].detach().to("cpu", torch.float32).numpy()
        target = attribution.target
        meta = {
            "key": key,
            "position": position,
            "source": source,
            "method": attribution.method,
            "target": None if target is None else target[index].tolist(),
            "score": float(attribution.scores[index]),
            "reduction": attribution.reduction,
            "layer": attribution.layer,
            "shape": list(values.shape),
            "extras": _plain_extras(attribution.extras, index),
        }
        buffer = io.BytesIO()
        np.savez_compressed(buffer, values=values, meta=np.frombuffer(
            json.dumps(meta).encode("utf-8"), dtype=np.uint8
        ))  # fmt: skip
        return atomic_write(self.map_path(key, attribution.method), buffer.getvalue())

    def write_order(self, keys: Sequence[str]) -> Path:
        """Record ``keys`` as the order of the inputs (of the last run), atomically."""
        order = {key: i for i, key in enumerate(keys)}
        return atomic_write(self.path / "order.json", json.dumps(order).encode("utf-8"))

    def _order(self) -> dict[str, int] | None:
        """Return the last run's order, or ``None`` for a store written before there was one."""
        try:
            order = json.loads((self.path / "order.json").read_text("utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return order if isinstance(order, dict) else None

    def write_index(self) -> Path:
        """Rebuild ``index.csv`` from the stored maps, atomically; returns its path."""
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(_INDEX_FIELDS)
        for e in self.entries():
            shape = "x".join(map(str, e.shape))
            row = [e.position, e.key, e.source, e.method, e.target, f"{e.score:.9g}", shape]
            writer.writerow([*row, e.file])
        return atomic_write(self.path / "index.csv", text.getvalue().encode("utf-8"))

    def write_failures(self, failures: list[tuple[str, str]]) -> Path:
        """Write ``failures.csv`` (``source, error``), atomically; returns its path."""
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(("source", "error"))
        writer.writerows(failures)
        return atomic_write(self.path / "failures.csv", text.getvalue().encode("utf-8"))

    # -- reading -------------------------------------------------------------------------------

    def entries(self, method: str | None = None) -> list[Entry]:
        """Every stored map (of ``method``), read from the files.

        Sorted by method, then by the input's position among the last run's inputs; maps of
        inputs it did not have come after, by key, with no position.

        Raises:
            ValueError: a damaged map file (it names the file: delete it, and a rerun
                computes it again).
        """
        root = self.path / "maps"
        if not root.is_dir():
            return []
        found = []
        order = self._order()
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if method is not None and folder.name != method:
                continue
            entries = []
            for file in folder.glob("*.npz"):
                meta = _read_meta(file)
                target = meta.get("target")
                position = meta.get("position")
                written = position if isinstance(position, int) else None
                entries.append(
                    Entry(
                        key=meta["key"],
                        source=meta["source"],
                        method=meta["method"],
                        target=target if isinstance(target, int) else None,
                        score=float(meta["score"]),
                        shape=tuple(meta["shape"]),
                        file=os.fspath(file.relative_to(self.path)),
                        # the position among the last run's inputs; none for the others
                        position=order.get(meta["key"]) if order is not None else written,
                    )
                )
            entries.sort(key=lambda e: (e.position is None, e.position or 0, e.key))
            found.extend(entries)
        return found

    def methods(self) -> list[str]:
        """Return the methods with at least one stored map."""
        return sorted({e.method for e in self.entries()})

    def load(self, key: str, method: str) -> Attribution:
        """Return one stored map as a batch-of-one :class:`~salience.Attribution`.

        Raises:
            KeyError: no map of ``key`` by ``method``.
            ValueError: a damaged map file (named, as :meth:`entries` does: delete it, and a
                rerun computes it again).
        """
        file = self.map_path(key, method)
        if not file.is_file():
            raise KeyError(f"no map of {key!r} by {method!r} in {self.path}")
        try:
            with np.load(file, allow_pickle=False) as data:
                values = torch.from_numpy(data["values"].copy())
                meta = dict(json.loads(bytes(data["meta"]).decode("utf-8")))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise _damaged(file, exc) from None
        target = meta.get("target")
        return Attribution(
            values=values[None],
            target=None if target is None else torch.tensor([target]),
            scores=torch.tensor([meta["score"]]),
            method=meta["method"],
            extras={**meta.get("extras", {}), "key": key, "source": meta["source"]},
            reduction=meta.get("reduction", "sum"),
            layer=meta.get("layer"),
        )

    def maps(self, method: str, keys: list[str] | None = None) -> tuple[list[str], Tensor]:
        """Return ``(keys, saliency)``: one method's maps as ``(N, H, W)``, for the metrics.

        In the order of the last run's inputs (map ``i`` is of its input ``i`` when every input
        was explained; ``keys`` says which), or of ``keys`` when given. The maps must share a size
        (inputs preprocessed to one size, as a model needs).
        """
        keys = keys if keys is not None else [e.key for e in self.entries(method)]
        if not keys:
            raise KeyError(f"no map by {method!r} in {self.path}")
        maps = [self.load(k, method).saliency()[0] for k in keys]
        sizes = {tuple(m.shape) for m in maps}
        if len(sizes) > 1:
            raise ValueError(f"the maps of {method!r} have different sizes {sorted(sizes)}")
        return keys, torch.stack(maps)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries())

    def __len__(self) -> int:
        return len(self.entries())


def _read_meta(file: Path) -> dict[str, Any]:
    """Return the metadata of a stored map (its values stay compressed)."""
    try:
        with zipfile.ZipFile(file) as archive:
            meta = np.load(io.BytesIO(archive.read("meta.npy")), allow_pickle=False)
        return dict(json.loads(meta.tobytes().decode("utf-8")))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise _damaged(file, exc) from None


def _damaged(file: Path, exc: BaseException) -> ValueError:
    """Return the error of a map file that cannot be read: which file, why, what to do."""
    return ValueError(
        f"{file}: a damaged map file ({type(exc).__name__}: {exc}); delete it and rerun "
        "to compute it again"
    )


def _plain_extras(extras: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Return the extras that are plain values, or tensors with one value for this sample."""
    plain: dict[str, Any] = {}
    for name, value in extras.items():
        if isinstance(value, bool | int | float | str) or value is None:
            plain[name] = value
        elif isinstance(value, Tensor) and value.ndim == 1 and value.numel() > index:
            plain[name] = value[index].item()
        elif isinstance(value, Mapping) and all(
            isinstance(v, bool | int | float | str) for v in value.values()
        ):
            plain[name] = dict(value)
    return plain
