"""Every hook and function mode salience puts on a model, scoped to one call and one thread.

This is the only module that registers hooks. Nothing here outlives a ``with`` block, also when
the block raises, and nothing is seen by another thread that runs the same model meanwhile. (The
hooks :func:`ruled_forward` puts on backward nodes belong to the graph of the call's own pass;
:func:`node_rules_scope`, which every method's call opens, removes them when the call ends, for
a node the model made before the call and keeps.)

**Forward hooks** (:func:`forward_hooks`) let layer methods read what a layer computed. They are
registered on the modules for the duration of the block, and act only in the thread that
entered it: a second thread running the same model at the same time runs it unobserved.

**Rectifier rules** (:func:`rectifier_rule`): the modified backward rules of DeconvNet and
guided backprop (defined in :mod:`salience.rectifiers`) are installed with a
:class:`torch.overrides.TorchFunctionMode`, not with module hooks. The mode sees every
rectifier, every call computing ``max(x, 0)`` or a clip to ``[0, t]``, however it is written
(``nn.ReLU`` and ``F.relu``, ``ReLU6``, ``hardtanh(0, t)``, ``clamp(min=0)``,
``maximum(x, 0)``, ...; :mod:`salience.rectifiers` lists every spelling). Module hooks only see
``nn.ReLU`` modules, which is why Captum and pytorch-grad-cam silently return plain gradients
on MobileNet and EfficientNet.

When the forward pass runs no rectifier at all (GELU, SiLU or Hardswish networks: ViT,
ConvNeXt, EfficientNet-B0), the rule would change nothing and :func:`rectifier_rule` raises,
naming the activations the model uses, rather than return a plain gradient under a guided
name. ``activations=`` extends the rule to such activations (not the papers' method; see
:mod:`salience.rectifiers`).

TorchScript models run outside Python and cannot be intercepted: :func:`rectifier_rule`
raises for them rather than returning a plain gradient under a guided name.

**Rules at backward nodes** (:func:`ruled_forward`, what the methods use): a function mode
costs every torch call of the forward pass (about 7 µs each in PyTorch's Python dispatch: 210
calls, 1.5 ms, on EfficientNet-Lite0), and its autograd function runs Python code forward and
backward at each rectifier. Most rectifiers are ``relu`` or ``hardtanh(0, t)`` (``nn.ReLU``,
``F.relu``, ``nn.ReLU6``), whose PyTorch backward nodes keep what the rule needs, so
:func:`ruled_forward` runs the pass as written and walks its autograd graph instead: a hook on
each such node returns ``relu`` of what the node computed (guided: ``[0 < x < t] * relu(s)``
is ``relu([0 < x < t] * s)``) or of what it received (DeconvNet: ``relu(s)``), bit for bit
the mode's result. The walk hands the pass to the mode (run again; the model is remembered
as one for the mode) where the graph does not show every rectifier as such a node: a node of
another spelling (``clamp(min=0)``, ``maximum(x, 0)``, ...; not a ``clamp(min=1e-6)``, which
is no rectifier), a node that hides the calls behind it (a custom autograd function, compiled
code, an in-place call on a view; not salience's own functions marked
:func:`no_rectifier_inside`), or no rectifier at all (the mode's error names the
activations). ``extras["rectifiers"]`` counts the ruled calls the output depends on (the
mode: every rectifier call of the pass).
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._checks import modules_of, warn
from ._containers import tensors_in
from ._weak import ByIdentity
from .rectifiers import (
    RECTIFIER_SPELLINGS,
    SITES,
    Activate,
    Activations,
    RectifierRule,
    Rectify,
    resolve_activations,
)

__all__ = [
    "CallHandler",
    "ForwardHook",
    "active_scopes",
    "call_rule",
    "forward_hooks",
    "no_rectifier_inside",
    "node_rules_scope",
    "rectifier_rule",
    "ruled_forward",
    "scripted_modules",
]

ForwardHook = Callable[[str, nn.Module, tuple[Any, ...], Any], Any]
"""``hook(name, module, args, output)``: a return value other than ``None`` replaces the output."""

FunctionT = TypeVar("FunctionT", bound=torch.autograd.Function)

CallHandler = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]
"""``handle(func, args, kwargs)``: the replacement result of a torch call, or ``NotImplemented``
to let the call run as written."""

_scopes = 0
_scopes_lock = threading.Lock()


def active_scopes() -> int:
    """How many hook scopes of this module are open, in any thread.

    A compiled model (``salience.performance(compile=...)``) may not run the hooks and modes
    installed here, so :class:`salience._forward.Forward` runs the eager model while this is
    not zero.
    """
    return _scopes


@contextlib.contextmanager
def _counted() -> Iterator[None]:
    global _scopes
    with _scopes_lock:
        _scopes += 1
    try:
        yield
    finally:
        with _scopes_lock:
            _scopes -= 1


_node_rules = threading.local()
"""``stack``: a list of hook handles per :func:`node_rules_scope` open in this thread."""


@contextlib.contextmanager
def node_rules_scope() -> Iterator[None]:
    """Remove, when the block exits, the rules put on backward nodes inside it in this thread.

    The nodes of a call's own pass go with its graph, but a model may keep a tensor it computed
    before the call, graph and all (a relu'd bias map made at construction, a hidden state): the
    rule would stay on its rectifier node, and your own backward passes through it would take
    the guided (or DeconvNet) gradient. Open around the call's backward passes too.
    """
    stack = getattr(_node_rules, "stack", None)
    if stack is None:
        stack = _node_rules.stack = []
    handles: list[Any] = []
    stack.append(handles)
    try:
        yield
    finally:
        stack.pop()
        for handle in handles:
            handle.remove()


def _rule_nodes(nodes: list[Any], rule: str) -> None:
    """Put ``rule`` on each rectifier node, until the innermost :func:`node_rules_scope` ends."""
    ruled = _guided_node if rule == "guided" else _deconvnet_node
    handles = [node.register_hook(ruled) for node in nodes]
    stack = getattr(_node_rules, "stack", None)
    if stack:
        stack[-1].extend(handles)


_Watcher = Callable[[nn.Module, str, Any], None]
_watchers: tuple[_Watcher, ...] = ()
_watchers_lock = threading.Lock()


def _on_buffer_registration(module: nn.Module, name: str, buffer: Any) -> None:
    for watcher in _watchers:  # a tuple replaced whole: safe to read while another thread adds
        watcher(module, name, buffer)


_register = getattr(torch.nn.modules.module, "register_module_buffer_registration_hook", None)
if _register is not None:  # one hook for the process, at import: adding and removing one per
    _register(_on_buffer_registration)  # call raced with register_buffer in other threads


class _Watching:
    """The handle of :func:`watch_buffer_registrations`."""

    def __init__(self, watcher: _Watcher) -> None:
        self.watcher = watcher

    def remove(self) -> None:
        global _watchers
        with _watchers_lock:
            _watchers = tuple(w for w in _watchers if w is not self.watcher)


def watch_buffer_registrations(watcher: _Watcher) -> _Watching:
    """Call ``watcher(module, name, buffer)`` at every buffer registration until removed.

    Process-wide: ``register_buffer`` and a buffer's assignment, on any module, in any thread.
    The caller removes the handle in a ``finally``. One hook of PyTorch's serves every watcher,
    installed when this module is imported (torch iterates its hooks while another thread
    would add or remove one); with no watcher it returns at once. Nothing is seen on a PyTorch
    without such hooks.
    """
    global _watchers
    with _watchers_lock:
        _watchers = (*_watchers, watcher)
    return _Watching(watcher)


@contextlib.contextmanager
def forward_hooks(modules: Iterable[tuple[str, nn.Module]], hook: ForwardHook) -> Iterator[None]:
    """Call ``hook`` after every forward call of the named ``modules`` inside the block.

    The hook runs only in the thread that entered the block; calls from other threads pass
    through untouched. The hooks are removed on exit, also when the block raises.

    Raises:
        TypeError: a TorchScript module, which runs no forward hooks.
    """
    owner = threading.get_ident()

    def scoped(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], Any]:
        def run(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if threading.get_ident() != owner:
                return None
            return hook(name, module, args, output)

        return run

    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for name, module in modules:
            if isinstance(module, torch.jit.ScriptModule):
                raise TypeError(
                    f"salience hooks the model's layers for this, and TorchScript models run "
                    f"no hooks (module {name or '(the model)'!r} is {type(module).__name__}); "
                    "load the model as a Python nn.Module instead"
                )
            handles.append(module.register_forward_hook(scoped(name)))
        with _counted():
            yield
    finally:
        for handle in handles:
            handle.remove()


def _differentiable(x: Any) -> bool:
    return (
        isinstance(x, Tensor)
        and x.requires_grad
        and torch.is_grad_enabled()
        and (x.is_floating_point() or x.is_complex())
    )


_RULE_NAMES = {"guided": "guided", "deconvnet": "DeconvNet"}
_METHODS = {"guided": "guided_backprop", "deconvnet": "deconvnet"}


class _RectifierMode(TorchFunctionMode):
    """Applies ``rule`` at every rectifier call, and at the activations named in ``extend``.

    Attributes:
        count: Rectifier calls modified.
        used: Calls of other activations, by name (modified or not).
        modified: Calls of other activations modified (those in ``extend``), by name.
    """

    def __init__(self, rule: str, extend: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.rule = rule
        self.extend = extend
        self.count = 0
        self.used: Counter[str] = Counter()
        self.modified: Counter[str] = Counter()
        self.hidden: str | None = None  # a backward node of the pass that hides calls

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        parse = SITES.get(func)
        site = None
        if parse is not None:
            try:
                site = parse(args, kwargs)
            except (TypeError, ValueError, IndexError, KeyError, RuntimeError):
                site = None  # arguments PyTorch itself rejects: let it say so below
        if site is None or not _differentiable(site.x):
            return func(*args, **kwargs)
        if site.fn is None:
            self.count += 1
            return Rectify.apply(site.x, site.upper, site.inplace, site.keep_output, self.rule)
        self.used[site.name] += 1
        if site.name not in self.extend:
            return func(*args, **kwargs)
        self.modified[site.name] += 1
        return Activate.apply(site.x, site.fn, site.inplace, self.rule)

    def extras(self) -> dict[str, Any]:
        """Return what a result records: ``rectifiers`` and ``activations_modified``."""
        return {"rectifiers": self.count, "activations_modified": dict(self.modified)}

    def check(self, method: str) -> None:
        """Raise when the pass ran nothing the rule could modify; warn of unmodified others."""
        if self.count or self.modified:
            unruled = Counter(
                {n: k for n, k in self.used.items() if n in _MAIN_PATH and n not in self.extend}
            )
            _warn_unruled(method, self.rule, self.count, unruled)
            return
        rule = _RULE_NAMES.get(self.rule, self.rule)
        uses = ", ".join(f"{name} × {n}" for name, n in self.used.most_common())
        asked = f" and none of the activations {sorted(self.extend)}" if self.extend else ""
        message = (
            f"{method} found no rectifier ({RECTIFIER_SPELLINGS}){asked} to modify in this "
            "model, so its result would be exactly the plain gradient. "
        )
        if uses:
            message += (
                f"The model uses {uses}. Use salience.gradient, or pass activations='all' (or "
                f"names such as {[n.lower() for n in self.used][:3]}) to apply the {rule} rule "
                "at these activations (an extension, not the paper's method)"
            )
        elif self.hidden is not None:
            message += (
                f"Its pass runs {self.hidden}, which hides the calls behind it from the rule "
                "(torch.utils.checkpoint with use_reentrant=True, a TorchScript function, a "
                "custom autograd function): run those parts without it (checkpoint: "
                "use_reentrant=False) to modify the rectifiers they hold"
            )
        else:
            message += "It uses no other activation function either: use salience.gradient"
        raise ValueError(message)


@contextlib.contextmanager
def rectifier_rule(
    model: nn.Module,
    rule: RectifierRule,
    *,
    activations: Activations = "rectifiers",
    method: str | None = None,
    hidden: str | None = None,
) -> Iterator[_RectifierMode | None]:
    """Apply ``rule`` at every rectifier the model runs inside the block.

    ``"gradient"`` changes nothing. The rule is active only for the calling thread and only
    until the block exits, also when it raises. ``activations`` extends it to other
    activation functions (see :func:`resolve_activations`). The mode yielded counts what it
    modified (:meth:`_RectifierMode.extras`).

    Raises:
        TypeError: for TorchScript models, whose rectifiers cannot be reached from Python.
        ValueError: on leaving the block, when the model ran no rectifier (nor any activation
            named in ``activations``): the result would be a plain gradient under another
            name. The message, on behalf of ``method``, names the activations the model uses,
            or ``hidden``: the kind of a backward node of the pass that hides calls.
    """
    if rule == "gradient":
        yield None
        return
    extend = resolve_activations(activations)
    _refuse_script(model, f"the {rule} backward rule", "its ReLUs")
    with _RectifierMode(rule, extend) as mode, _counted():
        mode.hidden = hidden
        yield mode
    mode.check(method or _METHODS.get(rule, rule))


def _refuse_script(
    model: Any, what: str, calls: str, modules: list[nn.Module] | None = None
) -> None:
    """Raise for a model that is, or holds, TorchScript: its calls run outside Python.

    A rule would not reach them, and a scripted block would keep its plain gradient.
    """
    scripted = scripted_modules(model, modules)
    if scripted:
        where = "a TorchScript model" if not scripted[0] else f"TorchScript module {scripted[0]!r}"
        raise TypeError(
            f"{what} cannot be applied to {where}: {calls} run outside Python. Load the model "
            "as a Python nn.Module instead"
        )


def scripted_modules(model: Any, modules: list[nn.Module] | None = None) -> list[str]:
    """Return the names of the TorchScript modules of ``model`` (``""``: the model itself).

    ``modules``: :func:`~salience._checks.modules_of` the model, if the caller has it; the names
    are looked up only when there is one.
    """
    if not isinstance(model, nn.Module):
        return []
    walked = modules if modules is not None else modules_of(model)
    if not any(issubclass(kind, torch.jit.ScriptModule) for kind in set(map(type, walked))):
        return []
    return [n for n, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]


class _CallMode(TorchFunctionMode):
    """Offers every torch call made inside the block to ``handle`` (see :func:`call_rule`)."""

    def __init__(self, handle: CallHandler, method: str) -> None:
        super().__init__()
        self.handle = handle
        self.method = method

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        result = self.handle(func, args, kwargs)
        if result is NotImplemented:
            return func(*args, **kwargs)
        if _checkpointed():
            raise RuntimeError(
                f"{self.method} cannot explain a model that checkpoints part of its forward "
                "pass (torch.utils.checkpoint): the backward pass recomputes that part outside "
                f"{self.method}'s rules, which would give a wrong map. Turn checkpointing off "
                "for the explanation (timm: model.set_grad_checkpointing(False); Hugging Face: "
                "model.gradient_checkpointing_disable())"
            )
        return result


def _checkpointed() -> bool:
    """Whether the call runs in a region that ``torch.utils.checkpoint`` recomputes."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = None if top is None else top(False)
    return hooks is not None and "_checkpoint_hook" in getattr(hooks[0], "__qualname__", "")


@contextlib.contextmanager
def call_rule(
    model: nn.Module,
    handle: CallHandler,
    *,
    method: str,
    modules: list[nn.Module] | None = None,
) -> Iterator[None]:
    """Let ``handle`` replace torch calls (activations, pooling, additions) inside the block.

    The general form of :func:`rectifier_rule`, for methods that change the backward pass at
    functions rather than modules (DeepLIFT's multipliers, LRP's rules): ``handle(func, args,
    kwargs)`` returns the call's replacement result, or ``NotImplemented`` to run it as
    written. The handler runs with the mode switched off, so the torch calls it makes are not
    offered again. The mode is active only for the calling thread and only until the block
    exits, also when it raises. :data:`salience.rectifiers.SITES` tells which calls are
    activations and how to read their arguments.

    Raises:
        TypeError: for TorchScript models, whose calls run outside Python; the message names
            ``method``.
    """
    _refuse_script(model, method, "its operations", modules)
    with _CallMode(handle, method), _counted():
        yield


# -- rectifier rules at the backward nodes of a pass -------------------------------------------

_MAYBE_RECTIFIERS = frozenset(
    {
        "ClampBackward",
        "ClampMinBackward",
        "ThresholdBackward",
        "MaximumBackward",
        "FmaxBackward",
        "LeakyReluBackward",
    }
)
"""Kinds of node (names less their version digits) that the other rectifier spellings of
:data:`salience.rectifiers.SITES` create; ``ReluBackward`` and ``HardtanhBackward`` are ruled
at the node. Such a node sends the pass to the mode, unless its saved arguments say it is no
rectifier (:func:`_no_rectifier`)."""

_OPAQUE = "torch::autograd::CopySlices"
"""The node of an in-place call on a view: the node of the call is hidden inside it."""

_NO_RECTIFIER_INSIDE: set[type] = set()
"""Backward node classes of salience's own autograd functions that run no rectifier."""

_MODE_ONLY: ByIdentity[nn.Module, bool] = ByIdentity()
"""Models whose graph the rule cannot be read from: :func:`ruled_forward` uses the mode."""
_HIDDEN: ByIdentity[nn.Module, tuple[str, ...]] = ByIdentity()
"""Of the models in :data:`_MODE_ONLY`, the backward node kind that hid calls, for errors."""
_MODE_LOCK = threading.Lock()


def no_rectifier_inside(function: type[FunctionT]) -> type[FunctionT]:
    """Class decorator: the walk of :func:`ruled_forward` may pass through ``function``'s nodes.

    For salience's own autograd functions that run no rectifier (the channels-last boundary of
    :class:`salience._forward.Forward`); any other custom function's node hides its calls.
    """
    _NO_RECTIFIER_INSIDE.add(function._backward_cls)  # type: ignore[attr-defined]
    return function


def ruled_forward(
    model: Any,
    run: Callable[[], Any],
    rule: RectifierRule,
    *,
    activations: Activations = "rectifiers",
    method: str | None = None,
    modules: list[nn.Module] | None = None,
) -> tuple[Any, dict[str, Any] | None]:
    """Run ``run()``, one forward pass of ``model``, with ``rule`` at every rectifier.

    What :func:`rectifier_rule` does, at the backward nodes of the pass where its graph shows
    every rectifier (see the module documentation), else through the mode. ``run`` may be
    called twice: it must make its inputs afresh. ``modules``: the model's modules, if the
    caller has walked them (:func:`~salience._checks.modules_of`). Call inside a
    :func:`node_rules_scope` that also holds the backward pass (the methods' calls open one):
    outside one, the rules stay on the nodes the model keeps.

    Returns:
        ``(output, extras)``: ``run()``'s output and what the rule modified
        (:meth:`_RectifierMode.extras`), ``None`` under ``"gradient"``.

    Raises:
        TypeError, ValueError: as :func:`rectifier_rule`.
    """
    if rule == "gradient":
        return run(), None
    _refuse_script(model, f"the {rule} backward rule", "its ReLUs", modules)
    hidden: list[str] = []
    if not resolve_activations(activations):
        ruled = _node_rule(model, run, rule, method or _METHODS.get(rule, rule), hidden)
        if ruled is not None:
            return ruled
    method = method or _METHODS.get(rule, rule)
    with rectifier_rule(
        model, rule, activations=activations, method=method, hidden=next(iter(hidden), None)
    ) as mode:
        output = run()
        assert mode is not None  # a rule other than "gradient"
        rule_left(output, mode, method)
    return output, mode.extras()


def rule_left(output: Any, mode: _RectifierMode, method: str) -> None:
    """Rule at their nodes the rectifiers of ``output``'s graph that ``mode`` did not see.

    The mode rules the calls made from Python. A rectifier that runs behind it (a
    TorchScript function's, an ``nn.RNN``'s with ``nonlinearity="relu"``, ``torch.ops``
    calls) leaves its plain node in the graph: the rule is put there, as on the node path,
    and counted with the mode's (until the :func:`node_rules_scope` ends: open one, as for
    :func:`ruled_forward`). Call inside the mode's block, before its check. A TorchScript
    graph run as one node hides what it holds: warned of (:func:`_warn_graphs`), or named in
    the mode's error if nothing else was ruled.
    """
    left, graphs = [], 0
    for node in _graph_nodes(output):
        kind = _kind(node)
        if _is_rectifier_node(node, kind):
            left.append(node)
        elif kind == _SCRIPT_GRAPH:
            graphs += 1
    _rule_nodes(left, mode.rule)
    mode.count += len(left)
    if graphs and not mode.count and not mode.modified:
        graph = f"{_SCRIPT_GRAPH} (a TorchScript function run as one node)"
        mode.hidden = graph if mode.hidden is None else f"{mode.hidden} and {graph}"
    elif mode.count or mode.modified:
        _warn_graphs(method, graphs)


def _warn_graphs(method: str, graphs: int) -> None:
    if graphs:
        warn(
            f"{method}: the pass runs {graphs} TorchScript graph(s) as one backward node "
            "(DifferentiableGraphBackward: a scripted function, fused), whose operations the "
            "rule cannot see: a rectifier inside keeps its plain gradient. Run the scripted "
            "functions as Python (not torch.jit.script) to be sure of the paper's map"
        )


def _graph_nodes(output: Any) -> Iterator[Any]:
    """Every backward node of the graph of the tensors in ``output`` (see :func:`_walk`)."""
    return _walk([t.grad_fn for t in tensors_in(output) if t.grad_fn is not None])


def _node_rule(
    model: Any, run: Callable[[], Any], rule: RectifierRule, method: str, hidden: list[str]
) -> tuple[Any, dict[str, Any]] | None:
    """Run ``run()`` and rule its rectifiers at their nodes: ``(output, extras)``.

    ``None`` (nothing run, or a pass thrown away) where the mode is needed; ``hidden`` then
    gets the kind of the node that hid calls, if one did.
    """
    if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        return None
    with _MODE_LOCK:
        if model in _MODE_ONLY:
            hidden.extend(_HIDDEN.get(model, ()))
            return None
    with _counted():  # keeps a compiled model out, as under the mode
        output = run()
    unruled: Counter[str] = Counter()
    nodes = _rectifier_nodes(output, unruled, hidden)
    if not nodes:  # a node the rule cannot see into, or none: the mode says what there is
        with _MODE_LOCK:
            _MODE_ONLY[model] = True
            if hidden:
                _HIDDEN[model] = tuple(hidden)
        return None
    graphs = unruled.pop(_SCRIPT_GRAPH, 0)
    _warn_unruled(method, rule, len(nodes), unruled)
    _warn_graphs(method, graphs)
    _rule_nodes(nodes, rule)
    return output, {"rectifiers": len(nodes), "activations_modified": {}}


def _guided_node(grad_inputs: tuple[Any, ...], grad_outputs: tuple[Any, ...]) -> Any:
    """Guided backprop at a rectifier's node: ``relu`` of its gradient ``[0 < x < t] * s``."""
    if grad_inputs[0] is None:
        return None
    return (grad_inputs[0].clamp(min=0.0), *grad_inputs[1:])


def _deconvnet_node(grad_inputs: tuple[Any, ...], grad_outputs: tuple[Any, ...]) -> Any:
    """DeconvNet at a rectifier's node: ``relu(s)`` of the gradient ``s`` it received."""
    if grad_inputs[0] is None or grad_outputs[0] is None:
        return None
    return (grad_outputs[0].clamp(min=0.0), *grad_inputs[1:])


def _rectifier_nodes(
    output: Any, others: Counter[str] | None = None, hidden: list[str] | None = None
) -> list[Any] | None:
    """Return the rectifier nodes of ``output``'s graph, or ``None`` where the mode must rule.

    ``None`` for a node that hides the calls behind it (a custom autograd function, compiled
    code, an in-place call on a view), a node of another rectifier spelling, or an output that
    is not tensors in tuples, lists and dicts. ``others`` counts the nodes of the other
    nonlinearities of :data:`_MAIN_PATH` the walk meets; ``hidden`` gets the kind of a node
    that hides calls.
    """
    roots: list[Any] = []
    pending = [output]
    while pending:
        value = pending.pop()
        if isinstance(value, Tensor):
            if value.grad_fn is not None:
                roots.append(value.grad_fn)
        elif isinstance(value, tuple | list):
            pending.extend(value)
        elif isinstance(value, dict):
            pending.extend(value.values())
        elif not (value is None or isinstance(value, int | float | str | bool)):
            return None  # an object that may hold tensors: look no further
    nodes = []
    kinds = _NODE_KINDS
    for node in _walk(roots):
        kind = kinds.get(type(node)) or _kind(node)
        if kind == "ReluBackward" or (kind == "HardtanhBackward" and _clip_to_positive(node)):
            nodes.append(node)
        elif _hides_calls(node, kind):
            if hidden is not None:
                hidden.append(kind)
            return None
        elif kind in _MAYBE_RECTIFIERS and not _no_rectifier(node, kind):
            return None
        elif others is not None and kind in _COUNTED:  # (a scripted graph: warned of)
            others[_COUNTED[kind]] += 1
        elif others is not None and kind == "ClampBackward" and _two_sided(node):
            others["Hardtanh"] += 1  # clamp(x, -1, 1): Hardtanh, spelled (as the mode reads it)
    return nodes


def _walk(roots: list[Any]) -> Iterator[Any]:
    """Yield every backward node behind ``roots`` once, but the leaves'.

    The leaves' nodes (every parameter's) have nothing behind them. ``roots`` may hold a node
    twice (an output holding one tensor twice).
    """
    pending = list(dict.fromkeys(roots))
    seen = set(pending)
    while pending:
        node = pending.pop()
        yield node
        for following, _ in node.next_functions:
            if following is not None and following not in seen and type(following) is not _LEAF:
                seen.add(following)
                pending.append(following)


def _kind(node: Any) -> str:
    """Return a backward node's kind: its name less its version digits (read once a class).

    Nodes of C++ functions without a class of their own share the class ``CppFunction`` (a
    TorchScript graph, a C++ extension's function, an error node): theirs is read every time.
    A TorchScript graph's is :data:`_SCRIPT_GRAPH`.
    """
    kind = _NODE_KINDS.get(type(node))
    if kind is None:
        kind = node.name().rstrip("0123456789")
        if kind.endswith(_SCRIPT_GRAPH):
            kind = _SCRIPT_GRAPH
        if type(node).__name__ != "CppFunction":
            if len(_NODE_KINDS) > 4096:  # node classes made on the fly (functions in a loop)
                _NODE_KINDS.clear()
            _NODE_KINDS[type(node)] = kind
    return kind


def _is_rectifier_node(node: Any, kind: str) -> bool:
    """Whether ``node`` (of ``kind``) is surely the plain backward of a rectifier call.

    ``relu``, ``hardtanh(0, t)``, ``clamp(min=0)`` (and ``clamp(0, t)``), ``leaky_relu`` with
    slope 0; not ``maximum`` or ``threshold``, whose nodes do not say (the other operand, the
    value).
    """
    try:
        if kind == "ReluBackward":
            return True
        if kind == "HardtanhBackward":
            return _clip_to_positive(node)
        if kind in ("ClampBackward", "ClampMinBackward"):  # (bool bounds: no rectifier,
            low, high = node._saved_min, getattr(node, "_saved_max", None)  # as the mode reads)
            numbers = type(low) in (int, float) and type(high) in (int, float, type(None))
            return numbers and low == 0 and (high is None or high > 0)
        if kind == "LeakyReluBackward":
            slope = node._saved_negative_slope
            return type(slope) in (int, float) and slope == 0
    except (AttributeError, RuntimeError):  # tensor bounds, another PyTorch's names
        return False
    return False


_SCRIPT_GRAPH = "DifferentiableGraphBackward"
"""The kind of a node that runs a TorchScript graph (a scripted function the executor made one
node of; named ``torch::jit::(anonymous namespace)::DifferentiableGraphBackward``)."""

_NODE_KINDS: dict[type, str] = {}
"""A backward node class's name less its version digits (the same for all its nodes): read
once per class, not once per node (Lite0's pass has 300 nodes of 20 classes)."""

_LEAF: type = torch._C._functions.AccumulateGrad  # type: ignore[attr-defined]


_MAIN_PATH = frozenset(
    {"GELU", "SiLU", "Hardswish", "Mish", "ELU", "SELU", "CELU", "RReLU", "PReLU", "Softplus",
     "LeakyReLU", "Hardtanh"}
)  # fmt: skip
"""Activations that carry a network's signal where rectifiers would (gates such as sigmoid and
tanh are left out): a rule that modifies the rectifiers and leaves these gives a map that is
partly the plain gradient."""

_MAIN_PATH_NODES = {
    "GeluBackward": "GELU", "SiluBackward": "SiLU", "HardswishBackward": "Hardswish",
    "MishBackward": "Mish", "EluBackward": "ELU", "CeluBackward": "CELU",
    "RreluWithNoiseBackward": "RReLU", "PreluKernelBackward": "PReLU",
    "SoftplusBackward": "Softplus", "LeakyReluBackward": "LeakyReLU",
    "HardtanhBackward": "Hardtanh",
}  # fmt: skip
"""The backward nodes of :data:`_MAIN_PATH` (SELU's is ELU's), by kind (less version digits)."""

_COUNTED = {**_MAIN_PATH_NODES, _SCRIPT_GRAPH: _SCRIPT_GRAPH}
"""The nodes :func:`_rectifier_nodes` counts: those of :data:`_MAIN_PATH`, and scripted graphs."""


def _warn_unruled(method: str, rule: str, count: int, unruled: Counter[str]) -> None:
    if not unruled:
        return
    uses = ", ".join(f"{name} × {n}" for name, n in unruled.most_common())
    warn(
        f"{method} modified {count} rectifier call(s), but the model also runs {uses}, which "
        "keep their plain gradient: the map is partly the plain gradient. Pass "
        f"activations='all' to apply the {_RULE_NAMES.get(rule, rule)} rule there too (an "
        "extension, not the paper's method)"
    )


def _hides_calls(node: Any, kind: str) -> bool:
    """Whether ``node`` stands for calls the walk cannot see (a rectifier among them, maybe)."""
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        return type(node) not in _NO_RECTIFIER_INSIDE
    return kind == _OPAQUE


def _clip_to_positive(node: Any) -> bool:
    """Whether a ``hardtanh`` node clips to ``[0, t]`` with ``t > 0`` (a rectifier)."""
    return bool(node._saved_min_val == 0.0 < node._saved_max_val)


def _two_sided(node: Any) -> bool:
    """Whether a ``clamp`` node clips to ``[lo, hi]`` with numbers ``lo < hi`` (``Hardtanh``)."""
    try:
        low, high = node._saved_min, node._saved_max
    except (AttributeError, RuntimeError):  # tensor bounds, another PyTorch's names
        return False
    return type(low) in (int, float) and type(high) in (int, float) and low < high


def _no_rectifier(node: Any, kind: str) -> bool:
    """Whether the saved arguments of ``node`` make its call no rectifier, as the mode reads it.

    A ``clamp`` whose lower bound is not 0 (``clamp(min=1e-6)`` of a norm, ``clamp(max=t)``),
    a ``threshold`` at another value, a ``leaky_relu`` with a slope. ``False`` when unsure.
    """
    try:
        if kind in ("ClampBackward", "ClampMinBackward"):
            bound = node._saved_min
            return bound is None or (isinstance(bound, int | float) and bound != 0)
        if kind == "ThresholdBackward":
            return bool(node._saved_threshold != 0)
        if kind == "LeakyReluBackward":
            return bool(node._saved_negative_slope != 0)
    except (AttributeError, RuntimeError):  # tensor bounds, another PyTorch's names
        return False
    return False
