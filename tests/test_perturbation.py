"""Occlusion and RISE (salience.methods.perturbation) and the occlusion rank correlation.

- occlusion: parity with Captum's ``Occlusion`` on several windows and strides (windows that
  tile the image and windows cut off at the border), fills, batches and ``K`` targets; a
  closed form on a linear model; exact zeros outside a unit's receptive field;
- RISE: the masks against an independent re-implementation of the authors' construction; the
  map against its closed-form expectation on a linear model (a statistical test over seeds);
  seeds, batches, ``K`` targets;
- occlusion_correlation: 1 for the occlusion map itself, -1 reversed, and Spearman's
  coefficient against a slow reference with ties.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import salience
from conftest import ResNetish, VGGish, _init, slow_spearman
from salience.methods.incremental import plan_incremental
from salience.methods.perturbation import rise_masks
from salience.metrics import occlusion_correlation
from salience.metrics.occlusion import spearman

captum_attr = pytest.importorskip("captum.attr")


def images(n: int, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


class Linear(nn.Module):
    """``logits = W vec(x) + b``: every score is a known linear function of the pixels."""

    def __init__(self, c: int, h: int, w: int, classes: int = 3, region: int | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        weight = torch.randn(classes, c, h, w, generator=g)
        if region is not None:  # weights only in the top-left region x region
            keep = torch.zeros(h, w)
            keep[:region, :region] = 1
            weight = weight.abs() * keep
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.randn(classes, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nchw,kchw->nk", x, self.weight) + self.bias


class TopLeftUnit(nn.Module):
    """Two valid 3x3 convolutions; the logits are the channels of output unit (0, 0), whose
    receptive field is exactly the top-left 5x5 pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Tanh(), nn.Conv2d(6, 4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[:, :, 0, 0]


# -- occlusion ----------------------------------------------------------------------------------


def captum_occlusion(model, x, target, window, stride, baselines=0.0):
    wh, ww = (window, window) if isinstance(window, int) else window
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    c = x.shape[1]
    return captum_attr.Occlusion(model).attribute(
        x,
        sliding_window_shapes=(c, wh, ww),
        strides=(c, sh, sw),
        baselines=baselines,
        target=target,
        perturbations_per_eval=64,
    )


@pytest.mark.parametrize(
    ("size", "window", "stride"),
    [
        ((16, 16), 4, 4),  # tiles exactly
        ((16, 16), 5, 3),  # does not tile: the last window is cut off at the border
        ((17, 19), (4, 6), (3, 5)),  # rectangular windows on a rectangular image
        ((17, 19), 3, 1),
        ((16, 16), 16, 8),  # one window
        ((17, 19), (17, 2), (1, 2)),  # full height
    ],
)
def test_occlusion_matches_captum(size, window, stride) -> None:
    h, w = size
    model = _init(ResNetish(), 1)
    x = images(3, h, w)
    ours = salience.occlusion(model, x, [1, 4, 7], window=window, stride=stride, batch_size=7)
    theirs = captum_occlusion(model, x, [1, 4, 7], window, stride)
    torch.testing.assert_close(ours.values, theirs, rtol=1e-5, atol=1e-5)
    assert ours.values.shape == x.shape


@pytest.mark.parametrize("fill", ["zeros", 0.7, "mean", "tensor", "image"])
def test_occlusion_fills_match_captum_baselines(fill) -> None:
    model = _init(VGGish(), 0)
    x = images(2)
    if fill == "zeros":
        baseline = 0.0
    elif fill == "mean":
        baseline = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    elif fill == "tensor":  # one value per channel, broadcast
        fill = baseline = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    elif fill == "image":
        fill = baseline = images(1, seed=5)
    else:
        baseline = fill
    ours = salience.occlusion(model, x, [2, 3], window=6, stride=4, fill=fill)
    theirs = captum_occlusion(model, x, [2, 3], 6, 4, baselines=baseline)
    torch.testing.assert_close(ours.values, theirs, rtol=1e-5, atol=1e-5)


def test_occlusion_blur_fill_is_the_blurred_image() -> None:
    from salience.methods.integrated import gaussian_blur

    model = _init(VGGish(), 0)
    x = images(2)
    ours = salience.occlusion(model, x, 3, window=4, stride=2, fill="blur", blur_sigma=1.5)
    theirs = captum_occlusion(model, x, 3, 4, 2, baselines=gaussian_blur(x, 1.5))
    torch.testing.assert_close(ours.values, theirs, rtol=1e-5, atol=1e-5)
    default = salience.occlusion(model, x, 3, window=4, stride=2, fill="blur")  # sigma = 2
    theirs = captum_occlusion(model, x, 3, 4, 2, baselines=gaussian_blur(x, 2.0))
    torch.testing.assert_close(default.values, theirs, rtol=1e-5, atol=1e-5)


def test_occlusion_closed_form_on_a_linear_model() -> None:
    """1x1 windows on ``f = <w_k, x> + b``: the drop at a pixel is ``sum_c w_kc x_c`` there;
    with 3x3 windows, stride 1, each pixel averages the window sums over the windows covering
    it."""
    x = images(2, 8, 8).double()
    model = Linear(3, 8, 8).double()
    contrib = torch.einsum("nchw,chw->nhw", x, model.weight[2]).detach()
    one = salience.occlusion(model, x, 2, window=1, stride=1)
    torch.testing.assert_close(one.values, contrib[:, None].expand_as(x), rtol=1e-12, atol=1e-12)
    three = salience.occlusion(model, x, 2, window=3, stride=1)
    window_sums = torch.nn.functional.avg_pool2d(contrib[:, None], 3, 1) * 9  # (N, 1, 6, 6)
    expected = torch.zeros(2, 8, 8, dtype=torch.float64)
    count = torch.zeros(8, 8, dtype=torch.float64)
    for i in range(6):
        for j in range(6):
            expected[:, i : i + 3, j : j + 3] += window_sums[:, 0, i, j, None, None]
            count[i : i + 3, j : j + 3] += 1
    torch.testing.assert_close(three.values[:, 0], expected / count, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(three.extras["coverage"], count.long())
    # The score with the patch at each position: the clean score minus the window sum.
    clean = model(x)[:, 2].detach()
    torch.testing.assert_close(
        three.extras["occluded_scores"], clean[:, None, None] - window_sums[:, 0]
    )


@pytest.mark.parametrize("incremental", [True, False])
@pytest.mark.parametrize(("window", "stride"), [(2, 2), (3, 1), (4, 3)])
def test_occlusion_is_exactly_zero_outside_the_receptive_field(window, stride, incremental) -> None:
    """A pixel whose windows all miss the unit's 5x5 receptive field gets exactly 0; a pixel
    with a window that overlaps it gets a non-zero drop (generic weights)."""
    torch.manual_seed(0)
    model = TopLeftUnit().eval()
    x = images(2, 12, 12)
    result = salience.occlusion(model, x, 1, window=window, stride=stride, incremental=incremental)
    assert isinstance(result.extras["incremental"], list) == incremental
    starts = list(range(0, 12 - window + (-(12 - window) % stride) + 1, stride))
    touches = torch.zeros(12, 12, dtype=torch.bool)
    for i in starts:
        for j in starts:
            if i < 5 and j < 5:  # the window overlaps the receptive field
                touches[i : i + window, j : j + window] = True
    values = result.values[:, 0]
    assert (values[:, ~touches] == 0).all(), "attribution outside the receptive field"
    assert (values[:, touches] != 0).all()
    assert touches[:5, :5].all()
    assert not touches.all()


def test_occlusion_batches_targets_and_rows() -> None:
    model = _init(VGGish(), 0)
    x = images(3)
    reference = salience.occlusion(model, x, [1, 4, 7], window=5, stride=3)
    for batch_size in (1, 5, 1000):
        other = salience.occlusion(model, x, [1, 4, 7], window=5, stride=3, batch_size=batch_size)
        torch.testing.assert_close(other.values, reference.values, rtol=1e-5, atol=1e-5)
    for i, t in enumerate([1, 4, 7]):  # the same passes for a sample alone: the same bits
        for incremental in (True, False):
            alone = salience.occlusion(
                model, x[i : i + 1], t, window=5, stride=3, incremental=incremental
            )
            together = salience.occlusion(
                model, x, [1, 4, 7], window=5, stride=3, incremental=incremental
            )
            assert torch.equal(alone.values, together.values[i : i + 1])
    # K targets per sample from the same passes: (N, K, H, W), one single-channel map each.
    classes = torch.tensor([[1, 2], [4, 0], [7, 9]])
    several = salience.occlusion(model, x, classes, window=5, stride=3)
    assert several.values.shape == (3, 2, 16, 16)
    assert several.scores.shape == (3, 2)
    assert torch.equal(several.target, classes)
    for k in range(2):
        one = salience.occlusion(model, x, classes[:, k], window=5, stride=3)
        torch.testing.assert_close(several.values[:, k], one.values[:, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one per target"):
        several.saliency()
    assert reference.saliency().shape == (3, 16, 16)
    torch.testing.assert_close(reference.saliency(), reference.values[:, 0])


def test_occlusion_callable_target_and_probability_score() -> None:
    model = _init(VGGish(), 0)
    x = images(2)
    softmax = salience.occlusion(model, x, 5, window=4, stride=4, score="probability")
    theirs = captum_occlusion(lambda z: torch.softmax(model(z), 1), x, 5, 4, 4)
    torch.testing.assert_close(softmax.values, theirs, rtol=1e-5, atol=1e-5)
    called = salience.occlusion(model, x, lambda out: out[:, 5] * 2, window=4, stride=4)
    plain = salience.occlusion(model, x, 5, window=4, stride=4, batch_size=3)
    torch.testing.assert_close(called.values, 2 * plain.values, rtol=1e-5, atol=1e-5)
    assert called.target is None


class Recorder(nn.Module):
    """Records whether each forward pass ran in inference mode and with a graph."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return self.inner(x)


@pytest.mark.parametrize("method", ["occlusion", "rise"])
def test_no_autograd_graph_and_normal_results(method: str) -> None:
    model = Recorder(_init(VGGish(), 0))
    x = images(2)
    options = {"masks": 32} if method == "rise" else {"window": 8, "stride": 8}
    result = salience.explain(model, x, method=method, target=1, batch_size=4, **options)
    assert model.seen
    assert all(inference and not grad for inference, grad in model.seen)
    for tensor in (result.values, result.scores, result.output):
        assert not tensor.is_inference()
        assert not tensor.requires_grad
    # The results can enter the user's autograd computations.
    leaf = torch.ones(1, requires_grad=True)
    (leaf * result.values).sum().backward()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        salience.explain(model, x, method=method, target=1, **options)


def test_occlusion_bad_options() -> None:
    model = _init(VGGish(), 0)
    x = images(1)
    with pytest.raises(ValueError, match="larger than the 16x16"):
        salience.occlusion(model, x, window=20)
    with pytest.raises(ValueError, match="stride 5 is larger than the window 4"):
        salience.occlusion(model, x, window=4, stride=5)
    with pytest.raises(ValueError, match="unknown fill"):
        salience.occlusion(model, x, fill="grey")
    with pytest.raises(ValueError, match="broadcast"):
        salience.occlusion(model, x, fill=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="window must be a positive integer"):
        salience.occlusion(model, x, window=0)
    with pytest.raises(ValueError, match="pair"):
        salience.occlusion(model, x, window=(1, 2, 3))


def test_occlusion_float64_and_forward_args() -> None:
    class WithScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _init(VGGish(), 0)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.net(x) * scale[:, None]

    model = WithScale().double()
    x = images(3).double()
    scale = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    result = salience.occlusion(model, x, 1, window=8, stride=4, forward_args=(scale,))
    assert result.values.dtype == torch.float64
    for i in range(3):
        alone = salience.occlusion(
            model.net, x[i : i + 1], 1, window=8, stride=4, batch_size=2
        ).values
        torch.testing.assert_close(result.values[i : i + 1], scale[i] * alone)


# -- RISE ---------------------------------------------------------------------------------------


def bilinear_weights(size: int, cells: int, up: int) -> np.ndarray:
    """``(up, cells)`` weights of bilinear upsampling with half-pixel centres (align_corners
    False; skimage's ``resize(order=1, mode='reflect')`` for upsampling)."""
    weights = np.zeros((up, cells))
    for i in range(up):
        src = max((i + 0.5) * cells / up - 0.5, 0.0)
        lo = min(math.floor(src), cells - 1)
        hi = min(lo + 1, cells - 1)
        frac = src - lo
        weights[i, lo] += 1 - frac
        weights[i, hi] += frac
    return weights


def test_rise_masks_are_the_papers_construction() -> None:
    """Mask i: the Bernoulli grid upsampled bilinearly to (s + 1) * ceil(H / s), cropped at a
    shift in 0 .. cell - 1, re-implemented here from the same random draws."""
    count, cells, p, h, w = 20, 3, 0.4, 10, 13
    like = torch.zeros(1, dtype=torch.float64)
    masks = rise_masks(count, cells, p, 5, (h, w), like)
    gen = torch.Generator().manual_seed(5)
    grid = (torch.rand(count, 1, cells, cells, generator=gen) < p).double()[:, 0].numpy()
    cell_h, cell_w = math.ceil(h / cells), math.ceil(w / cells)
    shift_y = torch.randint(0, cell_h, (count,), generator=gen).numpy()
    shift_x = torch.randint(0, cell_w, (count,), generator=gen).numpy()
    wy = bilinear_weights(h, cells, (cells + 1) * cell_h)
    wx = bilinear_weights(w, cells, (cells + 1) * cell_w)
    for i in range(count):
        up = wy @ grid[i] @ wx.T
        crop = up[shift_y[i] : shift_y[i] + h, shift_x[i] : shift_x[i] + w]
        np.testing.assert_allclose(masks[i].numpy(), crop, rtol=0, atol=1e-12)
    assert masks.min() >= 0
    assert masks.max() <= 1
    many = rise_masks(20000, 4, 0.3, 1, (12, 12), torch.zeros(1))
    # E[M] = p at every pixel; the per-pixel standard error is at most 0.5 / sqrt(20000).
    assert (many.mean(0) - 0.3).abs().max() < 6 * 0.5 / math.sqrt(20000)


def rise_expectation(model: Linear, x: torch.Tensor, k: int, cells: int, p: float):
    """``E[S(l)] = b + p sum_l' c_l' + (1 - p) sum_l' c_l' G(l, l')`` for ``f = sum c_l x_l + b``,
    with ``G(l, l') = E_shift[sum_a w_a(l) w_a(l')]`` from the bilinear weights: the cells are
    independent Bernoulli(p), so ``E[g_a g_b] = p^2 + p (1 - p) [a = b]``."""
    _, _, h, w = x.shape
    c = torch.einsum("chw,chw->hw", x[0], model.weight[k]).detach().double().numpy()
    b = float(model.bias[k].detach())

    def g(size: int) -> np.ndarray:
        cell = math.ceil(size / cells)
        weights = bilinear_weights(size, cells, (cells + 1) * cell)
        return np.mean(
            [weights[s : s + size] @ weights[s : s + size].T for s in range(cell)], axis=0
        )

    gy, gx = g(h), g(w)
    return b + p * c.sum() + (1 - p) * (gy @ c @ gx.T)


def test_rise_matches_its_expectation_on_a_linear_model() -> None:
    """The map of each seed is an unbiased estimate of the closed form (logit score): over
    R = 16 seeds, the mean is within 6 standard errors (estimated from the seeds, a t-test
    with 15 degrees of freedom: P(|t| > 6) < 3e-5 per pixel) at every pixel, and the closed
    form is far from what a wrong normalisation (N instead of N p) or no correlation term
    would give."""
    h = w = 12
    cells, p, masks, seeds = 3, 0.5, 1000, 16
    model = Linear(3, h, w, region=5).double()
    x = images(1, h, w, seed=3).double().abs()
    expected = torch.from_numpy(rise_expectation(model, x, 0, cells, p))
    maps = torch.stack(
        [
            salience.rise(model, x, 0, masks=masks, cells=cells, p=p, seed=s, score="logit")
            .values[0, 0]
            .double()
            for s in range(seeds)
        ]
    )
    mean, spread = maps.mean(0), maps.std(0)
    stderr = spread / math.sqrt(seeds)
    assert ((mean - expected).abs() <= 6 * stderr).all()
    # Power: the structure of the map is resolved, not drowned in noise.
    structure = expected - expected.mean()
    assert (mean - expected).abs().max() < 0.1 * structure.abs().max()
    # The map's peak lies in the region the score depends on.
    peak = int(mean.argmax())
    assert peak // w < 5
    assert peak % w < 5


def test_rise_seeds_batches_and_targets() -> None:
    model = _init(VGGish(), 0)
    x = images(3)
    options = {"masks": 300, "cells": 4}
    a = salience.rise(model, x, [1, 4, 7], seed=1, **options)
    b = salience.rise(model, x, [1, 4, 7], seed=1, **options)
    c = salience.rise(model, x, [1, 4, 7], seed=2, **options)
    assert torch.equal(a.values, b.values)
    assert not torch.allclose(a.values, c.values)
    for batch_size in (1, 7, 10_000):
        other = salience.rise(model, x, [1, 4, 7], seed=1, batch_size=batch_size, **options)
        torch.testing.assert_close(other.values, a.values, rtol=1e-5, atol=1e-7)
    for i, t in enumerate([1, 4, 7]):  # the same passes for a sample alone: the same bits
        alone = salience.rise(model, x[i : i + 1], t, seed=1, **options)
        assert torch.equal(alone.values, a.values[i : i + 1])
    # Every channel holds the map; probabilities by default (the paper's softmax).
    assert torch.equal(a.values[:, 0], a.values[:, 2])
    probability = salience.rise(model, x, [1, 4, 7], seed=1, score="probability", **options)
    assert torch.equal(probability.values, a.values)
    torch.testing.assert_close(a.scores, torch.softmax(model(x), 1)[[0, 1, 2], [1, 4, 7]])
    classes = torch.tensor([[1, 2], [4, 0], [7, 9]])
    several = salience.rise(model, x, classes, seed=1, **options)
    assert several.values.shape == (3, 2, 16, 16)
    for k in range(2):
        one = salience.rise(model, x, classes[:, k], seed=1, **options)
        torch.testing.assert_close(several.values[:, k], one.values[:, 0], rtol=1e-5, atol=1e-7)


def test_rise_bad_options() -> None:
    model = _init(VGGish(), 0)
    x = images(1)
    for p in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="p, the probability"):
            salience.rise(model, x, p=p)
    with pytest.raises(ValueError, match="cells=20"):
        salience.rise(model, x, cells=20)
    with pytest.raises(ValueError, match="masks must be a positive integer"):
        salience.rise(model, x, masks=0)
    with pytest.raises(ValueError, match="seed"):
        salience.rise(model, x, seed=1.5)


# -- occlusion correlation --------------------------------------------------------------------


def test_spearman_with_ties_matches_a_slow_reference() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (4, 60), generator=g).double()  # many ties
    b = torch.randn(4, 60, generator=g) + a
    ours = spearman(a, b)
    for i in range(4):
        assert ours[i].item() == pytest.approx(slow_spearman(a[i], b[i]), 1e-12)
    assert torch.isnan(spearman(torch.ones(1, 5), torch.arange(5.0)[None]))[0]


def test_occlusion_correlation_of_the_occlusion_map_is_one() -> None:
    model = _init(VGGish(), 0)
    x = images(2)
    reference = salience.occlusion(model, x, [1, 4], window=4, stride=2)
    same = occlusion_correlation(model, x, reference, window=4, stride=2)
    torch.testing.assert_close(same, torch.ones(2, dtype=torch.float64))
    reverse = occlusion_correlation(model, x, -reference.values[:, 0], [1, 4], reference=reference)
    torch.testing.assert_close(reverse, -torch.ones(2, dtype=torch.float64))
    gradient = salience.gradient(model, x, [1, 4])
    rho = occlusion_correlation(model, x, gradient, window=4, stride=2)
    expected = [
        slow_spearman(
            gradient.saliency()[i].flatten().numpy(), reference.values[i, 0].flatten().numpy()
        )
        for i in range(2)
    ]
    torch.testing.assert_close(rho, torch.tensor(expected, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        occlusion_correlation(model, x, torch.zeros(2, 8, 8), reference=reference)
    with pytest.warns(UserWarning, match="constant"):
        flat = occlusion_correlation(model, x, torch.ones(2, 16, 16), reference=reference)
    assert torch.isnan(flat).all()


# -- exact incremental inference (Krypton) ------------------------------------------------------


def assert_same_as_full(model: nn.Module, x: torch.Tensor, target, **options) -> list[str] | str:
    """Incremental and full occlusion agree to 1e-5 relative; return what ran by box."""
    fast = salience.occlusion(model, x, target, **options)
    full = salience.occlusion(model, x, target, incremental=False, **options)
    occluded, reference = fast.extras["occluded_scores"], full.extras["occluded_scores"]
    scale = float(reference.abs().max())
    torch.testing.assert_close(occluded, reference, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(fast.scores, full.scores, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(
        fast.values, full.values, rtol=0, atol=1e-5 * float(full.values.abs().max())
    )
    assert full.extras["incremental"] == "off"
    return fast.extras["incremental"]


@pytest.mark.parametrize("name", list(__import__("zoo").ZOO))
def test_incremental_equals_full_recomputation_on_the_zoo(name: str) -> None:
    import zoo

    case = zoo.build(name)
    options = {"window": 8, "stride": 4}
    if case.forward_args:
        options["forward_args"] = case.forward_args
    ran = assert_same_as_full(case.model, case.inputs, case.target, **options)
    if name == "TwoInput":
        assert "forward arguments" in ran
    else:  # every zoo CNN (and the transformers' patchify stems) runs some layers by box
        assert isinstance(ran, list)
        assert ran


class TFStyle(nn.Module):
    """EfficientNet-Lite-like: TensorFlow 'same' padding (ZeroPad2d + functional conv2d,
    asymmetric), BatchNorm, ReLU6, depthwise convolutions, residual sums, max and average
    pooling with padding, a dilated convolution, then global pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.stem = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.project = nn.Conv2d(8, 8, 1)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.avg = nn.AvgPool2d(2)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(torch.nn.functional.conv2d(self.pad(x), self.stem, None, 2)))
        x = x + self.project(self.act(self.depthwise(x)))  # a residual sum
        x = self.avg(torch.relu(self.dilated(self.pool(x))))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize(("window", "stride"), [(4, 4), (5, 3), (9, 7), (3, 1)])
def test_incremental_on_tensorflow_padding_residuals_and_pooling(window, stride) -> None:
    model = _init(TFStyle(), 4)
    x = images(2, 33, 35)
    ran = assert_same_as_full(model, x, [1, 3], window=window, stride=stride, batch_size=16)
    assert "pad" in ran
    assert "add" in ran


def test_incremental_with_k_targets_callable_targets_and_blur() -> None:
    model = _init(ResNetish(), 1)
    x = images(3)
    classes = torch.tensor([[1, 2], [4, 0], [7, 9]])
    assert isinstance(assert_same_as_full(model, x, classes, window=5, stride=3), list)
    callable_ran = assert_same_as_full(
        model, x, lambda out: out[:, 2] - out[:, 3], window=4, stride=2, fill="blur"
    )
    assert isinstance(callable_ran, list)


def test_incremental_falls_back_with_a_reason() -> None:
    model = _init(VGGish(), 0)
    x = images(2)
    handle = model.features[0].register_forward_hook(lambda *args: None)
    try:
        assert "hooks" in assert_same_as_full(model, x, 1, window=4, stride=4)
    finally:
        handle.remove()
    model.train()  # no BatchNorm or Dropout here: the same maps, but no tracing in training
    assert "training mode" in assert_same_as_full(model, x, 1, window=4, stride=4)
    model.eval()
    assert "off" in salience.occlusion(model, x, 1, incremental=False).extras["incremental"]
    # A window as large as the image: every box is the whole map, still exact.
    assert isinstance(assert_same_as_full(model, x, 1, window=16, stride=8), list)


class WithConstant(nn.Module):
    """A forward that makes a tensor constant: fx stores such constants on the traced root."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
        return self.fc(x.mean((2, 3)))


def test_tracing_leaves_the_model_alone() -> None:
    model = _init(WithConstant(), 0)
    before = {name: sorted(vars(m)) for name, m in model.named_modules()}
    ran = assert_same_as_full(model, images(2), 1, window=4, stride=4)
    assert "conv" in ran
    assert {name: sorted(vars(m)) for name, m in model.named_modules()} == before


class Fusable(nn.Module):
    """The patterns the incremental kernels rewrite: conv -> BN -> ReLU6 (folded, in place),
    a BN output read twice (a residual: not in place), a depthwise convolution
    (channels-last); optionally a BatchNorm without running statistics."""

    def __init__(self, batch_stats: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.act2 = nn.ReLU()
        self.mix = nn.Conv2d(8, 8, 1)
        self.stats = nn.BatchNorm2d(8, track_running_stats=False) if batch_stats else None
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(x)))
        y = self.bn2(self.depthwise(x))
        x = self.mix(self.act2(y)) + y  # bn2's output has two readers
        if self.stats is not None:
            x = self.stats(x)
        return self.head(x.mean((2, 3)))


def test_incremental_kernels_fold_and_alias_exactly() -> None:
    model = _init(Fusable(), 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ran = assert_same_as_full(model, images(3, 20, 18), [0, 3, 1], window=5, stride=3)
    assert {"conv", "bn", "act", "depthwise", "bn2", "act2", "mix"} <= set(ran)
    after = model.state_dict()  # folding works on copies: parameters and buffers untouched
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Batch statistics (no running ones): not an elementwise layer, never run by box.
    plan, _ = plan_incremental(Fusable(batch_stats=True).eval(), False)
    assert plan is not None
    assert "model_stats" not in {node.name for node in plan.layers}
    assert "model_bn2" in {node.name for node in plan.layers}


@pytest.mark.parametrize("case", ["tfstyle", "fusable", "resnetish_callable"])
def test_incremental_crops_and_pastes_by_index_as_on_a_gpu(case, monkeypatch) -> None:
    """Off the CPU, crops and pastes are one indexed copy each (no coordinates on the host):
    forced here on the CPU, they give the row-by-row maps bit for bit."""
    from salience.methods import _incremental_kernels

    if case == "tfstyle":
        model, x, target = _init(TFStyle(), 4), images(2, 33, 35), [1, 3]
        options = {"window": 5, "stride": 3, "batch_size": 16}
    elif case == "fusable":
        model, x, target = _init(Fusable(), 3), images(3, 20, 18), [0, 3, 1]
        options = {"window": 5, "stride": 3}
    else:
        model, x = _init(ResNetish(), 1), images(3)
        target, options = (lambda out: out[:, 2] - out[:, 3]), {"window": 4, "stride": 2}
    rows = salience.occlusion(model, x, target, **options)
    monkeypatch.setattr(_incremental_kernels, "_row_wise", lambda device: False)
    indexed = salience.occlusion(model, x, target, **options)
    assert isinstance(indexed.extras["incremental"], list)
    assert torch.equal(indexed.values, rows.values)
    assert torch.equal(indexed.extras["occluded_scores"], rows.extras["occluded_scores"])
