"""Krypton's approximate occlusion: exact at tau = drill_down = 1, close otherwise, cheaper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import salience
from salience.methods._incremental_approx import Approximation, _linear_weights
from salience.metrics.similarity import ssim


class Strided(nn.Module):
    """Two stride-2 stages of 3x3 convolutions: boxes grow fast (projective fields)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, stride=2, padding=1),
            nn.BatchNorm2d(12),
            nn.ReLU(),
            nn.Conv2d(12, 12, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(12, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def strided() -> nn.Module:
    torch.manual_seed(0)
    model = Strided().eval()
    bn = model.features[3]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    return model


def smooth_images(n: int, size: int = 64) -> torch.Tensor:
    """Images with structure at the window's scale (blobs), so maps are not pure noise."""
    g = torch.Generator().manual_seed(3)
    low = torch.randn(n, 3, size // 8, size // 8, generator=g)
    return nn.functional.interpolate(low, size=(size, size), mode="bilinear")


OPTIONS = {"window": 8, "stride": 4}  # 15 x 15 windows


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_tau_and_drill_down_one_is_the_exact_map() -> None:
    model, x = strided(), smooth_images(2)
    exact = salience.occlusion(model, x, 1, **OPTIONS)
    same = salience.occlusion(model, x, 1, approximate={"tau": 1.0, "drill_down": 1.0}, **OPTIONS)
    assert torch.equal(same.values, exact.values)  # the same passes, bit for bit
    assert torch.equal(same.extras["occluded_scores"], exact.extras["occluded_scores"])
    assert exact.extras["mode"] == "exact"
    assert exact.extras["approximate"] is None
    record = same.extras["approximate"]
    assert record["mode"] == "exact"
    assert same.extras["windows_evaluated"].tolist() == [exact.extras["windows"]] * 2
    assert record["recomputed_fraction"] == 1.0
    assert isinstance(same.extras["incremental"], list)
    # Full passes too (no incremental inference): the same map to float rounding.
    full = salience.occlusion(
        model, x, 1, approximate=Approximation(), incremental=False, **OPTIONS
    )
    torch.testing.assert_close(full.values, exact.values, rtol=0, atol=1e-5)
    assert full.extras["approximate"]["tau_applied"] is False


def test_projective_field_thresholding_is_close_and_cheaper() -> None:
    model, x = strided(), smooth_images(2)
    exact = salience.occlusion(model, x, [0, 2], **OPTIONS)
    approx = salience.occlusion(model, x, [0, 2], approximate={"tau": 0.35}, **OPTIONS)
    record = approx.extras["approximate"]
    assert record["mode"] == "approximate"
    assert record["tau_applied"]
    assert record["recomputed_fraction"] < 0.95  # fewer activations recomputed per window
    assert not torch.equal(approx.values, exact.values)  # really an approximation
    a, b = approx.values[:, 0], exact.values[:, 0]
    assert (ssim(a, b) > 0.75).all(), ssim(a, b)  # measured 0.82, 0.91
    assert corr(a, b) > 0.97  # measured 0.984
    # A tighter threshold recomputes less and errs more.
    tight = salience.occlusion(model, x, [0, 2], approximate={"tau": 0.25}, **OPTIONS)
    assert tight.extras["approximate"]["recomputed_fraction"] < 0.85
    assert corr(tight.values[:, 0], b) < corr(a, b)
    err = (approx.values - exact.values).abs().max()
    assert (tight.values - exact.values).abs().max() > err


def test_drill_down_is_close_cheaper_and_exact_where_evaluated() -> None:
    model, x = strided(), smooth_images(2)
    exact = salience.occlusion(model, x, [0, 2], **OPTIONS)
    approx = salience.occlusion(model, x, [0, 2], approximate={"drill_down": 0.25}, **OPTIONS)
    record = approx.extras["approximate"]
    windows = exact.extras["windows"]  # 15 x 15
    assert record["coarse_stride"] == (8, 8)
    # 8 x 8 coarse windows, then at most a quarter of the fine ones.
    assert (approx.extras["windows_evaluated"] <= 64 + 57).all()
    assert (approx.extras["windows_evaluated"] < windows * 0.5).all()
    evaluated = approx.extras["evaluated"]
    got, want = approx.extras["occluded_scores"], exact.extras["occluded_scores"]
    torch.testing.assert_close(got[evaluated], want[evaluated], rtol=0, atol=1e-5)
    assert not torch.allclose(got[~evaluated], want[~evaluated], atol=1e-5)
    a, b = approx.values[:, 0], exact.values[:, 0]
    assert (ssim(a, b) > 0.75).all(), ssim(a, b)  # measured 0.83, 0.88
    assert corr(a, b) > 0.97  # measured 0.984
    # The drilled windows are where the exact drop is large: the top decile of the exact
    # drops is nearly all evaluated.
    drops = (exact.scores[:, None, None] - want).flatten(1)
    top = drops >= drops.quantile(0.9, dim=1, keepdim=True)
    assert evaluated.flatten(1)[top].float().mean() > 0.8


class LinearRamp(nn.Module):
    """Score = sum of the pixels weighted by a ramp a y + b x + c: drops are linear in the
    window's start (windows inside the image), so bilinear interpolation is exact."""

    def __init__(self, size: int) -> None:
        super().__init__()
        ramp = torch.arange(size, dtype=torch.float64)
        self.register_buffer("w", 0.3 * ramp[:, None] - 0.7 * ramp[None, :] + 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x * self.w).sum((1, 2, 3))
        return torch.stack([s, -s], 1)


@pytest.mark.parametrize("coarse", [2, 4])
def test_drill_down_interpolation_is_exact_on_a_linear_score(coarse: int) -> None:
    model = LinearRamp(16).eval()
    x = torch.ones(1, 1, 16, 16, dtype=torch.float64)
    options = {"window": 4, "stride": 2, "incremental": False}  # 7 x 7 windows, none cut
    exact = salience.occlusion(model, x, 0, **options)
    approx = salience.occlusion(
        model, x, 0, approximate={"drill_down": 0.1, "coarse": coarse}, **options
    )
    assert (approx.extras["windows_evaluated"] < 49).all()
    torch.testing.assert_close(approx.values, exact.values, rtol=1e-12, atol=1e-12)


def test_linear_weights_interpolate_between_nodes() -> None:
    w = _linear_weights(7, [0, 4, 6], torch.device("cpu"))
    values = torch.tensor([1.0, 5.0, 3.0], dtype=torch.float64)
    want = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 4.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(w @ values, want)
    torch.testing.assert_close(w.sum(1), torch.ones(7, dtype=torch.float64))


def test_approximate_batches_callable_targets_and_both_at_once() -> None:
    model, x = strided(), smooth_images(3)
    spec = {"tau": 0.5, "drill_down": 0.3}
    both = salience.occlusion(model, x, [2, 0, 3], approximate=spec, **OPTIONS)
    for i, c in enumerate([2, 0, 3]):  # a sample's map does not depend on its batch
        alone = salience.occlusion(model, x[i : i + 1], c, approximate=spec, **OPTIONS)
        torch.testing.assert_close(alone.values[0], both.values[i], rtol=0, atol=1e-6)
    assert both.extras["approximate"]["tau_applied"]
    one = both[1]  # the per-sample extras follow indexing
    assert torch.equal(one.extras["evaluated"][0], both.extras["evaluated"][1])
    assert one.extras["windows_evaluated"].shape == (1,)
    exact = salience.occlusion(model, x, [2, 0, 3], **OPTIONS)
    assert (ssim(both.values[:, 0], exact.values[:, 0]) > 0.5).all()  # measured 0.59-0.86
    # A callable target: the union of the samples' drill-down windows, whole batch copies.
    fn = lambda out: out[:, 0] - out[:, 2]  # noqa: E731
    approx = salience.occlusion(model, x, fn, approximate={"drill_down": 0.25}, **OPTIONS)
    exact_fn = salience.occlusion(model, x, fn, **OPTIONS)
    evaluated = approx.extras["evaluated"]
    assert torch.equal(evaluated[0], evaluated[1])
    got, want = approx.extras["occluded_scores"], exact_fn.extras["occluded_scores"]
    torch.testing.assert_close(got[evaluated], want[evaluated], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"tau": 0}, "tau must be a number in"),
        ({"tau": 1.5}, "tau must be a number in"),
        ({"tau": float("nan")}, "tau must be a number in"),
        ({"tau": "half"}, "tau must be a number in"),
        ({"drill_down": 0.0}, "drill_down must be a number in"),
        ({"drill_down": True}, "drill_down must be a number in"),
        ({"coarse": 1}, "coarse must be an int >= 2"),
        ({"coarse": 2.5}, "coarse must be an int >= 2"),
        ({"taus": 0.5}, "unknown approximate option"),
        (0.5, "approximate must be None"),
    ],
)
def test_bad_approximate_options(spec, match: str) -> None:
    model, x = strided(), smooth_images(1)
    with pytest.raises(ValueError, match=match):
        salience.occlusion(model, x, 0, approximate=spec, **OPTIONS)
