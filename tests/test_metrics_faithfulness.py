"""Deletion and insertion curves (Petsiuk et al. 2018) against answers known in closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import salience
from conftest import VGGish, _init
from salience.attribution import Attribution
from salience.methods.integrated import gaussian_blur
from salience.metrics import deletion, insertion
from test_contract import assert_same, prepared, snapshot

GEN = torch.Generator().manual_seed(11)


class Linear(nn.Module):
    """f(x) = <w, x> in float64: class 0's logit; class 1's logit is 0."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = (x * self.w).flatten(1).sum(1)
        return torch.stack([f, torch.zeros_like(f)], 1)


class Region(nn.Module):
    """Class 0 iff the mean of the top-left 4x4 corner is large: only that region counts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = x[:, :, :4, :4].mean((1, 2, 3))
        return torch.stack([4 * corner, torch.zeros_like(corner)], 1)


class WithBias(nn.Module):
    """model(x, bias): a second input, one (classes,) bias per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _init(VGGish(), 0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.net(x) + bias


class FixedBias(nn.Module):
    def __init__(self, net: nn.Module, bias: torch.Tensor) -> None:
        super().__init__()
        self.net, self.bias = net, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.bias


def linear_setup(n: int = 2, h: int = 6, w: int = 5):
    x = torch.randn(n, 3, h, w, generator=GEN, dtype=torch.float64)
    weight = torch.randn(3, h, w, generator=GEN, dtype=torch.float64)
    contrib = (x * weight).sum(1)  # (N, H, W): what each pixel adds to f
    return Linear(weight), x, contrib


def hand_deletion(contrib: torch.Tensor, saliency: torch.Tensor, steps: int) -> torch.Tensor:
    """f(x) minus the contributions of the first c_s pixels of the ranking (zeros substrate)."""
    n = contrib.shape[0]
    pixels = contrib[0].numel()
    out = torch.empty(n, steps + 1, dtype=torch.float64)
    for i in range(n):
        order = sorted(range(pixels), key=lambda p: (-saliency[i].flatten()[p].item(), p))
        c = contrib[i].flatten()[order]
        removed = torch.cat([torch.zeros(1, dtype=torch.float64), c.cumsum(0)])
        for s in range(steps + 1):
            out[i, s] = c.sum() - removed[s * pixels // steps]
    return out


@pytest.mark.parametrize("steps", [30, 7, 1])
def test_linear_model_deletion_curve_by_hand(steps: int) -> None:
    model, x, contrib = linear_setup()
    saliency = torch.randn(x.shape[0], 6, 5, generator=GEN)
    result = deletion(model, x, saliency, 0, steps=steps, score="logit")
    expected = hand_deletion(contrib, saliency, steps)
    torch.testing.assert_close(result.curve, expected, rtol=1e-12, atol=1e-12)
    fractions = torch.tensor([s * 30 // steps / 30 for s in range(steps + 1)], dtype=torch.float64)
    torch.testing.assert_close(result.fractions, fractions)
    torch.testing.assert_close(result.auc, torch.trapezoid(expected, fractions, dim=1))
    assert result.target.tolist() == [0, 0]
    assert result.curve.shape == (2, steps + 1)
    assert result.auc.shape == (2,)


def test_linear_model_insertion_is_the_complement() -> None:
    model, x, contrib = linear_setup()
    saliency = torch.randn(2, 6, 5, generator=GEN)
    result = insertion(model, x, saliency, 0, steps=10, substrate="zeros", score="logit")
    expected = contrib.flatten(1).sum(1, keepdim=True) - hand_deletion(contrib, saliency, 10)
    torch.testing.assert_close(result.curve, expected, rtol=1e-12, atol=1e-12)


def test_ties_are_broken_in_row_major_order() -> None:
    model, x, _ = linear_setup()
    flat = torch.zeros(2, 6, 5, dtype=torch.float64)
    row_major = -torch.arange(30.0, dtype=torch.float64).view(1, 6, 5).expand(2, -1, -1)
    a = deletion(model, x, flat, 0, steps=30, score="logit")
    b = deletion(model, x, row_major, 0, steps=30, score="logit")
    assert torch.equal(a.curve, b.curve)


def test_true_contribution_order_beats_reversed() -> None:
    model, x, contrib = linear_setup(n=3)
    kw = {"steps": 15, "score": "logit", "substrate": "zeros"}
    good_del = deletion(model, x, contrib, 0, **kw).auc
    bad_del = deletion(model, x, -contrib, 0, **kw).auc
    good_ins = insertion(model, x, contrib, 0, **kw).auc
    bad_ins = insertion(model, x, -contrib, 0, **kw).auc
    assert (good_del < bad_del).all()
    assert (good_ins > bad_ins).all()


def test_true_region_has_lower_deletion_auc_than_its_complement() -> None:
    x = torch.rand(2, 3, 12, 12, generator=GEN) + 1.0  # class 0 predicted everywhere
    mask = torch.zeros(2, 12, 12, dtype=torch.bool)
    mask[:, :4, :4] = True
    model = Region()
    on = deletion(model, x, mask, steps=24)
    off = deletion(model, x, ~mask, steps=24)
    assert on.target.tolist() == [0, 0]
    assert (on.auc < off.auc - 0.3).all()  # the corner is gone after 1/9 of the pixels
    ins_on = insertion(model, x, mask, steps=24, substrate="zeros")
    ins_off = insertion(model, x, ~mask, steps=24, substrate="zeros")
    assert (ins_on.auc > ins_off.auc + 0.3).all()


def test_endpoints(vgg: nn.Module, images: torch.Tensor) -> None:
    saliency = torch.randn(3, 16, 16, generator=GEN)
    with torch.no_grad():
        p = torch.softmax(vgg(images), 1)
        target = p.argmax(1)
        zeros = torch.softmax(vgg(torch.zeros_like(images)), 1)
        blurred = torch.softmax(vgg(gaussian_blur(images, 5.0)), 1)

    def pick(q: torch.Tensor) -> torch.Tensor:
        return q.gather(1, target[:, None])[:, 0]

    d = deletion(vgg, images, saliency, steps=5)
    i = insertion(vgg, images, saliency, steps=5)
    assert torch.equal(d.target, target)
    assert torch.equal(i.target, target)
    torch.testing.assert_close(d.curve[:, 0], pick(p))
    torch.testing.assert_close(d.curve[:, -1], pick(zeros))
    torch.testing.assert_close(i.curve[:, 0], pick(blurred))
    torch.testing.assert_close(i.curve[:, -1], pick(p))
    assert not torch.allclose(pick(zeros), pick(blurred))


def test_substrate_number_and_tensor(vgg: nn.Module, images: torch.Tensor) -> None:
    saliency = torch.randn(3, 16, 16, generator=GEN)
    half = deletion(vgg, images, saliency, steps=4, substrate=0.5)
    image = deletion(vgg, images, saliency, steps=4, substrate=torch.full((3, 1, 1), 0.5))
    zeros = deletion(vgg, images, saliency, steps=4)
    torch.testing.assert_close(half.curve, image.curve)
    assert not torch.allclose(half.curve[:, -1], zeros.curve[:, -1])


def test_batch_equals_one_by_one(vgg: nn.Module, images: torch.Tensor) -> None:
    saliency = torch.randn(3, 16, 16, generator=GEN)
    target = [1, 4, 7]
    for fn in (deletion, insertion):
        batch = fn(vgg, images, saliency, target, steps=6)
        for k in range(3):
            one = fn(vgg, images[k : k + 1], saliency[k : k + 1], target[k], steps=6)
            torch.testing.assert_close(batch.curve[k : k + 1], one.curve, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(batch.auc[k : k + 1], one.auc, rtol=1e-5, atol=1e-6)


def test_chunking_does_not_change_the_curve(images: torch.Tensor) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)).double().eval()
    x = images.double()
    saliency = torch.randn(3, 16, 16, generator=GEN)
    small = deletion(model, x, saliency, steps=9, batch_size=1)
    large = deletion(model, x, saliency, steps=9, batch_size=1000)
    odd = deletion(model, x, saliency, steps=9, batch_size=7)
    torch.testing.assert_close(small.curve, large.curve, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(odd.curve, large.curve, rtol=1e-13, atol=1e-15)


def test_chunking_on_a_conv_net(vgg: nn.Module, images: torch.Tensor) -> None:
    saliency = torch.randn(3, 16, 16, generator=GEN)
    small = insertion(vgg, images, saliency, steps=5, batch_size=1)
    large = insertion(vgg, images, saliency, steps=5, batch_size=1000)
    torch.testing.assert_close(small.curve, large.curve, rtol=1e-5, atol=1e-6)


def test_forward_args_follow_their_rows(images: torch.Tensor) -> None:
    model = WithBias().eval()
    bias = torch.zeros(3, 10)
    bias[0, 2], bias[1, 5], bias[2, 8] = 30.0, 30.0, 30.0  # a different answer per sample
    saliency = torch.randn(3, 16, 16, generator=GEN)
    result = deletion(model, images, saliency, steps=4, batch_size=5, forward_args=(bias,))
    assert result.target.tolist() == [2, 5, 8]
    for k in range(3):
        alone = FixedBias(model.net, bias[k]).eval()
        one = deletion(alone, images[k : k + 1], saliency[k : k + 1], steps=4)
        torch.testing.assert_close(result.curve[k : k + 1], one.curve, rtol=1e-5, atol=1e-6)
    keyword = deletion(model, images, saliency, steps=4, batch_size=5, forward_args={"bias": bias})
    torch.testing.assert_close(keyword.curve, result.curve)


def test_callable_target_matches_class_target(images: torch.Tensor, vgg: nn.Module) -> None:
    saliency = torch.randn(3, 16, 16, generator=GEN)
    by_class = deletion(vgg, images, saliency, 3, steps=4, score="logit", batch_size=2)
    by_fn = deletion(vgg, images, saliency, lambda out: out[:, 3], steps=4, score="logit")
    torch.testing.assert_close(by_fn.curve, by_class.curve, rtol=1e-5, atol=1e-6)
    assert by_fn.target is None


def test_attribution_is_accepted_and_its_target_used(vgg: nn.Module, images: torch.Tensor) -> None:
    attribution = salience.explain(vgg, images, method="gradient", target=[3, 3, 3])
    result = deletion(vgg, images, attribution, steps=4)
    assert result.target.tolist() == [3, 3, 3]
    by_map = deletion(vgg, images, attribution.saliency(), 3, steps=4)
    torch.testing.assert_close(result.curve, by_map.curve)
    one_channel = deletion(vgg, images, attribution.saliency()[:, None], 3, steps=4)
    torch.testing.assert_close(one_channel.curve, by_map.curve)


@pytest.mark.filterwarnings("ignore:the model is in training mode")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_model_and_inputs_untouched(training: bool, images: torch.Tensor) -> None:
    model = prepared("resnet", training=training)
    saliency = torch.randn(3, 16, 16, generator=GEN)
    before, x0, s0 = snapshot(model), images.clone(), saliency.clone()
    deletion(model, images, saliency, steps=3, batch_size=4)
    insertion(model, images, saliency, steps=3)
    assert_same(before, snapshot(model))
    assert torch.equal(images, x0)
    assert torch.equal(saliency, s0)
    assert model.training == training


def test_errors(vgg: nn.Module, images: torch.Tensor) -> None:
    saliency = torch.randn(3, 16, 16)
    with pytest.raises(ValueError, match="Upsample"):
        deletion(vgg, images, torch.randn(3, 4, 4))
    cam = Attribution(torch.randn(3, 1, 4, 4), None, torch.zeros(3), "x", reduction="none")
    with pytest.raises(ValueError, match="Upsample"):
        insertion(vgg, images, cam)
    with pytest.raises(ValueError, match="one per input"):
        deletion(vgg, images, torch.randn(2, 16, 16))
    with pytest.raises(ValueError, match="one per input"):
        deletion(vgg, images, torch.randn(3, 3, 16, 16))
    for steps in (0, -1, 2.5):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            deletion(vgg, images, saliency, steps=steps)
    with pytest.raises(ValueError, match="unknown substrate 'noise'"):
        deletion(vgg, images, saliency, substrate="noise")
    with pytest.raises(ValueError, match="must broadcast"):
        deletion(vgg, images, saliency, substrate=torch.zeros(2, 16, 16))
    with pytest.raises(ValueError, match="NaN"):
        deletion(vgg, images, torch.full((3, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="out of range"):
        deletion(vgg, images, saliency, target=10)


@pytest.mark.parametrize("steps", [1, 4])
def test_results_of_inference_mode_passes_are_ordinary_tensors(steps: int) -> None:
    """The forward-only passes run under inference mode; what they return can still be
    changed in place and used with autograd."""
    model = _init(VGGish(), 0).eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    found = [
        deletion(model, x, x.abs().sum(1), steps=steps).curve,
        insertion(model, x, x.abs().sum(1), steps=steps).auc,
        salience.score_cam(model, x, layer="features.3").values,
    ]
    for value in found:
        assert not value.is_inference()
        value.add_(1.0)  # raises on an inference tensor outside inference mode
        assert value.requires_grad_(True).requires_grad
