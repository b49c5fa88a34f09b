"""Closed-form and rule-level checks of the gradient family."""

from __future__ import annotations

import re
from copy import deepcopy
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from conftest import FunctionalRelus
from salience.hooks import rectifier_rule


class Linear(nn.Module):
    """logits = W vec(x) + b: every gradient method has a closed form."""

    def __init__(self, shape: tuple[int, int, int] = (3, 5, 5), classes: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(shape[0] * shape[1] * shape[2], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.fixture
def linear() -> Linear:
    torch.manual_seed(0)
    return Linear().eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))


def test_linear_gradient_is_the_weight_row(linear: Linear, x: torch.Tensor) -> None:
    result = salience.gradient(linear, x, target=[2, 3])
    w = linear.fc.weight.detach()
    torch.testing.assert_close(result.values[0], w[2].view(3, 5, 5))
    torch.testing.assert_close(result.values[1], w[3].view(3, 5, 5))
    torch.testing.assert_close(result.saliency()[0], w[2].view(3, 5, 5).abs().amax(0))
    torch.testing.assert_close(result.scores, linear(x)[[0, 1], [2, 3]].detach())


def test_input_x_gradient_sums_to_logit_minus_bias(linear: Linear, x: torch.Tensor) -> None:
    result = salience.input_x_gradient(linear, x, target=1)
    torch.testing.assert_close(result.values, x * linear.fc.weight[1].detach().view(1, 3, 5, 5))
    logit_minus_bias = linear(x)[:, 1].detach() - linear.fc.bias[1].detach()
    torch.testing.assert_close(result.saliency().flatten(1).sum(1), logit_minus_bias)


@pytest.mark.parametrize("score", ["probability", "log_probability"])
def test_score_options_have_the_softmax_gradient(
    linear: Linear, x: torch.Tensor, score: str
) -> None:
    result = salience.gradient(linear, x, target=0, score=score)
    w = linear.fc.weight.detach()
    p = torch.softmax(linear(x).detach(), 1)
    d_log = w[0].view(1, -1) - p @ w  # d log p_0 / dx
    expected = d_log if score == "log_probability" else p[:, :1] * d_log
    torch.testing.assert_close(result.values.flatten(1), expected)
    picked = p[:, 0] if score == "probability" else p[:, 0].log()
    torch.testing.assert_close(result.scores, picked)


def test_rules_on_a_hand_computed_network() -> None:
    """y = w2 . relu(w1 * x): the three rules differ exactly where the paper says."""
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        model[3].weight.copy_(torch.tensor([[2.0, -3.0]]))
        model[3].bias.zero_()
    x = torch.tensor([2.0]).view(1, 1, 1, 1)  # unit 0 active (h=2), unit 1 inactive (h=-2)
    # gradient: only the active unit passes: 2 * 1 = 2
    assert salience.gradient(model, x, 0).values.item() == pytest.approx(2.0)
    # deconvnet: relu(signal) regardless of activity: relu(2)*1 + relu(-3)*(-1) = 2
    assert salience.deconvnet(model, x, 0).values.item() == pytest.approx(2.0)
    x = torch.tensor([-2.0]).view(1, 1, 1, 1)  # unit 1 active now, with a negative signal
    assert salience.gradient(model, x, 0).values.item() == pytest.approx(3.0)  # -3 * -1
    assert salience.guided_backprop(model, x, 0).values.item() == pytest.approx(0.0)
    assert salience.deconvnet(model, x, 0).values.item() == pytest.approx(2.0)


def test_every_rectifier_spelling_is_intercepted(functional_relus: nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16)
    with rectifier_rule(functional_relus, "guided") as mode:
        functional_relus(x)
    assert mode is not None
    assert mode.count == 7  # ReLU6 module twice, F.relu, torch.relu, relu_, F.relu6, hardtanh


