"""DeconvNet and guided backprop at every spelling of a rectifier, and on models without one.

Each rule is checked against an independent reference: the same network rebuilt with an
explicit custom autograd function at each rectifier (or activation), whose backward is written
from the papers' formulas with masks, not with PyTorch's backward kernels or salience's code.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import salience
from salience import hooks
from salience.hooks import rectifier_rule
from salience.rectifiers import ACTIVATIONS, resolve_activations

RULES = ("guided", "deconvnet")
METHODS = {"guided": salience.guided_backprop, "deconvnet": salience.deconvnet}


# -- independent references ------------------------------------------------------------------


class RefRectifier(torch.autograd.Function):
    """``min(max(x, 0), upper)``; backward by the papers' formulas, written with masks."""

    @staticmethod
    def forward(ctx, x: Tensor, upper: float | None, rule: str) -> Tensor:
        ctx.save_for_backward(x)
        ctx.upper, ctx.rule = upper, rule
        y = torch.where(x > 0, x, torch.zeros_like(x))
        return y if upper is None else torch.where(y < upper, y, torch.full_like(y, upper))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        positive = torch.where(grad > 0, grad, torch.zeros_like(grad))  # DeconvNet: relu(s)
        if ctx.rule == "deconvnet":
            return positive, None, None
        passes = x > 0
        if ctx.upper is not None:
            passes = passes & (x < ctx.upper)
        return torch.where(passes, positive, torch.zeros_like(positive)), None, None


def _gelu_derivative(x: Tensor) -> Tensor:
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return cdf + x * pdf


def _silu_derivative(x: Tensor) -> Tensor:
    s = 1 / (1 + torch.exp(-x))
    return s * (1 + x * (1 - s))


def _hardswish_derivative(x: Tensor) -> Tensor:
    middle = x / 3 + 0.5
    return torch.where(x < -3, torch.zeros_like(x), torch.where(x > 3, torch.ones_like(x), middle))


DERIVATIVES: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "gelu": (F.gelu, _gelu_derivative),
    "silu": (F.silu, _silu_derivative),
    "hardswish": (F.hardswish, _hardswish_derivative),
}


class RefActivation(torch.autograd.Function):
    """``f(x)``; backward ``f'(x) * relu(s)`` (guided) or ``relu(s)`` (DeconvNet), by hand."""

    @staticmethod
    def forward(ctx, x: Tensor, name: str, rule: str) -> Tensor:
        ctx.save_for_backward(x)
        ctx.name, ctx.rule = name, rule
        return DERIVATIVES[name][0](x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        positive = torch.where(grad > 0, grad, torch.zeros_like(grad))
        if ctx.rule == "deconvnet":
            return positive, None, None
        return DERIVATIVES[ctx.name][1](x) * positive, None, None


def reference_gradient(forward: Callable[[Tensor], Tensor], x: Tensor, target: Tensor) -> Tensor:
    leaf = x.detach().clone().requires_grad_(True)
    picked = forward(leaf).gather(1, target.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(picked, leaf)
    return grad


def assert_matches(actual: Tensor, expected: Tensor) -> None:
    scale = float(expected.abs().max())
    assert scale > 0, "a map of zeros compares equal to anything scaled by it"
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * scale)


# -- a small network with one activation spelling at each site ------------------------------


class Net(nn.Module):
    """``conv -> act_0 -> conv -> act_1 -> ... -> linear``, with one callable per site."""

    def __init__(self, acts: list[Callable[[Tensor], Tensor]], channels: int = 4) -> None:
        super().__init__()
        self.acts = acts
        self.convs = nn.ModuleList(
            nn.Conv2d(3 if i == 0 else channels, channels, 3, padding=1) for i in range(len(acts))
        )
        self.fc = nn.Linear(channels * 6 * 6, 5)
        self.register_buffer("zero", torch.zeros(()))
        self.register_buffer("zeros", torch.zeros(1, channels, 1, 1))
        torch.manual_seed(0)
        for conv in self.convs:
            nn.init.normal_(conv.weight, std=0.3)
            nn.init.uniform_(conv.bias, -0.2, 0.2)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x, self.acts)

    def run(self, x: Tensor, acts: list[Callable[[Tensor], Tensor]]) -> Tensor:
        for conv, act in zip(self.convs, acts, strict=True):
            x = act(conv(x))
        return self.fc(x.flatten(1))


X = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(4)) * 3
TARGET = torch.tensor([0, 2, 4])

