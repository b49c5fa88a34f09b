"""Numerical parity with Captum 0.9, and independent references where Captum is wrong.

Captum is the reference for the plain gradient, gradient x input, Integrated Gradients and, on
networks whose only rectifiers are ``nn.ReLU`` modules, DeconvNet and guided backprop. Two
places where Captum itself is wrong are documented by tests rather than copied:

- its ``riemann_trapezoid`` weights sum to ``(n - 1) / n`` instead of 1 (step ``1/n`` with the
  ends halved, on nodes spaced ``1/(n-1)``), so its trapezoid IG is ours times ``(n - 1)/n``;
  ours is checked against the mean of Captum's left and right sums on ``n - 1`` intervals,
  which is the trapezoid rule by definition;
- its DeconvNet and guided backprop hook ``nn.ReLU`` modules only, so on EfficientNet-Lite0
  (``nn.ReLU6``) they return the plain gradient; ours is checked there against a copy of the
  network whose ReLU6 modules call a test-defined ``torch.autograd.Function``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import salience
from conftest import BasicBlock, ResNetish

captum_attr = pytest.importorskip("captum.attr")

pytestmark = [
    pytest.mark.filterwarnings("ignore:Setting backward hooks:UserWarning"),
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients"),
]

TARGETS = torch.tensor([1, 4, 7])  # one class per sample of the batch of three
STEPS = 8
QUADRATURES = (
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
    "gausslegendre",
)


def assert_parity(actual: Tensor, expected: Tensor, *, rtol: float = 1e-5, atol: float = 1e-6):
    """``assert_close`` with ``atol`` relative to the largest magnitude of ``expected``."""
    assert actual.shape == expected.shape
    scale = float(expected.detach().abs().max())
    assert scale > 0, "a map of zeros compares equal to anything scaled by it"
    torch.testing.assert_close(actual, expected.detach(), rtol=rtol, atol=atol * scale)


def captum_map(cls: type, model: nn.Module, inputs: Tensor, target, **kwargs) -> Tensor:
    """Run a Captum attribution on a private copy of the inputs."""
    return cls(model).attribute(inputs.clone(), target=target, **kwargs).detach()


@pytest.fixture(params=["vgg", "resnet"])
def net(request: pytest.FixtureRequest) -> nn.Module:
    return request.getfixturevalue(request.param)


@pytest.fixture
def tensor_baseline(images: Tensor) -> Tensor:
    """A per-sample baseline, different for each image (not a constant)."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(11))
    return 0.3 * noise + 0.1


# -- small networks: gradient family --------------------------------------------------------

GRADIENT_FAMILY = [
    ("Saliency", salience.gradient, {"abs": False}),  # Captum's default abs=True is |grad|
    ("InputXGradient", salience.input_x_gradient, {}),
    ("Deconvolution", salience.deconvnet, {}),
    ("GuidedBackprop", salience.guided_backprop, {}),
]


@pytest.mark.parametrize(
    ("peer", "ours", "kwargs"), GRADIENT_FAMILY, ids=[g[0] for g in GRADIENT_FAMILY]
)
def test_gradient_family_matches_captum(net, images, peer, ours, kwargs):
    expected = captum_map(getattr(captum_attr, peer), net, images, TARGETS, **kwargs)
    result = ours(net, images, TARGETS)
    assert_parity(result.values, expected)
    assert torch.equal(result.target, TARGETS)


# -- small networks: Integrated Gradients ---------------------------------------------------


