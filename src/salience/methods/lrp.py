r"""Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019).

LRP is computed here in **gradient form**: the relevance of a tensor ``a`` is
:math:`R_a = a \odot c_a`, where :math:`c` is back-propagated like a gradient, once, from
:math:`c = 1` at the explained score (so the total relevance starts as the score itself). The
result is :math:`x \odot c_x`. In this form:

- every **linear operation without parameters** keeps its ordinary gradient: residual
  additions (relevance splits in proportion to each branch's contribution), concatenation,
  reshapes, flatten, padding, average and adaptive pooling, upsampling; max-pooling is
  winner-take-all. LRP-0 on a layer is its gradient, so LRP-0 / ε → 0 equals gradient × input
  on ReLU networks (Ancona et al. 2018);
- **ReLU**'s gradient is exactly the Pass rule; any other elementwise activation (ReLU6,
  GELU, SiLU, Hardswish, ...) gets the Pass rule :math:`R_{in} = R_{out}`, i.e.
  :math:`c_{in} = c_{out} f(x) / x`; so does a clamp that is no rectifier (``clamp(-1, 1)``,
  ``nn.Hardtanh`` spelled as a function). ``abs``, ``maximum``, ``where`` and a clamp by an
  input-dependent bound route the gradient elementwise, which conserves relevance as it is;
- **linear layers and convolutions** (``F.linear``, ``conv1d/2d/3d``, transposed too, also
  called functionally) apply their composite rule (:mod:`.rules`);
- **BatchNorm** right after a convolution (transposed too) or a linear layer (the BatchNorm's
  input is that layer's output, not read before) is folded into it for the call
  (:mod:`._lrp_norms`): the rule applies to the folded weights
  :math:`a W`, :math:`a b + \beta - a \mu` (:math:`a = \gamma / \sqrt{\sigma^2 + \epsilon}`),
  computed on the side; no module is changed. A BatchNorm after anything else (DenseNet's
  pre-activation) is an affine layer under LRP-0: its shift absorbs relevance. In training
  mode the batch statistics are taken as constants;
- **LayerNorm / GroupNorm / RMSNorm** are linearized (AttnLRP, Achtibat et al. 2024): the
  standard deviation is a constant, the centering keeps its gradient;
- **gates and attention** (CP-LRP, Ali et al. 2022): in an elementwise or matrix product of two
  input-dependent tensors, a softmax or sigmoid output, or the operand broadcast to the other's
  shape (squeeze-and-excitation gates), is a constant: relevance flows through the other
  operand (the attention's values);
- at activations with :math:`f(0) \ne 0` (sigmoid, softplus) the Pass rule's ratio
  :math:`f(x)/x` grows near 0: relevance is conserved but concentrated there. Sigmoids are
  mostly gates, which are constants (below);
- **input-layer rules** (w², flat, z^B) give relevance to inputs that are 0: their relevance
  is collected at the layer and added to the map directly when the layer reads the model input
  or a zero padding of it (TensorFlow "SAME" padding of EfficientNet); the padding gets none.

Operations without a rule raise a ``ValueError`` naming them and the module they run in
(eagerly for parameters used in an unknown way, e.g. ``x @ self.weight`` or
``nn.MultiheadAttention``; when relevance reaches them for nonlinear functions such as
``exp``, ``sin``, ``erf``, rounding, a power, a softmax outside a product, a division by an
input-dependent tensor, ``1 / t`` included). Everything is
installed through :mod:`salience.hooks` for the call only; weights are never edited.

**Cost.** One forward and one backward pass. A layer's rule is put on its output when that is
first read: a BatchNorm reading it is folded in first, and a rectifier reading it takes its
Pass rule in the same step (ε: one ratio :math:`\mathrm{clamp}(z, 0, t) / (|z| + ε)`; the
other rules: relevance :math:`\mathrm{clamp}(z, 0, t) \cdot c`, no copy). ε adds a few
elementwise passes to the gradient; BatchNorm keeps its own backward (its running statistics
make it affine). z⁺, αβ and γ add, per layer, the forward of the layer with the modified
weights (two with signed inputs; γ: two, four) and compute their backward with the layer's own
backward kernel (``aten.convolution_backward``, a matrix product), without a nested autograd
pass; the z⁺ rule therefore costs about two gradients on convolution-bound networks.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import not_differentiable, warn
from .._forward import ForwardArgs, model_scope
from ..attribution import Attribution
from ..hooks import call_rule, forward_hooks
from ..rectifiers import SITES
from ..registry import register
from ..targets import Score, TargetLike, resolve_target
from ._lrp_calls import (
    _CLIPS,
    _COVERED,
    _DIVIDING_BY_SELF,
    _DIVISIONS,
    _IN_PLACE,
    _LAYERS,
    _METADATA,
    _NONLINEAR,
    _OPAQUE,
    _POWERS,
    _PRODUCTS,
    _RESHAPES,
    _SOFTMAX,
    _arg,
    _conv_params,
    _grad_tensor,
    _tensors,
)
from ._lrp_layers import (
    _Deferred,
    _Direct,
    _EpsilonPass,
    _Layer,
    _NoRule,
    _Pass,
    _safe,
    _Scale,
)
from ._lrp_norms import batch_norm, linearized_norm
from .gradient import _result
from .rules import (
    Composite,
    Epsilon,
    Pass,
    Zero,
    resolve_composite,
)

__all__ = ["lrp"]


@dataclass
class _State:
    """Everything one call of :func:`lrp` knows while the model runs, and the handler."""

    composite: Composite
    inputs: Tensor
    params: dict[int, tuple[str, nn.Module]]
    filters: frozenset[int] = frozenset()  # ids of module buffers: fixed filters (blur pooling)
    model_input: Tensor = field(default_factory=lambda: torch.empty(0))
    counts: Counter[str] = field(default_factory=Counter)
    canonized: int = 0
    last: str = ""
    collected: Tensor | None = None
    first_seen: bool = False
    ran: set[int] = field(default_factory=set)
    consumed: set[int] = field(default_factory=set)
    _layers: dict[int, tuple[Any, _Layer]] = field(default_factory=dict)
    _pending: dict[int, tuple[Any, _Layer]] = field(default_factory=dict)
    _direct: dict[int, tuple[Any, _Direct]] = field(default_factory=dict)
    _gates: dict[int, Any] = field(default_factory=dict)

    # -- bookkeeping -------------------------------------------------------------------------

    def module_done(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        self.last = name or type(module).__name__
        self.ran.add(id(module))

    def check_modules(self, modules: list[tuple[str, nn.Module]]) -> None:
        """Raise for a module without submodules whose parameters reached no rule.

        That is a module that ran and used its parameters only in operations that no rule
        covers (none of them reached a layer, a norm or a linear operation).
        """
        for name, module in modules:
            if id(module) not in self.ran or any(m is not None for m in module._modules.values()):
                continue
            params = [p for p in module._parameters.values() if p is not None]
            if params and not any(id(p) in self.consumed for p in params):
                raise ValueError(
                    f"LRP has no rule for module {name or type(module).__name__!r} "
                    f"({type(module).__name__}) in the {self.composite.describe()}: it uses its "
                    "parameters in operations that no LRP rule covers. Write it with "
                    "nn.Linear / nn.Conv layers and elementwise activations, or use another "
                    "method"
                )

    def where(self) -> str:
        return f"after module {self.last!r}" if self.last else "before any module"

    def _find(self, table: dict[int, tuple[Any, Any]], t: Any) -> Any:
        entry = table.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        return entry[1]

    def direct_of(self, x: Tensor) -> _Direct | None:
        if x is self.model_input:
            return _Direct()
        return self._find(self._direct, x)

    def is_gate(self, t: Tensor) -> bool:
        ref = self._gates.get(id(t))
        return ref is not None and ref() is t

    def tag_gate(self, t: Tensor) -> None:
        self._gates[id(t)] = weakref.ref(t)

    def remember(self, out: Tensor, layer: _Layer) -> None:
        self._layers[id(out)] = (weakref.ref(out), layer)

    def collect(self, relevance: Tensor) -> None:
        self.collected = relevance if self.collected is None else self.collected + relevance

    def no_rule(self, what: str) -> str:
        return (
            f"LRP has no rule for {what} ({self.where()}), which the relevance reaches: its "
            f"result would not be LRP. The {self.composite.describe()} covers linear layers, "
            "convolutions, normalizations, elementwise activations and linear operations; "
            "explain another layer or use another method (salience.gradient, "
            "salience.integrated_gradients)"
        )

    def owner(self, t: Tensor) -> tuple[str, nn.Module] | None:
        return self.params.get(id(t))

    # -- the handler -------------------------------------------------------------------------

    def __call__(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        tensors = None
        if self._pending and func not in _METADATA and func is not F.batch_norm:
            if func in SITES:
                fused = self.rectifier(func, args, kwargs)
                if fused is not NotImplemented:
                    return fused
            tensors = _tensors(args) + _tensors(kwargs) if kwargs else _tensors(args)
            self.flush(tensors)
        if func in _COVERED:
            if tensors is None:
                tensors = _tensors(args) + _tensors(kwargs) if kwargs else _tensors(args)
            params = self.params
            for t in tensors:
                if id(t) in params:
                    self.consumed.add(id(t))
        layer = _LAYERS.get(func)
        if layer is not None:
            return self.layer(func, layer, args, kwargs)
        parse, clip = SITES.get(func), _CLIPS.get(func)
        if parse is not None or clip is not None:
            return self.activation(parse, args, kwargs, clip)
        if func is F.batch_norm:
            return self.batch_norm(func, args, kwargs)
        if func is F.layer_norm or func is F.group_norm or func is getattr(F, "rms_norm", None):
            return self.norm(func, args, kwargs)
        if func is F.pad:
            return self.pad(func, args, kwargs)
        if func in _RESHAPES:
            return self.reshape(func, args, kwargs)
        kind = _PRODUCTS.get(func)
        if kind is not None:
            return self.product(func, kind, args, kwargs)
        if func in _SOFTMAX:
            return self.softmax(func, args, kwargs)
        if func in _NONLINEAR or func in _POWERS or func in _DIVISIONS:
            return self.nonlinear(func, args, kwargs)
        if func in _OPAQUE:
            return self.opaque(func, args, kwargs)
        return NotImplemented

    def layer(
        self,
        func: Any,
        kind: tuple[type[nn.Module], bool],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        x = _arg(args, kwargs, 0, "input", None)
        weight = _arg(args, kwargs, 1, "weight", None)
        bias = _arg(args, kwargs, 2, "bias", None)
        if not _grad_tensor(x) or not isinstance(weight, Tensor):
            return NotImplemented
        owner = self.owner(weight)
        if owner is None and id(weight) in self.filters and _pools(func, x, weight, args, kwargs):
            # a fixed filter (timm's BlurPool2d: a depthwise F.conv2d with a non-negative
            # buffer) is a pooling: the relevance passes it as it passes an average pool
            # (LRP-0), not by the conv rule (α2β1 would double it: no negative part)
            return NotImplemented
        path, module_type = (owner[0], type(owner[1])) if owner else (None, kind[0])
        name = path if path is not None else f"functional {getattr(func, '__name__', func)}"
        direct = self.direct_of(x)
        rule = self.composite.rule_for(path, module_type, direct is not None)
        if direct is not None:
            self.first_seen = True
        if rule is None or isinstance(rule, Pass):
            raise ValueError(
                f"LRP has no rule for module {name!r} ({module_type.__name__}) in the "
                f"{self.composite.describe()}: add its type or its path to the composite "
                "(salience.methods.rules.Composite)"
                + (" (Pass is for activations, not layers)" if rule is not None else "")
            )
        rest = tuple(args[3:])
        options = {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}

        def fn(t: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            return func(t, w, b, *rest, **options)

        record = _Layer(
            fn,
            x,
            weight.detach(),
            bias.detach() if isinstance(bias, Tensor) else None,
            rule,
            name,
            kind[1],
            direct,
            conv=_conv_params(func, kind[1], weight.ndim - 2, args, kwargs),
            linear=func is F.linear,
        )
        self.counts[rule.name] += 1
        out = func(*args, **kwargs)
        if not (isinstance(rule, Zero) or (isinstance(rule, Epsilon) and rule.epsilon == 0)):
            # The rule is put on the output when something reads it (wrap): a BatchNorm that
            # reads it first is folded with the layer instead, and the rule goes after it.
            self._pending[id(out)] = (weakref.ref(out), record)
        self.remember(out, record)
        return out

    def wrap(self, t: Tensor, layer: _Layer) -> None:
        """Put ``layer``'s rule on its output ``t``, in place (``t`` keeps its identity)."""
        del self._pending[id(t)]
        layer.read = True
        if isinstance(layer.rule, Epsilon):
            _Scale.apply(t, layer)
        else:
            _Deferred.apply(layer.x, t, layer, self, None)

    def flush(self, tensors: list[Tensor] | None = None, *, everything: bool = False) -> None:
        """Wrap the pending layer outputs among ``tensors`` (or all of them)."""
        if everything:
            found = [entry[0]() for entry in list(self._pending.values())]
        else:
            found = tensors or []
        for t in found:
            if t is None:
                continue
            layer = self._find(self._pending, t)
            if layer is not None:
                self.wrap(t, layer)

    def batch_norm(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return batch_norm(self, func, args, kwargs)

    def norm(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return linearized_norm(func, args, kwargs, self.counts)

    def activation(
        self, parse: Any, args: tuple[Any, ...], kwargs: dict[str, Any], clip: Any = None
    ) -> Any:
        """Apply the Pass rule at an activation.

        ``parse``: the rectifier tables' parser of the call, if they list it; ``clip``: the
        parser of a clamp that is no rectifier (``clamp(min=-0.5)``, ``clamp_max``).
        """
        try:
            site = parse(args, kwargs) if parse is not None else None
            if site is None and clip is not None:
                site = clip(args, kwargs)
        except (TypeError, ValueError, IndexError, KeyError, RuntimeError):
            return NotImplemented
        if site is None or not _grad_tensor(site.x):
            return NotImplemented
        self.counts["Pass"] += 1
        if site.fn is None and site.upper is None:
            return NotImplemented  # ReLU: its gradient is the Pass rule
        out = _Pass.apply(site.x, site.fn, site.upper, site.inplace)
        if site.name in ("Sigmoid", "Hardsigmoid"):
            self.tag_gate(out)
        return out

    def rectifier(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        r"""Apply a layer's rule and the Pass rule of the rectifier reading its output together.

        For ε, the ratio :math:`|z| / (|z| + ε)` times the Pass rule's
        :math:`\mathrm{clamp}(z, 0, t) / z` is :math:`\mathrm{clamp}(z, 0, t) / (|z| + ε)`
        (:class:`_EpsilonPass`); the other rules take the relevance
        :math:`\mathrm{clamp}(z, 0, t) \cdot c` of ``z`` (:class:`_Deferred`). One step instead
        of two, and no copy of ``z``. ``NotImplemented`` when the input is no pending layer
        output.
        """
        try:
            site = SITES[func](args, kwargs)
        except (TypeError, ValueError, IndexError, KeyError, RuntimeError):
            return NotImplemented
        if site is None or site.fn is not None or not _grad_tensor(site.x):
            return NotImplemented
        layer = self._find(self._pending, site.x)
        if layer is None:
            return NotImplemented
        del self._pending[id(site.x)]
        layer.read = True
        self.counts["Pass"] += 1
        if isinstance(layer.rule, Epsilon):
            return _EpsilonPass.apply(site.x, layer.rule.epsilon, site.upper, site.inplace)
        return _Deferred.apply(layer.x, site.x, layer, self, None, (site.upper, site.inplace))

    def pad(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = _arg(args, kwargs, 0, "input", None)
        if not isinstance(x, Tensor):
            return NotImplemented
        direct = self.direct_of(x)
        if direct is None:
            return NotImplemented
        pad = tuple(int(p) for p in _arg(args, kwargs, 1, "pad", ()))
        mode = _arg(args, kwargs, 2, "mode", "constant")
        value = _arg(args, kwargs, 3, "value", None)
        out = func(*args, **kwargs)
        if mode == "constant" and value in (None, 0, 0.0) and all(p >= 0 for p in pad):
            self._direct[id(out)] = (weakref.ref(out), direct.then("pad", pad))
        return out

    def reshape(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Follow the model input through ``flatten``/``view``/``reshape``."""
        x = _arg(args, kwargs, 0, "input", None)
        if not isinstance(x, Tensor):
            return NotImplemented
        direct = self.direct_of(x)
        if direct is None:
            return NotImplemented
        out = func(*args, **kwargs)
        if isinstance(out, Tensor) and out.numel() == x.numel():
            step = direct.then("reshape", tuple(x.shape), tuple(out.shape))
            self._direct[id(out)] = (weakref.ref(out), step)
        return out

    def product(self, func: Any, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        a = _arg(args, kwargs, 0, "input", None)
        b = _arg(args, kwargs, 1, "other", None)
        if not (_grad_tensor(a) and _grad_tensor(b)):
            return NotImplemented
        owners = [o for o in (self.owner(a), self.owner(b)) if o is not None]
        if owners:
            if kind == "mul":
                return NotImplemented  # a scale by a parameter: linear
            path, module = owners[0]
            raise ValueError(
                f"module {path!r} ({type(module).__name__}) multiplies its parameter with an "
                f"input-dependent tensor through {getattr(func, '__name__', func)}, which has no "
                f"LRP rule in the {self.composite.describe()}: write the layer as nn.Linear / "
                "F.linear so that a rule applies"
            )
        ga, gb = self.is_gate(a), self.is_gate(b)
        if kind == "mul" and ga == gb:
            ga, gb = a.numel() < b.numel(), b.numel() < a.numel()
        if ga != gb:
            self.counts["gate (constant)"] += 1
            rest = tuple(args[2:])
            options = {k: v for k, v in kwargs.items() if k not in ("input", "other")}
            a2, b2 = (a.detach(), b) if ga else (a, b.detach())
            return func(a2, b2, *rest, **options)
        what = "the product of two input-dependent tensors" + (
            " (a matrix product)" if kind == "matmul" else ""
        )
        return _NoRule.apply(func(*args, **kwargs), self.no_rule(what))

    def softmax(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = _arg(args, kwargs, 0, "input", None)
        if not _grad_tensor(x):
            return NotImplemented
        out = _NoRule.apply(
            func(*args, **kwargs),
            self.no_rule("a softmax whose output is not a factor of a product (attention)"),
        )
        self.tag_gate(out)
        return out

    def nonlinear(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        a = _arg(args, kwargs, 0, "input", None)
        b = _arg(args, kwargs, 1, "other", _arg(args, kwargs, 1, "exponent", None))
        name = getattr(func, "__name__", str(func))
        if func in _DIVISIONS:
            divisor = a if func in _DIVIDING_BY_SELF else b
            if not _grad_tensor(divisor) or self.owner(divisor) is not None:
                return NotImplemented  # division by a constant: linear
            what = "a division by an input-dependent tensor"
        elif func in _POWERS:
            base, exponent = (b, a) if func is Tensor.__rpow__ else (a, b)
            if not _grad_tensor(exponent) and (
                not _grad_tensor(base) or (not isinstance(exponent, Tensor) and exponent == 1)
            ):
                return NotImplemented  # (pow(2.0, t): the exponent depends on the input)
            what = "a power"
        else:
            tensors = _tensors(args) + _tensors(kwargs) if kwargs else _tensors(args)
            if not any(map(_grad_tensor, tensors)):  # (atan2(c, x): the second)
                return NotImplemented
            what = f"the nonlinear function {name}"
        return _NoRule.apply(func(*args, **kwargs), self.no_rule(what), func in _IN_PLACE)

    def opaque(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        tensors = _tensors(args) + _tensors(kwargs)
        if not any(_grad_tensor(t) for t in tensors):
            return NotImplemented
        owners = [self.owner(t) for t in tensors if self.owner(t) is not None]
        name = getattr(func, "__name__", str(func))
        if owners:
            path, module = owners[0]  # type: ignore[misc]
            raise ValueError(
                f"LRP has no rule for module {path!r} ({type(module).__name__}), which computes "
                f"{name}, in the {self.composite.describe()}: write it with nn.Linear layers "
                "(and a softmax attention, treated as constant), or use another method"
            )
        return _NoRule.apply(func(*args, **kwargs), self.no_rule(f"the operation {name}"))


AMPLIFIED = 100.0
"""Relevance that differs from the score by more than this many times ``max(|score|, 0.01)``
is reported: the rules amplified it (see :func:`_warn_amplified`)."""


def _warn_amplified(relevance: Tensor, scores: Tensor) -> None:
    """Warn for samples whose relevance is far from their score: amplified, not conserved.

    Biases, ε and BatchNorm shifts absorb some relevance (a few times the score on random
    networks). Far more means it was amplified: where branches summed before a rectifier cancel,
    each carries far more relevance than their sum; z⁺, αβ and γ then divide it by a layer's
    positive part, small where the layer's output is negative, and the shifts below absorb
    it unevenly. Such a map shows the amplification (and float rounding) more than evidence.
    """
    off = (relevance - scores).abs() > AMPLIFIED * scores.abs().clamp(min=0.01)
    far = off.nonzero().flatten().tolist()
    if not far:
        return
    sums = ", ".join(f"{relevance[i].item():.3g}" for i in far[:5])
    of = ", ".join(f"{scores[i].item():.3g}" for i in far[:5])
    warn(
        f"lrp: the relevance of sample(s) {far[:10]} sums to {sums} for a score of {of}: "
        "amplified, not conserved, and the map shows that more than evidence. It happens where "
        "branches summed before a rectifier cancel (z⁺, αβ and γ divide each branch's share by "
        "its small positive part; shifts absorb it unevenly): fuse the branches of multi-branch "
        "blocks first (RepVGG, MobileOne, FastViT in training form: "
        "timm.utils.reparameterize_model), or compare composite='epsilon_gamma_box'; "
        "extras['conservation'] has the numbers"
    )


def _pools(
    func: Any, x: Tensor, weight: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> bool:
    """Whether a convolution with a buffer as weight is a pooling: depthwise, non-negative."""
    if func is F.linear or weight.ndim < 3 or weight.shape[1] != 1:
        return False
    groups = _arg(args, kwargs, 6, "groups", 1)
    return groups == x.shape[1] and bool((weight >= 0).all())


def _parameters(modules: list[tuple[str, nn.Module]]) -> dict[int, tuple[str, nn.Module]]:
    return {
        id(p): (name, module)
        for name, module in modules
        for p in module._parameters.values()
        if p is not None
    }


@register("lrp")
def lrp(
    model: nn.Module,
    inputs: Tensor,
    target: TargetLike = None,
    *,
    composite: str | Composite = "epsilon_plus",
    epsilon: float | None = None,
    gamma: float | None = None,
    low: float | Tensor | None = None,
    high: float | Tensor | None = None,
    score: Score = "logit",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
) -> Attribution:
    r"""Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019).

    The score :math:`S_c(x)` is redistributed layer by layer onto the input,
    :math:`\sum_i R_i \approx S_c(x)`, each layer following its rule in ``composite``
    (:mod:`salience.methods.rules`). One forward and one backward pass, in gradient form
    (:mod:`salience.methods.lrp`): :math:`R = x \odot c`.

    Args:
        model: A PyTorch model written in Python (not TorchScript).
        inputs: ``(N, C, H, W)`` preprocessed images.
        target: What to explain; see :mod:`salience.targets`.
        composite: A preset name (``"epsilon_plus"``: z⁺ on convolutions, ε on linear layers;
            ``"epsilon"``, ``"epsilon_gamma_box"`` (z^B input layer, γ on convolutions),
            ``"epsilon_plus_flat"`` (flat input layer), ``"epsilon_alpha2_beta1"``,
            ``"zero"`` (LRP-0)) or a :class:`~salience.methods.rules.Composite`.
        epsilon: ε of the composite's :class:`~salience.methods.rules.Epsilon` rules (default
            1e-6).
        gamma: γ of its :class:`~salience.methods.rules.Gamma` rules (default 0.25).
        low: Lower input bound of its z^B rule: a number or a tensor broadcastable to the
            input (e.g. ``(3, 1, 1)``); default each sample's minimum value. For
            ImageNet-normalized images pass ``(0 - mean) / std``.
        high: Upper bound, likewise; default each sample's maximum.
        score: The initial relevance: ``"logit"`` (default), ``"probability"`` or
            ``"log_probability"`` of the class, placed on the target logit.
        forward_args: Extra arguments for the model (see :func:`salience.gradient`).
        allow_tf32: Let CUDA use TF32 (faster, less exact); off by default.

    Returns:
        An :class:`Attribution` (channel reduction ``"sum"``) with ``extras``:
        ``"rules"`` (how many layer calls each rule, and the Pass rule, handled),
        ``"composite"`` (its name), ``"canonized"`` (convolution/linear + BatchNorm pairs
        folded), ``"relevance"`` (:math:`\sum_i R_i` per sample) and ``"conservation"``
        (``relevance - score`` per sample: 0 where every rule conserves; biases, ε and the
        BatchNorm shifts absorb relevance). A sample whose relevance is more than
        100 × max(|score|, 0.01) off its score is warned about: the rules amplified it (see
        :func:`_warn_amplified`).

    Raises:
        ValueError: a layer with no rule in the composite, a parameter used in a way no rule
            covers (the message names the module and its path), an operation without a rule
            that the relevance reaches, an option that no rule of the composite takes.
        TypeError: a TorchScript model; a bad ``composite``.
        RuntimeError: a model that checkpoints part of its forward pass
            (``torch.utils.checkpoint``), which the backward pass recomputes outside the rules.

    References:
        Bach, Binder, Montavon, Klauschen, Müller, Samek. On Pixel-Wise Explanations for
        Non-Linear Classifier Decisions by Layer-Wise Relevance Propagation. PLoS ONE 2015.
        Montavon, Binder, Lapuschkin, Samek, Müller. Layer-Wise Relevance Propagation: An
        Overview. In Explainable AI, LNCS 11700, 2019.
        Achtibat et al. AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for
        Transformers. ICML 2024. Ali et al. XAI for Transformers: Better Explanations through
        Conservative Propagation. ICML 2022.
    """
    resolved_composite = resolve_composite(
        composite, epsilon=epsilon, gamma=gamma, low=low, high=high
    )
    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as fwd:
        modules = list(model.named_modules()) if isinstance(model, nn.Module) else []
        filters = frozenset(id(b) for _, m in modules for b in m._buffers.values() if b is not None)
        state = _State(resolved_composite, inputs, _parameters(modules), filters)
        # The modules with parameters: check_modules needs to know which ran (and where()
        # names the last one in messages).
        hooked = [(n, m) for n, m in modules if any(p is not None for p in m._parameters.values())]
        leaf = inputs.detach().requires_grad_(True)
        with torch.enable_grad():
            state.model_input = leaf.clone()  # the model may change its input in place
            with call_rule(model, state, method="lrp"), forward_hooks(hooked, state.module_done):
                output = fwd(state.model_input)
            state.flush(everything=True)  # layer outputs that nothing read (the model output)
            state.check_modules(modules)
            if resolved_composite.first is not None and not state.first_seen:
                raise ValueError(
                    f"the {resolved_composite.describe()} has a first-layer rule, but no linear "
                    "layer or convolution reads the model input (or a zero padding or reshape "
                    "of it): the model transforms its input first (a normalization inside "
                    "forward?). Pass a composite without a first-layer rule, or map the first "
                    "layer by its path"
                )
            resolved = resolve_target(target, output, inputs.shape[0], score=score)
            scores = resolved.scores(output)
            start = scores
            if resolved.fn is None and score != "logit":
                logits = dataclasses.replace(resolved, score="logit").scores(output)
                start = logits * _safe(scores, logits).detach()
            if not start.requires_grad:
                raise not_differentiable()
            (grad,) = torch.autograd.grad(start.sum(), leaf, allow_unused=True)
            if grad is None and state.collected is None:  # other leaves (weights) only
                raise not_differentiable()
        values = inputs.detach() * grad if grad is not None else torch.zeros_like(inputs)
        if state.collected is not None:
            values = values + state.collected.to(values.dtype)
        values = values.detach()
    relevance = values.flatten(1).sum(1)
    _warn_amplified(relevance, scores.detach().reshape(relevance.shape))
    extras = {
        "composite": resolved_composite.name,
        "rules": dict(state.counts),
        "canonized": state.canonized,
        "relevance": relevance,
        "conservation": relevance - scores.detach().reshape(relevance.shape),
    }
    return _result("lrp", values, output, scores.detach(), resolved, "sum", extras)