# name -> (act(net, t), upper of the rectifier it computes)
SPELLINGS: dict[str, tuple[Callable[[Net, Tensor], Tensor], float | None]] = {
    "t.clamp(min=0)": (lambda n, t: t.clamp(min=0), None),
    "torch.clamp(t, 0, 6)": (lambda n, t: torch.clamp(t, 0, 6), 6.0),
    "torch.clamp(t, min=0.0, max=2.5)": (lambda n, t: torch.clamp(t, min=0.0, max=2.5), 2.5),
    "t.clamp_(0, 6)": (lambda n, t: t.clamp_(0, 6), 6.0),
    "torch.clamp_(t, min=0)": (lambda n, t: torch.clamp_(t, min=0), None),
    "t.clip(0, 4)": (lambda n, t: t.clip(0, 4), 4.0),
    "torch.clip(t, min=0)": (lambda n, t: torch.clip(t, min=0), None),
    "t.clip_(0)": (lambda n, t: t.clip_(0), None),
    "clamp with a zero tensor bound": (lambda n, t: torch.clamp(t, min=n.zero), None),
    "t.clamp_min(0)": (lambda n, t: t.clamp_min(0), None),
    "torch.clamp_min(t, 0.0)": (lambda n, t: torch.clamp_min(t, 0.0), None),
    "t.clamp_min_(0)": (lambda n, t: t.clamp_min_(0), None),
    "F.threshold(t, 0, 0)": (lambda n, t: F.threshold(t, 0, 0), None),
    "F.threshold(inplace=True)": (lambda n, t: F.threshold(t, 0.0, 0.0, inplace=True), None),
    "F.threshold_": (lambda n, t: F.threshold_(t, 0.0, 0.0), None),
    "torch.threshold": (lambda n, t: torch.threshold(t, 0.0, 0.0), None),
    "nn.Threshold(0, 0)": (lambda n, t: nn.Threshold(0, 0)(t), None),
    "torch.maximum(t, zero)": (lambda n, t: torch.maximum(t, n.zero), None),
    "torch.maximum(zero, t)": (lambda n, t: torch.maximum(n.zero, t), None),
    "t.maximum(zeros_like(t))": (lambda n, t: t.maximum(torch.zeros_like(t)), None),
    "maximum with broadcast zeros": (lambda n, t: torch.maximum(t, n.zeros), None),
    "torch.max(t, zero)": (lambda n, t: torch.max(t, n.zero), None),
    "t.max(zero)": (lambda n, t: t.max(n.zero), None),
    "torch.fmax(t, zero)": (lambda n, t: torch.fmax(t, n.zero), None),
    "F.leaky_relu(t, 0)": (lambda n, t: F.leaky_relu(t, 0), None),
    "nn.LeakyReLU(0.0)": (lambda n, t: nn.LeakyReLU(0.0)(t), None),
    "nn.LeakyReLU(0, inplace=True)": (lambda n, t: nn.LeakyReLU(0, inplace=True)(t), None),
    "F.leaky_relu_(t, 0.0)": (lambda n, t: F.leaky_relu_(t, 0.0), None),
    "F.hardtanh(t, 0, 3)": (lambda n, t: F.hardtanh(t, 0.0, 3.0), 3.0),
}


def _bind(net_acts: list[Callable[[Net, Tensor], Tensor]]) -> Net:
    holder: list[Net] = []
    net = Net([lambda t, a=a: a(holder[0], t) for a in net_acts])
    holder.append(net)
    return net


def _check_against_reference(net: Net, uppers: list[float | None], rule: str) -> None:
    acts = [lambda t, u=u: RefRectifier.apply(t, u, rule) for u in uppers]
    with torch.no_grad():  # the reference computes the same network
        torch.testing.assert_close(net.run(X, acts), net(X), rtol=0, atol=1e-6)
    expected = reference_gradient(lambda x: net.run(x, acts), X, TARGET)
    plain = salience.gradient(net, X, TARGET).values
    assert not torch.allclose(expected, plain, rtol=1e-3, atol=1e-5), "the rule changes nothing"
    result = METHODS[rule](net, X, TARGET)
    assert_matches(result.values, expected)
    assert result.extras["rectifiers"] == len(uppers)
    assert result.extras["activations_modified"] == {}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_every_spelling_matches_the_independent_reference(spelling: str, rule: str) -> None:
    act, upper = SPELLINGS[spelling]
    _check_against_reference(_bind([act, act]), [upper, upper], rule)


@pytest.mark.parametrize("rule", RULES)
def test_all_spellings_in_one_network(rule: str) -> None:
    spellings = list(SPELLINGS.values())
    _check_against_reference(_bind([a for a, _ in spellings]), [u for _, u in spellings], rule)


# name -> act(net, t): the same functions with bounds or arguments that make no rectifier
NOT_RECTIFIERS: dict[str, Callable[[Net, Tensor], Tensor]] = {
    "clamp(-1, 1)": lambda n, t: t.clamp(-1, 1),
    "clamp(min=0.5)": lambda n, t: t.clamp(min=0.5),
    "clamp(max=0)": lambda n, t: t.clamp(max=0),
    "clamp(min=0, max=0)": lambda n, t: t + t.clamp(0, 0),
    "clamp(min=0, max=per-channel tensor)": lambda n, t: t.clamp(
        min=n.zero, max=torch.arange(1.0, 5.0).view(1, 4, 1, 1)
    ),
    "clamp(min=per-channel tensor)": lambda n, t: torch.clamp(
        t, min=torch.tensor([0.0, 0.0, 1.0, 0.0]).view(1, 4, 1, 1)
    ),
    "clamp_min(-0.5)": lambda n, t: t.clamp_min(-0.5),
    "leaky_relu(0.1)": lambda n, t: F.leaky_relu(t, 0.1),
    "nn.LeakyReLU()": lambda n, t: nn.LeakyReLU()(t),
    "hardtanh(-1, 1)": lambda n, t: F.hardtanh(t),
    "threshold(0.1, 0)": lambda n, t: F.threshold(t, 0.1, 0.0),
    "threshold(0, 1)": lambda n, t: F.threshold(t, 0.0, 1.0),
    "maximum(t, 0.5)": lambda n, t: torch.maximum(t, n.zero + 0.5),
    "maximum(t, a zero that needs a gradient)": lambda n, t: torch.maximum(
        t, n.convs[0].bias.view(1, 4, 1, 1) * 0
    ),
    "torch.max(t, dim=1) reduction": lambda n, t: t + torch.max(t, dim=1, keepdim=True).values,
    "torch.max(t, 1) reduction": lambda n, t: t - t.max(1, keepdim=True)[0],
}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("spelling", list(NOT_RECTIFIERS))
def test_other_bounds_are_not_rectifiers(spelling: str, rule: str) -> None:
    """``spelling`` keeps its plain gradient; only the ReLU after it gets the rule."""
    act = NOT_RECTIFIERS[spelling]
    net = _bind([act, lambda n, t: F.relu(t)])
    relu = [lambda t: act(net, t), lambda t: RefRectifier.apply(t, None, rule)]
    expected = reference_gradient(lambda x: net.run(x, relu), X, TARGET)
    result = METHODS[rule](net, X, TARGET)
    assert result.extras["rectifiers"] == 1
    assert_matches(result.values, expected)


