"""The 1000 ImageNet-1k (ILSVRC-2012) class names, and lookup by name.

The list ships as ``salience/data/imagenet_classes.json``: for each class index, its synonyms,
the first being the display name. It combines the original WordNet synonyms of each class
(e.g. ``"tabby, tabby cat"``) with the curated clean name of the ``imagenet-classes`` package
(MIT licence), deduplicated. Two WordNet names label two classes each ("crane": the bird 134
and the machine 517; "maillot": 638 and 639); there the clean name leads, so the display names
are unique: ``"crane bird"``, ``"construction crane"``, ``"maillot"``,
``"one-piece bathing suit"``.
"""

from __future__ import annotations

import difflib
import json
import operator
import re
from functools import cache
from importlib import resources

__all__ = ["NUM_CLASSES", "class_index", "class_name", "class_names", "class_synonyms"]

NUM_CLASSES = 1000


@cache
def _synonyms() -> tuple[tuple[str, ...], ...]:
    text = (
        resources.files("salience")
        .joinpath("data")
        .joinpath("imagenet_classes.json")
        .read_text("utf-8")
    )
    data = json.loads(text)
    if len(data) != NUM_CLASSES:  # pragma: no cover - guards the packaged file
        raise RuntimeError(f"imagenet_classes.json has {len(data)} classes, not {NUM_CLASSES}")
    return tuple(tuple(names) for names in data)


@cache
def _lookup() -> dict[str, tuple[int, ...]]:
    """Map each lower-cased synonym to the classes that have it (usually one)."""
    table: dict[str, list[int]] = {}
    for index, names in enumerate(_synonyms()):
        for name in names:
            table.setdefault(name.lower(), []).append(index)
    return {name: tuple(indices) for name, indices in table.items()}


def class_names() -> list[str]:
    """Return the 1000 display names, by class index (a new list each call)."""
    return [names[0] for names in _synonyms()]


def class_synonyms(index: int) -> list[str]:
    """Return all the names of class ``index``, the display name first."""
    return list(_synonyms()[_check_index(index)])


def class_name(index: int) -> str:
    """Return the display name of class ``index`` (0–999).

    Raises:
        ValueError: If the index is out of range.
    """
    return _synonyms()[_check_index(index)][0]


def _check_index(index: int) -> int:
    if isinstance(index, bool):
        raise TypeError("a class index must be an integer, not a bool")
    i = operator.index(index)
    if not 0 <= i < NUM_CLASSES:
        raise ValueError(f"class index {i} is out of range [0, {NUM_CLASSES - 1}]")
    return i


def class_index(name_or_index: str | int) -> int:
    """Return the index of an ImageNet-1k class given by name or index.

    A name matches any synonym of a class, ignoring case (``"tabby"``, ``"Tabby Cat"`` → 281).
    When a name belongs to several classes, a case-sensitive match of a display name wins
    (``"cardigan"`` is the sweater 474, ``"Cardigan"`` the corgi 264), then a case-insensitive
    one; anything still ambiguous is an error that lists the candidates. An integer, or a string
    of digits, is taken as an index and range-checked.

    Args:
        name_or_index: A class name or index.

    Returns:
        The class index, in ``[0, 999]``.

    Raises:
        ValueError: For an unknown or ambiguous name (with close matches), or an index out of
            range.
    """
    if not isinstance(name_or_index, str):
        return _check_index(name_or_index)
    text = " ".join(name_or_index.split())
    if re.fullmatch(r"[+-]?\d+", text):
        return _check_index(int(text))
    candidates = _lookup().get(text.lower(), ())
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        synonyms = _synonyms()
        for exact in (True, False):
            hits = [
                i
                for i in candidates
                if (synonyms[i][0] == text if exact else synonyms[i][0].lower() == text.lower())
            ]
            if len(hits) == 1:
                return hits[0]
        listed = ", ".join(f"{i} ({synonyms[i][0]!r})" for i in candidates)
        raise ValueError(f"class name {name_or_index!r} is ambiguous: it names classes {listed}")
    close = difflib.get_close_matches(text.lower(), list(_lookup()), n=5, cutoff=0.6)
    if close:
        hint = f"; did you mean {', '.join(_describe(name) for name in close)}?"
    else:
        hint = "; pass a class index (0-999) or see salience.models.imagenet.class_names()"
    raise ValueError(f"unknown ImageNet class name {name_or_index!r}{hint}")


def _describe(lowered: str) -> str:
    """Describe a lower-cased synonym as spelled in the list, e.g. ``"'tabby cat' (281)"``."""
    indices = _lookup()[lowered]
    spelled = next(n for n in _synonyms()[indices[0]] if n.lower() == lowered)
    return f"{spelled!r} ({', '.join(map(str, indices))})"
