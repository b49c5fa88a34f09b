"""DeepLIFT: an independent layer-by-layer reference, summation-to-delta, closed forms, Captum.

The reference in :func:`reference_deeplift` computes the paper's multipliers layer by layer
on an explicit ``nn.Sequential`` (matrix products, transposed convolutions and a Python loop
over max-pooling windows), in float64, without salience's function mode or autograd.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

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


def test_reveal_cancel_conserves_through_batchnorm() -> None:
    net = _init(ConvBNNet(), 16)
    with torch.no_grad():  # negative BatchNorm scales swap the positive and negative parts
        net.body[1].weight[::2] *= -1
    x = inputs(3, seed=17)
    result = salience.deeplift(net, x, baseline=inputs(1, seed=18), rule="reveal_cancel")
    assert float(relative_gap(result).max()) < 1e-4
    rescale = salience.deeplift(net, x, baseline=inputs(1, seed=18))
    assert not torch.allclose(result.values, rescale.values, atol=1e-4)


# -- RevealCancel after residual sums, concatenations and other linear combinations -----------


class TinyRes(nn.Module):
    """Residual sums (identity and projection skips), BatchNorm, a 1x1 conv after a concat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.c1, self.bn1 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.c2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.c3, self.c4 = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.skip, self.bn_skip = nn.Conv2d(3, 4, 1, stride=2), nn.BatchNorm2d(4)
        self.mix = nn.Conv2d(7, 2, 1)
        self.fc = nn.Linear(8, 3)

    def pieces(self) -> dict[str, Callable[[Tensor], Tensor]]:
        """Each linear piece (an affine map of one neuron) between two activations."""
        return {
            "x>h1": lambda t: self.bn0(self.stem(t)),
            "h1>a": lambda t: self.bn1(self.c1(t)),
            "a>h2": lambda t: self.bn2(self.c2(t)),
            "h1>h2": lambda t: t,  # the identity skip
            "h2>c": self.c3,
            "c>h3": self.c4,
            "h2>h3": lambda t: self.bn_skip(self.skip(t)),  # the projection skip
            "h2>p": lambda t: F.avg_pool2d(t, 2),  # linear, no activation after it
            "h3>h4": lambda t: self.mix(torch.cat([t, t.new_zeros(t.shape[0], 3, 2, 2)], 1)),
            "p>h4": lambda t: F.conv2d(  # without the bias, counted in "h3>h4"
                torch.cat([t.new_zeros(t.shape[0], 4, 2, 2), t], 1), self.mix.weight
            ),
        }

    def forward(self, x: Tensor) -> Tensor:
        h1 = F.relu(self.bn0(self.stem(x)))
        a = torch.relu(self.bn1(self.c1(h1)))
        h2 = F.relu(self.bn2(self.c2(a)) + h1)
        c = F.relu(self.c3(h2))
        h3 = F.relu(torch.add(self.c4(c), self.bn_skip(self.skip(h2))))
        h4 = torch.tanh(self.mix(torch.cat([h3, F.avg_pool2d(h2, 2)], 1)))
        return self.fc(h4.flatten(1))


# each node: its output, its activation (None: a linear node) and the (piece, source) summed
# into its input
GRAPH = [
    ("h1", torch.relu, [("x>h1", "x")]),
    ("a", torch.relu, [("h1>a", "h1")]),
    ("h2", torch.relu, [("a>h2", "a"), ("h1>h2", "h1")]),
    ("p", None, [("h2>p", "h2")]),
    ("c", torch.relu, [("h2>c", "h2")]),
    ("h3", torch.relu, [("c>h3", "c"), ("h2>h3", "h2")]),
    ("h4", torch.tanh, [("h3>h4", "h3"), ("p>h4", "p")]),
]


