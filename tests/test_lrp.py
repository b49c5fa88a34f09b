"""LRP: each rule against a slow matrix-form reference, conservation, canonization, parity.

The references below are written from Montavon et al. 2019 (Table 1) on the dense matrix of
the layer (a convolution's matrix is read off its Jacobian), independently of the gradient-form
implementation in ``salience.methods.lrp``.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import salience
from conftest import VGGish, _init
from salience.methods.rules import (
    CONV,
    AlphaBeta,
    Composite,
    Epsilon,
    Flat,
    Gamma,
    WSquare,
    ZBox,
    Zero,
    ZPlus,
)

STAB = 1e-6


def stab(d: Tensor, eps: float = STAB) -> Tensor:
    return torch.where(d >= 0, d + eps, d - eps)


def dense_form(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The affine map ``y = W x + b`` of a one-layer ``model`` around one input ``x``.

    Returns ``(W (K, D), b (K,), receptive (K, D) bool)``; ``receptive`` marks which inputs
    each output reads (for the flat rule), from the same layer with all weights 1.
    """
    flat = x.reshape(-1)

    def f(v: Tensor) -> Tensor:
        return model(v.view(x.shape)).reshape(-1)

    w = torch.autograd.functional.jacobian(f, flat)
    b = f(torch.zeros_like(flat))
    ones = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ones.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
    receptive = torch.autograd.functional.jacobian(
        lambda v: ones(v.view(x.shape)).reshape(-1), flat
    )
    return w.detach(), b.detach(), receptive.detach() != 0


def share(contrib: Tensor) -> Tensor:
    """Each contribution's share of their sum; none when the sum is 0 (all are 0 there)."""
    total = contrib.sum()
    return contrib / total if total != 0 else torch.zeros_like(contrib)


def reference(rule, w: Tensor, b: Tensor, x: Tensor, r: Tensor, receptive: Tensor, bounds=None):
    """``R_in`` of one layer by the textbook formulas, one output ``j`` at a time."""
    k, d = w.shape
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    out = torch.zeros(d, dtype=x.dtype)
    z = w @ x + b
    for j in range(k):
        wj, bj = w[j], b[j]
        wpj, wnj = wj.clamp(min=0), wj.clamp(max=0)
        if isinstance(rule, Zero | Epsilon):
            eps = rule.epsilon if isinstance(rule, Epsilon) else 0.0
            contrib = x * wj
            den = contrib.sum() + bj
            den = stab(den, eps) if eps else den
            out += contrib / den * r[j] if den != 0 else 0.0
        elif isinstance(rule, Gamma):
            g = rule.gamma
            if z[j] >= 0:
                contrib = xp * (wj + g * wpj) + xn * (wj + g * wnj)
                den = contrib.sum() + bj + g * bj.clamp(min=0)
            else:
                contrib = xp * (wj + g * wnj) + xn * (wj + g * wpj)
                den = contrib.sum() + bj + g * bj.clamp(max=0)
            out += contrib / stab(den) * r[j]
        elif isinstance(rule, ZPlus | AlphaBeta):
            alpha, beta = (1.0, 0.0) if isinstance(rule, ZPlus) else (rule.alpha, rule.beta)
            pos = xp * wpj + xn * wnj
            neg = xp * wnj + xn * wpj
            out += (alpha * share(pos) - beta * share(neg)) * r[j]
        elif isinstance(rule, WSquare | Flat):
            contrib = wj**2 if isinstance(rule, WSquare) else receptive[j].to(x.dtype)
            out += share(contrib * receptive[j]) * r[j]
        elif isinstance(rule, ZBox):
            low, high = bounds
            out += share(x * wj - low * wpj - high * wnj) * r[j]
        else:  # pragma: no cover
            raise AssertionError(rule)
    return out


LAYER_RULES = [
    Zero(),
    Epsilon(0.3),
    Gamma(0.25),
    ZPlus(),
    AlphaBeta(1.0, 0.0),
    AlphaBeta(2.0, 1.0),
]
INPUT_RULES = [WSquare(), Flat(), ZBox(low=-2.0, high=2.5)]


def one_layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "dense":
        model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 5))
    elif kind == "conv":
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Flatten())
    elif kind == "grouped_dilated_conv":
        model = nn.Sequential(nn.Conv2d(2, 4, 2, padding=1, dilation=2, groups=2), nn.Flatten())
    elif kind == "transposed_conv":  # weight [in, out / groups, ...]; output 6 x 6
        layer = nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        model = nn.Sequential(layer, nn.Flatten())
    elif kind == "transposed_conv_one_group":  # x⁺ and x⁻ stacked on the weight's axis 0
        layer = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1)
        model = nn.Sequential(layer, nn.Flatten())
    else:  # a zero padding before the convolution, as TensorFlow "SAME" convs do
        model = nn.Sequential(
            nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(2, 3, 3, stride=2), nn.Flatten()
        )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.double().eval()


