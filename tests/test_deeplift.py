"""DeepLIFT: an independent layer-by-layer reference, summation-to-delta, closed forms, Captum.

The reference in :func:`reference_deeplift` computes the paper's multipliers layer by layer
on an explicit ``nn.Sequential`` (matrix products, transposed convolutions and a Python loop
over max-pooling windows), in float64, without salience's function mode or autograd.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import salience
from conftest import ResNetish, _init

# -- helpers ---------------------------------------------------------------------------------


def relative_gap(result: salience.Attribution) -> Tensor:
    """``|delta|`` relative to the float scale of the scores it is a difference of."""
    scale = result.scores.double().abs() + result.extras["baseline_scores"].double().abs()
    return result.extras["delta"].double().abs() / scale.clamp(min=1e-12)


def exact_gap(model: nn.Module, x: Tensor, x0: Tensor, result: salience.Attribution) -> Tensor:
    """``sum(values) - (S(x) - S(x0))`` recomputed from the model itself, not from extras."""
    target = result.target
    assert target is not None
    with torch.no_grad():
        change = (
            model(x).gather(1, target.view(-1, 1))[:, 0]
            - model(x0).gather(1, target.view(-1, 1))[:, 0]
        )
    return result.values.double().flatten(1).sum(1) - change.double()


def inputs(n: int = 2, c: int = 3, side: int = 16, seed: int = 0) -> Tensor:
    return torch.randn(n, c, side, side, generator=torch.Generator().manual_seed(seed))


def quiet(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# -- the independent reference ---------------------------------------------------------------


def _maxpool_multipliers(a: Tensor, a0: Tensor, m: Tensor, pool: nn.MaxPool2d) -> Tensor:
    """salience's max-pooling rule, window by window (first maximum in row-major order)."""
    k, s, p = pool.kernel_size, pool.stride, pool.padding
    assert isinstance(k, int)
    assert isinstance(s, int)
    assert isinstance(p, int)
    n, c, h, w = a.shape
    out = torch.zeros_like(a)
    for b in range(n):
        for ch in range(c):
            for oh in range(m.shape[2]):
                for ow in range(m.shape[3]):
                    cells = [
                        (r, q)
                        for r in range(oh * s - p, oh * s - p + k)
                        for q in range(ow * s - p, ow * s - p + k)
                        if 0 <= r < h and 0 <= q < w
                    ]
                    i = cells[0]
                    j = cells[0]
                    for cell in cells[1:]:
                        if a[b, ch][cell] > a[b, ch][i]:
                            i = cell
                        if a0[b, ch][cell] > a0[b, ch][j]:
                            j = cell
                    dy = a[b, ch][i] - a0[b, ch][j]
                    dxi = a[b, ch][i] - a0[b, ch][i]
                    dxj = a[b, ch][j] - a0[b, ch][j]
                    t = 1.0 if dxi == dxj else float((dy - dxj) / (dxi - dxj))
                    out[b, ch][i] += t * m[b, ch, oh, ow]
                    out[b, ch][j] += (1 - t) * m[b, ch, oh, ow]
    return out


def reference_deeplift(seq: nn.Sequential, x: Tensor, x0: Tensor, target: list[int]) -> Tensor:
    """DeepLIFT-Rescale by the paper's formulas, layer by layer, in float64."""
    seq = seq.double()
    acts, refs = [x.double()], [x0.double()]
    with torch.no_grad():
        for layer in seq:
            acts.append(layer(acts[-1]))
            refs.append(layer(refs[-1]))
        m = F.one_hot(torch.tensor(target), acts[-1].shape[1]).double()
        for layer, a, a0 in zip(
            reversed(seq), reversed(acts[:-1]), reversed(refs[:-1]), strict=True
        ):
            if isinstance(layer, nn.Linear):
                m = m @ layer.weight  # the linear rule: m_x = W^T m_y
            elif isinstance(layer, nn.Conv2d):
                m = torch.nn.grad.conv2d_input(
                    a.shape, layer.weight, m, layer.stride, layer.padding, layer.dilation
                )
            elif isinstance(layer, nn.Flatten):
                m = m.view(a.shape)
            elif isinstance(layer, nn.ReLU | nn.Sigmoid | nn.Tanh):
                dx, dy = a - a0, layer(a) - layer(a0)
                assert bool((dx != 0).all()), "the reference expects no zero differences"
                m = m * dy / dx  # the Rescale rule
            elif isinstance(layer, nn.MaxPool2d):
                m = _maxpool_multipliers(a, a0, m, layer)
            else:
                raise TypeError(type(layer))
    return (x.double() - x0.double()) * m