def _custom_rule(rule: str, upper: float | None):
    class Rule(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[override]
            ctx.save_for_backward(x)
            return x.clamp(0, upper)

        @staticmethod
        def backward(ctx, grad):  # type: ignore[override]
            (x,) = ctx.saved_tensors
            out = grad.clamp(min=0)
            if rule == "guided":
                out = out * (x > 0) * (x < upper if upper is not None else True)
            return out

    return Rule.apply


@pytest.mark.parametrize("rule", ["guided", "deconvnet"])
def test_rules_match_an_independent_rebuild(functional_relus: FunctionalRelus, rule: str) -> None:
    """The same network written with explicit custom autograd functions at each rectifier."""
    relu, relu6 = _custom_rule(rule, None), _custom_rule(rule, 6.0)
    m = functional_relus

    def rebuilt(x: torch.Tensor) -> torch.Tensor:
        c = m.convs
        x = relu6(c[0](x))
        x = relu(c[1](x))
        x = relu(c[2](x))
        x = relu(c[3](x))
        x = relu6(c[4](x))
        x = relu6(c[5](x))
        x = relu6(c[6](x))
        return m.fc(torch.flatten(F.max_pool2d(x, 2), 1))

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 3
    expected = salience.gradient(rebuilt, x, target=[1, 3]).values  # type: ignore[arg-type]
    method = salience.guided_backprop if rule == "guided" else salience.deconvnet
    torch.testing.assert_close(method(m, x, target=[1, 3]).values, expected)
    assert not torch.allclose(expected, salience.gradient(m, x, target=[1, 3]).values)


def test_inplace_rectifier_on_the_input_leaves_it_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(12, 2)).eval()
    x = torch.randn(1, 3, 2, 2)
    kept = x.clone()
    for method in (salience.gradient, salience.guided_backprop, salience.deconvnet):
        method(model, x, 0)
    assert torch.equal(x, kept)


def test_torchscript_models_get_gradients_but_no_silent_guided_map(linear: Linear) -> None:
    scripted = torch.jit.script(nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(75, 4)).eval())
    x = torch.randn(1, 3, 5, 5)
    assert salience.gradient(scripted, x).values.shape == x.shape
    with pytest.raises(TypeError, match="TorchScript"):
        salience.guided_backprop(scripted, x)


def test_score_without_a_gradient_path_is_an_error(x: torch.Tensor) -> None:
    class Detached(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.detach().flatten(1)[:, :4]

    with pytest.raises(ValueError, match="does not depend on the inputs"):
        salience.gradient(Detached(), x)


def test_model_output_that_is_not_a_tensor_needs_a_callable(x: torch.Tensor) -> None:
    class Dict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(75, 3)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.fc(x.flatten(1))}

    model = Dict()
    with pytest.raises(ValueError, match="callable target"):
        salience.gradient(model, x)
    result = salience.gradient(model, x, target=lambda out: out["logits"][:, 1])
    torch.testing.assert_close(result.values[0], model.fc.weight[1].detach().view(3, 5, 5))


class _Pair(NamedTuple):
    logits: torch.Tensor
    dense: torch.Tensor