@pytest.mark.parametrize("quadrature", QUADRATURES)
@pytest.mark.parametrize("baseline_kind", ["zeros", "tensor"])
def test_integrated_gradients_matches_captum(
    net, images, tensor_baseline, quadrature, baseline_kind
):
    baseline = torch.zeros_like(images) if baseline_kind == "zeros" else tensor_baseline
    ig = captum_attr.IntegratedGradients(net)
    expected, expected_delta = ig.attribute(
        images.clone(),
        baselines=baseline,
        target=TARGETS,
        n_steps=STEPS,
        method=quadrature,
        return_convergence_delta=True,
    )
    ours = salience.integrated_gradients(
        net,
        images,
        TARGETS,
        baseline="zeros" if baseline_kind == "zeros" else baseline,
        steps=STEPS,
        quadrature=quadrature,
    )
    if quadrature == "riemann_trapezoid":
        # Captum's weights are 1/n with the ends halved: they sum to (n-1)/n (see the module
        # docstring). Its result is exactly ours scaled by that sum.
        assert_parity(ours.values * ((STEPS - 1) / STEPS), expected)
        # The true trapezoid rule on n nodes is the mean of the left and right Riemann sums on
        # the n - 1 intervals between them: check ours against that, computed by Captum.
        sums = [
            ig.attribute(
                images.clone(), baselines=baseline, target=TARGETS, n_steps=STEPS - 1, method=m
            )
            for m in ("riemann_left", "riemann_right")
        ]
        assert_parity(ours.values, (sums[0] + sums[1]) / 2)
        return
    assert_parity(ours.values, expected)
    # Same definition of the completeness gap: sum(attribution) - (S(x) - S(x')).
    gap_scale = float((ours.scores - ours.extras["baseline_scores"]).abs().max())
    torch.testing.assert_close(
        ours.extras["delta"], expected_delta.to(ours.values.dtype), rtol=0, atol=1e-5 * gap_scale
    )


# -- SmoothGrad, SmoothGrad² and VarGrad against Captum's NoiseTunnel --------------------------
#
# Captum draws its own noise, so the two can only agree in distribution. On
# f_c(x) = sum_i w_ci x_i^2 the noisy gradient 2 w (x + sigma eps) has closed-form moments:
# mean 2 w x, second moment 4 w^2 (x^2 + sigma^2), variance 4 w^2 sigma^2. With many samples
# both estimates must lie within a few standard errors of those, pixel by pixel.


class SquareNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        w = torch.randn(3, 1 * 4 * 4, generator=torch.Generator().manual_seed(21)).double()
        self.w = nn.Parameter(w)

    def forward(self, x: Tensor) -> Tensor:
        return (x.flatten(1) ** 2) @ self.w.t()


NOISE_TUNNEL = {"mean": "smoothgrad", "squared": "smoothgrad_sq", "vargrad": "vargrad"}


@pytest.mark.parametrize("variant", list(NOISE_TUNNEL))
def test_smoothgrad_variants_agree_with_captum_noise_tunnel_in_distribution(variant):
    model = SquareNet().eval()
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    samples, level, target = 4096, 0.2, 1
    sigma = level * float(x.max() - x.min())
    w = model.w.detach()[target].view(1, 1, 4, 4)
    moments = {  # closed form and the variance of one sample's contribution
        "mean": (2 * w * x, 4 * w**2 * sigma**2),
        "squared": (4 * w**2 * (x**2 + sigma**2), 16 * w**4 * (4 * x**2 * sigma**2 + 2 * sigma**4)),
        "vargrad": (4 * w**2 * sigma**2 * torch.ones_like(x), 2 * (4 * w**2 * sigma**2) ** 2),
    }
    exact, one = moments[variant]
    standard_error = (one / samples).sqrt()

    ours = salience.smoothgrad(
        model, x, target=target, samples=samples, noise_level=level, variant=variant, seed=0
    ).values
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = captum_attr.NoiseTunnel(captum_attr.Saliency(model)).attribute(
            x.clone(),
            nt_type=NOISE_TUNNEL[variant],
            nt_samples=samples,
            stdevs=sigma,
            target=target,
            abs=False,  # Captum's default |grad| would change the variance
        )
    for name, estimate in (("salience", ours), ("captum", theirs.detach())):
        z = ((estimate - exact) / standard_error).abs().max()
        assert float(z) < 5, f"{name}: {float(z):.1f} standard errors from the closed form"
    # and the closed forms of the three variants are far apart: each check is specific
    others = [m[0] for v, m in moments.items() if v != variant]
    for other in others:
        assert float(((other - exact) / standard_error).abs().max()) > 20


