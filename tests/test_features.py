"""Tests of salience.features.class_model (Simonyan et al. 2013, §2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from salience.features import class_model


def _flat_net() -> nn.Module:
    """A tiny conv net whose classes respond to different patterns (no weight sharing)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 5)
    ).eval()


@pytest.mark.parametrize("target", [0, 3])
def test_class_score_rises_far_above_start_and_other_classes(target):
    model = _flat_net()
    image = class_model(
        model, target, steps=50, size=16, jitter=1, blur_every=4, input_range=(-1, 1)
    )
    assert image.shape == (1, 3, 16, 16)
    with torch.no_grad():
        start = model(torch.zeros(1, 3, 16, 16))[0]
        scores = model(image)[0]
    others = torch.cat([scores[:target], scores[target + 1 :]])
    assert scores[target] > start[target] + 1.0
    assert scores[target] > others.max() + 1.0
    assert scores[target] > 4 * others.abs().max()


def test_linear_model_reaches_the_analytic_optimum():
    # argmax_x  w_c . x - l2 |x|^2  =  w_c / (2 l2)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()
    with torch.no_grad():
        model[1].weight.normal_(0, 0.1)
    l2 = 0.05
    image = class_model(model, 2, steps=300, lr=0.02, l2=l2, jitter=0, blur_every=0, size=8)
    optimum = model[1].weight[2].detach().view(1, 3, 8, 8) / (2 * l2)
    error = (image - optimum).norm() / optimum.norm()
    assert error < 0.05


def test_clipped_to_the_preprocessing_range_of_the_model():
    model = _flat_net()
    model.mean, model.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # inputs in [-2, 2]
    image = class_model(model, 1, steps=40, size=16, jitter=1, lr=0.5)
    assert image.min() >= -2 - 1e-6
    assert image.max() <= 2 + 1e-6
    assert image.abs().max() > 1.5  # the range is used, not clipped tighter
    narrow = class_model(model, 1, steps=40, size=16, jitter=1, lr=0.5, input_range=(-0.5, 0.5))
    assert narrow.abs().max() <= 0.5 + 1e-6


def test_seeded_and_deterministic():
    model = _flat_net()
    a = class_model(model, 2, steps=10, size=16, jitter=2, seed=3)
    b = class_model(model, 2, steps=10, size=16, jitter=2, seed=3)
    c = class_model(model, 2, steps=10, size=16, jitter=2, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_leaves_the_model_alone():
    model = _flat_net()
    model.train()
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    class_model(model, 0, steps=3, size=16)
    assert model.training
    assert not model[0].weight.requires_grad
    assert model[3].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_arguments():
    model = _flat_net()
    with pytest.raises(ValueError, match="out of range"):
        class_model(model, 5, steps=1, size=16)
    with pytest.raises(TypeError, match="int"):
        class_model(model, "tabby", steps=1, size=16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        class_model(model, 0, steps=0, size=16)
    with pytest.raises(ValueError, match="input_range"):
        class_model(model, 0, steps=1, size=16, input_range=(1, -1))
    with pytest.raises(ValueError, match="jitter"):
        class_model(model, 0, steps=1, size=16, jitter=-1)
