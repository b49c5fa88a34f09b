r"""LRP rules as small immutable specs, and composites that say which rule goes where.

A rule says how a layer ``z = W x + b`` (a linear layer or a convolution) redistributes the
relevance ``R_j`` of its outputs onto its inputs (Montavon et al. 2019, Table 1). With
:math:`z_{ij} = x_i w_{ij}`, :math:`(\cdot)^+ = \max(\cdot, 0)`, :math:`(\cdot)^- =
\min(\cdot, 0)`:

- :class:`Zero` (LRP-0): :math:`R_i = \sum_j z_{ij} / z_j \, R_j`;
- :class:`Epsilon`: :math:`R_i = \sum_j z_{ij} / (z_j + \epsilon\,\mathrm{sign}(z_j)) \, R_j`;
- :class:`Gamma`: weights :math:`w + \gamma w^+` (and bias :math:`b + \gamma b^+`) for the
  outputs with :math:`z_j \ge 0`; sign-aware for negative inputs and outputs (see the class);
- :class:`AlphaBeta`: :math:`R_i = \sum_j (\alpha\, z^+_{ij} / \sum_i z^+_{ij} -
  \beta\, z^-_{ij} / \sum_i z^-_{ij}) R_j`, with :math:`\alpha - \beta = 1`; positive and
  negative parts of the contributions :math:`x_i w_{ij}` (so :math:`x^+ w^+ + x^- w^-` is
  positive); :class:`ZPlus` is :math:`\alpha = 1, \beta = 0`;
- input-layer rules, whose relevance does not vanish where :math:`x_i = 0`: :class:`WSquare`
  (:math:`w_{ij}^2`), :class:`Flat` (all weights 1) and :class:`ZBox`
  (:math:`x_i w_{ij} - l_i w^+_{ij} - h_i w^-_{ij}` for inputs bounded in ``[low, high]``);
- :class:`Pass`: the relevance passes unchanged (:math:`R_{in} = R_{out}`), for elementwise
  activations.

Bias terms take relevance under LRP-0, ε and γ (the rules of the papers); z⁺, αβ, w², flat and
z^B leave the bias out of the redistribution and conserve relevance exactly.

A :class:`Composite` maps module types or module names to rules, with an optional rule for the
input layers (the layers that read the model input itself, or a zero padding of it). The
registered presets (:data:`COMPOSITES`): ``"epsilon"``, ``"epsilon_plus"``,
``"epsilon_gamma_box"``, ``"epsilon_plus_flat"``, ``"epsilon_alpha2_beta1"`` and ``"zero"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

__all__ = [
    "COMPOSITES",
    "AlphaBeta",
    "Composite",
    "Epsilon",
    "Flat",
    "Gamma",
    "Pass",
    "Rule",
    "WSquare",
    "ZBox",
    "ZPlus",
    "Zero",
    "register_composite",
    "resolve_composite",
]


@dataclass(frozen=True)
class Rule:
    """Base of the rule specs: immutable, compared and hashed by value."""

    input_layer = False
    """Whether the rule gives relevance to inputs that are zero (w², flat, z^B): an input-layer
    rule, whose relevance salience collects at the layer rather than as ``R / x``."""

    @property
    def name(self) -> str:
        """The rule's name as ``extras["rules"]`` counts it."""
        return type(self).__name__


@dataclass(frozen=True)
class Zero(Rule):
    r"""LRP-0 (Bach et al. 2015): :math:`R_i = \sum_j x_i w_{ij} / z_j \, R_j`.

    In gradient form this is the ordinary gradient: on a ReLU network LRP-0 equals
    gradient × input.
    """


@dataclass(frozen=True)
class Epsilon(Rule):
    r"""LRP-ε: :math:`R_i = \sum_j x_i w_{ij} / (z_j + \epsilon\,\mathrm{sign}(z_j)) \, R_j`.

    ``sign(0)`` is taken as ``+1``. Small ``epsilon`` is LRP-0; larger values absorb the
    relevance of weak, contradictory outputs (Montavon et al. 2019 use ~0.25 · std).
    """

    epsilon: float = 1e-6

    def __post_init__(self) -> None:
        _check_number("epsilon", self.epsilon, minimum=0.0)