class _Returns(nn.Module):
    """A dense (N, 4, 5, 5) output, as it is or wrapped the way models wrap theirs."""

    def __init__(self, wrap: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.wrap = wrap

    def forward(self, x: torch.Tensor) -> Any:
        return self.wrap(self.conv(x))


@pytest.mark.parametrize(
    ("wrap", "hint"),
    [
        (lambda t: {"aux": None, "out": t}, "out['out']"),
        (lambda t: (t, t.sum()), "out[0]"),
        (lambda t: _Pair(t.sum((2, 3)), t), "out.logits"),
    ],
    ids=["dict", "tuple", "named"],
)
def test_structured_output_errors_say_how_to_reach_its_tensor(
    x: torch.Tensor, wrap: Any, hint: str
) -> None:
    model = _Returns(wrap)
    with pytest.raises(ValueError, match=re.escape(f"target=lambda out: {hint}[:, 3]")):
        salience.gradient(model, x)
    with pytest.raises(TypeError, match=re.escape(f"mask_target(1, mask)({hint})")):
        salience.gradient(model, x, target=salience.mask_target(1))


def test_mask_target_checks_its_class_and_mask(x: torch.Tensor) -> None:
    model = _Returns(lambda t: t)
    for bad, error in [(-1, ValueError), (1.0, TypeError), (True, TypeError)]:
        with pytest.raises(error, match="class index"):
            salience.mask_target(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(H, W\) or \(N, H, W\)"):
        salience.mask_target(1, torch.ones(5))
    with pytest.raises(TypeError, match="mask must be a tensor"):
        salience.mask_target(1, [[1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"class 4 is out of range: the output has 4 classes"):
        salience.gradient(model, x, target=salience.mask_target(4))
    with pytest.raises(ValueError, match=r"mask of shape \(4, 4\) does not fit"):
        salience.gradient(model, x, target=salience.mask_target(1, torch.ones(4, 4)))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 5, 5\) does not fit"):
        salience.gradient(model, x[:2], target=salience.mask_target(1, torch.ones(3, 5, 5)))
    mask = torch.zeros(5, 5)
    mask[1:3, 2:4] = 1
    found = salience.gradient(model, x, target=salience.mask_target(3, mask))
    w = model.conv.weight[3, :, 0, 0].detach()  # d/dx of sum(mask * conv(x)[3]) is w * mask
    torch.testing.assert_close(found.values, (w[:, None, None] * mask).expand_as(x))
    # an argmax's 0-d tensor as the class, one (1, H, W) mask for every sample: as before
    again = salience.gradient(model, x, target=salience.mask_target(torch.tensor(3), mask[None]))
    torch.testing.assert_close(again.values, found.values)


def test_bad_callable_target_results_are_errors(linear: Linear, x: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="one score per sample"):
        salience.gradient(linear, x, target=lambda out: out)
    with pytest.raises(TypeError, match="not a tensor"):
        salience.gradient(linear, x, target=lambda out: 3.0)
    with pytest.raises(ValueError, match="score='probability' applies to class targets"):
        salience.gradient(linear, x, target=lambda out: out[:, 0], score="probability")
    with pytest.raises(ValueError, match="unknown score"):
        salience.gradient(linear, x, score="softmax")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="integer class indices"):
        salience.gradient(linear, x, target=torch.tensor([0.0, 1.0]))


# SmoothGrad -----------------------------------------------------------------------------------


def test_smoothgrad_of_a_linear_model_is_its_gradient(linear: Linear, x: torch.Tensor) -> None:
    plain = salience.gradient(linear, x, target=1).values
    mean = salience.smoothgrad(linear, x, target=1, samples=6)
    torch.testing.assert_close(mean.values, plain)
    squared = salience.smoothgrad(linear, x, target=1, samples=6, variant="squared")
    torch.testing.assert_close(squared.values, plain**2)
    var = salience.smoothgrad(linear, x, target=1, samples=6, variant="vargrad")
    torch.testing.assert_close(var.values, torch.zeros_like(plain), atol=1e-7, rtol=0)


def test_smoothgrad_averages_the_base_over_seeded_noise(vgg: nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    samples, level, seed = 5, 0.2, 11
    result = salience.smoothgrad(
        vgg, x, target=[3, 4], samples=samples, noise_level=level, seed=seed, base="guided_backprop"
    )
    noise = torch.randn((samples, 3, 16, 16), generator=torch.Generator().manual_seed(seed))
    sigma = level * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    maps = [
        salience.guided_backprop(vgg, x + sigma.view(-1, 1, 1, 1) * noise[k], [3, 4]).values
        for k in range(samples)
    ]
    stacked = torch.stack(maps)
    torch.testing.assert_close(result.values, stacked.mean(0), rtol=1e-5, atol=1e-6)
    var = salience.smoothgrad(
        vgg,
        x,
        target=[3, 4],
        samples=samples,
        noise_level=level,
        seed=seed,
        base="guided_backprop",
        variant="vargrad",
    )
    torch.testing.assert_close(var.values, stacked.var(0, unbiased=False), rtol=1e-4, atol=1e-6)


class Cubic(nn.Module):
    """logit_c = sum_i w_ci x_i^3: the gradient 3 w x^2 changes with the noise."""

    def __init__(self) -> None:
        super().__init__()
        w = torch.randn(3, 2 * 4 * 4, generator=torch.Generator().manual_seed(6))
        self.w = nn.Parameter(w.double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) ** 3) @ self.w.t()


def _smoothgrad_noise(x: torch.Tensor, samples: int, level: float, seed: int) -> torch.Tensor:
    """The noisy copies SmoothGrad evaluates, ``(samples, N, C, H, W)``, drawn as documented:
    ``randn(samples, C, H, W)`` in float32 from a generator seeded with ``seed`` (shared by the
    samples of the batch), times ``sigma = level * (max - min)`` of each sample."""
    eps = torch.randn((samples, *x.shape[1:]), generator=torch.Generator().manual_seed(seed))
    eps = eps.to(x.dtype)
    sigma = level * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    return x[None] + sigma.view(1, -1, 1, 1, 1) * eps[:, None]


@pytest.mark.parametrize("variant", ["mean", "squared", "vargrad"])
def test_smoothgrad_of_a_cubic_model_closed_form(variant: str) -> None:
    """d/dx sum w x^3 = 3 w x^2: every noisy gradient is known exactly, and noise matters."""
    model = Cubic().eval()
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    samples, level, seed = 7, 0.2, 5
    result = salience.smoothgrad(
        model, x, target=[0, 2], samples=samples, noise_level=level, seed=seed, variant=variant
    )
    noisy = _smoothgrad_noise(x, samples, level, seed)
    w = model.w.detach()[[0, 2]].view(1, 2, 2, 4, 4)
    grads = 3 * w * noisy**2  # (samples, N, C, H, W)
    expected = {
        "mean": grads.mean(0),
        "squared": (grads**2).mean(0),
        "vargrad": grads.var(0, unbiased=False),
    }[variant]
    torch.testing.assert_close(result.values, expected, rtol=1e-10, atol=1e-12)
    # the noise changes the map: it is not the gradient (or its square) at the clean input
    plain = 3 * w[0] * x**2
    clean = {"mean": plain, "squared": plain**2, "vargrad": torch.zeros_like(plain)}[variant]
    assert float((result.values - clean).abs().max()) > 0.05 * float(expected.abs().max())
    torch.testing.assert_close(
        result.extras["sigma"], level * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    )


@pytest.mark.parametrize("base", ["gradient", "input_x_gradient"])
@pytest.mark.parametrize("variant", ["mean", "squared", "vargrad"])
def test_smoothgrad_variants_equal_a_plain_autograd_loop(
    resnet: nn.Module, images: torch.Tensor, base: str, variant: str
) -> None:
    """A ReLU network, one torch.autograd.grad call per noisy copy, moments taken here."""
    samples, level, seed = 6, 0.15, 3
    target = torch.tensor([2, 0, 7])
    result = salience.smoothgrad(
        resnet,
        images,
        target=target,
        samples=samples,
        noise_level=level,
        seed=seed,
        base=base,
        variant=variant,
    )
    maps = []
    for copy in _smoothgrad_noise(images, samples, level, seed):
        leaf = copy.clone().requires_grad_(True)
        score = resnet(leaf).gather(1, target.view(-1, 1)).sum()
        (g,) = torch.autograd.grad(score, leaf)
        maps.append(g * copy if base == "input_x_gradient" else g)
    stacked = torch.stack(maps).double()
    expected = {
        "mean": stacked.mean(0),
        "squared": (stacked**2).mean(0),
        "vargrad": stacked.var(0, unbiased=False),
    }[variant].float()
    scale = float(expected.abs().max())
    torch.testing.assert_close(result.values, expected, rtol=1e-4, atol=1e-5 * scale)
    assert float((stacked.std(0)).max()) > 0.01 * float(stacked.abs().max())  # noise matters


def test_smoothgrad_noise_does_not_depend_on_the_dtype(vgg: nn.Module) -> None:
    """The same seed draws the same noise for float64 inputs: the maps agree to float32."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    single = salience.smoothgrad(vgg, x, [3, 4], samples=4, seed=5)
    double = salience.smoothgrad(deepcopy(vgg).double(), x.double(), [3, 4], samples=4, seed=5)
    assert double.values.dtype == torch.float64
    torch.testing.assert_close(double.values.float(), single.values, rtol=1e-4, atol=1e-5)


def test_smoothgrad_does_not_depend_on_chunking(resnet: nn.Module, images: torch.Tensor) -> None:
    runs = [salience.smoothgrad(resnet, images, samples=5, batch_size=b).values for b in (1, 4, 64)]
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], rtol=1e-5, atol=1e-6)


def test_smoothgrad_without_noise_is_the_base(resnet: nn.Module, images: torch.Tensor) -> None:
    smooth = salience.smoothgrad(
        resnet, images, samples=3, noise_level=0.0, base="input_x_gradient"
    )
    torch.testing.assert_close(smooth.values, salience.input_x_gradient(resnet, images).values)


def test_smoothgrad_option_errors(resnet: nn.Module, images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="unknown SmoothGrad base"):
        salience.smoothgrad(resnet, images, base="occlusion")
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        salience.smoothgrad(resnet, images, samples=0)
    with pytest.raises(ValueError, match="noise_level"):
        salience.smoothgrad(resnet, images, noise_level=-1)
    with pytest.raises(TypeError, match="has no option 'stepz'"):
        salience.explain(resnet, images, method="smoothgrad", stepz=3)


def test_rules_apply_to_the_model_not_to_a_callable_target(vgg: nn.Module) -> None:
    """A ReLU written inside the user's target keeps its ordinary gradient."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    with_relu = salience.guided_backprop(vgg, x, lambda out: -torch.relu(-out[:, 0]))
    with_mask = salience.guided_backprop(vgg, x, lambda out: out[:, 0] * (out[:, 0] < 0).float())
    torch.testing.assert_close(with_relu.values, with_mask.values)


def test_guided_rule_survives_an_in_place_change_of_a_clipped_rectifier_output() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4 * 4 * 4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu6(self.conv(x))
            h.mul_(2)
            return self.fc(h.flatten(1))

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 3, 6, 6) * 4
    guided = salience.guided_backprop(net, x, 1).values
    reference = net.fc.weight[1].view(1, 4, 4, 4) * 2
    pre = net.conv(x)
    inner = (reference.clamp(min=0) * ((pre > 0) & (pre < 6))).detach()
    expected = torch.nn.grad.conv2d_input(x.shape, net.conv.weight.detach(), inner)
    torch.testing.assert_close(guided, expected)


def test_smoothgrad_with_a_callable_target_and_small_passes(
    resnet: nn.Module, images: torch.Tensor
) -> None:
    """Passes smaller than the batch still hold whole copies of it for a callable target."""

    def target(out: torch.Tensor) -> torch.Tensor:
        return out[:, 2] - out[:, 5]

    small = salience.smoothgrad(resnet, images, target=target, samples=3, batch_size=1)
    large = salience.smoothgrad(resnet, images, target=target, samples=3, batch_size=64)
    torch.testing.assert_close(small.values, large.values, rtol=1e-5, atol=1e-6)


class _ChannelsLastGradient(torch.autograd.Function):
    """The identity, whose backward hands its gradient on channels-last (as compiled code may)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x * 1

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


def test_the_map_keeps_the_inputs_layout(x: torch.Tensor) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    wrapped = lambda t: model(_ChannelsLastGradient.apply(t))  # noqa: E731
    found = salience.gradient(wrapped, x, target=1)
    assert found.values.is_contiguous()
    torch.testing.assert_close(found.values, salience.gradient(model, x, target=1).values)
