"""One method call on the user's model: what the model is given, and what it gets back.

Every method runs the model inside :func:`model_scope`, which

- passes **extra forward arguments** with the image (``forward_args=``): a VQA model's question,
  a captioning model's tokens, an attention mask. Tensors whose first axis is the batch are
  expanded with the image, row by row, when a method evaluates many rows per sample
  (Integrated Gradients' steps, SmoothGrad's noisy copies, Score-CAM's masked inputs); anything
  else is passed as it is;
- **restores the model's buffers** afterwards (BatchNorm running statistics and
  ``num_batches_tracked`` of a model left in training mode), also when the method raises;
- computes in **full float32**: TF32 (on by default for cuDNN convolutions) is switched off for
  the call and restored after, unless ``allow_tf32=True``. On an H100, TF32 moves the gradient of
  EfficientNet-Lite0 by 28 % (max-abs relative to float64); in float32 it agrees to a
  correlation of 0.999998;
- applies the **speed settings** of :func:`salience.performance` (channels-last inputs,
  ``torch.compile``), see :mod:`salience._performance`.

The TF32 switches are process-wide (PyTorch has no per-thread flag): while any call that
disabled them is running, they stay off, and the last such call to finish restores them.
"""

from __future__ import annotations

import contextlib
import math
import operator
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors

from ._checks import check_inputs, check_model, is_training, modules_of
from ._containers import map_tensors
from ._performance import channels_last_input, compiled_model, get_performance, record_pass
from ._weak import ByIdentity
from .hooks import (
    active_scopes,
    no_rectifier_inside,
    node_rules_scope,
    watch_buffer_registrations,
)

__all__ = ["Forward", "ForwardArgs", "model_scope"]

ForwardArgs: TypeAlias = "tuple[Any, ...] | list[Any] | Mapping[str, Any] | Tensor | None"
"""Extra arguments for ``model(image, ...)``: a tuple of positional arguments, a mapping of
keyword arguments, or a single tensor (one positional argument)."""


class Forward:
    """The user's model as a method calls it: ``forward(x, rows)`` is ``model(x, *args, **kw)``.

    ``rows`` gives, for each row of ``x``, the sample of the batch it comes from; tensors among
    the extra arguments whose first axis has the batch size are indexed with it. ``None`` means
    that ``x`` is the batch itself.

    The model may modify ``x`` in place: callers pass a tensor of their own, never the user's.

    The speed settings in force when it is made (:func:`salience.performance`) apply to every
    pass: a channels-last input, and the compiled model for the passes where salience has no
    hook active (:func:`salience.hooks.active_scopes`); each pass is counted for the result's
    ``extras["performance"]``.
    """

    def __init__(
        self,
        model: Any,
        n: int,
        forward_args: ForwardArgs,
        modules: list[nn.Module] | None = None,
    ) -> None:
        self.model = model
        self.n = n
        self.modules = modules  # the model's modules at the start of the call, if walked
        self.args: tuple[Any, ...]
        self.kwargs: dict[str, Any]
        if forward_args is None:
            self.args, self.kwargs = (), {}
        elif isinstance(forward_args, Tensor):
            self.args, self.kwargs = (forward_args,), {}
        elif isinstance(forward_args, tuple | list):
            self.args, self.kwargs = tuple(forward_args), {}
        elif isinstance(forward_args, Mapping):
            if not all(isinstance(k, str) for k in forward_args):
                raise TypeError("forward_args as a mapping needs str keys (argument names)")
            self.args, self.kwargs = (), dict(forward_args)
        else:
            raise TypeError(
                "forward_args must be a tuple of extra positional arguments for the model, a "
                f"dict of keyword arguments or a tensor; got {type(forward_args).__name__}"
            )
        # Extra arguments are data, not something to explain: no gradient flows into them.
        self.args = tuple(_detach(a) for a in self.args)
        self.kwargs = {k: _detach(v) for k, v in self.kwargs.items()}
        self.has_args = bool(self.args or self.kwargs)
        self.settings = get_performance()
        options = self.settings.compile
        self.compiled = None if options is None else compiled_model(model, options)

    def __call__(self, x: Tensor, rows: Tensor | None = None) -> Any:
        """Run the model on ``x`` with the extra arguments of its rows."""
        model, compiled = self.model, False
        if self.compiled is not None and active_scopes() == 0:
            model, compiled = self.compiled, True
        channels_last = self.settings.channels_last and channels_last_input(x)
        if self.settings.active:
            record_pass(compiled=compiled, channels_last=channels_last)
        to_channels_last = channels_last and not x.is_contiguous(memory_format=torch.channels_last)
        own_copies = compiled and x.is_cuda  # outputs of CUDA graphs are overwritten by the next
        if to_channels_last or own_copies:
            x = _Boundary.apply(x, to_channels_last, own_copies)
        output = self._run(model, x, rows)
        return _clone_tensors(output) if own_copies else output

    def _run(self, model: Any, x: Tensor, rows: Tensor | None) -> Any:
        if not self.has_args:
            return model(x)
        if rows is None:
            if x.shape[0] != self.n:
                raise RuntimeError(f"{x.shape[0]} rows given without their samples of origin")
            return model(x, *self.args, **self.kwargs)
        args = tuple(_expand(a, rows, self.n) for a in self.args)
        kwargs = {k: _expand(v, rows, self.n) for k, v in self.kwargs.items()}
        return model(x, *args, **kwargs)