# -- models without a rectifier -------------------------------------------------------------


@pytest.mark.parametrize(
    ("act", "name"), [(nn.GELU(), "GELU"), (nn.SiLU(), "SiLU"), (nn.Hardswish(), "Hardswish")]
)
@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_a_model_without_rectifiers_is_an_error_naming_its_activations(
    act: nn.Module, name: str, method: str
) -> None:
    net = Net([act, act, act])  # one module called three times
    with pytest.raises(ValueError, match=rf"{name} × 3") as error:
        getattr(salience, method)(net, X, TARGET)
    message = str(error.value)
    assert message.startswith(f"{method} found no rectifier")
    assert "plain gradient" in message
    assert "activations='all'" in message
    assert "not the paper's method" in message


def test_the_error_counts_each_activation_and_ignores_softmax() -> None:
    class Mixed(Net):
        def forward(self, x: Tensor) -> Tensor:
            x = F.gelu(self.convs[0](x))
            x = torch.softmax(F.gelu(self.convs[1](x)), dim=1)
            x = torch.tanh(self.convs[2](x)) + x.sigmoid()
            return self.fc(F.hardtanh(x).flatten(1))

    with pytest.raises(ValueError, match="GELU × 2, ") as error:
        salience.guided_backprop(Mixed([F.gelu] * 3), X, TARGET)
    for part in ("Tanh × 1", "Sigmoid × 1", "Hardtanh × 1"):
        assert part in str(error.value)
    assert "oftmax" not in str(error.value)


def test_tanh_and_hardtanh_minus_one_one_are_no_rectifiers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Hardtanh(-1.0, 1.0), nn.Flatten(), nn.Linear(64, 3)
    ).eval()
    for method in (salience.guided_backprop, salience.deconvnet):
        with pytest.raises(ValueError, match="Tanh × 1, Hardtanh × 1"):
            method(model, X)


def test_a_model_without_any_activation_is_an_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(32, 3)).eval()
    with pytest.raises(ValueError, match="no other activation function"):
        salience.guided_backprop(model, X)


def test_rectifiers_on_tensors_without_gradient_do_not_count() -> None:
    """A clamp of a buffer, or a ReLU under no_grad, is no rectifier of the explained path."""

    class Gelu(Net):
        def forward(self, x: Tensor) -> Tensor:
            scale = self.zeros.clamp(min=0) + 1
            with torch.no_grad():
                F.relu(x)
            return self.run(x, self.acts) * scale.mean()

    with pytest.raises(ValueError, match="GELU × 1"):
        salience.deconvnet(Gelu([nn.GELU()]), X)


def test_guided_grad_cam_and_smoothgrad_raise_too() -> None:
    net = Net([nn.GELU(), nn.GELU()])
    with pytest.raises(ValueError, match="GELU × 2"):
        salience.guided_grad_cam(net, X, TARGET, layer="convs.1")
    with pytest.raises(ValueError, match=r"smoothgrad with base='deconvnet' .*GELU × 2"):
        salience.smoothgrad(net, X, TARGET, base="deconvnet", samples=2)
    assert salience.smoothgrad(net, X, TARGET, samples=2).values.shape == X.shape


# -- the extension to other activations -----------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", list(DERIVATIVES))
@pytest.mark.parametrize("option", ["all", "name"])
def test_activations_extension_matches_a_hand_built_reference(
    rule: str, name: str, option: str
) -> None:
    f = DERIVATIVES[name][0]
    net = Net([f, f])
    acts = [lambda t: RefActivation.apply(t, name, rule)] * 2
    expected = reference_gradient(lambda x: net.run(x, acts), X, TARGET)
    assert not torch.allclose(expected, salience.gradient(net, X, TARGET).values)
    activations = "all" if option == "all" else [name.upper()]
    result = METHODS[rule](net, X, TARGET, activations=activations)
    assert_matches(result.values, expected)
    assert result.extras["rectifiers"] == 0
    assert result.extras["activations_modified"] == {
        {"gelu": "GELU", "silu": "SiLU", "hardswish": "Hardswish"}[name]: 2
    }


@pytest.mark.parametrize("rule", RULES)
def test_activations_extension_applies_only_where_asked(rule: str) -> None:
    """GELU gets the rule, SiLU (in place) keeps its gradient, the ReLU gets the rule."""
    net = Net([nn.GELU(), nn.SiLU(inplace=True), nn.ReLU()])
    acts = [
        lambda t: RefActivation.apply(t, "gelu", rule),
        F.silu,
        lambda t: RefRectifier.apply(t, None, rule),
    ]
    expected = reference_gradient(lambda x: net.run(x, acts), X, TARGET)
    result = METHODS[rule](net, X, TARGET, activations={"gelu"})
    assert_matches(result.values, expected)
    assert result.extras == {"rectifiers": 1, "activations_modified": {"GELU": 1}}