@dataclass(frozen=True)
class Gamma(Rule):
    r"""LRP-γ: favour positive contributions, weights :math:`w + \gamma w^+`.

    For outputs :math:`z_j \ge 0` the contributions are
    :math:`x^+_i (w_{ij} + \gamma w^+_{ij}) + x^-_i (w_{ij} + \gamma w^-_{ij})` and the bias
    :math:`b_j + \gamma b^+_j`; for :math:`z_j < 0`,
    :math:`x^+_i (w_{ij} + \gamma w^-_{ij}) + x^-_i (w_{ij} + \gamma w^+_{ij})` and
    :math:`b_j + \gamma b^-_j` (the sign-aware form of Zennit; for non-negative inputs and
    outputs it is Montavon et al.'s rule). ``gamma=0`` is LRP-0, ``gamma → ∞`` z⁺.
    """

    gamma: float = 0.25

    def __post_init__(self) -> None:
        _check_number("gamma", self.gamma, minimum=0.0)


@dataclass(frozen=True)
class AlphaBeta(Rule):
    r"""LRP-αβ (Bach et al. 2015) with :math:`\alpha - \beta = 1` (α1β0, α2β1, ...).

    :math:`R_i = \sum_j (\alpha\, z^+_{ij} / \sum_i z^+_{ij} - \beta\, z^-_{ij} /
    \sum_i z^-_{ij}) R_j`, with :math:`z^+_{ij} = x^+_i w^+_{ij} + x^-_i w^-_{ij}` and
    :math:`z^-_{ij} = x^+_i w^-_{ij} + x^-_i w^+_{ij}`; the bias is left out, so the rule
    conserves.
    """

    alpha: float = 1.0
    beta: float = 0.0

    def __post_init__(self) -> None:
        _check_number("alpha", self.alpha, minimum=0.0)
        _check_number("beta", self.beta, minimum=0.0)
        if abs(self.alpha - self.beta - 1.0) > 1e-9:
            raise ValueError(
                f"AlphaBeta needs alpha - beta = 1 to conserve relevance, got alpha="
                f"{self.alpha}, beta={self.beta}"
            )

    @property
    def name(self) -> str:
        """``"AlphaBeta(2,1)"`` and the like."""
        return f"AlphaBeta({self.alpha:g},{self.beta:g})"


@dataclass(frozen=True)
class ZPlus(Rule):
    r"""LRP-z⁺: :math:`R_i = \sum_j z^+_{ij} / \sum_i z^+_{ij} \, R_j` (α1β0, bias left out)."""


@dataclass(frozen=True)
class WSquare(Rule):
    r"""LRP-w² (Montavon et al. 2017), an input-layer rule, whatever the input values.

    :math:`R_i = \sum_j w_{ij}^2 / \sum_i w_{ij}^2 \, R_j`.
    """

    input_layer = True


@dataclass(frozen=True)
class Flat(Rule):
    """The flat rule (Lapuschkin et al. 2019), an input-layer rule: w² with every weight 1.

    The relevance spreads uniformly over each output's receptive field.
    """

    input_layer = True


@dataclass(frozen=True, eq=False)
class ZBox(Rule):
    r"""LRP-z^B (Montavon et al. 2017), an input-layer rule for inputs in ``[low, high]``.

    :math:`R_i = \sum_j (x_i w_{ij} - l_i w^+_{ij} - h_i w^-_{ij}) / \sum_i (\cdot) \, R_j`.
    ``low``/``high`` are numbers, tensors broadcastable to the input, or ``None``: each
    sample's minimum and maximum value. For ImageNet-normalized images pass the normalized
    bounds of the pixel range, e.g. ``low=(0 - mean) / std`` as a ``(3, 1, 1)`` tensor.
    """

    low: float | Tensor | None = None
    high: float | Tensor | None = None
    input_layer = True

    def __post_init__(self) -> None:
        for bound in ("low", "high"):
            value = getattr(self, bound)
            if value is not None and not isinstance(value, int | float | Tensor):
                raise TypeError(
                    f"ZBox {bound} must be a number, a tensor or None, got {type(value).__name__}"
                )


