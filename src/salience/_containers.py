"""Model outputs and arguments as containers of tensors: one walk through all of them.

A model may return, or take, tensors in tuples, lists, named tuples, dicts, dict subclasses
(Hugging Face's ``ModelOutput``) and dataclasses. Every place that copies, detaches, slices or
moves them goes through :func:`map_tensors`, which rebuilds each container as it was, so that
a target written for the model's own output type (``lambda out: out.logits[:, 3]``) works on
every copy the methods make.
"""

from __future__ import annotations

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
        else:
            try:
                rebuilt = type(value)(members)
            except TypeError:  # a subclass with a constructor of its own: made without it
                rebuilt = _bare(value, members)
        extra = getattr(value, "__dict__", None)  # attributes of a subclass: mapped too
        if extra and getattr(rebuilt, "__dict__", None) is not None:
            for name, item in extra.items():
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

    As ``copy.copy`` makes such objects; a plain tuple or list if even that fails.
    """
    kind = type(value)
    try:
        if isinstance(value, tuple):
            return tuple.__new__(kind, members)  # type: ignore[type-var]
        made: list[Any] = list.__new__(kind)  # type: ignore[arg-type]
        list.extend(made, members)
        return made
    except TypeError:
        return tuple(members) if isinstance(value, tuple) else members


def tensors_in(value: Any) -> list[Tensor]:
    """Return the tensors in ``value``, in the order :func:`map_tensors` visits them."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, tuple | list):
        members = [t for v in value for t in tensors_in(v)]
        extra = getattr(value, "__dict__", None) if type(value) not in (tuple, list) else None
        return members + [t for v in extra.values() for t in tensors_in(v)] if extra else members
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