@pytest.mark.parametrize("rule", RULES)
def test_activations_extension_on_in_place_activations(rule: str) -> None:
    net = Net([nn.SiLU(inplace=True), nn.Hardswish(inplace=True)])
    acts = [
        lambda t: RefActivation.apply(t, "silu", rule),
        lambda t: RefActivation.apply(t, "hardswish", rule),
    ]
    expected = reference_gradient(lambda x: net.run(x, acts), X, TARGET)
    result = METHODS[rule](net, X, TARGET, activations=["swish", "hard_swish"])
    assert_matches(result.values, expected)
    assert result.extras["activations_modified"] == {"SiLU": 1, "Hardswish": 1}


def test_activations_option_names_and_errors() -> None:
    assert resolve_activations("rectifiers") == frozenset()
    assert resolve_activations("all") == frozenset(ACTIVATIONS)
    assert resolve_activations(["GELU", "leaky_relu", "relu"]) == {"GELU", "LeakyReLU"}
    assert resolve_activations("gelu") == {"GELU"}
    net = Net([nn.ReLU()])
    with pytest.raises(ValueError, match=r"unknown activation 'gleu'.*GELU"):
        salience.guided_backprop(net, X, activations=["gleu"])
    with pytest.raises(TypeError, match="activation names are strings"):
        salience.deconvnet(net, X, activations=[1])
    with pytest.raises(ValueError, match="activations= applies to the deconvnet"):
        salience.smoothgrad(net, X, activations="all", samples=2)
    with pytest.raises(ValueError, match="unknown activation"):
        salience.guided_grad_cam(net, X, activations="gleu")
    with pytest.raises(ValueError, match=r"none of the activations \['SiLU'\].*GELU × 1"):
        salience.guided_backprop(Net([nn.GELU()]), X, activations=["silu"])
    result = salience.explain(Net([nn.GELU()]), X, method="deconvnet", activations="all")
    assert result.extras["activations_modified"] == {"GELU": 1}


# -- counts -----------------------------------------------------------------------------------


def test_counts_are_rectifier_calls_per_forward_pass() -> None:
    relu = nn.ReLU()
    net = Net([relu, relu, relu])  # one module called three times
    for method in (salience.guided_backprop, salience.deconvnet):
        assert method(net, X, TARGET).extras["rectifiers"] == 3
    gc = salience.guided_grad_cam(net, X, TARGET, layer="convs.2")
    assert gc.extras["rectifiers"] == 3
    assert gc.extras["activations_modified"] == {}
    for batch_size in (1, 6):
        smooth = salience.smoothgrad(
            net, X, TARGET, base="guided_backprop", samples=2, batch_size=batch_size
        )
        assert smooth.extras["rectifiers"] == 3
    assert "rectifiers" not in salience.smoothgrad(net, X, TARGET, samples=2).extras


def test_rectifier_rule_counts_every_call_of_the_mode() -> None:
    net = _bind([a for a, _ in SPELLINGS.values()])
    x = X.clone().requires_grad_(True)
    with rectifier_rule(net, "guided") as mode:
        net(x)
    assert mode is not None
    assert mode.count == len(SPELLINGS)
    with pytest.raises(ValueError, match="found no rectifier"), rectifier_rule(net, "deconvnet"):
        pass


# -- in-place changes after a rectifier -----------------------------------------------------


def test_guided_rule_survives_an_in_place_change_of_a_relu_input() -> None:
    """``y = F.relu(h); h.mul_(0.5)``: PyTorch's relu keeps its output, so must the rule."""

    class Net2(Net):
        def forward(self, x: Tensor) -> Tensor:
            h = self.convs[0](x)
            y = F.relu(h)
            h.mul_(0.5)
            return self.fc((y + h).flatten(1))

    net = Net2([F.relu])

    def reference(x: Tensor) -> Tensor:
        h = net.convs[0](x)
        return net.fc((RefRectifier.apply(h, None, "guided") + 0.5 * h).flatten(1))

    expected = reference_gradient(reference, X, TARGET)
    assert_matches(salience.guided_backprop(net, X, TARGET).values, expected)


IN_PLACE_SPELLINGS = {
    "F.relu": lambda n, t: F.relu(t),
    "nn.ReLU6": lambda n, t: nn.ReLU6()(t),
    "nn.ReLU(inplace=True)": lambda n, t: nn.ReLU(inplace=True)(t),
    "nn.ReLU6(inplace=True)": lambda n, t: nn.ReLU6(inplace=True)(t),
    **{k: a for k, (a, _) in SPELLINGS.items()},
}


@pytest.mark.parametrize("changed", ["input", "output"])
@pytest.mark.parametrize("spelling", list(IN_PLACE_SPELLINGS))
def test_guided_works_wherever_the_gradient_does(spelling: str, changed: str) -> None:
    """The model changes the rectifier's input or output in place after the call."""
    act = IN_PLACE_SPELLINGS[spelling]

    class Changing(Net):
        def forward(self, x: Tensor) -> Tensor:
            h = self.convs[0](x)
            y = act(self, h)
            (h if changed == "input" else y).mul_(0.5)
            return self.fc(y.flatten(1))

    net = Changing([F.relu])
    try:
        salience.gradient(net, X, TARGET)
    except RuntimeError as error:
        message = str(error)
    else:
        message = ""
    if message:
        assert "inplace" in message
        pytest.skip("PyTorch's own backward of this call does not allow the change either")
    salience.guided_backprop(net, X, TARGET)
    salience.deconvnet(net, X, TARGET)


