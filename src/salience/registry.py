"""The registry of methods: the one door the CLI, reports and tests go through."""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
from torch import Tensor, nn

from ._performance import recorded
from .attribution import Attribution
from .targets import span_read_early

__all__ = ["MethodSpec", "available_methods", "explain", "get_method", "register"]

Kind = Literal["pixel", "cam"]
F = TypeVar("F", bound=Callable[..., Attribution])


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function, a one-line description and what it produces.

    ``kind`` is ``"pixel"`` for maps with the input's shape and ``"cam"`` for one-channel
    maps computed at a layer.
    """

    name: str
    func: Callable[..., Attribution]
    description: str
    kind: Kind

    @functools.cached_property
    def options(self) -> tuple[str, ...]:
        """The keyword options the method accepts (read once: explain() checks every call)."""
        params = inspect.signature(self.func).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)

    @functools.cached_property
    def switches(self) -> frozenset[str]:
        """The options that take ``True`` or ``False`` only."""
        return _switches(self.func)


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, *, kind: Kind = "pixel") -> Callable[[F], F]:
    """Register a method function under ``name``; the first docstring line describes it.

    The function is returned wrapped (same name, signature and docstring), so that a call
    under :func:`salience.performance` settings records them in ``extras["performance"]``.
    """

    def decorate(func: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"a method named {name!r} is already registered")
        doc = inspect.getdoc(func) or ""
        description = doc.splitlines()[0].rstrip(".") if doc else name
        method = _checked_switches(name, _target_read_early(recorded(func)))
        _REGISTRY[name] = MethodSpec(name=name, func=method, description=description, kind=kind)
        return method

    return decorate


def _target_read_early(method: F) -> F:
    """Wrap ``method``: a target tensor on a device has its range read before the passes.

    See :func:`salience.targets.span_read_early`.
    """

    @functools.wraps(method)
    def early(*args: Any, **kwargs: Any) -> Attribution:
        target = args[2] if len(args) > 2 else kwargs.get("target")
        with span_read_early(target):
            return method(*args, **kwargs)

    return early  # type: ignore[return-value]


def _checked_switches(name: str, method: F) -> F:
    """Wrap ``method`` so that its ``bool`` options take ``True`` or ``False`` only.

    ``relu="false"`` (a string, which is true) or a typo from the command line would otherwise
    turn a switch on silently.
    """
    switches = _switches(method)
    if not switches:
        return method

    @functools.wraps(method)
    def checked(*args: Any, **kwargs: Any) -> Attribution:
        for key in switches.intersection(kwargs):
            if not isinstance(kwargs[key], bool | np.bool_):
                raise TypeError(f"{name}: {key} must be True or False, got {kwargs[key]!r}")
        return method(*args, **kwargs)

    return checked  # type: ignore[return-value]


def _switches(func: Callable[..., Any]) -> frozenset[str]:
    params = inspect.signature(func).parameters.values()
    return frozenset(p.name for p in params if p.annotation in ("bool", bool))


def get_method(name: str) -> MethodSpec:
    """Return the registered method ``name``, or raise a ``ValueError`` that suggests names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown method {name!r}{hint} Available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def available_methods(kind: Kind | None = None) -> dict[str, str]:
    """Return ``{name: one-line description}`` of the registered methods."""
    return {n: s.description for n, s in _REGISTRY.items() if kind is None or s.kind == kind}


def explain(
    model: nn.Module,
    inputs: Tensor,
    method: str = "gradient",
    target: Any = None,
    **options: Any,
) -> Attribution:
    """Explain ``model`` on ``inputs`` with the registered ``method``.

    ``salience.explain(model, x, method="integrated_gradients", steps=64)`` is
    ``salience.integrated_gradients(model, x, steps=64)``; unknown option names raise a
    ``TypeError`` that lists the method's options.
    """
    spec = get_method(method)
    check_options(spec, options)
    return spec.func(model, inputs, target, **options)


def check_options(spec: MethodSpec, options: dict[str, Any]) -> None:
    """Raise a ``TypeError`` naming any option ``spec`` does not take."""
    allowed = spec.options
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(
                f"{spec.name} has no option {key!r}{hint}; its options are: "
                f"{', '.join(allowed) or 'none'}"
            )
