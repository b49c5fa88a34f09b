"""Speed settings for the calls in a block: channels-last inputs and ``torch.compile``.

Every method and metric runs the model through :class:`salience._forward.Forward`; the settings
here change how it runs, never what it computes (beyond float rounding)::

    with salience.performance(channels_last=True, compile=True):
        maps = [salience.integrated_gradients(model, x, steps=64) for x in batches]

    salience.set_performance(channels_last=True)   # a process-wide default (notebooks)
    salience.get_performance()                      # the settings in force here

**channels_last=True** hands the model its 4-D floating inputs in the channels-last memory
format (``x.contiguous(memory_format=torch.channels_last)``). PyTorch then runs the
convolutions channels-last, which is faster on GPUs with tensor cores (NHWC is their native
layout; cuDNN otherwise transposes around every convolution) and on CPUs through mkldnn /
oneDNN, mostly for wide convolutions and large batches. The model's weights are not converted
(the model is never touched); a model whose weights are channels-last already gains most.
The map keeps the layout it has without the setting (the gradient is copied back to the
input's layout), so only timings change.

**compile** runs the model through :func:`torch.compile`: ``True`` for the default (inductor),
a string for its ``mode`` (``"reduce-overhead"``: CUDA graphs, for small batches of a fixed
shape, where the launch overhead of each kernel dominates; ``"max-autotune"``: slower to
compile, tries more kernels), or a dict of :func:`torch.compile` keyword arguments
(``{"backend": "aot_eager"}``, ``{"mode": "max-autotune", "dynamic": False}``). It helps
repeated calls on one model: the compile time (seconds to minutes) is paid by the first
call, and again for each new input shape or grad mode. The compiled model is cached per model
(weakly: it does not keep the model alive) and per setting; the model itself is not modified.
Metrics that run copies of the model (the randomized copies of the sanity checks, the shifted
twin of the invariance test) compile each copy: leave compile off for them.

Compiled kernels round differently (operations fused and reordered; the decompositions of
AOTAutograd). Gradients of ReLU networks jump where a unit's gate flips, so a rounding-level
change can move a patch of a gradient map: on EfficientNet-Lite0, inductor moves the vanilla
gradient by 4e-2 of its max-abs value at a hundred-odd pixels (correlation 0.999997 with the
eager map), exactly as much as perturbing the input by one ulp moves the eager map. The
scores agree to 4e-7. Channels-last inputs gave bit-identical maps there; on the VGG-style
net of ``bench/`` they move the gradient by 0.11 of its max, again exactly as much as a
one-ulp change of the input (a max-pooling or ReLU tie decided the other way).

A compiled graph does not run Python hooks or torch-function modes reliably, and salience's
modified backward rules live there (guided backprop and DeconvNet, the CAM activation
capture, LRP, DeepLIFT: see :mod:`salience.hooks`). So a forward pass runs compiled only
while salience has **no** hook scope open in any thread; otherwise it runs the model as it is.
Methods built on plain autograd (gradient, input × gradient, Integrated Gradients, SmoothGrad
of the gradient, the masked passes of occlusion, RISE and Score-CAM) compile; the others run
eagerly, and say so (below).

**What was done** is recorded: a registered method called with a setting active returns
``extras["performance"] = {"channels_last": bool, "compiled": bool, "passes": int,
"compiled_passes": int}``: whether any forward pass got a channels-last input, whether any ran
compiled, and how many passes there were. Without a setting, nothing is added.

**Failures are errors.** When ``torch.compile`` cannot compile the model (no C++ compiler for
inductor, an operation dynamo does not support with ``fullgraph=True``, a TorchScript model),
the call raises a ``RuntimeError`` naming the setting, chained to PyTorch's error; it does not
fall back to the eager model. You asked for a compiled model: a silent fallback would hide a
slowdown of several times and a broken setup behind a result that looks fine. Compilation of
the backward pass happens in autograd, outside salience's reach: its errors come as PyTorch
raises them.

The settings live in a :mod:`contextvars` variable: a :func:`performance` block applies to
its own thread (and to the asyncio tasks it starts); other threads see the process-wide
default of :func:`set_performance`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import threading
import types
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, TypeAlias, TypeVar

import torch
from torch import Tensor, nn

from ._weak import ByIdentity
from .attribution import Attribution

__all__ = [
    "CompileLike",
    "PerformanceSettings",
    "compiled_model",
    "get_performance",
    "performance",
    "record_pass",
    "recorded",
    "set_performance",
]

CompileLike: TypeAlias = "bool | str | Mapping[str, Any] | None"
"""``True`` (default :func:`torch.compile`), a ``mode`` string, a dict of
:func:`torch.compile` keyword arguments, ``False`` (off) or ``None`` (leave as it is)."""


@dataclasses.dataclass(frozen=True, repr=False)
class PerformanceSettings:
    """The speed settings in force: see :mod:`salience._performance`.

    Attributes:
        channels_last: Pass 4-D floating inputs to the model in channels-last memory format.
        compile: The :func:`torch.compile` keyword arguments (read-only), or ``None`` when
            the model runs uncompiled.
    """

    channels_last: bool = False
    compile: Mapping[str, Any] | None = None

    @property
    def active(self) -> bool:
        """Whether any setting differs from the default."""
        return self.channels_last or self.compile is not None

    def __repr__(self) -> str:
        compile_ = None if self.compile is None else dict(self.compile)
        return f"PerformanceSettings(channels_last={self.channels_last}, compile={compile_})"


_OFF = PerformanceSettings()
_default = _OFF
_default_lock = threading.Lock()
_scoped: contextvars.ContextVar[PerformanceSettings | None] = contextvars.ContextVar(
    "salience_performance", default=None
)


def get_performance() -> PerformanceSettings:
    """Return the settings in force here.

    They are the innermost :func:`performance` block's, else the process-wide default
    (:func:`set_performance`).
    """
    scoped = _scoped.get()
    return _default if scoped is None else scoped


@contextlib.contextmanager
def performance(
    *, channels_last: bool | None = None, compile: CompileLike = None
) -> Iterator[PerformanceSettings]:
    """Run the method and metric calls inside the block with these speed settings.

    A setting left at ``None`` keeps its value from the enclosing block (or the process-wide
    default); ``False`` switches it off. The previous settings come back when the block exits,
    also when it raises. The block applies to the calling thread only (a
    :class:`contextvars.ContextVar`). Maps equal those without the settings to float
    tolerance; see :mod:`salience._performance` for when each helps.

    Args:
        channels_last: Give the model its ``(N, C, H, W)`` floating inputs in channels-last
            memory format (faster convolutions on tensor-core GPUs and on CPUs with oneDNN).
            The model's weights are not converted.
        compile: Run the model through :func:`torch.compile` for the passes where salience
            has no hook active: ``True`` (inductor), a ``mode`` such as ``"reduce-overhead"``
            (CUDA graphs) or ``"max-autotune"``, or a dict of :func:`torch.compile` keyword
            arguments, e.g. ``{"backend": "aot_eager"}``.

    Yields:
        The settings in force inside the block.

    Raises:
        TypeError: a setting of the wrong type, or a dict key :func:`torch.compile` does not
            take.
        ValueError: a compile setting :func:`torch.compile` rejects (an unknown mode or
            backend), chained to its error.
    """
    settings = _merged(get_performance(), channels_last, compile)
    token = _scoped.set(settings)
    try:
        yield settings
    finally:
        _scoped.reset(token)


def set_performance(
    *, channels_last: bool | None = None, compile: CompileLike = None
) -> PerformanceSettings:
    """Set the process-wide default settings (arguments as in :func:`performance`).

    Every thread without a :func:`performance` block of its own sees them;
    ``set_performance(channels_last=False, compile=False)`` restores the defaults.

    Returns:
        The new default settings.
    """
    global _default
    with _default_lock:
        _default = _merged(_default, channels_last, compile)
        return _default


def _merged(
    base: PerformanceSettings, channels_last: bool | None, compile: CompileLike
) -> PerformanceSettings:
    if channels_last is not None and not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be True, False or None, got {channels_last!r}")
    options = base.compile if compile is None else _compile_options(compile)
    return PerformanceSettings(
        channels_last=base.channels_last if channels_last is None else channels_last,
        compile=options,
    )


@functools.cache
def _compile_parameters() -> frozenset[str]:
    params = inspect.signature(torch.compile).parameters
    return frozenset(name for name in params if name != "model")


def _compile_options(value: CompileLike) -> Mapping[str, Any] | None:
    """Normalize a ``compile=`` setting to read-only :func:`torch.compile` keyword arguments."""
    if value is False:
        return None
    if value is True:
        options: dict[str, Any] = {}
    elif isinstance(value, str):
        if not value:
            raise ValueError("compile= as a string is a torch.compile mode; got ''")
        options = {"mode": value}
    elif isinstance(value, Mapping):
        options = dict(value)
        unknown = sorted(str(k) for k in options if k not in _compile_parameters())
        if unknown:
            raise TypeError(
                f"compile={value!r}: torch.compile has no argument {', '.join(unknown)}; it "
                f"takes {', '.join(sorted(_compile_parameters()))}"
            )
    else:
        raise TypeError(
            "compile must be True, False, None, a torch.compile mode such as "
            f"'reduce-overhead', or a dict of torch.compile arguments; got {value!r}"
        )
    _cache_key(options)  # unhashable option values fail here, not at the first pass
    _check_compile(options)
    return types.MappingProxyType(options)


def _check_compile(options: Mapping[str, Any]) -> None:
    """Let :func:`torch.compile` check the mode and backend now (it traces nothing yet)."""
    try:
        torch.compile(_identity, **options)
    except Exception as exc:
        raise ValueError(
            f"salience.performance(compile={_describe(options)}): torch.compile rejects it "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from exc


def _identity(x: Any) -> Any:
    return x


def _cache_key(options: Mapping[str, Any]) -> Hashable:
    def freeze(value: Any) -> Hashable:
        if isinstance(value, Mapping):
            return ("{}", tuple(sorted((str(k), freeze(v)) for k, v in value.items())))
        if isinstance(value, list | tuple):
            return ("[]", tuple(freeze(v) for v in value))
        try:
            hash(value)
        except TypeError:
            raise TypeError(
                "compile options must be hashable (they key the cache of compiled models); "
                f"got {value!r}"
            ) from None
        return value

    return freeze(options)


# -- the compiled models: one per model and setting, held weakly -----------------------------

_compiled: ByIdentity[nn.Module, dict[Hashable, Callable[..., Any]]] = ByIdentity()
_compiled_lock = threading.Lock()


def _describe(options: Mapping[str, Any]) -> str:
    if not options:
        return "True"
    if set(options) == {"mode"}:
        return repr(options["mode"])
    return repr(dict(options))


def compiled_model(model: Any, options: Mapping[str, Any]) -> Callable[..., Any]:
    """Return ``model`` compiled with ``options``, from the cache or compiled now.

    The compiled function calls the model through a weak reference, so the cache, keyed
    weakly by the model, does not keep it alive. On PyTorch versions that have it,
    ``isolate_recompiles=True`` gives every model its own recompilation budget (dynamo
    otherwise shares one budget of 8 between all models compiled from the same code, and
    runs the ninth eagerly).

    Raises:
        TypeError: for a model that is not an ``nn.Module``, or a TorchScript model.
    """
    setting = f"salience.performance(compile={_describe(options)})"
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{setting} compiles nn.Module models; got {type(model).__name__}. Wrap the "
            "function in an nn.Module, or run without compile="
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"{setting} cannot compile a TorchScript model; load the model as a Python "
            "nn.Module, or run without compile="
        )
    key = _cache_key(options)
    with _compiled_lock:
        per_model = _compiled.get(model)
        if per_model is None:
            per_model = _compiled[model] = {}
        fn = per_model.get(key)
        if fn is None:
            fn = per_model[key] = _compile(model, options, setting)
    return fn


def _compile(model: nn.Module, options: Mapping[str, Any], setting: str) -> Callable[..., Any]:
    ref = weakref.ref(model)

    def forward(*args: Any, **kwargs: Any) -> Any:
        return ref()(*args, **kwargs)  # type: ignore[misc]

    kwargs = dict(options)
    if "isolate_recompiles" in _compile_parameters():
        kwargs.setdefault("isolate_recompiles", True)
    compiled = torch.compile(forward, **kwargs)  # checked by _check_compile
    name = type(model).__name__  # not the model: the cache must not keep it alive

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as exc:
            raise RuntimeError(
                f"{setting}: torch.compile failed on {name} "
                f"({type(exc).__name__}: {_first_line(exc)}). Run without compile= "
                "(salience.performance(compile=False)) or with another backend, e.g. "
                "compile={'backend': 'aot_eager'}; if the model fails without compile= too, "
                "the cause below is the model's"
            ) from exc

    return run


def _first_line(exc: BaseException) -> str:
    inner = getattr(exc, "inner_exception", None)  # BackendCompilerFailed: the backend's error
    if isinstance(inner, BaseException):
        return f"the backend raised {type(inner).__name__}: {_first_line(inner)}"
    text = str(exc).strip().splitlines()
    return text[0] if text else "no message"


# -- what was done: counted per registered method call --------------------------------------


@dataclasses.dataclass
class _Passes:
    passes: int = 0
    compiled: int = 0
    channels_last: int = 0

    def report(self) -> dict[str, Any]:
        return {
            "channels_last": self.channels_last > 0,
            "compiled": self.compiled > 0,
            "passes": self.passes,
            "compiled_passes": self.compiled,
        }


_passes: contextvars.ContextVar[_Passes | None] = contextvars.ContextVar(
    "salience_performance_passes", default=None
)


def record_pass(*, compiled: bool, channels_last: bool) -> None:
    """Count one forward pass of the model in the method call being recorded, if any."""
    passes = _passes.get()
    if passes is None:
        return
    passes.passes += 1
    passes.compiled += compiled
    passes.channels_last += channels_last


F = TypeVar("F", bound=Callable[..., Any])


def recorded(func: F) -> F:
    """Wrap a method so that, under an active setting, its result records what was done.

    ``extras["performance"]`` is added to the :class:`~salience.attribution.Attribution`
    (see the module documentation). Without an active setting the method runs as it is; a
    method called by another (Guided Grad-CAM's parts) counts toward the outer call.
    """

    @functools.wraps(func)
    def method(*args: Any, **kwargs: Any) -> Any:
        if not get_performance().active or _passes.get() is not None:
            return func(*args, **kwargs)
        passes = _Passes()
        token = _passes.set(passes)
        try:
            result = func(*args, **kwargs)
        finally:
            _passes.reset(token)
        if not isinstance(result, Attribution):
            return result
        extras = {**result.extras, "performance": passes.report()}
        return dataclasses.replace(result, extras=extras)

    return method  # type: ignore[return-value]


def channels_last_input(x: Tensor) -> bool:
    """Whether ``x`` is a tensor the channels-last setting applies to (4-D, floating)."""
    return isinstance(x, Tensor) and x.ndim == 4 and x.is_floating_point()


# Entries below which a host synchronisation costs more than the work it would let us skip.
_SYNC_WORTH = 1 << 20


def worth_a_sync(t: Tensor) -> bool:
    """Whether to read ``t`` back to Python to decide on optional work (``bool(mask.any())``).

    On the CPU a read is free and the work it skips is not. Elsewhere a read is a host
    synchronisation: the host waits until the device has run every kernel queued so far,
    and the device then waits for the next launch (tens of microseconds, the time of a whole
    small layer at batch 1). Below about a million entries the optional work done everywhere
    costs less. Callers guarantee that the work is always correct to do: it leaves the entries
    that do not need it unchanged, so both ways give the same map.
    """
    return t.is_cpu or t.numel() >= _SYNC_WORTH