# -- rules at the backward nodes, and when they hand over to the mode ------------------------


def _mode_only(model: nn.Module) -> bool:
    return model in hooks._MODE_ONLY


def _through_the_mode(method: Callable[..., salience.Attribution], net: nn.Module, **options):
    """``method``'s result with the mode at every rectifier (the rules at nodes not tried)."""
    hooks._MODE_ONLY[net] = True
    try:
        return method(net, X, TARGET, **options)
    finally:
        del hooks._MODE_ONLY[net]


# name -> (activation, upper): rectifiers whose PyTorch node keeps what the rules need
AT_NODES: dict[str, tuple[Callable[[Tensor], Tensor], float | None]] = {
    "nn.ReLU": (nn.ReLU(), None),
    "nn.ReLU(inplace=True)": (nn.ReLU(inplace=True), None),
    "F.relu": (F.relu, None),
    "torch.relu_": (torch.relu_, None),
    "nn.ReLU6(inplace=True)": (nn.ReLU6(inplace=True), 6.0),
    "F.relu6": (F.relu6, 6.0),
    "nn.Hardtanh(0, 2.5)": (nn.Hardtanh(0.0, 2.5), 2.5),
    "F.hardtanh_(t, 0, 3)": (lambda t: F.hardtanh_(t, 0.0, 3.0), 3.0),
}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("spelling", list(AT_NODES))
def test_relu_and_hardtanh_are_ruled_at_their_nodes(
    spelling: str, rule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the mode, as the reference, and bit for bit the mode's map."""
    act, upper = AT_NODES[spelling]
    net = Net([act, act])
    mode = _through_the_mode(METHODS[rule], net)

    def no_mode(*args: object, **kwargs: object) -> None:
        raise AssertionError("the function mode ran")

    monkeypatch.setattr(hooks._RectifierMode, "__torch_function__", no_mode)
    result = METHODS[rule](net, X, TARGET)
    assert not _mode_only(net)
    ref = [lambda t: RefRectifier.apply(t, upper, rule)] * 2
    assert_matches(result.values, reference_gradient(lambda x: net.run(x, ref), X, TARGET))
    assert torch.equal(result.values, mode.values)
    assert result.extras == mode.extras == {"rectifiers": 2, "activations_modified": {}}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_other_spellings_send_the_pass_to_the_mode(spelling: str) -> None:
    """Their maps: ``test_every_spelling_matches_the_independent_reference``."""
    act, _ = SPELLINGS[spelling]
    net = _bind([lambda n, t: F.relu(t), act])
    salience.guided_backprop(net, X, TARGET)
    assert _mode_only(net) == (spelling != "F.hardtanh(t, 0, 3)")


# NOT_RECTIFIERS whose node does not say it is no rectifier: the mode reads their arguments
NOT_RECTIFIERS_FOR_THE_MODE = {
    "clamp(min=0, max=0)",
    "clamp(min=0, max=per-channel tensor)",
    "clamp(min=per-channel tensor)",
    "threshold(0, 1)",
    "maximum(t, 0.5)",
    "maximum(t, a zero that needs a gradient)",
}


@pytest.mark.parametrize("spelling", list(NOT_RECTIFIERS))
def test_a_node_that_says_it_is_no_rectifier_keeps_the_pass(spelling: str) -> None:
    """``clamp(min=1e-6)`` and the like do not cost a second pass."""
    act = NOT_RECTIFIERS[spelling]
    net = _bind([act, lambda n, t: F.relu(t)])
    salience.deconvnet(net, X, TARGET)
    assert _mode_only(net) == (spelling in NOT_RECTIFIERS_FOR_THE_MODE)


def test_a_model_for_the_mode_runs_one_pass_from_then_on() -> None:
    net = _bind([lambda n, t: F.relu(t), lambda n, t: t.clamp(min=0)])
    calls: list[int] = []
    net.register_forward_pre_hook(lambda *_: calls.append(1))
    first = salience.guided_backprop(net, X, TARGET)
    assert len(calls) == 2  # the pass read at its nodes, thrown away, and the mode's
    again = salience.guided_backprop(net, X, TARGET)
    assert len(calls) == 3
    assert torch.equal(first.values, again.values)
    salience.smoothgrad(net, X, TARGET, base="guided_backprop", samples=4, batch_size=2)
    assert len(calls) == 3 + 1 + 3 * 4 // 2  # the clean pass, 12 rows 2 by 2: none thrown away


class HalfReLU(nn.ReLU):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 0.5


def _patched(module: nn.Module) -> nn.Module:
    module.forward = lambda t: F.relu(t) * 0.5
    return module


def _hooked(module: nn.Module) -> nn.Module:
    module.register_forward_hook(lambda m, args, out: out * 0.5)
    return module


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(
    "make", [lambda: HalfReLU(), lambda: _patched(nn.ReLU()), lambda: _hooked(nn.ReLU())]
)
def test_the_rule_follows_the_graph_not_the_modules(make: Callable, rule: str) -> None:
    """A rectifier module that scales its output: the rule at the relu, as the mode's."""
    module = make()
    net = Net([module, module])
    result = METHODS[rule](net, X, TARGET)
    assert not _mode_only(net)
    ref = [lambda t: RefRectifier.apply(t, None, rule) * 0.5] * 2
    assert_matches(result.values, reference_gradient(lambda x: net.run(x, ref), X, TARGET))
    mode = _through_the_mode(METHODS[rule], net)
    assert torch.equal(result.values, mode.values)
    assert result.extras == mode.extras


def test_the_count_is_of_the_rectifiers_the_output_depends_on() -> None:
    """A ReLU whose output a hook of the user's throws away: the mode counts its call."""
    relu = nn.ReLU()
    relu.register_forward_hook(lambda m, args, out: args[0] * 0.5)
    net = Net([relu, F.relu])
    result = salience.guided_backprop(net, X, TARGET)
    mode = _through_the_mode(salience.guided_backprop, net)
    assert torch.equal(result.values, mode.values)
    assert (result.extras["rectifiers"], mode.extras["rectifiers"]) == (1, 2)


class Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


# name -> activation at the second site: graphs that hide calls from the walk
HIDING: dict[str, Callable[[Net, Tensor], Tensor]] = {
    "an in-place nn.ReLU on a view": lambda n, t: (
        u := t * 1,
        nn.ReLU(inplace=True)(u[:, :2]),
        u,
    )[2],
    "an in-place F.relu on a view": lambda n, t: (u := t * 1, F.relu(u[:, :2], inplace=True), u)[2],
    "a custom autograd function": lambda n, t: F.relu(Identity.apply(t)),
}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("hiding", list(HIDING))
def test_a_node_that_hides_calls_sends_the_pass_to_the_mode(hiding: str, rule: str) -> None:
    net = _bind([lambda n, t: F.relu(t), HIDING[hiding]])
    result = METHODS[rule](net, X, TARGET)
    assert _mode_only(net)
    mode = _through_the_mode(METHODS[rule], net)
    assert torch.equal(result.values, mode.values)
    assert result.extras == mode.extras
    assert not torch.equal(result.values, salience.gradient(net, X, TARGET).values)


def test_a_checkpointed_part_of_the_model_is_ruled_at_its_nodes() -> None:
    """``checkpoint(use_reentrant=False)`` (timm's grad_checkpointing) keeps the pass's nodes."""
    from torch.utils.checkpoint import checkpoint

    eager = Net([F.relu, F.relu])

    class Checkpointed(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            h = checkpoint(lambda t: F.relu(eager.convs[0](t)), x, use_reentrant=False)
            return eager.fc(F.relu(eager.convs[1](h)).flatten(1))

    net = Checkpointed()
    for method in (salience.guided_backprop, salience.deconvnet):
        result = method(net, X, TARGET)
        assert not _mode_only(net)
        assert torch.equal(result.values, method(eager, X, TARGET).values)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_compiled_part_of_the_model_goes_to_the_mode() -> None:
    """Compiled code is one custom autograd node: the mode's map, as the eager twin's."""
    eager = Net([F.relu, F.relu])

    class Part(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.compiled = torch.compile(lambda t: F.relu(eager.convs[1](t)), backend="aot_eager")

        def forward(self, x: Tensor) -> Tensor:
            return eager.fc(self.compiled(F.relu(eager.convs[0](x))).flatten(1))

    net = Part()
    result = salience.guided_backprop(net, X, TARGET)
    assert _mode_only(net)
    assert_matches(result.values, salience.guided_backprop(eager, X, TARGET).values)
    assert not torch.equal(result.values, salience.gradient(net, X, TARGET).values)


def test_an_output_it_cannot_look_through_goes_to_the_mode() -> None:
    """A tuple with an object in it: the graph behind the object (a clamp) is not walked."""

    class Boxed:
        def __init__(self, t: Tensor) -> None:
            self.t = t

    class Boxing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.relus = _bind([lambda n, t: F.relu(t)] * 2)
            self.clamps = _bind([lambda n, t: t.clamp(min=0)] * 2)

        def forward(self, x: Tensor) -> tuple[Tensor, Boxed]:
            return self.relus(x), Boxed(self.clamps(x))

    def target(out: tuple[Tensor, Boxed]) -> Tensor:
        return (out[0] + out[1].t).gather(1, TARGET[:, None])[:, 0]

    net = Boxing()
    result = salience.guided_backprop(net, X, target)
    assert _mode_only(net)
    ref = [lambda t: RefRectifier.apply(t, None, "guided")] * 2
    expected = reference_gradient(
        lambda x: net.relus.run(x, ref) + net.clamps.run(x, ref), X, TARGET
    )
    assert_matches(result.values, expected)


def test_an_output_holding_one_tensor_twice_rules_each_rectifier_once() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net([F.relu, F.relu])

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            y = F.relu(self.net(x))  # the output's own node is a rectifier
            return {"a": y, "b": [y, (y,)]}

    def target(out: dict[str, Any]) -> Tensor:
        return out["b"][1][0].sum(1)

    net = Twice()
    for method in (salience.guided_backprop, salience.deconvnet):
        result = method(net, X, target)
        assert not _mode_only(net)
        assert result.extras["rectifiers"] == 3
        hooks._MODE_ONLY[net] = True
        mode = method(net, X, target)
        del hooks._MODE_ONLY[net]
        assert torch.equal(result.values, mode.values)
        assert result.extras == mode.extras


def test_rules_at_nodes_in_guided_grad_cam_and_smoothgrad_equal_the_mode() -> None:
    relu = nn.ReLU(inplace=True)
    net = Net([relu, relu])
    cam = salience.guided_grad_cam(net, X, TARGET, layer="convs.1")
    assert torch.equal(
        cam.values, _through_the_mode(salience.guided_grad_cam, net, layer="convs.1").values
    )
    for batch_size in (1, 6):
        options = {"base": "deconvnet", "samples": 3, "batch_size": batch_size}
        torch.manual_seed(0)
        smooth = salience.smoothgrad(net, X, TARGET, **options)
        torch.manual_seed(0)
        mode = _through_the_mode(salience.smoothgrad, net, **options)
        assert torch.equal(smooth.values, mode.values)
        assert smooth.extras["rectifiers"] == 2
    assert not _mode_only(net)


class _HalfRectified(nn.Module):
    """A rectifier, then a Hardswish on the main path (MobileNetV3's mix)."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.spelling = spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        h = h.relu() if self.spelling == "relu" else h.clamp(min=0)  # nodes / the mode
        h = F.hardswish(self.conv2(h))
        return self.head(torch.sigmoid(h).mean((2, 3)))  # a gate: no warning of its own


@pytest.mark.parametrize("spelling", ["relu", "clamp"])
@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_other_nonlinearities_left_unmodified_are_warned_of(method: str, spelling: str) -> None:
    model, x = _HalfRectified(spelling).eval(), torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"modified 1 rectifier call\(s\), .* Hardswish × 1,"):
        getattr(salience, method)(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        getattr(salience, method)(model, x, activations="all")


class _Clamped(nn.Module):
    """A rectifier, then ``clip`` on the main path: Hardtanh spelled as a clamp, or a guard."""

    def __init__(self, clip: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.clip = clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.clip(self.conv2(self.conv1(x).relu())).mean((2, 3)))


@pytest.mark.parametrize(
    ("clip", "low", "high"),
    [
        (lambda t: t.clamp(-1, 1), -1.0, 1.0),
        (lambda t: torch.clip(t, -0.5, 2.0), -0.5, 2.0),
        (lambda t: t.clone().clamp_(-1.0, 1.0), -1.0, 1.0),
    ],
    ids=["clamp", "clip", "clamp_"],
)
@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_a_clamp_to_an_interval_is_hardtanh(
    method: str, clip: Any, low: float, high: float
) -> None:
    """It kept its plain gradient without a word (on the nodes and under the mode alike)."""
    model, x = _Clamped(clip).eval(), torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"modified 1 rectifier call\(s\), .* Hardtanh × 1,"):
        getattr(salience, method)(model, x)
    ruled = getattr(salience, method)(model, x, activations="all")
    assert ruled.extras["activations_modified"] == {"Hardtanh": 1}
    spelled = _Clamped(lambda t: F.hardtanh(t, low, high)).eval()
    torch.testing.assert_close(
        ruled.values, getattr(salience, method)(spelled, x, activations="all").values
    )
    guarded = _Clamped(lambda t: t.clamp(min=1e-6)).eval()  # a guard: no activation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        getattr(salience, method)(guarded, x)


class ReentrantCheckpoint(nn.Module):
    """Every rectifier inside ``torch.utils.checkpoint(use_reentrant=True)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 3)

    def middle(self, h: Tensor) -> Tensor:
        return torch.relu(self.c2(torch.relu(h)))

    def forward(self, x: Tensor) -> Tensor:
        h = checkpoint(self.middle, self.c1(x), use_reentrant=True)
        return self.fc(h.mean((2, 3)))


@pytest.mark.filterwarnings("ignore")
def test_rectifiers_hidden_behind_a_node_are_named_in_the_error() -> None:
    model, x = ReentrantCheckpoint().eval(), torch.randn(1, 3, 12, 12)
    for _ in range(2):  # the second call knows the model needs the mode
        with pytest.raises(ValueError, match=r"CheckpointFunctionBackward.*use_reentrant=False"):
            salience.guided_backprop(model, x, 0)


@torch.jit.script
def _scripted_relu(t: Tensor) -> Tensor:
    return torch.relu(t)


@pytest.mark.parametrize("rule", RULES)
def test_rectifiers_the_mode_cannot_see_are_ruled_at_their_nodes(rule: str) -> None:
    """A scripted function's relu, in a pass the mode rules (an in-place call on a view).

    The mode sees calls made from Python only: the scripted relu kept its plain gradient, and
    the map was partly the plain gradient, silently. Its node is ruled as on the node path.
    """
    hiding = HIDING["an in-place F.relu on a view"]
    net = _bind([hiding, lambda n, t: _scripted_relu(t)])
    python = _bind([hiding, lambda n, t: torch.relu(t)])  # the same model in Python
    python.load_state_dict(net.state_dict())
    expected = METHODS[rule](python, X, TARGET)
    assert _mode_only(python)
    assert expected.extras["rectifiers"] == 2
    for _ in range(3):  # the profiling executor's first runs, and the optimized one
        result = METHODS[rule](net, X, TARGET)
        assert _mode_only(net)
        assert_matches(result.values, expected.values)
        assert result.extras["rectifiers"] == 2


class _ReluRNN(nn.Module):
    """A ReLU RNN over the feature map's positions: its rectifiers run inside ATen's RNN."""

    def __init__(self, hide: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.rnn = nn.RNN(4, 5, nonlinearity="relu", batch_first=True)
        self.fc = nn.Linear(5, 5)
        self.hide = hide
        with torch.no_grad():  # units alive along the path (a default RNN here was dead)
            for name, value in self.rnn.named_parameters():
                value.copy_(torch.linspace(-0.3, 0.6, value.numel()).view_as(value))
                if name.startswith("bias"):
                    value.fill_(0.2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv(x))
        h = Identity.apply(h) if self.hide else h  # a hidden node: the pass goes to the mode
        out, _ = self.rnn(F.adaptive_avg_pool2d(h, 2).flatten(2).transpose(1, 2))  # 4 steps
        return self.fc(out[:, -1])


@pytest.mark.parametrize("rule", RULES)
def test_rectifiers_inside_aten_calls_are_ruled_in_the_mode_too(rule: str) -> None:
    """nn.RNN's relu: ruled at its nodes on the node path, and now on the mode's as well (the
    mode cannot see it; a first version of the mode's check refused these models)."""
    torch.manual_seed(0)
    plain = _ReluRNN(hide=False).eval()
    hidden = _ReluRNN(hide=True).eval()
    hidden.load_state_dict(plain.state_dict())
    nodes = METHODS[rule](plain, X, TARGET)
    assert not _mode_only(plain)
    for found in (
        METHODS[rule](hidden, X, TARGET),
        METHODS[rule](plain, X, TARGET, activations="all"),  # the mode, every activation
    ):
        assert_matches(found.values, nodes.values)
        assert found.extras["rectifiers"] == nodes.extras["rectifiers"] == 1 + 4
    assert not torch.equal(nodes.values, salience.gradient(plain, X, TARGET).values)


def test_a_reconstruction_rules_rectifiers_the_mode_cannot_see() -> None:
    hiding = HIDING["an in-place F.relu on a view"]
    net = _bind([hiding, lambda n, t: _scripted_relu(t), lambda n, t: F.relu(t)])
    python = _bind([hiding, lambda n, t: F.relu(t), lambda n, t: F.relu(t)])
    python.load_state_dict(net.state_dict())
    found = salience.features.reconstruct(net, X, layer="convs.2")
    expected = salience.features.reconstruct(python, X, layer="convs.2")
    assert found.projection is not None
    assert expected.projection is not None
    assert_matches(found.projection, expected.projection)


@pytest.mark.parametrize("rule", RULES)
def test_a_scripted_graph_run_as_one_node_is_warned_of(rule: str) -> None:
    """The legacy executor runs a scripted function as one DifferentiableGraph node."""

    @torch.jit.script
    def block(t: Tensor, s: Tensor) -> Tensor:
        return torch.relu(t * s + 0.1) * 2.0

    scale = torch.full((1, 4, 1, 1), 1.5)
    net = _bind([lambda n, t: F.relu(t), lambda n, t: block(t, scale)])
    profiling = torch._C._jit_set_profiling_executor(False)
    mode = torch._C._jit_set_profiling_mode(False)
    try:
        for _ in range(3):
            out = net(X.requires_grad_(False).clone().requires_grad_())
        kinds = {node.name() for node in hooks._graph_nodes(out)}
        if not any(kind.endswith("DifferentiableGraphBackward") for kind in kinds):
            pytest.skip("this PyTorch runs the scripted function as separate nodes")
        with pytest.warns(UserWarning, match=r"1 TorchScript graph.*not torch.jit.script"):
            result = METHODS[rule](net, X, TARGET)
    finally:
        torch._C._jit_set_profiling_executor(profiling)
        torch._C._jit_set_profiling_mode(mode)
    assert result.extras["rectifiers"] == 1  # the one it could see


def test_kinds_of_nodes_sharing_the_generic_class_are_read_each_time() -> None:
    """C++ functions without a class of their own share ``CppFunction`` (a scripted graph, an
    extension's function): a kind cached by class made the first one seen stand for all."""
    kind_of = type("CppFunction", (), {"name": lambda self: self.text})

    def node(text: str) -> Any:
        made = kind_of()
        made.text = text
        return made

    assert hooks._kind(node("torchvision::roi_align_backward")) == "torchvision::roi_align_backward"
    graph = node("torch::jit::(anonymous namespace)::DifferentiableGraphBackward")
    assert hooks._kind(graph) == hooks._SCRIPT_GRAPH


class KeepsARectifiedTensor(nn.Module):
    """A model holding a tensor it computed once with a relu, graph and all (a learned bias map
    made at construction): its ``ReluBackward`` node outlives every call. ``mode=True`` also
    runs a ``clamp(min=0)``, which sends the rule to the function mode."""

    def __init__(self, mode: bool = False) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, 1, 1, generator=generator))
        self.bias_map = torch.relu(self.w * 2)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x + self.bias_map)
        h = h.clamp(min=0) if self.mode else torch.relu(h)
        return self.fc(h.mean((2, 3)))


def _users_gradient(model: KeepsARectifiedTensor) -> Tensor:
    """The gradient of the user's own loss through the kept relu node (signs that a rule would
    change: a negative seed where the relu passed its input)."""
    seed = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1)
    (grad,) = torch.autograd.grad((model.bias_map * seed).sum(), model.w, retain_graph=True)
    return grad


@pytest.mark.parametrize("mode", [False, True], ids=["at the nodes", "under the mode"])
@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "reconstruct"])
def test_a_node_the_model_keeps_has_no_rule_after_the_call(method: str, mode: bool) -> None:
    """The rules put on the backward nodes of a call's graph are removed when the call ends: a
    node made before the call and kept by the model got the rule for good, and your own
    backward passes through it then took the guided (or DeconvNet) gradient."""
    model = KeepsARectifiedTensor(mode).eval()
    before = _users_gradient(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    if method == "reconstruct":
        salience.features.reconstruct(model, x, "conv", 0)
    else:
        getattr(salience, method)(model, x, target=1)
    assert torch.equal(_users_gradient(model), before)