# -- a ReLU module reused in one forward ----------------------------------------------------
#
# ResNetish calls ``self.relu`` twice per forward, and each BasicBlock calls its ``relu`` twice.
# Captum's hooks (captum._utils.common._register_backward_hook) keep one ``grad_out`` slot per
# module and device, overwritten by each call's output-gradient hook; the input-gradient hook
# of a call reads that slot. DeconvNet (which reads the slot) is right as long as each call's
# input hook fires before another call of the same module stores its output gradient, which
# holds when the calls are sequential, as here; guided backprop reads the input gradient and
# does not use the slot. So Captum is right on ResNetish and it is compared directly above.
# Here the result on the reused-module net must also equal the result on a copy whose every
# call has its own ReLU module (the same weights): a reused module changes nothing for us.


class DistinctBlock(BasicBlock):
    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.relu_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu_out(out + x)


class DistinctResNet(ResNetish):
    def __init__(self, classes: int = 10) -> None:
        super().__init__(classes)
        self.layer1 = DistinctBlock(8)
        self.layer2 = DistinctBlock(16)
        self.relu_down = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.stem(x))
        x = self.layer1(x)
        x = self.relu_down(self.down(x))
        x = self.layer2(x)
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.mark.parametrize(
    ("peer", "ours", "kwargs"), GRADIENT_FAMILY, ids=[g[0] for g in GRADIENT_FAMILY]
)
def test_reused_relu_module_equals_distinct_modules(resnet, images, peer, ours, kwargs):
    distinct = DistinctResNet().eval()
    distinct.load_state_dict(resnet.state_dict())  # ReLUs hold no state: same keys
    relus = [m for m in distinct.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == len(set(map(id, relus))) == 6
    with torch.no_grad():
        torch.testing.assert_close(distinct(images), resnet(images), rtol=0, atol=0)

    reused = ours(resnet, images, TARGETS).values
    separate = ours(distinct, images, TARGETS).values
    torch.testing.assert_close(reused, separate, rtol=0, atol=0)
    expected = captum_map(getattr(captum_attr, peer), distinct, images, TARGETS, **kwargs)
    assert_parity(separate, expected)


# -- independent references for the modified rectifier rules -------------------------------


class GuidedClamp(torch.autograd.Function):
    """``clamp(x, 0, upper)``; backward: ``relu(grad) * [0 < x < upper]``."""

    @staticmethod
    def forward(ctx, x: Tensor, upper: float | None) -> Tensor:
        ctx.save_for_backward(x)
        ctx.upper = upper
        return x.clamp(min=0.0, max=upper)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        passes = x > 0
        if ctx.upper is not None:
            passes = passes & (x < ctx.upper)
        return grad.clamp(min=0.0) * passes, None


class DeconvClamp(torch.autograd.Function):
    """``clamp(x, 0, upper)``; backward: ``relu(grad)`` whatever the input."""

    @staticmethod
    def forward(ctx, x: Tensor, upper: float | None) -> Tensor:
        return x.clamp(min=0.0, max=upper)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad.clamp(min=0.0), None


RULES = {"guided_backprop": GuidedClamp, "deconvnet": DeconvClamp}


class RuleReLU6(nn.Module):
    """Stands in for ``nn.ReLU6`` and applies a modified backward rule."""

    def __init__(self, function: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: Tensor) -> Tensor:
        return self.function.apply(x, 6.0)


def reference_gradient(forward, inputs: Tensor, target: Tensor) -> Tensor:
    """Plain ``d output[target] / d inputs`` of ``forward``."""
    x = inputs.detach().clone().requires_grad_(True)
    out = forward(x)
    picked = out.gather(1, target.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(picked, x)
    return grad


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_functional_relus_match_independent_reference(functional_relus, images, method):
    rule = RULES[method]

    def r(x: Tensor) -> Tensor:
        return rule.apply(x, None)

    def r6(x: Tensor) -> Tensor:
        return rule.apply(x, 6.0)

    def forward(x: Tensor) -> Tensor:  # FunctionalRelus.forward, with the rule at each rectifier
        c = functional_relus.convs
        x = r6(c[0](x))  # nn.ReLU6
        x = r(c[1](x))  # F.relu
        x = r(c[2](x))  # torch.relu
        x = r(c[3](x))  # Tensor.relu_
        x = r6(c[4](x))  # F.relu6
        x = r6(c[5](x))  # F.hardtanh(0, 6)
        x = r6(c[6](x))  # nn.ReLU6 reused
        return functional_relus.fc(torch.flatten(F.max_pool2d(x, 2), 1))

    targets = torch.tensor([0, 2, 4])
    with torch.no_grad():
        torch.testing.assert_close(forward(images), functional_relus(images), rtol=0, atol=0)
    expected = reference_gradient(forward, images, targets)
    plain = salience.gradient(functional_relus, images, targets).values
    assert not torch.allclose(expected, plain), "the rule changes nothing: a vacuous test"
    result = getattr(salience, method)(functional_relus, images, targets)
    assert_parity(result.values, expected)


# -- pretrained EfficientNet-Lite0 on the cat photo -----------------------------------------


@pytest.fixture(scope="module")
def cat_class(lite0: nn.Module, cat: Tensor) -> Tensor:
    with torch.no_grad():
        return lite0(cat).argmax(1)


@pytest.fixture(scope="module")
def cat_gradient(lite0: nn.Module, cat: Tensor, cat_class: Tensor) -> Tensor:
    """Captum's plain gradient of the predicted logit."""
    return captum_map(captum_attr.Saliency, lite0, cat, cat_class, abs=False)


@pytest.mark.pretrained
def test_lite0_gradient_matches_captum(lite0, cat, cat_class, cat_gradient):
    assert_parity(salience.gradient(lite0, cat, cat_class).values, cat_gradient)
    # target=None explains the predicted class, as resolved above.
    assert_parity(salience.gradient(lite0, cat).values, cat_gradient)


@pytest.mark.pretrained
def test_lite0_input_x_gradient_matches_captum(lite0, cat, cat_class):
    expected = captum_map(captum_attr.InputXGradient, lite0, cat, cat_class)
    assert_parity(salience.input_x_gradient(lite0, cat, cat_class).values, expected)


@pytest.mark.pretrained
def test_lite0_integrated_gradients_matches_captum(lite0, cat, cat_class):
    steps = 16
    ig = captum_attr.IntegratedGradients(lite0)
    expected, delta = ig.attribute(
        cat.clone(),
        target=cat_class,
        n_steps=steps,
        method="gausslegendre",
        internal_batch_size=8,
        return_convergence_delta=True,
    )
    ours = salience.integrated_gradients(
        lite0, cat, cat_class, steps=steps, quadrature="gausslegendre", batch_size=8
    )
    assert_parity(ours.values, expected)
    gap_scale = float((ours.scores - ours.extras["baseline_scores"]).abs().max())
    torch.testing.assert_close(ours.extras["delta"], delta.float(), rtol=0, atol=1e-5 * gap_scale)


@pytest.mark.pretrained
@pytest.mark.parametrize("peer", ["GuidedBackprop", "Deconvolution"])
def test_lite0_captum_ignores_relu6(lite0, cat, cat_class, cat_gradient, peer):
    """Documents the peer's failure: with no ``nn.ReLU`` to hook, it is the plain gradient."""
    assert not any(isinstance(m, nn.ReLU) for m in lite0.modules())
    peer_map = captum_map(getattr(captum_attr, peer), lite0, cat, cat_class)
    torch.testing.assert_close(peer_map, cat_gradient, rtol=0, atol=0)


@pytest.mark.pretrained
@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_lite0_rectifier_rules_match_independent_reference(
    lite0, cat, cat_class, cat_gradient, method
):
    reference = copy.deepcopy(lite0)
    reference._swish = RuleReLU6(RULES[method])
    for block in reference._blocks:
        block._swish = RuleReLU6(RULES[method])
    assert not any(isinstance(m, nn.ReLU6) for m in reference.modules())
    with torch.no_grad():
        torch.testing.assert_close(reference(cat), lite0(cat), rtol=0, atol=0)

    expected = reference_gradient(reference, cat, cat_class)
    assert not torch.allclose(expected, cat_gradient), "the rule changes nothing here"
    result = getattr(salience, method)(lite0, cat, cat_class)
    assert_parity(result.values, expected)
