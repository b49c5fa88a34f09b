"""What salience remembers per model, held weakly and keyed by identity.

:class:`weakref.WeakKeyDictionary` hashes its keys: a model whose class defines ``__eq__``
without ``__hash__`` (a ``@dataclass`` module, say) cannot be a key, and one that defines both
by value would share what another, equal model remembered. :class:`ByIdentity` keys by
``id`` and holds a weak reference to each key, whose death removes its entry (so an ``id``
reused by a new object never finds the old entry). No lock: each step is one operation on a
dict, which the interpreter runs whole; at worst a race drops an entry, which is then
remembered again.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, MutableMapping
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

__all__ = ["ByIdentity"]


class ByIdentity(MutableMapping[K, V], Generic[K, V]):
    """A mapping from objects, by identity, to values; an entry lives as long as its key.

    Keys must take weak references (``nn.Module`` does): setting one that does not raises
    ``TypeError``, as :class:`weakref.WeakKeyDictionary` does.
    """

    def __init__(self) -> None:
        self._data: dict[int, tuple[weakref.ref[Any], V]] = {}

    def _entry(self, key: K) -> tuple[weakref.ref[Any], V]:
        entry = self._data.get(id(key))
        if entry is None or entry[0]() is not key:
            raise KeyError(key)
        return entry

    def __getitem__(self, key: K) -> V:
        return self._entry(key)[1]

    def __setitem__(self, key: K, value: V) -> None:
        number, data = id(key), self._data

        def drop(ref: weakref.ref[Any]) -> None:  # the key died: its entry goes
            if data.get(number, (None,))[0] is ref:
                data.pop(number, None)

        data[number] = (weakref.ref(key, drop), value)

    def __delitem__(self, key: K) -> None:
        self._entry(key)
        self._data.pop(id(key), None)

    def __contains__(self, key: object) -> bool:
        entry = self._data.get(id(key))
        return entry is not None and entry[0]() is key

    def __iter__(self) -> Iterator[K]:
        for ref, _ in list(self._data.values()):
            key = ref()
            if key is not None:
                yield key

    def __len__(self) -> int:
        return sum(1 for ref, _ in list(self._data.values()) if ref() is not None)

    def clear(self) -> None:
        self._data.clear()