def reference_reveal_cancel(net: TinyRes, x: Tensor, x0: Tensor, target: int) -> Tensor:
    """RevealCancel term by term (paper, Sec. 3.5.1 and 3.5.3) on one sample, in float64.

    Each linear piece is an explicit matrix (its response to the basis vectors); the input of
    each activation is the sum of the terms ``M[j, i] dv[i]`` of every piece that feeds it
    (``dv`` the whole difference of the piece's input, a neuron or the linear node ``p``), and
    ``dy+``, ``dy-`` are the sums of the positive and negative terms. Where a term is 0 its
    weight goes half to each part (the paper's rule for ``dx_i = 0``).
    """
    pieces = net.pieces()
    with torch.no_grad():
        values = {"x": (x.double()[None], x0.double()[None])}
        for name, f, feeds in GRAPH:
            z = [sum(pieces[p](values[src][k]) for p, src in feeds) for k in (0, 1)]
            values[name] = (z[0], z[1]) if f is None else (f(z[0]), f(z[1]))

        def matrix(piece: str, src: str) -> Tensor:
            shape = values[src][0].shape[1:]
            basis = torch.eye(values[src][0].numel(), dtype=torch.float64).view(-1, *shape)
            fn = pieces[piece]
            return (fn(basis) - fn(torch.zeros_like(basis[:1]))).flatten(1).T

        mult = {k: torch.zeros(v[0].numel(), dtype=torch.float64) for k, v in values.items()}
        mult["h4"] = net.fc.weight.double()[target].clone()
        for name, f, feeds in reversed(GRAPH):
            if f is None:  # a linear node: the multipliers go back by the piece's transpose
                for piece, src in feeds:
                    mult[src] += mult[name] @ matrix(piece, src)
                continue
            terms = []
            for piece, src in feeds:
                dv = (values[src][0] - values[src][1]).flatten()
                m = matrix(piece, src)
                terms.append((m, m * dv[None, :], src))
            pos = sum(t.clamp(min=0).sum(1) for _, t, _ in terms)
            neg = sum(t.clamp(max=0).sum(1) for _, t, _ in terms)
            z0 = sum((pieces[p](values[src][1])).flatten() for p, src in feeds)
            up = 0.5 * (f(z0 + pos) - f(z0)) + 0.5 * (f(z0 + neg + pos) - f(z0 + neg))
            down = 0.5 * (f(z0 + neg) - f(z0)) + 0.5 * (f(z0 + pos + neg) - f(z0 + pos))
            # a part that is exactly 0 (no term of that sign): the derivative at z0, as the
            # limit of the secant (what salience does below float resolution)
            slope = (z0 > 0).double() if f is torch.relu else 1 - torch.tanh(z0) ** 2
            m_pos = mult[name] * torch.where(pos != 0, up / pos.where(pos != 0, 1.0), slope)
            m_neg = mult[name] * torch.where(neg != 0, down / neg.where(neg != 0, 1.0), slope)
            for m, t, src in terms:
                tie = 0.5 * (m_pos + m_neg)[:, None]
                share = torch.where(t > 0, m_pos[:, None], torch.where(t < 0, m_neg[:, None], tie))
                mult[src] += (m * share).sum(0)
    return ((x - x0).double().flatten() * mult["x"]).view_as(x)


def tiny_res(seed: int) -> TinyRes:
    net = _init(TinyRes(), seed).double()
    with torch.no_grad():  # some negative BatchNorm scales: the parts swap there
        net.bn1.weight[1] *= -1
        net.bn_skip.weight[::2] *= -1
    return net


def test_reveal_cancel_after_residual_sums_equals_a_term_by_term_reference() -> None:
    net = tiny_res(40)
    x = inputs(2, 2, 4, seed=41).double()
    x0 = inputs(1, 2, 4, seed=42).double().expand_as(x)
    result = salience.deeplift(net, x, [0, 2], baseline=x0, rule="reveal_cancel")
    expected = torch.stack(
        [reference_reveal_cancel(net, x[k], x0[k], t) for k, t in enumerate([0, 2])]
    )
    torch.testing.assert_close(result.values, expected, rtol=1e-9, atol=1e-12)
    assert float(exact_gap(net, x, x0, result).abs().max()) < 1e-10
    rescale = salience.deeplift(net, x, [0, 2], baseline=x0)
    assert not torch.allclose(rescale.values, expected, atol=1e-3)