def small_relu_pool_net(seed: int, bias: bool = True) -> nn.Sequential:
    """Conv / ReLU / overlapping 3x3 stride-2 max-pool (SqueezeNet-style), twice, then linear."""
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=bias),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),  # 11 -> 5, overlapping windows
        nn.Conv2d(4, 4, 3, padding=1, bias=bias),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),  # 5 -> 3
        nn.Flatten(),
        nn.Linear(36, 6, bias=bias),
        nn.ReLU(),
        nn.Linear(6, 3, bias=bias),
    )
    return _init(net, seed)


@pytest.mark.parametrize("baseline", ["zeros", "random"])
def test_equals_an_independent_layer_by_layer_reference(baseline: str) -> None:
    net = small_relu_pool_net(0).double()
    x = inputs(2, 3, 11, seed=1).double()
    x0 = torch.zeros_like(x) if baseline == "zeros" else inputs(1, 3, 11, seed=2).double()
    x0 = x0.expand_as(x)
    target = [0, 2]
    expected = reference_deeplift(net, x, x0, target)
    result = salience.deeplift(net, x, target, baseline=x0)
    torch.testing.assert_close(result.values, expected, rtol=1e-5, atol=1e-5)
    assert result.extras["max_pools"] == 2
    assert result.extras["nonlinearities"] == {"ReLU": 3}
    # the reference conserves too: this is the property the rule was built for
    gap = exact_gap(net, x, x0, result)
    assert float(gap.abs().max()) < 1e-9


def test_reference_with_sigmoid_and_tanh() -> None:
    net = _init(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.Sigmoid(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(4, 4, 3),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(4, 3),
        ),
        3,
    ).double()
    x = inputs(2, 3, 9, seed=4).double()
    x0 = inputs(1, 3, 9, seed=5).double().expand_as(x)
    expected = reference_deeplift(net, x, x0, [1, 2])
    result = salience.deeplift(net, x, [1, 2], baseline=x0)
    torch.testing.assert_close(result.values, expected, rtol=1e-5, atol=1e-7)


# -- summation-to-delta ----------------------------------------------------------------------


class Spellings(nn.Module):
    """ReLU6, clips and functional rectifiers, smooth activations, every max-pool spelling."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.ModuleList(nn.Conv2d(c, 6, 3, padding=1) for c in (3, 6, 6, 6, 6, 6, 6, 6))
        self.pool = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True, return_indices=True)
        self.fc = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x: Tensor) -> Tensor:
        c = self.c
        x = F.relu6(c[0](x))
        x, _ = self.pool(x)  # 16 -> 9 (ceil_mode, padding, indices)
        x = c[1](x).clamp(0, 4)
        x = F.max_pool2d(F.silu(c[2](x)), 3, 1, dilation=2)  # 9 -> 5, dilated
        x = torch.tanh(c[3](x))
        x = F.gelu(c[4](x))
        x = torch.max_pool2d(torch.sigmoid(c[5](x)), 2, 1)  # 5 -> 4
        x = F.hardswish(c[6](x)) + F.elu(c[7](x))
        x = F.adaptive_max_pool2d(x, 2)
        y = F.max_pool1d(x.flatten(2), 2, 1)  # a 1-d pool on the side, kept in the score
        return self.fc(x.flatten(1)) + y.mean((1, 2))[:, None]


def test_summation_to_delta_on_every_spelling() -> None:
    net = _init(Spellings(), 5)
    x = inputs(3, seed=6)
    for baseline in ("zeros", inputs(1, seed=7)):
        result = salience.deeplift(net, x, baseline=baseline)
        assert float(relative_gap(result).max()) < 1e-4
        assert result.extras["gradient_ops"] == {}
        assert result.extras["max_pools"] == 5
        assert result.extras["nonlinearities"] == {
            "ReLU6": 1,
            "clamp(0, 4)": 1,
            "SiLU": 1,
            "Tanh": 1,
            "GELU": 1,
            "Sigmoid": 1,
            "Hardswish": 1,
            "ELU": 1,
        }
        gap = exact_gap(net, x, result.extras["baseline"], result)
        assert float(gap.abs().max()) < 1e-4 * float(result.scores.abs().max())


def test_summation_to_delta_in_float64_is_exact() -> None:
    """In float64 the gap is rounding only: 1e-10 of the score change, max-pooling included."""
    net = _init(Spellings(), 8).double()
    x = inputs(2, seed=9).double()
    result = salience.deeplift(net, x, baseline=inputs(1, seed=10).double())
    change = (result.scores - result.extras["baseline_scores"]).abs()
    assert float((result.extras["delta"].abs() / change).max()) < 1e-10


def test_overlapping_max_pool_after_relu_conserves_where_captum_does_not() -> None:
    """ReLU then 3x3 stride-2 max-pooling: Captum's max-unpooling overwrites overlaps."""
    captum_attr = pytest.importorskip("captum.attr")
    net = small_relu_pool_net(11)
    x = inputs(4, 3, 11, seed=12)
    x0 = inputs(1, 3, 11, seed=13).expand_as(x).contiguous()
    ours = salience.deeplift(net, x, baseline=x0)
    target = ours.target.tolist()
    _, captum_delta = quiet(
        captum_attr.DeepLift(net).attribute,
        x,
        x0,
        target=target,
        return_convergence_delta=True,
    )
    scale = ours.scores.abs() + ours.extras["baseline_scores"].abs()
    ours_gap = relative_gap(ours)
    captum_gap = captum_delta.abs().double() / scale.double()
    assert float(ours_gap.max()) < 1e-4
    assert float(captum_gap.max()) > 100 * float(ours_gap.max())
    assert float(captum_gap.max()) > 1e-3


