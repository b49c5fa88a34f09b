"""Every hook and function mode salience puts on a model, scoped to one call and one thread.

This is the only module that registers hooks. Nothing here outlives a ``with`` block, also when
the block raises, and nothing is seen by another thread that runs the same model meanwhile.

**Forward hooks** (:func:`forward_hooks`) let layer methods read what a layer computed. They are
registered on the modules for the duration of the block, and act only in the thread that
entered it: a second thread running the same model at the same time runs it unobserved.

Modified backward rules at rectifiers (DeconvNet, guided backprop) are installed with a
:class:`torch.overrides.TorchFunctionMode`, not with module hooks. The mode sees every
rectifier the network applies, however it is written: ``nn.ReLU`` (also ``inplace=True`` and one
module reused several times in a forward), ``F.relu``, ``torch.relu``, ``Tensor.relu_``, and the
clipped rectifiers of mobile networks, ``nn.ReLU6``, ``F.relu6`` and ``F.hardtanh`` with a lower
bound of 0. Module hooks only see ``nn.ReLU`` modules, which is why Captum and
pytorch-grad-cam silently return plain gradients on MobileNet and EfficientNet.

TorchScript models run outside Python and cannot be intercepted: :func:`rectifier_rule`
raises for them rather than returning a plain gradient under a guided name.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["ForwardHook", "RectifierRule", "forward_hooks", "rectifier_rule"]

ForwardHook = Callable[[str, nn.Module, tuple[Any, ...], Any], Any]
"""``hook(name, module, args, output)``: a return value other than ``None`` replaces the output."""


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
        yield
    finally:
        for handle in handles:
            handle.remove()

RectifierRule = Literal["gradient", "deconvnet", "guided"]


class _Rectify(torch.autograd.Function):
    """``clamp(x, 0, upper)`` whose backward follows a modified rule.

    With ``s`` the incoming gradient and ``x`` the forward input:

    - ``"deconvnet"`` (Zeiler & Fergus 2013): ``relu(s)``, whatever the sign of the input;
    - ``"guided"`` (Springenberg et al. 2014): ``relu(s) * [0 < x < upper]``, the forward
      derivative times the positive part of the signal.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, upper: float | None, inplace: bool, rule: str
    ) -> Tensor:
        if inplace:
            out = x.clamp_(min=0.0, max=upper)
            ctx.mark_dirty(x)
        else:
            out = x.clamp(min=0.0, max=upper)
        ctx.rule = rule
        ctx.upper = upper
        if rule == "guided":
            # Keep the input, as PyTorch's own hardtanh does, so that a later in-place change
            # of the output does not break the backward; in place, input and output are one.
            ctx.save_for_backward(out if inplace else x)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        signal = grad.clamp(min=0.0)
        if ctx.rule == "guided":
            # The forward derivative, with PyTorch's own fused kernels: pass where 0 < x < upper.
            (saved,) = ctx.saved_tensors  # the input, or the output when in place
            if ctx.upper is None:
                signal = torch.ops.aten.threshold_backward(signal, saved, 0.0)
            else:
                signal = torch.ops.aten.hardtanh_backward(signal, saved, 0.0, ctx.upper)
        return signal, None, None, None


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


# Each entry turns a call's (args, kwargs) into (input, upper bound, inplace), or None when the
# call is not a rectifier (a hardtanh with a lower bound other than 0).
_Parsed = tuple[Tensor, float | None, bool] | None


def _relu(inplace: bool) -> Callable[[tuple[Any, ...], dict[str, Any]], _Parsed]:
    def parse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Parsed:
        return args[0] if args else kwargs["input"], None, inplace

    return parse


def _f_relu(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Parsed:
    return _arg(args, kwargs, 0, "input", None), None, bool(_arg(args, kwargs, 1, "inplace", False))


def _f_relu6(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Parsed:
    return _arg(args, kwargs, 0, "input", None), 6.0, bool(_arg(args, kwargs, 1, "inplace", False))


def _hardtanh(inplace_default: bool) -> Callable[[tuple[Any, ...], dict[str, Any]], _Parsed]:
    def parse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Parsed:
        lower = float(_arg(args, kwargs, 1, "min_val", -1.0))
        if lower != 0.0:
            return None
        upper = float(_arg(args, kwargs, 2, "max_val", 1.0))
        inplace = bool(_arg(args, kwargs, 3, "inplace", inplace_default))
        return _arg(args, kwargs, 0, "input", None), upper, inplace

    return parse


_RECTIFIERS: dict[Any, Callable[[tuple[Any, ...], dict[str, Any]], _Parsed]] = {
    F.relu: _f_relu,
    torch.relu: _relu(False),
    torch.relu_: _relu(True),
    Tensor.relu: _relu(False),
    Tensor.relu_: _relu(True),
    F.relu6: _f_relu6,
    F.hardtanh: _hardtanh(False),
    F.hardtanh_: _hardtanh(True),
}


class _RectifierMode(TorchFunctionMode):
    def __init__(self, rule: str) -> None:
        super().__init__()
        self.rule = rule
        self.count = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        parse = _RECTIFIERS.get(func)
        parsed = parse(args, kwargs) if parse is not None else None
        if parsed is None:
            return func(*args, **kwargs)
        x, upper, inplace = parsed
        self.count += 1
        return _Rectify.apply(x, upper, inplace, self.rule)


@contextlib.contextmanager
def rectifier_rule(model: nn.Module, rule: RectifierRule) -> Iterator[_RectifierMode | None]:
    """Apply ``rule`` at every rectifier the model runs inside the block.

    ``"gradient"`` changes nothing. The rule is active only for the calling thread and only
    until the block exits, also when it raises.

    Raises:
        TypeError: for TorchScript models, whose rectifiers cannot be reached from Python.
    """
    if rule == "gradient":
        yield None
        return
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"the {rule} backward rule cannot be applied to a TorchScript model: its ReLUs run "
            "outside Python. Load the model as a Python nn.Module instead"
        )
    with _RectifierMode(rule) as mode:
        yield mode