@pytest.mark.parametrize("rule", ["rescale", "reveal_cancel"])
def test_resnet_with_batchnorm_conserves(rule: str) -> None:
    net = _init(ResNetish(), 43)
    x = inputs(3, seed=44)
    for baseline in ("zeros", inputs(1, seed=45)):
        result = salience.deeplift(net, x, baseline=baseline, rule=rule)  # type: ignore[arg-type]
        assert float(relative_gap(result).max()) < 1e-4
        gap = exact_gap(net, x, result.extras["baseline"], result)
        assert float(gap.abs().max()) < 1e-4 * float(result.scores.abs().max())


class TwoWays(nn.Module):
    """``relu(conv_a(h) + conv_b(g))`` written as two convolutions summed, or as one on a concat.

    Both spell the same linear unit with the same terms, so RevealCancel must agree.
    """

    def __init__(self, summed: bool) -> None:
        super().__init__()
        self.summed = summed
        self.h, self.g = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)
        self.a, self.b = nn.Conv2d(4, 5, 3, padding=1), nn.Conv2d(2, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h, g = F.relu(self.h(x)), torch.sigmoid(self.g(x))
        if self.summed:
            z = torch.sub(self.a(h), self.b(g), alpha=-1.0)  # a(h) + b(g), spelled oddly
        else:
            w = torch.cat([self.a.weight, self.b.weight], 1)
            z = F.conv2d(torch.cat([h, g], 1), w, self.a.bias + self.b.bias, padding=1)
        return self.fc(F.relu(z).mean((2, 3)))


def test_reveal_cancel_sum_of_branches_equals_one_layer_on_their_concatenation() -> None:
    summed = _init(TwoWays(True), 46).double()
    concat = TwoWays(False).double()
    concat.load_state_dict(summed.state_dict())
    x, x0 = inputs(2, seed=47).double(), inputs(1, seed=48).double()
    a = salience.deeplift(summed, x, [0, 1], baseline=x0, rule="reveal_cancel")
    b = salience.deeplift(concat, x, [0, 1], baseline=x0, rule="reveal_cancel")
    torch.testing.assert_close(a.values, b.values, rtol=1e-10, atol=1e-12)
    assert float(relative_gap(a).max()) < 1e-10


class LinearZoo(nn.Module):
    """Activations fed through every kind of linear call the parts follow."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.ModuleList(nn.Conv2d(ci, 4, 3, padding=1) for ci in (3, 4, 8, 4))
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.fc = nn.Linear(16, 3)
        self.register_buffer("scale", torch.linspace(-1.5, 2.0, 4).view(1, 4, 1, 1))
        self.register_buffer(
            "proj", torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self.c[0](2.0 * x - 1.0))  # scalar product and difference on the input
        r = -self.c[1](h) * self.scale + h / 3.0  # negation, signed constant tensor, quotient
        g = F.gelu(F.pad(r, (1, 1, 1, 1), value=5.0)[..., 1:-1, 1:-1])  # padding, slicing
        left, right = torch.chunk(g, 2, dim=1)  # several outputs
        z = self.c[2](torch.cat([right, left, F.avg_pool2d(self.up(g), 2)], 1))
        z = F.interpolate(F.avg_pool2d(z, 2), scale_factor=2.0, mode="nearest")
        t = torch.tanh(z.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 4).transpose(1, 2))
        u = F.silu(t.flatten(1)[:, :16] @ self.proj)  # a matrix product with a constant
        return self.fc(u) + self.c[3](t.reshape(-1, 4, 16, 16)).mean((1, 2, 3))[:, None]


def test_reveal_cancel_follows_every_linear_call_and_conserves() -> None:
    net = _init(LinearZoo(), 49)
    x = inputs(2, seed=50)
    for baseline in ("zeros", inputs(1, seed=51)):
        result = salience.deeplift(net, x, baseline=baseline, rule="reveal_cancel")
        assert float(relative_gap(result).max()) < 1e-4
        assert result.extras["gradient_ops"] == {}
        assert sum(result.extras["nonlinearities"].values()) == 4
    rescale = salience.deeplift(net, x, rule="rescale")
    assert not torch.allclose(rescale.values, result.values, atol=1e-5)


class Uncovered(nn.Module):
    """An activation fed directly by an operation with no DeepLIFT rule."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        if self.kind == "product":
            h = torch.sigmoid(h) * h
        elif self.kind == "layer_norm":
            h = F.layer_norm(h, h.shape[1:])
        elif self.kind == "division":
            h = h / (1.0 + x.abs().mean((1, 2, 3), keepdim=True))
        return self.fc(F.relu(h + 1.0).mean((2, 3)))


@pytest.mark.parametrize(
    ("kind", "named"),
    [
        ("product", "`mul` (a product of two input-dependent tensors)"),
        ("layer_norm", "`layer_norm`"),
        ("division", "`div` (a division by an input-dependent tensor)"),
    ],
)
@pytest.mark.filterwarnings("ignore:deeplift. . operation")
def test_reveal_cancel_refuses_an_activation_fed_by_an_uncovered_operation(
    kind: str, named: str
) -> None:
    net = _init(Uncovered(kind), 52)
    with pytest.raises(NotImplementedError, match=re.escape(named)) as caught:
        salience.deeplift(net, inputs(1, seed=53), rule="reveal_cancel")
    assert "ReLU call" in str(caught.value)
    assert "rule='rescale'" in str(caught.value)
    salience.deeplift(net, inputs(1, seed=53))  # Rescale runs (with its warning)


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


class Dynamic(nn.Module):
    """A linear layer whose weight is computed from the input (a product of two paths)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 9)

    def forward(self, x: Tensor) -> Tensor:
        v = x.mean((2, 3))
        return F.linear(torch.relu(v), self.fc(v).view(-1, 3, 3)[0])


@pytest.mark.parametrize("rule", ["rescale", "reveal_cancel"])
def test_an_input_dependent_weight_is_reported(rule: str) -> None:
    net = _init(Dynamic(), 54)
    with pytest.warns(UserWarning, match="input-dependent weight"):
        result = salience.deeplift(net, inputs(1, seed=55), rule=rule)  # type: ignore[arg-type]
    assert result.extras["gradient_ops"] == {"linear (input-dependent weight)": 1}


class InPlaceBlock(nn.Module):
    """torchvision's ``out += identity`` then an in-place ReLU, or the same out of place."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        identity = self.relu(self.stem(x))
        out = self.bn(self.conv(identity))
        if self.inplace:
            out += identity
        else:
            out = out + identity
        return self.fc(self.relu(out).mean((2, 3)))


def test_reveal_cancel_follows_an_in_place_residual_addition() -> None:
    x, x0 = inputs(2, seed=56), inputs(1, seed=57)
    a = salience.deeplift(_init(InPlaceBlock(True), 58), x, baseline=x0, rule="reveal_cancel")
    b = salience.deeplift(_init(InPlaceBlock(False), 58), x, baseline=x0, rule="reveal_cancel")
    torch.testing.assert_close(a.values, b.values)
    assert float(relative_gap(a).max()) < 1e-4


def test_a_clamp_to_an_interval_takes_the_rescale_rule_as_hardtanh() -> None:
    """``clamp(x, -0.3, 0.3)`` was back-propagated with its gradient (and warned of)."""

    class Net(nn.Module):
        def __init__(self, act: Callable[[Tensor], Tensor]) -> None:
            super().__init__()
            self.act = act
            self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
            self.fc = nn.Linear(6, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(F.relu(self.c2(self.act(self.c1(x)))).mean((2, 3)))

    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    maps = []
    for act in (lambda t: F.hardtanh(t, -0.3, 0.3), lambda t: t.clamp(-0.3, 0.3)):
        torch.manual_seed(1)
        a = salience.deeplift(Net(act).double().eval(), x, 1)
        assert a.extras["nonlinearities"] == {"Hardtanh": 1, "ReLU": 1}
        assert a.extras["gradient_ops"] == {}
        maps.append(a.values)
    torch.testing.assert_close(maps[0], maps[1], rtol=0, atol=0)