@pytest.mark.pretrained
def test_efficientnet_lite0_conserves(lite0: nn.Module, cat: Tensor) -> None:
    result = salience.deeplift(lite0, cat)
    assert float(relative_gap(result).max()) < 1e-4
    assert result.extras["gradient_ops"] == {}
    assert result.extras["nonlinearities"]["ReLU6"] > 20
    reveal = salience.deeplift(lite0, cat, rule="reveal_cancel")
    assert float(relative_gap(reveal).max()) < 1e-4
    assert not torch.allclose(reveal.values, result.values)


# -- closed forms ------------------------------------------------------------------------------


def test_zero_reference_bias_free_relu_net_is_gradient_times_input() -> None:
    """Without biases every reference activation is 0, so f(x)/x is the ReLU's derivative and
    a max-pool's share goes entirely to the input's argmax: DeepLIFT = gradient x input."""
    net = small_relu_pool_net(14, bias=False)
    x = inputs(3, 3, 11, seed=15)
    ours = salience.deeplift(net, x, [0, 1, 2])
    expected = salience.input_x_gradient(net, x, [0, 1, 2])
    torch.testing.assert_close(ours.values, expected.values, rtol=1e-5, atol=1e-7)
    # with biases, the reference activations are not zero and the two differ
    biased = small_relu_pool_net(14)
    a = salience.deeplift(biased, x, [0, 1, 2]).values
    b = salience.input_x_gradient(biased, x, [0, 1, 2]).values
    assert not torch.allclose(a, b, rtol=1e-3, atol=1e-5)


