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
        items = [map_tensors(fn, v) for v in value]
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
            return type(value)(*items)
        try:
            return type(value)(items)
        except TypeError:  # a subclass with a constructor of its own
            return tuple(items) if isinstance(value, tuple) else items
    mapped = value
    if isinstance(value, dict):
        if type(value) is dict:
            return {k: map_tensors(fn, v) for k, v in value.items()}
        mapped = copy.copy(value)
        for k, v in value.items():
            mapped[k] = map_tensors(fn, v)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if mapped is value:
            mapped = copy.copy(value)
        for field in dataclasses.fields(value):
            item = getattr(value, field.name, None)
            object.__setattr__(mapped, field.name, map_tensors(fn, item))  # frozen ones too
    return mapped


def tensors_in(value: Any) -> list[Tensor]:
    """Return the tensors in ``value``, in the order :func:`map_tensors` visits them."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return [t for f in fields for t in tensors_in(getattr(value, f.name, None))]
    return []
