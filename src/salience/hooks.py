"""Every hook and function mode salience puts on a model, scoped to one call and one thread.

This is the only module that registers hooks. Nothing here outlives a ``with`` block, also when
the block raises, and nothing is seen by another thread that runs the same model meanwhile.

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
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

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
    "rectifier_rule",
]

ForwardHook = Callable[[str, nn.Module, tuple[Any, ...], Any], Any]
"""``hook(name, module, args, output)``: a return value other than ``None`` replaces the output."""

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


@contextlib.contextmanager
def forward_hooks(modules: Iterable[tuple[str, nn.Module]], hook: ForwardHook) -> Iterator[None]:
    """Call ``hook`` after every forward call of the named ``modules`` inside the block.

    The hook runs only in the thread that entered the block; calls from other threads pass
    through untouched. The hooks are removed on exit, also when the block raises.
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
        """Raise when the forward pass ran nothing the rule could modify."""
        if self.count or self.modified:
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
            name. The message, on behalf of ``method``, names the activations the model uses.
    """
    if rule == "gradient":
        yield None
        return
    extend = resolve_activations(activations)
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"the {rule} backward rule cannot be applied to a TorchScript model: its ReLUs run "
            "outside Python. Load the model as a Python nn.Module instead"
        )
    with _RectifierMode(rule, extend) as mode, _counted():
        yield mode
    mode.check(method or _METHODS.get(rule, rule))


class _CallMode(TorchFunctionMode):
    """Offers every torch call made inside the block to ``handle`` (see :func:`call_rule`)."""

    def __init__(self, handle: CallHandler) -> None:
        super().__init__()
        self.handle = handle

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
        return result


@contextlib.contextmanager
def call_rule(model: nn.Module, handle: CallHandler, *, method: str) -> Iterator[None]:
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
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"{method} cannot be applied to a TorchScript model: its operations run outside "
            "Python. Load the model as a Python nn.Module instead"
        )
    with _CallMode(handle), _counted():
        yield