class Pair(nn.Module):
    """Two inputs ``x1, x2`` as a (N, 2, 1, 1) image; ``min`` or ``relu(x1 - x2)`` of them."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.diff = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.diff.weight.copy_(torch.tensor([[1.0, -1.0]]))

    def forward(self, x: Tensor) -> Tensor:
        v = x.flatten(1)
        h = F.relu(self.diff(v))  # relu(x1 - x2)
        if self.kind == "min":
            return v[:, :1] - h  # min(x1, x2) = x1 - relu(x1 - x2), the paper's Fig. 3
        return h


@pytest.mark.parametrize(
    ("kind", "pair", "rescale", "reveal"),
    [
        # min(x1, x2) with reference 0: Rescale gives all of it to the smaller input; RevealCancel
        # splits it evenly (paper, Sec. 3.5.3 and Fig. 3).
        ("min", (3.0, 1.0), (0.0, 1.0), (0.5, 0.5)),
        ("min", (1.0, 3.0), (1.0, 0.0), (0.5, 0.5)),
        # relu(x1 - x2) at (3, 1): P = 3, N = -1; dy+ = (3 + 2) / 2, dy- = (0 - 1) / 2.
        ("relu", (3.0, 1.0), (3.0, -1.0), (2.5, -0.5)),
    ],
)
def test_reveal_cancel_closed_forms(
    kind: str, pair: tuple[float, float], rescale: tuple[float, float], reveal: tuple[float, float]
) -> None:
    net = Pair(kind).eval()
    x = torch.tensor(pair).view(1, 2, 1, 1)
    a = salience.deeplift(net, x, 0, rule="rescale").values.flatten()
    b = salience.deeplift(net, x, 0, rule="reveal_cancel").values.flatten()
    torch.testing.assert_close(a, torch.tensor(rescale))
    torch.testing.assert_close(b, torch.tensor(reveal))


class ConvBNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(8, 8, 3, groups=2),
            nn.BatchNorm2d(8),
            nn.Tanh(),
        )
        self.fc = nn.Linear(8 * 5 * 5, 4)
        self.act = nn.ReLU6()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.act(F.linear(self.body(x).flatten(1), torch.eye(200))))


def test_reveal_cancel_conserves_through_batchnorm_and_refuses_residuals() -> None:
    net = _init(ConvBNNet(), 16)
    with torch.no_grad():  # negative BatchNorm scales swap the positive and negative parts
        net.body[1].weight[::2] *= -1
    x = inputs(3, seed=17)
    result = salience.deeplift(net, x, baseline=inputs(1, seed=18), rule="reveal_cancel")
    assert float(relative_gap(result).max()) < 1e-4
    rescale = salience.deeplift(net, x, baseline=inputs(1, seed=18))
    assert not torch.allclose(result.values, rescale.values, atol=1e-4)
    with pytest.raises(NotImplementedError, match="rule='rescale'"):
        salience.deeplift(_init(ResNetish(), 1), x, rule="reveal_cancel")


# -- Captum parity where Captum conserves ------------------------------------------------------


def test_parity_with_captum_without_pooling_after_relu() -> None:
    captum_attr = pytest.importorskip("captum.attr")
    net = _init(
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 5),
        ),
        19,
    )
    x = inputs(3, seed=20)
    x0 = inputs(1, seed=21).expand_as(x).contiguous()
    ours = salience.deeplift(net, x, [0, 3, 4], baseline=x0)
    theirs, delta = quiet(
        captum_attr.DeepLift(net).attribute,
        x,
        x0,
        target=[0, 3, 4],
        return_convergence_delta=True,
    )
    theirs = theirs.detach()
    scale = float(theirs.abs().max())
    torch.testing.assert_close(ours.values, theirs, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(ours.extras["delta"], delta, rtol=0, atol=1e-4)


# -- what the rules do not cover, and errors -----------------------------------------------------


class Gated(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(fc(mean(x)))``, a product of two input paths."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv(x))
        gate = torch.sigmoid(self.fc(h.mean((2, 3))))[:, :, None, None]
        return self.head((h * gate).mean((2, 3)))


def test_products_use_the_gradient_with_a_warning_and_an_honest_delta() -> None:
    net = _init(Gated(), 22)
    x = inputs(2, seed=23)
    with pytest.warns(UserWarning, match="mul .product of two input-dependent tensors. x 1"):
        result = salience.deeplift(net, x)
    assert result.extras["gradient_ops"] == {"mul (product of two input-dependent tensors)": 1}
    gap = exact_gap(net, x, torch.zeros_like(x), result)
    torch.testing.assert_close(result.extras["delta"].double(), gap, rtol=1e-4, atol=1e-5)


def test_probability_score_is_reported_as_not_exact() -> None:
    net = small_relu_pool_net(24)
    x = inputs(2, 3, 11, seed=25)
    with pytest.warns(UserWarning, match="softmax"):
        result = salience.deeplift(net, x, score="probability")
    assert "softmax" in result.extras["gradient_ops"]


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        h = torch.relu(h) if bool(x.mean() > 0) else torch.sigmoid(h)  # data-dependent
        return self.fc(h.mean((2, 3)))


def test_data_dependent_control_flow_is_an_error() -> None:
    x = inputs(1, seed=26).abs()
    with pytest.raises(RuntimeError, match="different operations on the input than on the ref"):
        salience.deeplift(_init(Branchy(), 27), x)


def test_bad_rule_and_baseline() -> None:
    net = small_relu_pool_net(0)
    x = inputs(1, 3, 11)
    with pytest.raises(ValueError, match="unknown rule"):
        salience.deeplift(net, x, rule="revealcancel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not broadcast"):
        salience.deeplift(net, x, baseline=torch.zeros(2, 3, 5, 5))
    with pytest.warns(UserWarning, match="zero everywhere"):
        salience.deeplift(net, x, baseline=x)


class LateInPlace(nn.Module):
    """Changes the input of a ReLU in place after the ReLU ran (``inplace``: ``y.mul_``)."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        z = torch.relu(y)
        y = y.mul_(0.5) if self.inplace else y * 0.5
        pooled = F.max_pool2d(z, 3, 2, padding=1).mean((1, 2, 3))[:, None, None, None]
        return self.fc((torch.relu(z + y) + pooled).mean((2, 3)))