@no_rectifier_inside  # guided backprop's rule at the nodes walks through it
class _Boundary(torch.autograd.Function):
    """The input as the model gets it: channels-last, or a copy.

    The gradient comes back in the input's own layout (and as a copy of a CUDA graph's
    output, which the next replay would overwrite).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, channels_last: bool, copy: bool) -> Tensor:
        ctx.restore = channels_last and x.is_contiguous()
        ctx.copy = copy
        if channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        out = grad
        if ctx.restore:
            out = out.contiguous()
        if ctx.copy and out is grad:
            out = grad.clone()
        return out, None, None


def _clone_tensors(value: Any) -> Any:
    return map_tensors(Tensor.clone, value)


def _detach(value: Any) -> Any:
    return map_tensors(Tensor.detach, value)


def _expand(value: Any, rows: Tensor, n: int) -> Any:
    """Index the batch axis of every tensor in ``value`` whose first axis has ``n`` entries."""

    def index(t: Tensor) -> Tensor:
        return t[rows.to(t.device)] if t.ndim > 0 and t.shape[0] == n else t

    return map_tensors(index, value)


# -- precision: TF32 off while any call that wants float32 runs ------------------------------

_tf32_lock = threading.Lock()
_tf32_users = 0
_tf32_restore: Callable[[], None] | None = None

# What ``torch.backends.cudnn.allow_tf32`` and ``torch.backends.cuda.matmul.allow_tf32`` read
# and write, called directly: the properties' Python is a third of a call's cost of the switch
# when the host's caches are cold after a pass (a GPU at batch 1); the properties elsewhere.
_get_cudnn_tf32 = getattr(torch._C, "_get_cudnn_allow_tf32", None)
_set_cudnn_tf32 = getattr(torch._C, "_set_cudnn_allow_tf32", None)
_get_matmul_tf32 = getattr(torch._C, "_get_cublas_allow_tf32", None)
_set_matmul_tf32 = getattr(torch._C, "_set_cublas_allow_tf32", None)


def _tf32() -> tuple[bool, bool]:
    """Whether TF32 is allowed now: ``(cuDNN convolutions, CUDA matmuls)``.

    Raises:
        RuntimeError: the precision was set with PyTorch's newer ``fp32_precision`` settings,
            which its older flags cannot be read beside.
    """
    if _get_cudnn_tf32 is None or _get_matmul_tf32 is None:
        return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    return _get_cudnn_tf32(), _get_matmul_tf32()


def _set_tf32(flags: tuple[bool, bool], now: tuple[bool, bool] | None = None) -> None:
    """Allow TF32 or not (``flags`` as :func:`_tf32` gives them); only flags that change.

    ``now``: the flags as they are, if the caller has just read them.
    """
    if _set_cudnn_tf32 is None or _set_matmul_tf32 is None:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
        return
    cudnn, matmul = flags
    now = _tf32() if now is None else now
    if now[0] != cudnn:
        _set_cudnn_tf32(cudnn)
    if now[1] != matmul:
        _set_matmul_tf32(matmul)


_get_precision = getattr(torch._C, "_get_fp32_precision_getter", None)
_set_precision = getattr(torch._C, "_set_fp32_precision_setter", None)


def _precision_leaves() -> list[tuple[str, str]]:
    """Return PyTorch's newer per-operation precision settings, where it has them.

    ``(backend, operation)`` as its C functions name them: cuDNN's convolutions and RNNs and
    CUDA's matmuls (``"cuda"``), oneDNN's matmuls, convolutions and RNNs (``"mkldnn"``), the
    CPU's. Read through those functions (a property read costs 2 µs, six a call).
    """
    if _get_precision is None or _set_precision is None:
        return []
    found = []
    for leaf in (("cuda", "conv"), ("cuda", "rnn"), ("cuda", "matmul"),
                 ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn")):  # fmt: skip
        try:
            _get_precision(*leaf)
        except RuntimeError:  # a backend or operation this PyTorch does not have
            continue
        found.append(leaf)
    return found


_LEAVES = _precision_leaves()
_CPU_MATMUL = ("mkldnn", "matmul")


def _leaves_off(always: str | None = None) -> list[tuple[tuple[str, str], str]]:
    """Set to ``"ieee"`` each newer setting that allows less than float32 now; return the undo.

    ``"tf32"`` or ``"bf16"``, its own or inherited from ``torch.backends.cudnn.fp32_precision``
    and the like. The flags do not reach oneDNN's (the CPU's), nor a setting inherited from a
    parent. ``always``: a backend (``"cuda"``) whose settings are set whatever they read (their
    ``"none"`` defers to flags that allow TF32). Returns each setting changed with what it read.
    """
    changed = []
    for leaf in _LEAVES:
        try:
            value = _get_precision(*leaf)  # type: ignore[misc]
        except RuntimeError:  # (none seen: the flags are switched already, nothing may raise)
            continue
        if leaf[0] == always or value not in ("ieee", "none"):
            _set_precision(*leaf, "ieee")  # type: ignore[misc]
            changed.append((leaf, value))
    return changed


def _leaves_back(leaves: list[tuple[tuple[str, str], str]]) -> None:
    for leaf, value in reversed(leaves):
        _set_precision(*leaf, value)  # type: ignore[misc]


def _matmul_precision() -> str | None:
    """Return ``torch.get_float32_matmul_precision()``, or ``None`` where PyTorch refuses it.

    (It refuses where the newer settings were mixed with the older.)
    """
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


def _tf32_off() -> Callable[[], None]:
    """Switch TF32 off for cuDNN (convolutions, RNNs) and matmuls; return what undoes it.

    Through the flags ``allow_tf32``, unless the precision was set with the newer
    ``fp32_precision`` settings (``torch.backends.cuda.matmul.fp32_precision = "tf32"``): the
    flags then cannot be read (every method raised), and those settings are used, set to
    ``"ieee"`` and back (each round trip leaves the settings as they were). After
    ``torch.set_float32_matmul_precision("high")`` or ``"medium"`` the matmuls are switched
    through that precision: the flag cannot say "medium" again. Then every newer setting that
    still allows less than float32 is set to ``"ieee"`` (:func:`_leaves_off`): oneDNN's, the
    CPU's, which the flags do not reach (``"medium"`` makes its matmuls bfloat16), and one
    inheriting ``"tf32"`` from a parent setting (``torch.backends.cudnn.fp32_precision``),
    which the flag leaves. The undoing reads nothing (a mixed state may refuse a read).
    """
    try:
        saved = _tf32()
    except RuntimeError:  # the newer settings are in use: the flags would mix the two
        leaves = _leaves_off(always="cuda")  # cuDNN's convolutions and RNNs, CUDA's matmuls
        return lambda: _leaves_back(leaves)
    precision = _matmul_precision() if saved[1] else None
    if precision is None or precision not in ("high", "medium"):
        _set_tf32((False, False), saved)
        leaves = _leaves_off()

        def restore_flags() -> None:
            _leaves_back(leaves)
            _set_tf32(saved, (False, False))

        return restore_flags
    allowed: str = precision
    # TF32 (or bfloat16) matmuls: through PyTorch's precision, which the flag cannot say again
    # ("medium"), and which sets the CPU's matmuls (oneDNN) too, where the flag leaves them
    cpu = _CPU_MATMUL if _CPU_MATMUL in _LEAVES else None
    own = _get_precision(*cpu) if cpu is not None else None  # type: ignore[misc]
    _set_tf32((False, True), saved)
    torch.set_float32_matmul_precision("highest")
    leaves = _leaves_off()

    def restore_precision() -> None:
        _leaves_back(leaves)
        _set_tf32((saved[0], False), (False, False))
        torch.set_float32_matmul_precision(allowed)
        if cpu is not None:  # the user's own setting of the CPU's, if it differed
            _set_precision(*cpu, own)  # type: ignore[misc]

    return restore_precision


@contextlib.contextmanager
def full_float32(allow_tf32: bool = False) -> Iterator[None]:
    """Switch TF32 off (cuDNN convolutions and CUDA matmuls) inside the block, then restore."""
    global _tf32_users, _tf32_restore
    if allow_tf32:
        yield
        return
    with _tf32_lock:
        if _tf32_users == 0:
            _tf32_restore = _tf32_off()
        _tf32_users += 1
    try:
        yield
    finally:
        with _tf32_lock:
            _tf32_users -= 1
            if _tf32_users == 0 and _tf32_restore is not None:
                _tf32_restore()
                _tf32_restore = None


# -- buffers ---------------------------------------------------------------------------------


class _Buffers:
    """What :func:`kept_buffers` learned of a model's buffers.

    ``kinds``: each buffer's dtype and device, and ``ids``: each buffer's id in the order of
    the model's walk with the ids and types of its modules: the record holds while they are
    the same. ``groups``: the buffers' positions per dtype, device and rank (the flat copies).
    ``honest``: a call in eval mode found every buffer it changed with its version bumped.
    ``saved``: the flat copies of the last call, kept for the next one while every buffer
    still has the version and data pointer of ``versions`` and ``places`` (see
    :func:`kept_buffers`); ``None`` when none are kept.

    No reference to a buffer is kept (a weak one would stop ``torch.utils.swap_tensors``,
    which ``load_state_dict`` may use), so a module replaced by one of the same type whose
    module and buffers all take the freed ids would keep the record: the new module's writes
    behind the counter would then go unseen.
    """

    __slots__ = ("groups", "honest", "ids", "kinds", "places", "saved", "versions")

    def __init__(self, kinds: Any, ids: Any, buffers: list[Tensor]) -> None:
        self.kinds = kinds
        self.ids = ids
        self.groups = _same_kind(buffers)
        self.honest = False
        self.saved: list[_Saved] | None = None
        self.versions: list[int] = []
        self.places: list[int] | None = None


_KNOWN: ByIdentity[nn.Module, _Buffers] = ByIdentity()
_DISHONEST: ByIdentity[nn.Module, bool] = ByIdentity()
"""Models a call found changing a buffer behind its version counter: compared at every call."""

_KEPT_BYTES = 4 << 20
"""The largest copy of a model's buffers kept from one call to the next, until the next call
on the model or until the model is freed (BatchNorm statistics: 168 KB for EfficientNet-Lite0,
0.4 MB for a ResNet-50); a larger one is made afresh at every call."""


@contextlib.contextmanager
def kept_buffers(model: Any, modules: list[nn.Module] | None = None) -> Iterator[None]:
    """Put every buffer of ``model`` back as it was when the block exits, also on error.

    A model left in training mode updates BatchNorm statistics and counters on every forward
    pass; explaining it must not. The buffer objects themselves are restored too, should the
    model replace one; those it removes or sets from ``None`` are put back, with their
    persistence; persistent buffers it registers under new names are removed (on any of the
    model's modules), non-persistent ones (caches made lazily) left (see :func:`_rebind`). A
    buffer the call resizes in place (an observer growing its statistics) or gives other data
    through ``.data`` gets its shape, dtype and values back (through ``.data``: the same
    object). Lazy conjugate and negative views are compared resolved, quantized buffers each
    alone (a copy with others would requantize them to one scale), sparse ones as dense
    tensors.

    The values are kept as one flat copy per dtype, device and rank, made in one call
    (:func:`_copy`: concatenated, as DistributedDataParallel flattens its buckets), and
    compared the same way: one copy and, off the CPU, one host synchronisation per call, where a
    comparison per buffer would wait on the device once per buffer (147 times for
    EfficientNet-Lite0). Compared bit for bit (a NaN left alone is unchanged, a zero whose sign
    flipped is not). Only buffers that differ are written back (a write bumps the version,
    which would break a graph of the user's own that saved the buffer). ``modules``:
    :func:`~salience._checks.modules_of` the model, if the caller has it.

    The comparison is skipped where version counters tell. A write in place bumps the
    buffer's version, except a write through ``.data``, a kernel of the model's own, or native
    BatchNorm updating its statistics (training mode, or ``F.batch_norm(training=True)``
    called by the model). So the first call on a model (or on its new buffers) compares, and
    if every buffer it changed had its version bumped, later calls in eval mode whose versions
    did not move skip the comparison. A model that changed a buffer behind its counter is
    compared at every call.

    The copy is kept for the next call too, when it is small (:data:`_KEPT_BYTES`) and the
    model honest and in eval mode: a call whose buffers all have the versions and data
    pointers they had when the last call ended knows that they still hold the kept values
    (what the model writes bumps the versions; what you write bumps them too, unless it goes
    through ``.data``: a ``.data`` assignment moves the data pointer, an in-place write through
    ``.data`` between two calls is not seen). Such a call copies nothing, and at its end puts
    back from the kept copy only the buffers whose version or data pointer moved during the
    call, what the model wrote: a buffer you changed unseen is left as you made it, unless the
    model writes that buffer too (it then gets the kept value). A ``.data`` assignment of the
    model's is seen by its pointer, and put back, even on a model that had shown its version
    counters honest. The same holds for a buffer swapped by ``torch.utils.swap_tensors`` whose
    new data landed at the old address with the same version.

    At batch 1 the buffers were about 0.35 ms of a call's fixed cost on a network with Lite0's
    150 buffers whose arithmetic is nearly free (``bench_overhead.py --models thin``: the cost
    of a GPU at batch 1, where the host's caches are cold after the pass); with the copy kept,
    a walk of the buffers and two reads of their version counters and pointers are left.

    Calls on one model from several threads at once are kept apart when the model writes its
    buffers (training mode, or a call saw it write): they take turns on a lock of the model's
    (one thread's copy would otherwise hold another's writes, and put them back last). Calls on
    a model that writes nothing run side by side; the first calls on a model in eval mode that
    writes, before one has seen it, are not kept apart.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modules = modules_of(model) if modules is None else modules
    training = any(map(is_training, modules))
    lock = _writer_lock(model, training)
    if lock is None:
        with _kept(model, modules, training):
            yield
        return
    with lock, _kept(model, modules, training):
        yield


_WRITERS: ByIdentity[nn.Module, threading.RLock] = ByIdentity()
"""A lock for each model a call saw write its buffers, or left in training mode."""
_WRITERS_LOCK = threading.Lock()


def _writer_lock(model: nn.Module, training: bool) -> threading.RLock | None:
    """Return the model's lock if it writes its buffers (made in training mode), or ``None``.

    Re-entrant: a method that calls another on the same model, in the same thread, holds it.
    """
    lock = _WRITERS.get(model)
    if lock is None and training:
        return _mark_writer(model)
    return lock


def _mark_writer(model: nn.Module) -> threading.RLock:
    with _WRITERS_LOCK:
        lock = _WRITERS.get(model)
        if lock is None:
            lock = _WRITERS[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def _kept(model: nn.Module, modules: list[nn.Module], training: bool) -> Iterator[None]:
    """Do the work of :func:`kept_buffers`.

    ``training``: a module of the model is in training mode at the start.
    """
    holders = [module for module in modules if module._buffers]
    tables = [dict(module._buffers) for module in holders]  # name -> buffer, as they were
    caches = [  # the non-persistent names of each
        frozenset(names) if (names := m._non_persistent_buffers_set) else _NONE for m in holders
    ]
    entries = [buffer for table in tables for buffer in table.values()]
    buffers = [buffer for buffer in entries if buffer is not None]
    versions: list[int] | None
    try:
        versions = list(map(_VERSION, buffers))
    except RuntimeError:  # inference tensors keep no version counter: compared every time
        versions = None
    ids = (list(map(id, buffers)), list(map(id, modules)), list(map(type, modules)))
    known = _KNOWN.get(model)
    saved = known.saved if known is not None and not training else None
    kept = (  # the buffers still hold the copy kept by the last call
        known is not None
        and saved is not None
        and known.ids == ids
        and known.versions == versions
        and known.places == _places(buffers)
    )
    if not kept or known is None or saved is None:
        kinds = list(map(_KIND, buffers))
        if known is None or known.ids != ids or known.kinds != kinds:
            known = _KNOWN[model] = _Buffers(kinds, ids, buffers)
        known.saved = None
        with torch.no_grad():
            saved = [_save([buffers[i] for i in group]) for group in known.groups]
    registered = _Registered(modules, holders)
    watching = watch_buffer_registrations(registered)  # (removed below, whatever happens)
    try:
        yield
    finally:
        watching.remove()
        _rebind(holders, tables, entries, caches, registered)
        training = training or any(map(is_training, modules))
        now = None if versions is None else list(map(_VERSION, buffers))
        moved = now != versions
        only: set[int] | None = None  # the buffers that may be written back (None: any)
        if kept and versions is not None and now is not None and known.places is not None:
            # The kept copy may be older than a write of yours that no counter saw: only what
            # the model wrote (its version or, for a .data assignment, its pointer moved) is
            # put back from it. In training mode BatchNorm writes unseen: every buffer then.
            places = _places(buffers)
            moved = moved or places != known.places
            if moved and places is not None and not training:
                only = {
                    id(b)
                    for b, v, w, p, q in zip(
                        buffers, versions, now, known.places, places, strict=True
                    )
                    if v != w or p != q
                }
        if training or moved or not known.honest:
            groups = [[buffers[i] for i in group] for group in known.groups]
            # inference tensors (a model made under inference_mode) are written back in it
            with torch.no_grad(), torch.inference_mode(versions is None):
                changed = _put_back(groups, saved, only)
            if changed and model not in _WRITERS:
                _mark_writer(model)  # its next calls take turns with other threads'
            if not training and versions is not None and now is not None:
                unseen = any(
                    id(b) in changed and before == after
                    for b, before, after in zip(buffers, versions, now, strict=True)
                )
                if unseen:
                    _DISHONEST[model] = True
                known.honest = model not in _DISHONEST
            kept = False  # written back, or compared: kept again below, if it may be
        if not kept:
            _keep(known, saved, buffers, training or versions is None)


_VERSION = operator.attrgetter("_version")
_KIND = operator.attrgetter("dtype", "device")


def _places(buffers: list[Tensor]) -> list[int] | None:
    """Each buffer's data pointer, or ``None`` if one has none (a sparse buffer)."""
    try:
        return list(map(Tensor.data_ptr, buffers))
    except RuntimeError:
        return None


def _keep(known: _Buffers, saved: list[_Saved], buffers: list[Tensor], fresh: bool) -> None:
    """Keep ``saved``, which the buffers hold now, for the next call, if it may be kept.

    ``fresh``: a call in training mode, or on buffers without version counters: nothing kept.
    """
    places = None if fresh or not known.honest else _places(buffers)
    size = sum(t.numel() * t.element_size() for t, _ in saved)
    if places is None or size > _KEPT_BYTES:
        known.saved = None
        return
    known.saved, known.versions, known.places = saved, list(map(_VERSION, buffers)), places


_NONE: frozenset[str] = frozenset()


class _Registered:
    """The buffer registrations of a call on the model's modules (as they were at its start).

    Called at every registration in the process while the call runs
    (:func:`~salience.hooks.watch_buffer_registrations`: ``register_buffer`` and a buffer's
    assignment call it; nothing else is slowed down), it notes the modules of the model that
    registered a buffer: those that held none at the start (:func:`_rebind` does not walk
    them) and those that held some (a registration of the same object with another
    persistence escapes the comparison by identity). Finding them otherwise would take a second
    walk of every module at every call.
    """

    __slots__ = ("holders", "ids", "modules", "others", "touched")

    def __init__(self, modules: list[nn.Module], holders: list[nn.Module]) -> None:
        self.modules, self.holders = modules, holders
        self.ids: dict[int, bool] | None = None  # module id -> whether it held buffers
        self.others: dict[int, nn.Module] = {}  # registered on: modules that held no buffer
        self.touched = False  # a holder registered one

    def __call__(self, module: nn.Module, name: str, buffer: Any) -> None:
        if self.ids is None:  # made at the first registration (any module's, any thread's)
            self.ids = dict.fromkeys(map(id, self.modules), False)
            self.ids.update(dict.fromkeys(map(id, self.holders), True))
        held = self.ids.get(id(module))
        if held:
            self.touched = True
        elif held is not None:
            self.others[id(module)] = module


def _rebind(
    holders: list[nn.Module],
    tables: list[dict[str, Any]],
    entries: list[Any],
    caches: list[frozenset[str]],
    registered: _Registered,
) -> None:
    """Put back the buffers of the model's modules as the call found them, but new caches.

    ``tables``: the buffers of ``holders`` at the start (``entries``: their values in order),
    ``caches``: their non-persistent names. A buffer the call replaced, removed or set from
    ``None`` is put back, with its persistence (a non-persistent one too: it may be running
    state, an average the model reassigns). A persistent buffer registered under a new name
    (on any module of the model, with those of ``registered``) is removed; a non-persistent one
    is left as the model made it, a cache made lazily: no part of its ``state_dict``, and the
    Python attribute that goes with it (a ``ready`` flag) cannot be put back, so removing it
    would break the model's next pass. (A cache the model grows under its old name is put
    back; a model that keeps the cache's length in an attribute then meets the old cache.)
    When the holders still hold exactly those objects and nothing was registered (the common
    case: one comparison by identity, in C), nothing else is done.
    """
    now = [buffer for module in holders for buffer in module._buffers.values()]
    same = len(now) == len(entries) and all(map(operator.is_, now, entries))
    if same and not registered.touched and not registered.others:
        return
    for module, table, cache in zip(holders, tables, caches, strict=True):
        if isinstance(module, torch.jit.ScriptModule):
            continue  # its buffers cannot be rebound (values are put back by the caller)
        current, marked = module._buffers, module._non_persistent_buffers_set
        for name in [name for name in current if name not in table]:
            if name not in marked:
                del current[name]  # registered during the call, persistent
        for name, buffer in table.items():
            if name not in current or current[name] is not buffer:
                current[name] = buffer  # replaced, removed, or set from None
            if name in cache:
                marked.add(name)
            else:
                marked.discard(name)
    for module in registered.others.values():
        if isinstance(module, torch.jit.ScriptModule):
            continue
        marked = module._non_persistent_buffers_set
        for name in [name for name in module._buffers if name not in marked]:
            del module._buffers[name]  # a persistent buffer of a module that held none


_Saved: TypeAlias = tuple[Tensor, list[torch.Size]]
"""A group's copy (see :func:`_copy`) and the shapes of its buffers."""


def _save(buffers: list[Tensor]) -> _Saved:
    return _copy(buffers), [b.shape for b in buffers]


def _put_back(
    groups: list[list[Tensor]], saved: list[_Saved], only: set[int] | None = None
) -> set[int]:
    """Write back the buffers of ``groups`` whose bits differ from ``saved``: their ids.

    ``only``: the ids of the buffers that may be written (``None``: any).
    """
    changed: set[int] = set()
    for buffers, (values, shapes) in zip(groups, saved, strict=True):
        if only is not None and not any(id(b) in only for b in buffers):
            continue
        if len(buffers) == 1:
            if not _same_bits(buffers[0], values):
                _write(buffers[0], values)
                changed.add(id(buffers[0]))
        elif not _same_bits(_copy(buffers), values):
            written = _restore(buffers, values, shapes, only)
            changed.update(id(b) for b, w in zip(buffers, written, strict=True) if w)
    return changed


def _write(buffer: Tensor, value: Tensor) -> None:
    """Put ``value`` in ``buffer``, in place if it kept its shape, dtype and device.

    Else (resized in place, or given other data through ``.data`` during the call) through
    ``.data``: the same object, with its shape and dtype back.
    """
    if (buffer.shape, buffer.dtype, buffer.device) == (value.shape, value.dtype, value.device):
        buffer.copy_(value)
    else:
        buffer.data = value.clone()


def _same_kind(buffers: list[Tensor]) -> list[list[int]]:
    """Group the positions of ``buffers``: dense ones by dtype, device and rank, others alone.

    The ranks: scalars, vectors and the rest (see :func:`_copy`).
    """
    groups: dict[Any, list[int]] = {}
    for i, buffer in enumerate(buffers):
        dense = buffer.layout == torch.strided and not buffer.is_quantized  # (own scales)
        key = (buffer.dtype, buffer.device, min(buffer.ndim, 2)) if dense else ("alone", i)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _copy(buffers: list[Tensor]) -> Tensor:
    """Copy one buffer, or several into one flat tensor (one call; one kernel on a GPU).

    Vectors (BatchNorm's statistics) are concatenated and scalars (its counters) stacked as
    they are: a third of the time of flattening each first (a view per buffer; 13 against 43
    µs for Lite0's 98 statistics). Buffers of other ranks, or a group whose ranks changed
    since it was made (a ``.data`` assignment), are flattened.
    """
    if len(buffers) == 1:
        return buffers[0].detach().clone()
    rank = buffers[0].ndim
    if rank <= 1 and all(b.ndim == rank for b in buffers):  # (cat takes an empty vector
        with contextlib.suppress(RuntimeError):  # beside any rank) sizes no longer alike
            return torch.cat(buffers) if rank == 1 else torch.stack(buffers)
    return _flatten_dense_tensors(buffers)


def _restore(
    buffers: list[Tensor], values: Tensor, shapes: list[torch.Size], only: set[int] | None
) -> list[bool]:
    """Write back the buffers whose values changed (only those: a write bumps the version).

    ``shapes``: the buffers' shapes when ``values`` was made; ``only``: as for
    :func:`_put_back`. Returns whether each was written.
    """
    written = []
    for buffer, value, shape in zip(
        buffers, values.split([math.prod(s) for s in shapes]), shapes, strict=True
    ):
        value = value.view(shape)
        differs = (only is None or id(buffer) in only) and (
            buffer.shape != shape or not _same_bits(buffer, value)
        )
        if differs:
            _write(buffer, value)
        written.append(differs)
    return written


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same bits: a NaN equals itself, ``-0.0`` is not ``0.0``.

    ``torch.equal`` compares values, so a buffer holding a NaN would count as changed (and be
    written, its version bumped) on every call, and a sign flipped on a zero would stay. Compared
    as integers of the same width (faster too: 28 against 39 µs for Lite0's 42k floats here).
    """
    if a.layout != b.layout or a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.layout != torch.strided:  # sparse: torch.equal has no kernel for it
        return torch.equal(a.to_dense(), b.to_dense())
    if a.is_quantized:
        return torch.equal(a, b)
    a, b = a.resolve_conj().resolve_neg(), b.resolve_conj().resolve_neg()  # lazy views
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    bits = _BITS[a.element_size()]
    return torch.equal(a.view(bits), b.view(bits))


@contextlib.contextmanager
def model_scope(
    model: Any,
    inputs: Tensor,
    *,
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
) -> Iterator[Forward]:
    """Check the model and inputs and run the block on a :class:`Forward` of the model.

    Buffers are restored, TF32 is off and the rules put on backward nodes are removed at the end
    of the block (see the module documentation).
    """
    modules = modules_of(model) if isinstance(model, nn.Module) else None
    check_model(model, modules)
    check_inputs(inputs)
    forward = Forward(model, inputs.shape[0], forward_args, modules)
    with full_float32(allow_tf32), kept_buffers(model, modules), node_rules_scope():
        yield forward