KINDS = [
    "dense",
    "conv",
    "padded_conv",
    "grouped_dilated_conv",
    "transposed_conv",
    "transposed_conv_one_group",
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rule", LAYER_RULES + INPUT_RULES, ids=lambda r: repr(r))
def test_each_rule_matches_the_matrix_form(kind: str, rule) -> None:
    model = one_layer(kind)
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if rule.input_layer:
        composite = Composite({nn.Linear: Zero(), CONV: Zero()}, first=rule)
    else:
        composite = Composite({nn.Linear: rule, CONV: rule})
    # An output that reads the input, with positive contributions (z⁺ gives it relevance).
    target = {"grouped_dilated_conv": 4, "transposed_conv_one_group": 7}.get(kind, 2)
    result = salience.lrp(model, x, target=target, composite=composite)
    w, b, receptive = dense_form(model, x)
    z = w @ x.reshape(-1) + b
    r = torch.zeros_like(z)
    r[target] = z[target]
    bounds = None
    if isinstance(rule, ZBox):
        bounds = (torch.full_like(x.reshape(-1), -2.0), torch.full_like(x.reshape(-1), 2.5))
    expected = reference(rule, w, b, x.reshape(-1), r, receptive, bounds)
    torch.testing.assert_close(result.values.reshape(-1), expected, rtol=1e-9, atol=1e-12)
    assert result.extras["rules"][rule.name] == 1
    # The bias-free rules conserve (αβ where the output has contributions of both signs: the
    # few taps of a grouped or transposed convolution's output may all have one sign).
    if not isinstance(rule, Zero | Epsilon | Gamma) and kind in ("dense", "conv", "padded_conv"):
        assert abs(float(result.extras["conservation"][0])) < 1e-12 * abs(float(z[target]))


def test_zbox_default_bounds_are_each_samples_range() -> None:
    model = one_layer("conv")
    x = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    composite = Composite({CONV: Zero()}, first=ZBox())
    both = salience.lrp(model, x, target=0, composite=composite)
    for i in range(2):
        xi = x[i : i + 1]
        low, high = float(xi.min()), float(xi.max())
        alone = salience.lrp(
            model, xi, target=0, composite=Composite({CONV: Zero()}, first=ZBox(low, high))
        )
        torch.testing.assert_close(both.values[i : i + 1], alone.values)
    # low=/high= reach the rule through the options
    opts = salience.lrp(model, x[:1], target=0, composite="epsilon_gamma_box", low=-3.0, high=3.0)
    manual = salience.lrp(
        model,
        x[:1],
        target=0,
        composite=Composite({CONV: Gamma(), nn.Linear: Epsilon()}, first=ZBox(-3.0, 3.0)),
    )
    torch.testing.assert_close(opts.values, manual.values)


# -- conservation ----------------------------------------------------------------------------


class BiasFreeNet(nn.Module):
    """ReLU convolutions, max- and average-pooling, a residual add, flatten, MLP: no biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)  # overlapping windows
        self.avg = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(6 * 4 * 4, 16, bias=False)
        self.fc2 = nn.Linear(16, 4, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = x + F.relu(self.conv2(x))  # residual
        x = self.avg(self.pool(x))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def bias_free() -> nn.Module:
    torch.manual_seed(4)
    model = BiasFreeNet()
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model.double().eval()


@pytest.mark.parametrize(
    "composite", ["zero", "epsilon_plus", "epsilon_alpha2_beta1", "epsilon_plus_flat"]
)
def test_bias_free_relu_net_conserves_the_logit(composite: str) -> None:
    model = bias_free()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    options = {"epsilon": 1e-12} if composite != "zero" else {}
    result = salience.lrp(model, x, target=[0, 1, 2], composite=composite, **options)
    total = result.values.flatten(1).sum(1)
    torch.testing.assert_close(total, result.scores, rtol=1e-5, atol=0)
    torch.testing.assert_close(result.extras["relevance"], total)
    assert (result.extras["conservation"].abs() <= 1e-5 * result.scores.abs()).all()


def test_relevance_starts_from_the_probability_when_asked() -> None:
    model = bias_free()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    result = salience.lrp(model, x, target=1, composite="zero", score="probability")
    probability = torch.softmax(model(x), 1)[:, 1]
    torch.testing.assert_close(result.scores, probability)
    torch.testing.assert_close(result.values.flatten(1).sum(1), probability, rtol=1e-6, atol=0)


class RectifiedNet(nn.Module):
    """Conv / ReLU and ReLU6 / BatchNorm / linear: every γ layer but the last is rectified."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.fc1 = nn.Linear(8 * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = F.relu6(self.conv2(x))
        x = torch.relu(self.conv3(x) - 0.1)  # a shift: z <= 0 is common, not all
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.mark.parametrize("gamma", [0.25, 2.0])
def test_gamma_after_a_rectifier_equals_the_general_form(gamma: float, monkeypatch) -> None:
    """Where a rectifier reads the layer, R = 0 wherever z <= 0 and γ takes one backward call
    with the weights w + γw⁺ (x⁺) and w + γw⁻ (x⁻): the same relevance as the general form."""
    from salience.methods import _lrp_layers

    torch.manual_seed(0)
    model = RectifiedNet().double().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)  # signed: the first layer's x⁻ side too
    composite = Composite({CONV: Gamma(gamma), nn.Linear: Gamma(gamma)})
    fast = salience.lrp(model, x, target=[0, 2, 3], composite=composite).values
    general = _lrp_layers.rule_backward

    def slow(*args, **kwargs):
        return general(*args, **{**kwargs, "rectified": False})

    monkeypatch.setattr(_lrp_layers, "rule_backward", slow)
    reference = salience.lrp(model, x, target=[0, 2, 3], composite=composite).values
    assert fast.abs().amax() > 0
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-12 * float(fast.abs().max()))


