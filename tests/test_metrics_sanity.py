"""Sanity checks (Adebayo et al. 2018): similarity measures against known answers and slow
references, the randomization of a copy, and the paper's finding on EfficientNet-Lite0."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import salience
from conftest import slow_spearman
from salience.attribution import Attribution
from salience.metrics import (
    SanityCheck,
    hog_features,
    hog_similarity,
    parameter_randomization,
    plot_sanity_checks,
    randomization_layers,
    rank_correlation,
    ssim,
)
from test_contract import assert_same, prepared, snapshot

GEN = torch.Generator().manual_seed(5)


def _skimage():
    try:
        from skimage.feature import hog
        from skimage.metrics import structural_similarity
    except ImportError:
        pytest.skip("scikit-image is not installed")
    return hog, structural_similarity


# ----------------------------------------------------------------------- rank correlation


def test_rank_correlation_known_answers_and_slow_reference():
    a = torch.randn(3, 8, 8, generator=GEN)
    assert torch.allclose(rank_correlation(a, a), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(rank_correlation(a, -a), -torch.ones(3, dtype=torch.float64))
    # a monotone transform keeps the ranks
    assert torch.allclose(rank_correlation(a, a.exp() * 3 + 1), torch.ones(3, dtype=torch.float64))
    # ties: values rounded to a few levels
    x = (torch.randn(4, 50, generator=GEN) * 2).round()
    y = (x + torch.randn(4, 50, generator=GEN)).round()
    got = rank_correlation(x, y)
    want = [slow_spearman(x[i], y[i]) for i in range(4)]
    assert got.tolist() == pytest.approx(want, abs=1e-12)


def test_rank_correlation_of_independent_maps_is_near_zero_and_constant_is_nan():
    a = torch.rand(8, 64, 64, generator=GEN)
    b = torch.rand(8, 64, 64, generator=GEN)
    r = rank_correlation(a, b)
    assert r.abs().max() < 0.06  # sd 1/sqrt(4096) = 0.016
    c = rank_correlation(torch.zeros(1, 4, 4), a[:1, :4, :4])
    assert math.isnan(float(c))
    with pytest.raises(ValueError, match="differ in shape"):
        rank_correlation(a, b[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        rank_correlation(a, b * math.nan)


def test_rank_correlation_matches_scipy_when_available():
    stats = pytest.importorskip("scipy.stats")
    x = (torch.randn(3, 200, generator=GEN) * 3).round()
    y = x + torch.randn(3, 200, generator=GEN)
    want = [stats.spearmanr(x[i].numpy(), y[i].numpy())[0] for i in range(3)]
    assert rank_correlation(x, y).tolist() == pytest.approx(want, abs=1e-12)


# ----------------------------------------------------------------------- SSIM


def _slow_ssim(a: np.ndarray, b: np.ndarray, data_range: float, sigma: float = 1.5) -> float:
    """Wang et al. with an explicit loop over every window position (float64)."""
    r = int(3.5 * sigma + 0.5)
    t = np.arange(-r, r + 1)
    g1 = np.exp(-0.5 * (t / sigma) ** 2)
    g = np.outer(g1, g1)
    g /= g.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    h, w = a.shape
    values = []
    for i in range(r, h - r):
        for j in range(r, w - r):
            pa = a[i - r : i + r + 1, j - r : j + r + 1]
            pb = b[i - r : i + r + 1, j - r : j + r + 1]
            ma, mb = (g * pa).sum(), (g * pb).sum()
            va = (g * (pa - ma) ** 2).sum()
            vb = (g * (pb - mb) ** 2).sum()
            cov = (g * (pa - ma) * (pb - mb)).sum()
            values.append(
                ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
    return float(np.mean(values))


def test_ssim_closed_forms():
    a = torch.rand(2, 20, 24, generator=GEN)
    assert torch.allclose(ssim(a, a, data_range=1.0), torch.ones(2, dtype=torch.float64))
    # constant maps: sigma = 0 everywhere, SSIM = (2 c1 c2 + C1) / (c1^2 + c2^2 + C1)
    c1, c2, big_c1 = 0.3, 0.7, (0.01 * 1.0) ** 2
    want = (2 * c1 * c2 + big_c1) / (c1**2 + c2**2 + big_c1)
    got = ssim(torch.full((1, 16, 16), c1), torch.full((1, 16, 16), c2), data_range=1.0)
    assert float(got) == pytest.approx(want, rel=1e-6)
    # symmetric, and below 1 for a rescaled map
    z = torch.rand(1, 32, 32, generator=GEN)
    assert torch.equal(ssim(z, 0.5 * z, data_range=1.0), ssim(0.5 * z, z, data_range=1.0))
    assert float(ssim(z, 0.5 * z, data_range=1.0)) < 0.9


def test_ssim_matches_slow_reference():
    a = torch.rand(2, 19, 23, generator=GEN, dtype=torch.float64)
    b = (a + 0.3 * torch.rand(2, 19, 23, generator=GEN, dtype=torch.float64)).clamp(0, 1)
    got = ssim(a, b, data_range=1.0)
    want = [_slow_ssim(a[i].numpy(), b[i].numpy(), 1.0) for i in range(2)]
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    # default data range: that of both maps together, per sample
    spans = [float(torch.cat([a[i], b[i]]).max() - torch.cat([a[i], b[i]]).min()) for i in range(2)]
    want = [_slow_ssim(a[i].numpy(), b[i].numpy(), spans[i]) for i in range(2)]
    assert ssim(a, b).tolist() == pytest.approx(want, abs=1e-12)


def test_ssim_matches_skimage():
    _, structural_similarity = _skimage()
    a = torch.rand(2, 40, 33, generator=GEN, dtype=torch.float64)
    b = (0.6 * a + 0.4 * torch.rand(2, 40, 33, generator=GEN, dtype=torch.float64)).clamp(0, 1)
    options = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}
    want = [
        structural_similarity(a[i].numpy(), b[i].numpy(), data_range=1.0, **options)
        for i in range(2)
    ]
    assert ssim(a, b, data_range=1.0).tolist() == pytest.approx(want, abs=1e-10)


def test_ssim_of_independent_noise_is_near_zero_and_small_maps_refused():
    a = torch.rand(4, 64, 64, generator=GEN)
    b = torch.rand(4, 64, 64, generator=GEN)
    assert ssim(a, b, data_range=1.0).abs().max() < 0.05
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim(a[:, :8, :8], b[:, :8, :8])


# ----------------------------------------------------------------------- HOG


def _stripes(vertical: bool, size: int = 48, period: int = 6, phase: int = 0) -> torch.Tensor:
    t = ((torch.arange(size) + phase) // (period // 2)) % 2
    img = t.expand(size, size).double()
    return (img if vertical else img.T).unsqueeze(0)


def test_hog_of_stripes_votes_in_the_right_orientation():
    vertical, horizontal = _stripes(True), _stripes(False)
    fv = hog_features(vertical).view(-1, 9)
    fh = hog_features(horizontal).view(-1, 9)
    # vertical stripes vary along columns: gradient angle 0 degrees, bin 0;
    # horizontal stripes: 90 degrees, bin 4 ([80, 100))
    assert fv.sum(0).argmax() == 0
    assert fv.sum(0)[1:].abs().max() == 0
    assert fh.sum(0).argmax() == 4
    assert (fh.sum(0).sum() - fh.sum(0)[4]).abs() < 1e-12
    shifted = _stripes(True, phase=2)
    sim = hog_similarity(torch.cat([vertical, vertical]), torch.cat([horizontal, shifted]))
    assert sim[0] < 0  # orthogonal orientations: anti-correlated descriptors
    assert sim[1] > 0.9  # same orientation, shifted stripes
    assert float(hog_similarity(vertical, vertical)) == pytest.approx(1.0)


def test_hog_matches_skimage():
    hog, _ = _skimage()
    maps = torch.rand(2, 45, 53, generator=GEN, dtype=torch.float64)
    for cell, block in ((8, 3), (5, 2)):
        got = hog_features(maps, cell=cell, block=block)
        for i in range(2):
            want = hog(
                maps[i].numpy(), orientations=9, pixels_per_cell=(cell, cell),
                cells_per_block=(block, block), block_norm="L2-Hys", feature_vector=True,
            )  # fmt: skip
            assert got[i].numpy() == pytest.approx(want, abs=1e-6)


def test_hog_refuses_maps_smaller_than_a_block():
    with pytest.raises(ValueError, match="at least 24x24"):
        hog_features(torch.rand(1, 20, 30))


# ----------------------------------------------------------------------- layers


def test_default_layers_group_blocks_and_norms(resnet, images):
    layers = randomization_layers(resnet, images)
    assert layers == [
        ("stem.0", ["stem.0", "stem.1"]),
        ("layer1.conv1", ["layer1.conv1", "layer1.bn1"]),
        ("layer1.conv2", ["layer1.conv2", "layer1.bn2"]),
        ("down.0", ["down.0", "down.1"]),
        ("layer2.conv1", ["layer2.conv1", "layer2.bn1"]),
        ("layer2.conv2", ["layer2.conv2", "layer2.bn2"]),
        ("fc", ["fc"]),
    ]
    units = randomization_layers(resnet, images, "units")
    assert len(units) == 13
    assert units[1] == ("stem.1", ["stem.1"])
    named = randomization_layers(resnet, images, ["layer1", ["down", "layer2"], "fc"])
    assert [label for label, _ in named] == ["layer1", "down+layer2", "fc"]
    assert named[1][1] == ["down.0", "down.1", *[f"layer2.{n}" for n in
                                                   ("conv1", "bn1", "conv2", "bn2")]]  # fmt: skip
    with pytest.raises(ValueError, match="did you mean 'layer1'"):
        randomization_layers(resnet, images, ["layer_1"])
    with pytest.raises(ValueError, match="no parameters"):
        randomization_layers(resnet, images, ["relu"])


# ----------------------------------------------------------------------- the check


def _fixed_method(values: torch.Tensor):
    """A 'method' that ignores the model: the same map whatever the weights."""

    def method(model, inputs, target):
        return Attribution(values=values.clone(), target=None, scores=torch.zeros(len(values)),
                           method="fixed")  # fmt: skip

    return method


def test_a_map_that_ignores_the_model_stays_identical_and_fails(vgg, images):
    values = torch.rand(3, 3, 16, 16, generator=GEN)
    check = parameter_randomization(vgg, images, _fixed_method(values))
    for measure in ("spearman_abs", "spearman", "ssim", "hog"):
        assert torch.allclose(check.similarity[measure], torch.ones(5, 3, dtype=torch.float64))
    assert check.passed is False
    assert "stay similar" in check.verdict()
    assert "fails" in check.verdict()
    assert check.layers == ("classifier.3", "classifier.1", "features.5", "features.2",
                            "features.0")  # fmt: skip


@pytest.mark.parametrize("mode", ["cascading", "independent"])
def test_the_methods_warnings_are_shown_for_the_trained_model_only(vgg, images, mode):
    """A randomized model's maps may well be all zero: the method's warnings about them are
    not the user's; those on the trained model are shown."""
    values = torch.rand(3, 3, 16, 16, generator=GEN)
    fixed = _fixed_method(values)

    def method(model, inputs, target):
        warnings.warn("about this map", UserWarning, stacklevel=1)
        return fixed(model, inputs, target)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parameter_randomization(vgg, images, method, mode=mode)
    assert [str(w.message) for w in caught] == ["about this map"]


