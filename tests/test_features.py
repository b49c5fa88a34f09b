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
    for size in (0, (-4, 16), (16,), (1.5, 16), True):
        with pytest.raises(ValueError, match=r"size must be a positive int or \(height, width\)"):
            class_model(model, 0, steps=1, size=size)  # type: ignore[arg-type]


# -- unit objectives, Fourier parameterisation, transformation robustness, batches ---------

from salience.features import Objective, channel, class_logit, neuron  # noqa: E402
from salience.features.class_model import _transform  # noqa: E402


def _deep_net() -> nn.Module:
    """Three conv layers, max pooling and a linear head; Kaiming weights, seeded."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    ).eval()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)
    return model


def _unit(model: nn.Module, x: torch.Tensor, objective: Objective) -> torch.Tensor:
    """The objective of every row of ``x``, computed independently of salience's hooks."""
    layer = dict(model.named_modules())[objective.layer]
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    plane = seen[-1][:, objective.index]
    if objective.position is None:
        return plane.mean((1, 2))
    y, x_ = objective.position
    return plane[:, y, x_]


def test_objective_shortcuts_and_labels():
    assert class_logit(3) == Objective(None, 3)
    assert channel("2", 5) == Objective("2", 5)
    assert neuron("2", 5, (1, 2)) == Objective("2", 5, (1, 2))
    from salience.features.objectives import to_objectives

    assert to_objectives([3, ("2", 5), ("2", 5, (1, 2))]) == [
        class_logit(3),
        channel("2", 5),
        neuron("2", 5, (1, 2)),
    ]
    assert neuron("2", 5, (1, 2)).label == "2:5@(1, 2)"
    with pytest.raises(TypeError, match="objective"):
        to_objectives("tabby")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="position"):
        neuron("2", 1, (1.5, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        channel("2", -1)


def test_channel_of_a_linear_layer_reaches_the_analytic_optimum():
    # The mean of a convolution's channel is affine in x: over the box [-1, 1] its maximum is
    # f(0) + sum |grad|, reached at x = sign(grad).
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 2)
    ).eval()
    zero = torch.zeros(1, 3, 12, 12, requires_grad=True)
    value = model[0](zero)[0, 2].mean()
    (grad,) = torch.autograd.grad(value, zero)
    optimum = float(value.detach()) + float(grad.abs().sum())
    image = class_model(
        model, ("0", 2), steps=100, size=12, input_range=(-1, 1), jitter=0, blur_every=0, l2=0
    )
    reached = float(_unit(model, image, channel("0", 2))[0])
    assert reached <= optimum + 1e-5
    assert reached > 0.99 * optimum
    assert optimum > 5 * abs(float(value.detach()))  # the start is far from it


@pytest.mark.parametrize("param", ["pixel", "fourier"])
@pytest.mark.parametrize("objective", [channel("2", 5), channel("5", 3), neuron("5", 1, (4, 4))])
def test_unit_activation_rises_far_above_start_and_random_images(param, objective):
    # Margin: the optimized image must beat the best of 64 random images in the same input
    # range by more than 3 standard deviations of the unit over those images (measured: 7 to
    # 23), and rise above the start (the zero image, or the grey image of the Fourier basis).
    model = _deep_net()
    image = class_model(
        model,
        objective,
        steps=100,
        size=16,
        jitter=1,
        input_range=(-1, 1),
        param=param,
        scale=0.05,
        rotate=5,
    )
    assert image.shape == (1, 3, 16, 16)
    assert image.min() >= -1 - 1e-6
    assert image.max() <= 1 + 1e-6
    generator = torch.Generator().manual_seed(1)
    random = _unit(model, torch.rand(64, 3, 16, 16, generator=generator) * 2 - 1, objective)
    start = float(_unit(model, torch.zeros(1, 3, 16, 16), objective)[0])
    final = float(_unit(model, image, objective)[0])
    assert final > float(random.max()) + 3 * float(random.std())
    assert final > start + 3 * float(random.std())


@pytest.mark.parametrize("param", ["pixel", "fourier"])
def test_a_batch_of_objectives_equals_them_one_by_one(param):
    model = _deep_net()
    objectives = [channel("2", 5), channel("5", 3), neuron("5", 1, (4, 4)), 2]
    options = dict(
        steps=20, size=16, jitter=2, input_range=(-1, 1), param=param, scale=0.1, rotate=10
    )
    batch = class_model(model, objectives, **options)
    alone = torch.cat([class_model(model, o, **options) for o in objectives])
    assert batch.shape == (4, 3, 16, 16)
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_fourier_images_stay_in_the_pixel_range_and_are_seeded():
    model = _flat_net()
    model.mean, model.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # inputs in [-2, 2]
    a = class_model(model, 1, steps=15, size=16, param="fourier", lr=0.2)
    b = class_model(model, 1, steps=15, size=16, param="fourier", lr=0.2)
    c = class_model(model, 1, steps=15, size=16, param="fourier", lr=0.2, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() > -2
    assert a.max() < 2
    plain = class_model(model, 1, steps=15, size=16, param="fourier", decorrelate=False)
    assert plain.shape == a.shape
    grey = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(3)).eval()
    grey(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="decorrelate=False"):
        class_model(grey, 0, size=8, channels=1, param="fourier", steps=1)
    assert class_model(
        grey, 0, size=8, channels=1, param="fourier", decorrelate=False, steps=2
    ).shape == (1, 1, 8, 8)


def test_the_transformations():
    x = torch.randn(2, 3, 10, 12)
    # An integer shift through the affine path is the roll wherever the roll does not wrap.
    shifted = _transform(x, (2, -3), 1.0, 0.0, affine=True)
    torch.testing.assert_close(
        shifted[..., 2:, :-3], torch.roll(x, (2, -3), (2, 3))[..., 2:, :-3], rtol=0, atol=1e-5
    )
    square = torch.randn(1, 2, 8, 8)
    torch.testing.assert_close(
        _transform(square, (0, 0), 1.0, 90.0, affine=True),
        torch.rot90(square, 1, (2, 3)),
        rtol=0,
        atol=1e-5,
    )
    zoomed = _transform(square, (0, 0), 2.0, 0.0, affine=True)  # the centre, enlarged
    torch.testing.assert_close(
        zoomed[..., 3:5, 3:5].mean(), square[..., 3:5, 3:5].mean(), rtol=0, atol=0.5
    )


def test_unit_objectives_leave_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    )
    model.train()
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for param in ("pixel", "fourier"):
        with pytest.warns(UserWarning, match="training mode"):
            class_model(model, [("1", 2), ("2", 1, (3, 3))], steps=3, size=8, param=param)
    assert model.training
    assert not model[0].weight.requires_grad
    assert model[4].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model[0]._forward_hooks
    assert not model[1]._forward_hooks


def test_bad_unit_objectives():
    model = _deep_net()
    with pytest.raises(ValueError, match="no layer named 'conv9'"):
        class_model(model, ("conv9", 1), steps=1, size=16)
    with pytest.raises(ValueError, match=r"channel 8 is out of range.*8 channels"):
        class_model(model, ("2", 8), steps=1, size=16)
    with pytest.raises(ValueError, match=r"outside the 8×8 map"):
        class_model(model, ("5", 1, (8, 0)), steps=1, size=16)
    with pytest.raises(ValueError, match="scale"):
        class_model(model, 0, steps=1, size=16, scale=1.5)
    with pytest.raises(ValueError, match="param"):
        class_model(model, 0, steps=1, size=16, param="wavelet")  # type: ignore[arg-type]