def test_lrp_zero_and_small_epsilon_equal_gradient_times_input() -> None:
    model = _init(VGGish(), 0).double()  # ReLU, biases, max-pooling, no BatchNorm
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    reference = salience.input_x_gradient(model, x, target=[3, 5]).values
    zero = salience.lrp(model, x, target=[3, 5], composite="zero").values
    small = salience.lrp(model, x, target=[3, 5], composite="epsilon", epsilon=1e-12).values
    torch.testing.assert_close(zero, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(small, reference, rtol=1e-7, atol=1e-9)
    large = salience.lrp(model, x, target=[3, 5], composite="epsilon", epsilon=1.0).values
    assert not torch.allclose(large, reference, rtol=1e-3)  # ε does something


# -- canonization ----------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class ResNetBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.block1 = Block(6)
        self.block2 = Block(6)
        self.fc = nn.Linear(6, 4, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet_bn(shifts: bool) -> nn.Module:
    """BatchNorm with random scales; with ``shifts=False`` its mean and beta are 0, so folding
    introduces no bias and every conserving rule conserves end to end."""
    torch.manual_seed(8)
    model = ResNetBN()
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, -1.5, 1.5)  # negative scales flip the folded weights
            m.running_var.uniform_(0.5, 1.5)
            if shifts:
                nn.init.uniform_(m.bias, -0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
    return model.double().eval()


def folded_by_hand(model: ResNetBN) -> nn.Module:
    """The same network with every BatchNorm folded into its convolution by hand."""
    folded = copy.deepcopy(model)
    pairs = [("stem", "bn")] + [
        (f"{b}.conv{i}", f"{b}.bn{i}") for b in ("block1", "block2") for i in (1, 2)
    ]
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        new = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1).double()
        with torch.no_grad():
            new.weight.copy_(conv.weight * a.view(-1, 1, 1, 1))
            new.bias.copy_(bn.bias - bn.running_mean * a)
        parent, _, leaf = conv_name.rpartition(".")
        setattr(folded.get_submodule(parent) if parent else folded, leaf, new)
        parent, _, leaf = bn_name.rpartition(".")
        setattr(folded.get_submodule(parent) if parent else folded, leaf, nn.Identity())
    return folded.eval()


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"])
def test_batchnorm_is_folded_into_the_convolution(composite: str) -> None:
    model = resnet_bn(shifts=True)
    by_hand = folded_by_hand(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    torch.testing.assert_close(by_hand(x), model(x))  # folding keeps the output
    before = copy.deepcopy(model.state_dict())
    ours = salience.lrp(model, x, target=[0, 3], composite=composite)
    theirs = salience.lrp(by_hand, x, target=[0, 3], composite=composite)
    assert ours.extras["canonized"] == 5
    assert theirs.extras["canonized"] == 0
    torch.testing.assert_close(ours.output, model(x))
    torch.testing.assert_close(ours.values, theirs.values, rtol=1e-9, atol=1e-12)
    for k, v in model.state_dict().items():  # the user's weights are untouched
        assert torch.equal(v, before[k])


class TwoNorms(nn.Module):
    """A convolution followed by two BatchNorms: both fold into it, one on top of the other."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.bn2(self.bn1(self.conv(x)))).mean((2, 3)))


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"])
def test_two_batchnorms_in_a_row_fold_one_on_the_other(composite: str) -> None:
    torch.manual_seed(10)
    model = TwoNorms().double()
    for bn in (model.bn1, model.bn2):
        nn.init.uniform_(bn.weight, -2, 2)  # negative scales swap w+ and w-: a lost fold shows
        nn.init.uniform_(bn.bias, -0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    by_hand = copy.deepcopy(model)
    a1 = model.bn1.weight / torch.sqrt(model.bn1.running_var + model.bn1.eps)
    a2 = model.bn2.weight / torch.sqrt(model.bn2.running_var + model.bn2.eps)
    with torch.no_grad():
        by_hand.conv.weight.mul_((a2 * a1).view(-1, 1, 1, 1))
        shift1 = model.bn1.bias - model.bn1.running_mean * a1
        by_hand.conv.bias.copy_(
            a2 * (a1 * model.conv.bias + shift1) + model.bn2.bias - model.bn2.running_mean * a2
        )
    by_hand.bn1, by_hand.bn2 = nn.Identity(), nn.Identity()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    torch.testing.assert_close(by_hand(x), model(x))
    ours = salience.lrp(model, x, target=0, composite=composite)
    theirs = salience.lrp(by_hand, x, target=0, composite=composite)
    assert ours.extras["canonized"] == 2
    torch.testing.assert_close(ours.values, theirs.values, rtol=1e-9, atol=1e-12)


# (αβ conserves only where each output has positive and negative contributions: not here,
# where ReLU outputs leave some outputs without negative ones.)
@pytest.mark.parametrize("composite", ["zero", "epsilon_plus", "epsilon_plus_flat"])
def test_resnet_with_batchnorm_conserves_end_to_end(composite: str) -> None:
    model = resnet_bn(shifts=False)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    options = {"epsilon": 1e-12} if composite != "zero" else {}
    result = salience.lrp(model, x, target=[0, 1, 2], composite=composite, **options)
    assert result.extras["canonized"] == 5
    torch.testing.assert_close(result.values.flatten(1).sum(1), result.scores, rtol=1e-5, atol=0)


def test_batchnorm_shifts_absorb_relevance_and_the_gap_is_reported() -> None:
    model = resnet_bn(shifts=True)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    result = salience.lrp(model, x, target=[0, 1], composite="epsilon_plus")
    gap = result.extras["conservation"]
    torch.testing.assert_close(gap, result.values.flatten(1).sum(1) - result.scores)


class Decoder(nn.Module):
    """Bias-free encoder-decoder: conv, then grouped transposed convolutions, each + BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.up1 = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1, groups=2, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.up2 = nn.ConvTranspose2d(6, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn0(self.down(x)))
        x = torch.relu(self.bn1(self.up1(x)))
        x = torch.relu(self.bn2(self.up2(x)))
        return self.fc(x.mean((2, 3)))


def decoder(shifts: bool) -> Decoder:
    torch.manual_seed(12)
    model = Decoder()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, -1.5, 1.5)
            m.running_var.uniform_(0.5, 1.5)
            if shifts:
                nn.init.uniform_(m.bias, -0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
    return model.double().eval()


def transposed_folded_by_hand(model: Decoder) -> nn.Module:
    """Fold each BatchNorm into the transposed convolution before it, channel by channel.

    A transposed convolution's weight is ``[in, out / groups, kh, kw]``: output channel ``o``
    of group ``g = o // (out / groups)`` is column ``o % (out / groups)`` of that group's rows.
    """
    folded = copy.deepcopy(model)
    for conv_name, bn_name in (("up1", "bn1"), ("up2", "bn2")):
        conv, bn = getattr(folded, conv_name), getattr(folded, bn_name)
        a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        per_in = conv.in_channels // conv.groups
        per_out = conv.out_channels // conv.groups
        with torch.no_grad():
            weight = conv.weight.clone()
            for o in range(conv.out_channels):
                g, j = divmod(o, per_out)
                weight[g * per_in : (g + 1) * per_in, j] *= a[o]
            conv.weight.copy_(weight)
            conv.bias = nn.Parameter(bn.bias - bn.running_mean * a)
        setattr(folded, bn_name, nn.Identity())
    return folded.eval()


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"])
def test_batchnorm_is_folded_into_a_transposed_convolution(composite: str) -> None:
    model = decoder(shifts=True)
    by_hand = transposed_folded_by_hand(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    torch.testing.assert_close(by_hand(x), model(x))  # folding keeps the output
    ours = salience.lrp(model, x, target=[0, 2], composite=composite)
    theirs = salience.lrp(by_hand, x, target=[0, 2], composite=composite)
    assert ours.extras["canonized"] == 3
    assert theirs.extras["canonized"] == 1
    torch.testing.assert_close(ours.output, model(x))
    torch.testing.assert_close(ours.values, theirs.values, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("composite", ["zero", "epsilon_plus"])
def test_decoder_with_transposed_convolutions_conserves(composite: str) -> None:
    model = decoder(shifts=False)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    options = {"epsilon": 1e-12} if composite != "zero" else {}
    result = salience.lrp(model, x, target=[0, 1, 2], composite=composite, **options)
    assert result.extras["canonized"] == 3
    assert "BatchNorm (affine, LRP-0)" not in result.extras["rules"]
    torch.testing.assert_close(result.values.flatten(1).sum(1), result.scores, rtol=1e-5, atol=0)


# -- transformers ----------------------------------------------------------------------------


class TinyViT(nn.Module):
    """Bias-free pre-norm transformer: patch embedding, attention, GELU MLP, mean pooling."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, dim, 4, stride=4, bias=False)
        self.norm1 = nn.LayerNorm(dim, bias=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim, bias=False)
        self.fc1 = nn.Linear(dim, 2 * dim, bias=False)
        self.fc2 = nn.Linear(2 * dim, dim, bias=False)
        self.head = nn.Linear(dim, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # (N, T, D)
        n, tokens, d = t.shape
        q, k, v = self.qkv(self.norm1(t)).view(n, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5).softmax(-1)
        t = t + self.proj((attn @ v).transpose(1, 2).reshape(n, tokens, d))
        t = t + self.fc2(F.gelu(self.fc1(self.norm2(t))))
        return self.head(t.mean(1))


def test_transformer_lrp_conserves_on_a_bias_free_vit() -> None:
    torch.manual_seed(12)
    model = TinyViT().double().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    result = salience.lrp(model, x, target=[0, 2], composite="zero")
    torch.testing.assert_close(result.values.flatten(1).sum(1), result.scores, rtol=1e-6, atol=0)
    rules = result.extras["rules"]
    assert rules["LayerNorm (linearized)"] == 2
    assert rules["gate (constant)"] == 1  # the attention weights
    assert rules["Pass"] == 1  # GELU
    # the attention weights are constants: the map differs from gradient × input
    gxi = salience.input_x_gradient(model, x, target=[0, 2]).values
    assert not torch.allclose(gxi, result.values, rtol=1e-3)


# -- errors ----------------------------------------------------------------------------------


def test_a_layer_without_rule_names_its_path() -> None:
    model = _init(VGGish(), 0)
    x = torch.randn(1, 3, 16, 16)
    composite = Composite({nn.Linear: Epsilon()}, name="dense-only")
    with pytest.raises(ValueError, match=r"'features\.0' \(Conv2d\).*dense-only"):
        salience.lrp(model, x, composite=composite)


class MatmulLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3 * 4 * 4, 5))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.weight


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(3, 1, batch_first=True)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        t = x.flatten(2).transpose(1, 2)
        return self.fc(self.attn(t, t, t)[0].mean(1))


class Addcmul(nn.Module):
    """Uses its parameter in an operation without a rule."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(x, x, self.scale)


class Exponential(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.exp(x).flatten(1))


@pytest.mark.parametrize(
    ("model", "pattern"),
    [
        (nn.Sequential(nn.Identity(), MatmulLayer()), r"module '1' \(MatmulLayer\).*nn\.Linear"),
        (WithAttention(), r"module 'attn' \(MultiheadAttention\)"),
        (Exponential(), r"no rule for the nonlinear function exp"),
        (
            nn.Sequential(Addcmul(), nn.Flatten(), nn.Linear(48, 2)),
            r"module '0' \(Addcmul\).*uses its parameters in operations",
        ),
    ],
    ids=["matmul-parameter", "multihead-attention", "exp", "unknown-parameter-use"],
)
def test_unknown_uses_raise_naming_the_module(model: nn.Module, pattern: str) -> None:
    model.eval()
    x = torch.randn(2, 3, 4, 4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=pattern):
        salience.lrp(model, x, target=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def _in_place(op: Any) -> Any:
    """``op`` on a copy, as a statement: what it returns is dropped, the copy goes on."""

    def run(t: Tensor) -> Tensor:
        t = t.clone()
        op(t)
        return t

    return run


class _Between(nn.Module):
    """Bias-free convolutions and classifier with ``op`` between the convolutions (LRP-0
    relevance then sums exactly to the score where every step conserves it)."""

    def __init__(self, op: Any) -> None:
        super().__init__()
        self.op = op
        self.c1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.fc = nn.Linear(6, 4, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.c2(self.op(self.c1(x)))).mean((2, 3)))


@pytest.mark.parametrize(
    ("op", "what"),
    [
        (lambda t: 1 / (1 + t.abs()), "a division by an input-dependent tensor"),
        (torch.sin, "the nonlinear function sin"),
        (lambda t: t.expm1(), "the nonlinear function expm1"),
        (lambda t: torch.special.erf(t), "the nonlinear function special_erf"),
        (lambda t: torch.atan2(torch.ones_like(t), t), "the nonlinear function atan2"),
        (lambda t: F.softshrink(t, 0.3), "the nonlinear function softshrink"),
        (lambda t: F.glu(torch.cat([t, t], 1), 1), "the nonlinear function glu"),
        (lambda t: 2**t, "a power"),
        (lambda t: torch.pow(2.0, t), "a power"),
        (lambda t: t.round(), "the nonlinear function round"),
        (lambda t: F.normalize(t, dim=1), "the nonlinear function normalize"),
        (lambda t: F.local_response_norm(t, 2), "the nonlinear function local_response_norm"),
        (_in_place(lambda t: t.sin_()), "the nonlinear function sin_"),
        (_in_place(lambda t: t.div_(1 + t.mean())), "a division by an input-dependent tensor"),
        (_in_place(lambda t: t.pow_(3)), "a power"),
    ],
    ids=[
        "rtruediv",
        "sin",
        "expm1",
        "special.erf",
        "atan2-second",
        "softshrink",
        "glu",
        "rpow",
        "pow-of-a-number",
        "round",
        "normalize",
        "lrn",
        "sin_-statement",
        "div_-statement",
        "pow_-statement",
    ],
)
def test_nonlinear_functions_without_a_rule_raise_where_the_relevance_reaches_them(
    op: Any, what: str
) -> None:
    """Each kept its plain gradient before, without a word: sums of -0.001 against a score of
    +0.005 (a clamp), a wrong sign (``1 / t``)."""
    torch.manual_seed(1)
    model = _Between(op).double().eval()
    with pytest.raises(ValueError, match=rf"no rule for {re.escape(what)} \(after module 'c1'\)"):
        salience.lrp(model, torch.randn(1, 3, 8, 8, dtype=torch.float64), 1, composite="zero")


@pytest.mark.parametrize(
    ("op", "activations"),
    [
        (nn.Hardtanh(), 2),
        (lambda t: t.clamp(-1, 1), 2),
        (lambda t: t.clone().clamp_(-1.0, 1.0), 2),
        (lambda t: torch.clip(t, min=-0.5), 2),
        (lambda t: t.clamp_max(0.05), 2),
        (lambda t: t.clone().clamp_max_(0.05), 2),
        (torch.special.expit, 2),
        (torch.abs, 1),
        (lambda t: torch.maximum(t, 0.1 * t), 1),
        (lambda t: torch.where(t > 0, t, 0.1 * t), 1),
    ],
    ids=[
        "Hardtanh",
        "clamp",
        "clamp_",
        "clip-min",
        "clamp_max",
        "clamp_max_",
        "expit",
        "abs",
        "maximum",
        "where",
    ],
)
def test_clamps_take_the_pass_rule_and_routing_functions_conserve(
    op: Any, activations: int
) -> None:
    """A clamp that is no rectifier is an activation, as nn.Hardtanh (the Pass rule; its plain
    gradient lost the relevance of the clipped units); abs, maximum and where route the
    gradient, so that relevance is conserved through them as it is."""
    torch.manual_seed(1)
    model = _Between(op).double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    a = salience.lrp(model, x, 1, composite="zero")
    torch.testing.assert_close(a.values.sum(), model(x)[0, 1].detach(), rtol=1e-10, atol=1e-12)
    assert a.extras["rules"]["Pass"] == activations  # the ReLU's, and the clamp's


class _StdConv(nn.Conv2d):
    """timm's StdConv2d: the weight standardized with F.batch_norm at every pass."""

    def forward(self, x: Tensor) -> Tensor:
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, eps=1e-6
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_weight_standardization_is_no_batchnorm_in_the_record() -> None:
    """The map was right (a plain convolution with the standardized weight gives it), but the
    record counted a 'BatchNorm (affine, LRP-0)' rule per call on a model without one."""
    torch.manual_seed(0)
    std = nn.Sequential(
        _StdConv(3, 4, 3, padding=1), nn.ReLU(), _StdConv(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).double().eval()  # fmt: skip
    plain = copy.deepcopy(std)
    for i in (0, 2):
        conv = nn.Conv2d(std[i].in_channels, 4, 3, padding=1).double()
        with torch.no_grad():
            flat = std[i].weight.reshape(1, 4, -1)
            conv.weight.copy_(
                F.batch_norm(flat, None, None, training=True, eps=1e-6).view_as(conv.weight)
            )
            conv.bias.copy_(std[i].bias)
        plain[i] = conv
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    a = salience.lrp(std, x, 1)
    assert not any("BatchNorm" in rule for rule in a.extras["rules"])
    assert a.extras["rules"] == salience.lrp(plain, x, 1).extras["rules"]
    torch.testing.assert_close(a.values, salience.lrp(plain, x, 1).values)


class Normalizing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.fc = nn.Linear(2 * 2 * 2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv((x - 0.5) / 0.2).flatten(1))


def test_a_first_layer_rule_that_finds_no_input_layer_raises() -> None:
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="first-layer rule, but no linear layer"):
        salience.lrp(Normalizing().eval(), x, composite="epsilon_plus_flat")
    assert torch.isfinite(
        salience.lrp(Normalizing().eval(), x, composite="epsilon_plus").values
    ).all()


def test_bad_options_are_clear() -> None:
    model = _init(VGGish(), 0)
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="unknown LRP composite 'nope'"):
        salience.lrp(model, x, composite="nope")
    with pytest.raises(ValueError, match="gamma"):
        salience.lrp(model, x, composite="epsilon_plus", gamma=0.5)
    with pytest.raises(ValueError, match="alpha - beta = 1"):
        AlphaBeta(2.0, 2.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        salience.lrp(model, x, composite="epsilon_gamma_box", low=torch.zeros(5, 1, 1))


# -- parity with Captum ----------------------------------------------------------------------


class CaptumVGG(nn.Module):
    def __init__(self, features: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.features, self.classifier = features, classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
def test_epsilon_matches_captum_lrp_on_a_vgg_style_net() -> None:
    captum_attr = pytest.importorskip("captum.attr")
    vgg = _init(VGGish(), 0).double()
    # Captum has no rule for nn.Flatten: the same network with a functional flatten.
    model = CaptumVGG(vgg.features, vgg.classifier[1:])
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # Captum's hooks need out-of-place ReLUs
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    target = [2, 6]
    ours = salience.lrp(model, x, target=target, composite="epsilon", epsilon=1e-9)
    theirs = captum_attr.LRP(model).attribute(x.clone(), target=target)
    torch.testing.assert_close(ours.values, theirs.detach(), rtol=1e-6, atol=1e-9)


# -- the pretrained EfficientNet-Lite0 -------------------------------------------------------


@pytest.mark.pretrained
def test_pretrained_lite0_maps_are_finite_and_report_conservation(lite0, cat) -> None:
    mean = torch.tensor(lite0.mean).view(3, 1, 1)
    std = torch.tensor(lite0.std).view(3, 1, 1)
    for composite, options in (
        ("epsilon_plus", {}),
        ("epsilon_gamma_box", {"low": (0 - mean) / std, "high": (1 - mean) / std}),
    ):
        result = salience.lrp(lite0, cat, composite=composite, **options)
        assert torch.isfinite(result.values).all()
        assert result.extras["canonized"] > 40  # every conv + BatchNorm pair
        assert result.extras["rules"]["Pass"] > 0  # ReLU6
        gap = float(result.extras["conservation"][0])
        assert abs(gap) < 10 * abs(float(result.scores[0]))
        assert result.values.abs().sum() > 0
    captum_attr = pytest.importorskip("captum.attr")
    with pytest.raises(TypeError, match=r"ZeroPad2d|ReLU6|Identity"):  # Captum has no rule
        captum_attr.LRP(copy.deepcopy(lite0)).attribute(cat.clone(), target=int(result.target[0]))


def test_every_rectifier_spelling_gets_the_pass_rule(functional_relus: nn.Module) -> None:
    """ReLU6 / hardtanh(0, 6) / relu_ ...: relevance passes, so a bias-free net conserves.

    The gradient of a clipped rectifier is 0 above the clip, and gradient x input does not
    conserve there: the inputs are scaled so that many activations exceed 6.
    """
    model = copy.deepcopy(functional_relus).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.bias.zero_()
    x = 20 * torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(15)).double()
    result = salience.lrp(model, x, target=[0, 3], composite="zero")
    torch.testing.assert_close(result.values.flatten(1).sum(1), result.scores, rtol=1e-6, atol=0)
    assert result.extras["rules"]["Pass"] == 7
    gxi = salience.input_x_gradient(model, x, target=[0, 3]).values.flatten(1).sum(1)
    assert not torch.allclose(gxi, result.scores, rtol=1e-2)


class Functional(nn.Module):
    """A convolution and a linear layer called functionally, with weights that are buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kernel", torch.randn(4, 3, 3, 3, dtype=torch.float64))
        self.register_buffer("matrix", torch.randn(2, 4 * 4 * 4, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.relu(F.conv2d(x, self.kernel, padding=1)).flatten(1), self.matrix)


def test_functional_layers_get_their_types_rule() -> None:
    torch.manual_seed(16)
    model = Functional().eval()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    result = salience.lrp(model, x, target=1, composite="epsilon_plus")
    assert result.extras["rules"] == {"ZPlus": 1, "Epsilon": 1, "Pass": 1}
    torch.testing.assert_close(result.values.flatten(1).sum(1), result.scores, rtol=1e-5, atol=0)


# -- relevance amplified where summed branches cancel -----------------------------------------


class CancellingBranches(nn.Module):
    """A standalone BatchNorm (shift 1), then two convolutions over 2 pixels, summed before the
    ReLU: ``a = 1e-3 h1 - 10 h2`` and ``b = 10 h2 + 1`` nearly cancel, ``score = 1e-3 h1 + 1``.
    ``fused``: the same function as one convolution (what re-parameterizing such blocks does).
    """

    def __init__(self, fused: bool = False) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(1, eps=0.0)
        self.a = nn.Conv2d(1, 1, (1, 2))
        self.b = nn.Conv2d(1, 1, (1, 2))
        self.fc = nn.Linear(1, 1)
        self.fused = fused
        with torch.no_grad():
            self.bn.bias.fill_(1.0)
            self.a.weight.copy_(torch.tensor([1e-3, -10.0]).view(1, 1, 1, 2))
            self.a.bias.zero_()
            self.b.weight.copy_(torch.tensor([0.0, 10.0]).view(1, 1, 1, 2))
            self.b.bias.fill_(1.0)
            self.fc.weight.fill_(1.0)
            self.fc.bias.zero_()
            if fused:
                self.a.weight += self.b.weight
                self.a.bias += self.b.bias

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(x)
        s = self.a(h) if self.fused else self.a(h) + self.b(h)
        return self.fc(torch.relu(s).flatten(1))


def test_amplified_relevance_is_reported() -> None:
    """z⁺ gives all of each branch's relevance to its one positive input: h1 gets a = -1010,
    h2 gets b = 1011; the BatchNorm (LRP-0) keeps x / (x + 1) of each, so the relevance sums
    to about 991 for a score of 1, which is said. The fused twin gives h1 the score, of which
    x1 / (x1 + 1) stays: no warning."""
    x = torch.tensor([0.01, 100.0]).view(1, 1, 1, 2)
    h1, h2 = 1.01, 101.0
    expected = torch.tensor([0.01 / h1 * (1e-3 * h1 - 10 * h2), 100.0 / h2 * (10 * h2 + 1)])
    with pytest.warns(UserWarning, match=r"sample\(s\) \[0\] sums to 991 for a score of 1: "):
        result = salience.lrp(CancellingBranches().eval(), x, 0)
    torch.testing.assert_close(result.values.flatten(), expected, rtol=1e-4, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = salience.lrp(CancellingBranches(fused=True).eval(), x, 0)
    torch.testing.assert_close(fused.extras["relevance"], torch.tensor([0.01 / h1 * 1.00101]))


def test_the_amplification_threshold() -> None:
    from salience.methods.lrp import _warn_amplified

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within 100 x max(|score|, 0.01): absorbed, not amplified
        _warn_amplified(torch.tensor([-2.0, 0.9, 0.5]), torch.tensor([0.03, 0.004, -5.0]))
    with pytest.warns(UserWarning, match=r"sample\(s\) \[1, 2\] sums to 1.2, 600 for a score"):
        _warn_amplified(torch.tensor([-2.0, 1.2, 600.0]), torch.tensor([0.03, 0.004, -5.0]))


class _Pooled(nn.Module):
    """conv -> ReLU -> a 2 x 2 average, as nn.AvgPool2d or as F.conv2d with a buffer filter
    (timm's BlurPool2d) -> linear."""

    def __init__(self, fixed_filter: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("filt", torch.full((4, 1, 2, 2), 0.25))
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 16, 3)
        self.fixed_filter = fixed_filter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = F.conv2d(h, self.filt, stride=2, groups=4) if self.fixed_filter else self.pool(h)
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_alpha2_beta1", "epsilon_plus_flat"])
def test_a_fixed_filter_passes_relevance_as_a_pool(composite: str) -> None:
    """α2β1 at the buffer convolution handed on twice its relevance (nothing negative)."""
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    pooled = salience.lrp(_Pooled(False).double().eval(), x, 1, composite=composite)
    filtered = salience.lrp(_Pooled(True).double().eval(), x, 1, composite=composite)
    torch.testing.assert_close(filtered.values, pooled.values)
    assert filtered.extras["rules"] == pooled.extras["rules"]