def test_independent_random_maps_have_similarity_near_zero(vgg):
    calls = iter(range(100))
    x = torch.randn(2, 3, 96, 96, generator=GEN)

    class Small(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    def noise(model, inputs, target):
        g = torch.Generator().manual_seed(next(calls))
        return Attribution(values=torch.randn(inputs.shape, generator=g), target=None,
                           scores=torch.zeros(len(inputs)), method="noise")  # fmt: skip

    check = parameter_randomization(Small(), x, noise)
    for measure in ("spearman_abs", "spearman", "ssim"):
        assert check.similarity[measure].abs().max() < 0.05, measure
    # HOG descriptors of independent noise correlate a little (mean 0.05 at 96 px over 200
    # pairs, at most 0.15): a pixel grid favours some orientation bins in every image alike
    assert check.similarity["hog"].max() < 0.2
    assert check.passed is True
    assert "passes" in check.verdict()


def test_users_model_is_untouched_also_when_the_method_raises(images):
    model = prepared("resnet", training=True)
    before = snapshot(model)
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # training mode warns
        check = parameter_randomization(model, images, "gradient", mode="cascading")
        assert_same(before, snapshot(model))
        parameter_randomization(model, images, "gradient", mode="independent", checkpoints=3)
        assert_same(before, snapshot(model))
    assert check.maps is not None
    assert check.maps.shape == (7, 3, 16, 16)

    calls = []

    def flaky(m, x, t):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return salience.gradient(m, x, t)

    model.eval()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        parameter_randomization(model, images, flaky)
    assert_same(before, snapshot(model))
    calls.clear()
    with pytest.raises(RuntimeError, match="boom"):
        parameter_randomization(model, images, flaky, mode="independent")
    assert_same(before, snapshot(model))
    assert torch.equal(rng, torch.get_rng_state())  # the global random state is left alone


def _recording(states: list):
    def method(model, inputs, target):
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return salience.gradient(model, inputs, target)

    return method


def test_cascading_is_cumulative_from_the_top_and_independent_one_at_a_time(resnet, images):
    trained = {k: v.clone() for k, v in resnet.state_dict().items()}
    cascade: list = []
    check = parameter_randomization(resnet, images, _recording(cascade), seed=3)
    assert check.layers[0] == "fc"
    assert check.layers[-1] == "stem.0"
    assert [len(r) for r in check.randomized] == [1, 3, 5, 7, 9, 11, 13]
    alone: list = []
    ind = parameter_randomization(resnet, images, _recording(alone), seed=3, mode="independent")
    assert ind.randomized[1] == ("layer2.conv2", "layer2.bn2")

    def changed(state):
        return {k.rsplit(".", 1)[0] for k in state if not torch.equal(state[k], trained[k])}

    assert changed(cascade[0]) == set()  # the first call is on the trained copy
    assert changed(cascade[1]) == {"fc"}
    assert changed(cascade[2]) == {"fc", "layer2.conv2", "layer2.bn2"}
    assert changed(cascade[-1]) == {k.rsplit(".", 1)[0] for k in trained}
    assert changed(alone[2]) == {"layer2.conv2", "layer2.bn2"}
    # a unit gets the same random values in both orders
    key = "layer2.conv2.weight"
    assert torch.equal(alone[2][key], cascade[2][key])
    # BatchNorm is reset by its reset_parameters: running statistics included
    assert torch.equal(cascade[2]["layer2.bn2.running_var"], torch.ones(16))
    # reproducible, and the seed matters
    again = parameter_randomization(resnet, images, "gradient", seed=3)
    other = parameter_randomization(resnet, images, "gradient", seed=4)
    base = parameter_randomization(resnet, images, "gradient", seed=3)
    assert torch.equal(again.similarity["ssim"], base.similarity["ssim"])
    assert not torch.equal(other.similarity["ssim"], base.similarity["ssim"])


def test_modules_without_reset_parameters_get_a_gaussian_of_the_same_std(images):
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 1, 1, generator=GEN) * 0.1 + 1.0)
            self.big = nn.Parameter(torch.randn(400, generator=GEN) * 2.5 + 3)

        def forward(self, x):
            return x * self.w + self.big[:1]

    model = nn.Sequential(Scale(), nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    states: list = []
    parameter_randomization(model, images, _recording(states), layers="units")
    big = states[-1]["0.big"]
    assert not torch.equal(big, model[0].big)
    assert float(big.std()) == pytest.approx(float(model[0].big.detach().std()), rel=0.15)
    assert abs(float(big.mean())) < 0.5  # zero-mean: the trained mean (3) is not kept


def test_target_is_resolved_on_the_trained_model(vgg, images):
    seen = []

    def method(model, inputs, target):
        seen.append(target.clone())
        return salience.gradient(model, inputs, target)

    check = parameter_randomization(vgg, images, method, checkpoints=2)
    predicted = vgg(images).argmax(1)
    assert all(torch.equal(t, predicted) for t in seen)
    assert torch.equal(check.target, predicted)


def test_a_callable_target_is_passed_through(vgg, images):
    from salience.targets import class_target

    target = class_target(2)
    seen = []

    def method(model, inputs, t):
        seen.append(t)
        return salience.gradient(model, inputs, t)

    check = parameter_randomization(vgg, images, method, target, checkpoints=2)
    assert all(t is target for t in seen)
    assert check.target is None


def test_checkpoints_table_plot_and_repr(vgg, images):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model's Grad-CAM may be zero: NaN, warned
        check = parameter_randomization(vgg, images, "grad_cam", checkpoints=3)
    assert check.layers == ("classifier.3", "features.5", "features.0")
    # cascading: the layers in between are randomized too
    assert check.randomized[1] == ("features.5", "classifier.1", "classifier.3")
    rows = check.table()
    assert [r["layer"] for r in rows] == list(check.layers)
    assert set(rows[0]) == {"layer", "units", "spearman_abs", "spearman", "ssim", "hog"}
    assert rows[-1]["spearman_abs"] == pytest.approx(check.final())
    assert check.similarity["hog"].shape == (3, 3)
    assert "grad_cam" in repr(check)
    assert "SanityCheck" in repr(check)
    assert "| layer randomized |" in str(check)
    fig = check.plot()
    assert len(fig.axes[0].lines) == 4 + 1  # four measures and the zero line
    other = parameter_randomization(vgg, images, "gradient", checkpoints=3)
    fig = plot_sanity_checks([check, other])
    assert len(fig.axes) == 2
    assert len(fig.axes[0].lines) == 2 + 1
    with pytest.raises(ValueError, match="unknown measure"):
        check.mean("pearson")


def test_bad_arguments(vgg, images):
    with pytest.raises(ValueError, match="unknown method"):
        parameter_randomization(vgg, images, "gradiant")
    with pytest.raises(TypeError, match="has no option"):
        parameter_randomization(vgg, images, "gradient", options={"steps": 3})
    with pytest.raises(ValueError, match="unknown mode"):
        parameter_randomization(vgg, images, mode="bottom_up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive integer"):
        parameter_randomization(vgg, images, checkpoints=0)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        parameter_randomization(lambda x: x.sum((2, 3)), images)
    with pytest.raises(ValueError, match="nothing to randomize"):
        parameter_randomization(nn.Flatten(), images, _fixed_method(images))


def test_an_integer_seed_and_options_of_registered_methods(vgg, images):
    check = parameter_randomization(
        vgg, images, "integrated_gradients", options={"steps": 4}, checkpoints=2, keep_maps=False
    )
    assert isinstance(check, SanityCheck)
    assert check.maps is None
    assert check.similarity["spearman"].shape == (2, 3)


# ----------------------------------------------------------------------- Quantus


class _DetConv(nn.Conv2d):
    """reset_parameters draws from a fixed generator: the same random weights for Quantus
    (which seeds the global RNG) and salience (which seeds its own streams)."""

    def reset_parameters(self) -> None:
        g = torch.Generator().manual_seed(self.weight.numel())
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=g) * 0.3)
            if self.bias is not None:
                self.bias.copy_(torch.randn(self.bias.shape, generator=g) * 0.1)


