"""Warnings name the user's line, however deep in salience they are raised."""

from __future__ import annotations

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
