"""Warnings name the user's line, however deep in salience they are raised."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import salience
from salience.metrics import max_sensitivity


def dead_model() -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with torch.no_grad():
        model[1].weight.zero_()  # every map is zero: salience warns
    return model.eval()


def training_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3))


X = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))

CALLS = {
    "method": lambda: salience.gradient(dead_model(), X, 0),
    "explain": lambda: salience.explain(dead_model(), X, "gradient", 0),
    "integrated_gradients": lambda: salience.integrated_gradients(
        dead_model(),
        torch.zeros(1, 3, 2, 2),
        0,
        steps=4,  # the baseline is the input
    ),
    "under_a_setting": lambda: _under_setting(),
    "metric_running_a_method": lambda: max_sensitivity(dead_model(), X, samples=2),
    "training_mode": lambda: salience.gradient(training_model(), X, 0),
}


def _under_setting() -> None:
    with salience.performance(channels_last=True):
        salience.gradient(dead_model(), X, 0)


@pytest.mark.parametrize("name", list(CALLS))
def test_a_warning_points_at_the_callers_line(name: str) -> None:
    with pytest.warns(UserWarning, match="zero|training mode") as record:
        CALLS[name]()
    assert record, name
    for caught in record:
        assert caught.filename == __file__, (caught.filename, str(caught.message))


# -- the fast checks behind the warnings and errors ------------------------------------------


@pytest.mark.parametrize(
    ("values", "finite"),
    [
        (torch.tensor([1.0, 2.0]), True),
        (torch.tensor([3e38, 3e38]), True),  # float32 entries whose float32 sum overflows
        (torch.tensor([1e308, 1e308], dtype=torch.float64), True),  # so does this float64 sum
        (torch.tensor([60000.0, 60000.0], dtype=torch.float16), True),
        (torch.tensor([1.0, float("nan")]), False),
        (torch.tensor([float("inf"), 1.0]), False),
        (torch.tensor([float("inf"), float("-inf")]), False),  # the sum is NaN
        (torch.tensor([-1e308, float("-inf")], dtype=torch.float64), False),
        (torch.zeros(0), True),
        (torch.tensor([1, 2]), True),  # integers are finite
    ],
)
def test_all_finite_agrees_with_isfinite(values: torch.Tensor, finite: bool) -> None:
    from salience._checks import all_finite

    assert all_finite(values) is finite
    assert finite == (values.numel() == 0 or bool(torch.isfinite(values).all()))


@pytest.mark.parametrize("side", [3, 100], ids=["small", "large"])  # two ways of reducing
def test_zero_maps_are_found_per_sample(side: int) -> None:
    from salience._checks import warn_zero_maps

    values = torch.full((4, 3, side, side), 1e-30)
    values[1] = 0.0
    values[3] = -0.0
    values[2] = 0.0
    values[2, 1, 1, 1] = float("nan")  # not zero
    with pytest.warns(UserWarning, match=r"sample\(s\) \[1, 3\] is zero everywhere"):
        warn_zero_maps("m", values, "here")
    values[1, 0, 0, 0] = values[3, 2, -1, -1] = -1e-30
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_zero_maps("m", values, "here")
    counts = torch.zeros(3, 1, side, side, dtype=torch.uint8)  # any() of uint8 is uint8
    counts[1] = 200
    with pytest.warns(UserWarning, match=r"sample\(s\) \[0, 2\] is zero"):
        warn_zero_maps("m", counts, "here")