@dataclass(frozen=True)
class Pass(Rule):
    """Relevance passes unchanged, :math:`R_{in} = R_{out}`: elementwise activations.

    In gradient form the backward is :math:`c_{in} = c_{out} f(x) / x` (ReLU: its ordinary
    gradient; at :math:`x = 0` the derivative :math:`f'(0)`).
    """


def _check_number(name: str, value: Any, *, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= minimum:
        raise ValueError(f"{name} must be a number >= {minimum:g}, got {value!r}")


LayerKey: TypeAlias = "type[nn.Module] | str"
"""A module type (matched with ``isinstance``) or a module path as ``model.named_modules()``
names it (matched exactly)."""

CONV: type[nn.Module] = _ConvNd
"""The key matching every convolution (``Conv1d/2d/3d`` and their transposes)."""


@dataclass(frozen=True)
class Composite:
    """Which rule each linear layer and convolution of a model gets.

    A rule is looked up, for a layer that reads the model input (or a zero padding of it),
    first in ``first``; then by the module's path in ``layers``; then by type, in the order of
    ``layers``. A functional ``F.conv2d``/``F.linear`` whose weight is no module parameter is
    looked up by type as ``nn.Conv2d``/``nn.Linear`` would be, unless it is a fixed filter (a
    depthwise convolution whose weight is a non-negative module buffer: blur pooling), which
    relevance passes as an average pool (LRP-0).

    Args:
        layers: ``(key, rule)`` pairs; a key is a module type or a module path. A mapping is
            accepted and kept in its order.
        first: The rule of the input layers, or ``None`` for their type's rule.
        name: How results record the composite.

    Example:
        >>> from torch import nn
        >>> Composite({nn.Linear: Epsilon(0.25), CONV: Gamma(0.25)}, first=Flat(), name="mine")
        ... # doctest: +ELLIPSIS
        Composite(...)
    """

    layers: tuple[tuple[LayerKey, Rule], ...] | Mapping[LayerKey, Rule]
    first: Rule | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        pairs = tuple(self.layers.items()) if isinstance(self.layers, Mapping) else self.layers
        for pair in pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise TypeError(f"Composite layers are (key, rule) pairs, got {pair!r}")
            key, rule = pair
            if not (isinstance(key, str) or (isinstance(key, type) and issubclass(key, nn.Module))):
                raise TypeError(f"a Composite key is a module type or a module path, got {key!r}")
            if not isinstance(rule, Rule):
                raise TypeError(f"the rule for {key!r} must be a Rule spec, got {rule!r}")
        if self.first is not None and not isinstance(self.first, Rule):
            raise TypeError(f"first must be a Rule spec or None, got {self.first!r}")
        object.__setattr__(self, "layers", pairs)

    def rule_for(self, path: str | None, module: type[nn.Module], first: bool) -> Rule | None:
        """Return the rule of a layer (input layer, path, then type), or ``None``."""
        if first and self.first is not None:
            return self.first
        pairs: tuple[tuple[LayerKey, Rule], ...] = self.layers  # type: ignore[assignment]
        if path is not None:
            for key, rule in pairs:
                if key == path:
                    return rule
        for key, rule in pairs:
            if isinstance(key, type) and issubclass(module, key):
                return rule
        return None

    def rules(self) -> list[Rule]:
        """Every rule of the composite."""
        pairs: tuple[tuple[LayerKey, Rule], ...] = self.layers  # type: ignore[assignment]
        return [rule for _, rule in pairs] + ([self.first] if self.first is not None else [])

    def describe(self) -> str:
        """Describe the composite in one line, for error messages."""
        pairs: tuple[tuple[LayerKey, Rule], ...] = self.layers  # type: ignore[assignment]
        parts = [f"{key if isinstance(key, str) else key.__name__}: {rule}" for key, rule in pairs]
        if self.first is not None:
            parts.insert(0, f"first layer: {self.first}")
        return f"composite {self.name!r} ({'; '.join(parts)})"

    def with_options(self, **options: Any) -> Composite:
        """Return a copy whose rules take the given parameters where they have that field.

        Raises:
            ValueError: an option (not ``None``) that no rule of the composite has.
        """
        used: set[str] = set()

        def update(rule: Rule) -> Rule:
            fields = {f.name for f in dataclasses.fields(rule)}
            change = {k: v for k, v in options.items() if v is not None and k in fields}
            used.update(change)
            return dataclasses.replace(rule, **change) if change else rule

        pairs: tuple[tuple[LayerKey, Rule], ...] = self.layers  # type: ignore[assignment]
        layers = tuple((key, update(rule)) for key, rule in pairs)
        first = update(self.first) if self.first is not None else None
        unused = [k for k, v in options.items() if v is not None and k not in used]
        if unused:
            raise ValueError(
                f"option(s) {unused} apply to no rule of the {self.describe()}; pick a "
                "composite with such a rule (e.g. gamma= needs 'epsilon_gamma_box', low=/high= "
                "a z^B first layer)"
            )
        return Composite(layers, first, self.name)


COMPOSITES: dict[str, Callable[[], Composite]] = {}
"""The registered composite presets, by name."""


def register_composite(name: str) -> Callable[[Callable[[], Composite]], Callable[[], Composite]]:
    """Register a zero-argument factory of a :class:`Composite` under ``name``."""

    def decorate(factory: Callable[[], Composite]) -> Callable[[], Composite]:
        if name in COMPOSITES:
            raise ValueError(f"a composite named {name!r} is already registered")
        COMPOSITES[name] = factory
        return factory

    return decorate


@register_composite("zero")
def _zero() -> Composite:
    return Composite({CONV: Zero(), nn.Linear: Zero()}, name="zero")


@register_composite("epsilon")
def _epsilon() -> Composite:
    return Composite({CONV: Epsilon(), nn.Linear: Epsilon()}, name="epsilon")


@register_composite("epsilon_plus")
def _epsilon_plus() -> Composite:
    return Composite({CONV: ZPlus(), nn.Linear: Epsilon()}, name="epsilon_plus")


@register_composite("epsilon_gamma_box")
def _epsilon_gamma_box() -> Composite:
    return Composite({CONV: Gamma(), nn.Linear: Epsilon()}, first=ZBox(), name="epsilon_gamma_box")


@register_composite("epsilon_plus_flat")
def _epsilon_plus_flat() -> Composite:
    return Composite({CONV: ZPlus(), nn.Linear: Epsilon()}, first=Flat(), name="epsilon_plus_flat")


@register_composite("epsilon_alpha2_beta1")
def _epsilon_alpha2_beta1() -> Composite:
    return Composite({CONV: AlphaBeta(2.0, 1.0), nn.Linear: Epsilon()}, name="epsilon_alpha2_beta1")


def resolve_composite(composite: str | Composite, **options: Any) -> Composite:
    """Return the composite a ``composite=`` argument names, with rule options applied.

    Raises:
        ValueError: an unknown preset name, or an option no rule takes.
        TypeError: neither a name nor a :class:`Composite`.
    """
    if isinstance(composite, str):
        if composite not in COMPOSITES:
            raise ValueError(
                f"unknown LRP composite {composite!r}; known: {', '.join(COMPOSITES)} (or "
                "pass a salience.methods.rules.Composite)"
            )
        resolved = COMPOSITES[composite]()
    elif isinstance(composite, Composite):
        resolved = composite
    else:
        raise TypeError(
            f"composite must be a preset name or a Composite, got {type(composite).__name__}"
        )
    return resolved.with_options(**options)