class _DetLinear(nn.Linear):
    def reset_parameters(self) -> None:
        g = torch.Generator().manual_seed(self.weight.numel())
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=g) * 0.05)
            self.bias.copy_(torch.randn(self.bias.shape, generator=g) * 0.1)


def test_cascading_spearman_matches_quantus_mprt():
    quantus = pytest.importorskip("quantus")
    net = nn.Sequential(
        _DetConv(3, 6, 3, padding=1), nn.ReLU(), _DetConv(6, 6, 3, padding=1), nn.ReLU(),
        nn.Flatten(), _DetLinear(6 * 16 * 16, 4),
    )  # fmt: skip
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.uniform_(m.bias, -0.1, 0.1)
    net.eval()
    x = torch.randn(4, 3, 16, 16, generator=GEN)
    y = net(x).argmax(1)

    def explain(model, inputs, targets, **kwargs):
        a = salience.gradient(model, torch.as_tensor(inputs), torch.as_tensor(targets).long())
        return a.values.abs().sum(1, keepdim=True).numpy()

    metric = quantus.MPRT(
        layer_order="top_down", similarity_func=quantus.similarity_func.correlation_spearman,
        abs=True, normalise=True, disable_warnings=True,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = metric(
            model=net, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None,
            explain_func=explain, device="cpu", channel_first=True, softmax=False,
        )  # fmt: skip
    ours = parameter_randomization(net, x, "gradient", y, layers="units")
    assert list(ours.layers) == [k for k in theirs if k != "original"] == ["5", "2", "0"]
    for k, layer in enumerate(ours.layers):
        assert ours.similarity["spearman_abs"][k].tolist() == pytest.approx(theirs[layer], abs=1e-6)


# ----------------------------------------------------------------------- the paper's finding


@pytest.mark.pretrained
def test_adebayo_finding_on_lite0_gradient_and_grad_cam_change_guided_backprop_does_not(lite0, cat):
    """Cascading randomization from the top, 5 checkpoints, the cat at 224 x 224, seed 0.

    Measured (Spearman of |maps|, cat and coffee images, seeds 0-4, every checkpoint of the
    19 layers; see the report of this change):

    - guided_backprop stays >= 0.95 down to _blocks.13 and 0.77-0.83 at _blocks.8, then
      falls (0.2-0.4 once every layer is random);
    - gradient is 0.36-0.52 once the logits layer alone is random, 0.31-0.48 at _blocks.13,
      0.05-0.12 with every layer random;
    - grad_cam varies a lot between seeds (its map has 7 x 7 degrees of freedom): -0.45 to
      0.41 at _blocks.13; its mean over the last four checkpoints is below 0.45.

    The thresholds leave a margin of about 0.05-0.1 beyond the measured ranges.
    """
    checks = {
        m: parameter_randomization(lite0, cat, m, checkpoints=5, seed=0)
        for m in ("gradient", "grad_cam", "guided_backprop")
    }
    layers = checks["gradient"].layers
    assert layers == ("_fc", "_blocks.13", "_blocks.8", "_blocks.3", "_conv_stem")
    grad = checks["gradient"].mean()
    cam = checks["grad_cam"].mean()
    guided = checks["guided_backprop"].mean()
    assert guided[1] > 0.9
    assert guided[2] > 0.7
    assert grad[0] < 0.6
    assert grad[1] < 0.55
    assert grad[-1] < 0.2
    assert cam[1] < 0.5
    assert float(cam[1:].nanmean()) < 0.45
    # the contrast the paper shows: with the top half random, guided backprop still matches
    assert guided[1] - max(grad[1], cam[1]) > 0.4
    # the verdict reads the average over the checkpoints (0.26 and 0.73 measured here)
    assert checks["gradient"].passed is True
    assert checks["guided_backprop"].passed is False
    assert "fails" in checks["guided_backprop"].verdict()


def _two_convs() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).eval()  # fmt: skip


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "wrap",
    [
        torch.nn.utils.spectral_norm,  # legacy: weight recomputed from weight_orig
        torch.nn.utils.parametrizations.spectral_norm,
        torch.nn.utils.parametrizations.weight_norm,
    ],
    ids=["legacy-spectral", "spectral", "weight-norm"],
)
def test_a_layer_whose_weight_is_computed_is_randomized_too(wrap):
    """reset_parameters() writes the computed weight, which the next forward pass recomputes
    from the parameters it hides: those are randomized, and the layer is one layer."""
    model = _two_convs()
    wrap(model[2])
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    names = [name for name, _ in randomization_layers(model, x, "units")]
    assert names == ["0", "2", "6"]
    check = parameter_randomization(model, x, "gradient", [1, 3], layers=["2"], mode="independent")
    plain = parameter_randomization(
        _two_convs(), x, "gradient", [1, 3], layers=["2"], mode="independent"
    )
    assert float(plain.mean()[0]) < 0.5
    assert float(check.mean()[0]) < 0.5  # it stayed 0.99 with the weight left as it was


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "wrap", [torch.nn.utils.weight_norm, torch.nn.utils.spectral_norm], ids=["weight", "spectral"]
)
def test_a_legacy_normed_model_is_checked_after_a_pass_with_gradients(wrap):
    """The legacy hooks keep the weight they compute as an attribute: after any method's pass it
    is in an autograd graph, which copy.deepcopy refuses; the check copies it detached."""
    model = _two_convs()
    wrap(model[2])
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    salience.gradient(model, x, 1)
    assert not model[2].weight.is_leaf  # what made the copy fail
    before = snapshot(model)
    check = parameter_randomization(model, x, "gradient", [1, 3], layers=["2"], mode="independent")
    assert float(check.mean()[0]) < 0.5
    assert_same(before, snapshot(model))