def test_tensors_changed_in_place_after_the_reference_pass_are_recorded_as_copies() -> None:
    x = inputs(2, seed=28)
    x0 = inputs(1, seed=29)
    in_place = salience.deeplift(_init(LateInPlace(True), 30), x, baseline=x0)
    out_of_place = salience.deeplift(_init(LateInPlace(False), 30), x, baseline=x0)
    torch.testing.assert_close(in_place.values, out_of_place.values)
    assert float(relative_gap(in_place).max()) < 1e-4


# Zoo families whose every nonlinear operation has a DeepLIFT rule, and what the others run.
EXACT = {"PlainCNN", "ResNetBN", "DenseNetish", "Inceptionish", "TwoInput", "DenseOutput"}
NOT_COVERED = {
    "MobileNetish": {"mul (product of two input-dependent tensors)"},  # squeeze-excitation
    "ConvNeXtish": {"layer_norm"},
    "ViTish": {"layer_norm", "softmax", "matmul (product of two input-dependent tensors)"},
    "Swinish": {"layer_norm", "softmax", "matmul (product of two input-dependent tensors)"},
}


@pytest.mark.parametrize("family", sorted(EXACT | set(NOT_COVERED)))
def test_zoo_conserves_exactly_or_says_what_it_did_not_cover(family: str) -> None:
    import zoo

    case = zoo.build(family)
    args = {"forward_args": case.forward_args} if case.forward_args else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = salience.deeplift(case.model, case.inputs, case.target, **args)
    messages = [str(w.message) for w in caught if "deeplift" in str(w.message)]
    if family in EXACT:
        assert result.extras["gradient_ops"] == {}
        assert not messages
        assert float(relative_gap(result).max()) < 1e-4
    else:
        assert set(result.extras["gradient_ops"]) == NOT_COVERED[family]
        assert len(messages) == 1
        assert "extras['delta']" in messages[0]
        assert float(relative_gap(result).max()) > 1e-3  # the gap is real, and reported


def test_reveal_cancel_through_batchnorm_equals_the_folded_convolution() -> None:
    """Conv -> BN (eval, some negative scales) -> ReLU splits the fused layer's terms."""
    conv, bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
    unfolded = _init(nn.Sequential(conv, bn, nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 4)), 31)
    with torch.no_grad():
        bn.weight[::2] *= -1
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(3, 6, 3, padding=1)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        fused.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
    folded = nn.Sequential(fused, nn.ReLU(), nn.Flatten(), unfolded[4]).eval()
    x, x0 = inputs(2, 3, 8, seed=32), inputs(1, 3, 8, seed=33)
    a = salience.deeplift(unfolded, x, [0, 1], baseline=x0, rule="reveal_cancel")
    b = salience.deeplift(folded, x, [0, 1], baseline=x0, rule="reveal_cancel")
    torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-6)
    rescale = salience.deeplift(folded, x, [0, 1], baseline=x0)
    assert not torch.allclose(a.values, rescale.values, atol=1e-4)


class Tie(nn.Module):
    """``act(x1 - x2 + b)``: at ``x1 = x2`` the input and the reference meet at the same point."""

    def __init__(self, act: nn.Module, bias: float) -> None:
        super().__init__()
        self.act = act
        self.fc = nn.Linear(2, 1)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0]]))
            self.fc.bias.fill_(bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.fc(x.flatten(1)))


@pytest.mark.parametrize(
    ("act", "bias", "slope"),
    [
        (nn.ReLU(), 0.5, 1.0),
        (nn.ReLU(), -0.5, 0.0),
        (nn.ReLU6(), 7.0, 0.0),
        (nn.ReLU6(inplace=True), 3.0, 1.0),
        (
            nn.Sigmoid(),
            0.3,
            float(torch.sigmoid(torch.tensor(0.3)) * (1 - torch.sigmoid(torch.tensor(0.3)))),
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:deeplift. the map of sample")
def test_equal_input_and_reference_fall_back_to_the_derivative(
    act: nn.Module, bias: float, slope: float
) -> None:
    """x - x0 = 0 at the activation although the inputs moved: the multiplier is f'(x)."""
    x = torch.tensor([1.5, 1.5]).view(1, 2, 1, 1)
    result = salience.deeplift(Tie(act, bias).eval(), x, 0)
    torch.testing.assert_close(result.values.flatten(), torch.tensor([1.5, -1.5]) * slope)
