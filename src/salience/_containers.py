"""Model outputs and arguments as containers of tensors: one walk through all of them.

A model may return, or take, tensors in tuples, lists, named tuples, dicts, dict subclasses
(Hugging Face's ``ModelOutput``) and dataclasses. Every place that copies, detaches, slices or
moves them goes through :func:`map_tensors`, which rebuilds each container as it was, so that
a target written for the model's own output type (``lambda out: out.logits[:, 3]``) works on
every copy the methods make.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable
from typing import Any

from torch import Tensor

__all__ = ["map_tensors", "tensors_in"]


def map_tensors(fn: Callable[[Tensor], Any], value: Any) -> Any:
    """Apply ``fn`` to every tensor in ``value``, rebuilding its containers as they were.

    Through tuples, lists, named tuples, dicts (dict subclasses such as Hugging Face's
    ``ModelOutput`` stay of their type, attribute access included) and dataclasses; any other
    object is returned as it is.
    """
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple | list):
        members = [map_tensors(fn, v) for v in value]
        if type(value) in (tuple, list):
            return type(value)(members)
        rebuilt: Any
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
            rebuilt = type(value)(*members)
        else:  # a subclass: made without its constructor, whose arguments may be others
            rebuilt = _bare(value, members)
        for name, item in _attributes(value):  # a subclass's attributes: mapped too
            with contextlib.suppress(AttributeError, TypeError):  # (a plain one: none kept)
                object.__setattr__(rebuilt, name, map_tensors(fn, item))
        return rebuilt
    items: dict[Any, Any] | None = None
    if isinstance(value, dict):
        items = {k: map_tensors(fn, v) for k, v in value.items()}
        if type(value) is dict:
            return items
    if not (items is not None or dataclasses.is_dataclass(value)) or isinstance(value, type):
        return value
    try:
        mapped = copy.copy(value)
    except Exception:  # a constructor of its own (an argument it needs): a plain dict then
        return items if items is not None else value
    for key, item in (items or {}).items():
        mapped[key] = item  # item by item: ModelOutput refuses update()
    if dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            if items is not None and field.name in items:  # Hugging Face's ModelOutput:
                item = items[field.name]  # its fields are its items, mapped once
            else:
                item = map_tensors(fn, getattr(value, field.name, None))
            object.__setattr__(mapped, field.name, item)  # frozen ones too
    return mapped


def _bare(value: tuple[Any, ...] | list[Any], members: list[Any]) -> Any:
    """Return ``value``'s type holding ``members``, without calling its constructor.

    Its constructor may take the members otherwise (``Scores(logits, aux)``, or ``*items``,
    which would nest the list given to it); its attributes are copied by the caller. A type
    that cannot be made so (a C struct sequence) is called with the members, and a plain
    tuple or list is the last resort.
    """
    kind = type(value)
    try:
        if isinstance(value, tuple):
            return tuple.__new__(kind, members)  # type: ignore[type-var]
        made: list[Any] = list.__new__(kind)  # type: ignore[arg-type]
        list.extend(made, members)
        return made
    except TypeError:
        pass
    try:
        return kind(members)
    except TypeError:
        return tuple(members) if isinstance(value, tuple) else members


def _attributes(value: tuple[Any, ...] | list[Any]) -> list[tuple[str, Any]]:
    """Return the attributes of a tuple or list subclass: its ``__dict__``, then its slots."""
    found = list(getattr(value, "__dict__", {}).items())
    for kind in type(value).__mro__:
        slots = kind.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(value, name):
                found.append((name, getattr(value, name)))
    return found


def tensors_in(value: Any) -> list[Tensor]:
    """Return the tensors in ``value``, in the order :func:`map_tensors` visits them."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, tuple | list):
        members = [t for v in value for t in tensors_in(v)]
        if type(value) in (tuple, list):
            return members
        return members + [t for _, v in _attributes(value) for t in tensors_in(v)]
    found: list[Tensor] = []
    if isinstance(value, dict):
        found = [t for v in value.values() for t in tensors_in(v)]
        if type(value) is dict:
            return found
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # the fields that are no items too (a ModelOutput's are all items): as map_tensors
        items = value if isinstance(value, dict) else {}
        for field in dataclasses.fields(value):
            if field.name not in items:
                found.extend(tensors_in(getattr(value, field.name, None)))
    return found
