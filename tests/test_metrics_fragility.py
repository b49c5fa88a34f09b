"""Fragility (Ghorbani et al. 2019) and max-sensitivity (Yeh et al. 2019): known answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from conftest import FunctionalRelus, ResNetish, VGGish, _init, slow_spearman
from salience.metrics import fragility, max_sensitivity, top_k_intersection
from salience.metrics.fragility import _differentiable_map, _resolve_method, _Softplus
from salience.metrics.fragility import _spearman as spearman
from test_contract import assert_same, snapshot

GEN = torch.Generator().manual_seed(5)


def images(n: int = 3, size: int = 16, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class Linear(nn.Module):
    """Two logits linear in x: the gradient map is the same for every input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class Smooth(nn.Module):
    """A CNN without rectifiers (tanh, SiLU): its softplus twin is the model itself."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv1(x))
        x = F.silu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def constant_map(model: nn.Module, inputs: torch.Tensor, target: object = None) -> torch.Tensor:
    """A 'method' whose map ignores the input."""
    m = torch.arange(16 * 16, dtype=torch.float32).view(16, 16).remainder(37)
    return m.expand(inputs.shape[0], 16, 16).clone()


# --------------------------------------------------------------------------- comparisons


def test_spearman_and_top_k_against_slow_references() -> None:
    a = torch.randn(4, 7, 9, generator=GEN)
    b = a + 0.8 * torch.randn(4, 7, 9, generator=GEN)
    b[1] = b[1].round()  # many ties
    b[2] = a[2].clamp(min=0)  # ties at zero, as a ReLU'd CAM has
    rho = spearman(a, b)
    for i in range(4):
        assert rho[i].item() == pytest.approx(slow_spearman(a[i], b[i]), abs=1e-12)
    assert torch.allclose(spearman(a, a), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(spearman(a, -a), -torch.ones(4, dtype=torch.float64))
    const = torch.ones(4, 7, 9)
    assert torch.equal(spearman(const, const), torch.ones(4, dtype=torch.float64))
    assert torch.isnan(spearman(a, const)).all()
    k = 10
    inter = top_k_intersection(a, b, k)
    for i in range(4):
        top = lambda m: set(sorted(range(63), key=lambda p: (-m.flatten()[p].item(), p))[:k])  # noqa: E731
        assert inter[i].item() == len(top(a[i]) & top(b[i])) / k
    assert torch.equal(top_k_intersection(const, const, k), torch.ones(4, dtype=torch.float64))
    for bad in (64, 0, 2.5, True):  # 2.5 gave 1.2, outside [0, 1]
        with pytest.raises(ValueError, match="k must be an integer in"):
            top_k_intersection(a, b, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hold NaN"):
        top_k_intersection(a, torch.full_like(b, float("nan")), k)


# --------------------------------------------------------------------------- known answers


def test_constant_map_is_perfectly_robust_and_insensitive() -> None:
    model = _init(VGGish(), 0)
    x = images()
    with pytest.warns(UserWarning, match="does not change with the input"):
        res = fragility(model, x, constant_map, epsilon=0.1, steps=3)
    for scores in (res.attacked, res.random):
        assert torch.equal(scores.top_k_intersection, torch.ones(3, dtype=torch.float64))
        assert torch.allclose(scores.spearman, torch.ones(3, dtype=torch.float64))
        assert torch.equal(scores.center_shift, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(res.attacked.linf, torch.zeros(3))  # no direction: never moved
    sens = max_sensitivity(model, x, constant_map, 0.2, samples=5)
    assert torch.equal(sens.max, torch.zeros(3, dtype=torch.float64))
    assert sens.figure == 0.0


def test_linear_gradient_map_is_perfectly_robust() -> None:
    model = _init(Linear(), 4)
    x = images()
    with pytest.warns(UserWarning, match="does not change with the input"):
        res = fragility(model, x, "gradient", epsilon=0.5, steps=4)
    assert torch.equal(res.attacked.top_k_intersection, torch.ones(3, dtype=torch.float64))
    assert torch.equal(res.random.top_k_intersection, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(res.attacked.spearman, torch.ones(3, dtype=torch.float64))
    # the gradient of a linear model is its weight, whatever the input: sensitivity 0
    sens = max_sensitivity(model, x, "gradient", 0.5, samples=4)
    assert float(sens.max.max()) < 1e-6


@pytest.mark.parametrize("attack", ["top_k", "center_of_mass"])
def test_attack_beats_random_noise_within_budget_and_keeps_the_label(attack: str) -> None:
    model = _init(VGGish(), 0)
    x = images(4)
    eps = 0.05
    before = snapshot(model)
    copy = x.clone()
    res = fragility(model, x, "gradient", epsilon=eps, steps=8, attack=attack, seed=1)
    assert_same(before, snapshot(model))
    assert torch.equal(x, copy)
    # budget: the perturbation actually used, recomputed here
    used = (res.perturbed - x).abs().flatten(1).amax(1)
    assert torch.allclose(used, res.attacked.linf)
    assert bool((used <= eps + 1e-6).all())
    assert bool((res.random.linf <= eps + 1e-6).all())
    # label: recomputed on the true model
    with torch.no_grad():
        assert torch.equal(model(res.perturbed).argmax(1), model(x).argmax(1))
    assert bool(res.attacked.label_held.all())
    # the attack moves the map more than noise of the same size
    if attack == "top_k":
        a, r = res.attacked.top_k_intersection.mean(), res.random.top_k_intersection.mean()
        assert a < r - 0.2, (a, r)
    else:
        a, r = res.attacked.center_shift.mean(), res.random.center_shift.mean()
        assert a > 2 * r, (a, r)
    assert res.attacked_map.shape == res.original_map.shape == (4, 16, 16)
    assert "fragile" in res.reading() or "robust" in res.reading()
    summary = res.summary()
    assert summary["attack_top_k_intersection"] == pytest.approx(res.figure)


def test_rejected_steps_are_never_returned() -> None:
    """A huge budget flips labels; the returned input must still have the clean label."""
    model = _init(VGGish(), 0)
    x = images(3)
    res = fragility(model, x, "gradient", epsilon=3.0, steps=6)
    with torch.no_grad():
        assert torch.equal(model(res.perturbed).argmax(1), res.label)
    assert bool(res.attacked.label_held.all())
    assert res.kept_steps.shape == (3,)
    assert bool((res.kept_steps <= 6).all())
    assert not bool(res.random.label_held.all())  # noise of that size does flip some


def test_functional_rectifiers_are_smoothed_for_the_direction() -> None:
    """F.relu, relu_(), ReLU6, hardtanh: a piecewise-linear network whose gradient map has a
    zero derivative; only the softplus twin gives the attack a direction."""
    model = _init(FunctionalRelus(), 2)
    x = images(2)
    before = snapshot(model)
    meth = _resolve_method("gradient", None)
    rule = _Softplus(30.0)
    from salience._forward import model_scope

    with model_scope(model, x) as fwd:
        z = x.clone().requires_grad_(True)
        m = _differentiable_map(meth, fwd, z, torch.zeros(2, dtype=torch.long),
                                torch.arange(2), None, rule)  # fmt: skip
        (g,) = torch.autograd.grad(m.sum(), z)
    assert rule.count == 7  # every rectifier call, however written
    assert float(g.abs().max()) > 0
    # without the twin, double backprop through the rectifiers gives exactly nothing
    z = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(z)[:, 0].sum(), z, create_graph=True)
    if plain.requires_grad:
        (g0,) = torch.autograd.grad(plain.abs().amax(1).sum(), z, materialize_grads=True)
        assert float(g0.abs().max()) == 0.0
    res = fragility(model, x, "gradient", epsilon=0.1, steps=4)
    assert float(res.attacked.top_k_intersection.mean()) < 1
    assert_same(before, snapshot(model))


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("gradient", {}),
        ("input_x_gradient", {}),
        ("integrated_gradients", {"steps": 5}),
        ("integrated_gradients", {"steps": 4, "baseline": "blur", "quadrature": "riemann_middle"}),
        ("grad_cam", {}),
        ("grad_cam", {"layer": "conv1", "relu": False}),
    ],
)
def test_differentiable_maps_equal_the_methods(name: str, options: dict) -> None:
    """Without rectifiers the twin is the model: the attacked map must be the method's map."""
    model = _init(Smooth(), 3)
    x = images(2).double()
    model.double()
    att = salience.explain(model, x, name, **options)
    meth = _resolve_method(name, options)
    from salience._forward import model_scope

    with model_scope(model, x) as fwd:
        z = x.clone().requires_grad_(True)
        m = _differentiable_map(meth, fwd, z, att.target, torch.arange(2), att.layer,
                                _Softplus(30.0))  # fmt: skip
    assert m.requires_grad
    torch.testing.assert_close(m.detach(), att.saliency(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["input_x_gradient", "integrated_gradients", "grad_cam"])
def test_other_methods_run_and_respect_the_budget(method: str) -> None:
    model = _init(ResNetish(), 1)
    x = images(2)
    opts = {"steps": 4} if method == "integrated_gradients" else None
    x = x.clamp(-1.5, 1.5)  # the valid range: the attack must stay in it
    res = fragility(
        model, x, method, epsilon=0.05, steps=3, method_options=opts, bounds=(-1.5, 1.5)
    )
    assert bool((res.attacked.linf <= 0.05 + 1e-6).all())
    assert float(res.perturbed.abs().max()) <= 1.5
    assert bool(res.attacked.label_held.all())


def test_batch_equals_samples_one_by_one() -> None:
    model = _init(VGGish(), 0)
    x = images(3)
    whole = fragility(model, x, "gradient", epsilon=0.05, steps=3)
    parts = [fragility(model, x[i : i + 1], "gradient", epsilon=0.05, steps=3) for i in range(3)]
    got = torch.cat([p.attacked.top_k_intersection for p in parts])
    assert torch.equal(whole.attacked.top_k_intersection, got)
    assert torch.allclose(whole.perturbed, torch.cat([p.perturbed for p in parts]))
    chunked = fragility(model, x, "gradient", epsilon=0.05, steps=3, batch_size=2)
    assert torch.equal(chunked.attacked.top_k_intersection, whole.attacked.top_k_intersection)


# --------------------------------------------------------------------------- max-sensitivity


def test_max_sensitivity_equals_a_slow_reference() -> None:
    model = _init(VGGish(), 0)
    x = images(3)
    radius, samples, seed = 0.1, 6, 4
    res = max_sensitivity(model, x, "gradient", radius, samples=samples, seed=seed, batch_size=4)
    gen = torch.Generator().manual_seed(seed)
    deltas = [(2 * torch.rand(3, 16, 16, generator=gen, dtype=torch.float64) - 1) * radius
              for _ in range(samples)]  # fmt: skip
    target = model(x).argmax(1)
    for i in range(3):
        phi = salience.gradient(model, x[i : i + 1], target[i : i + 1]).saliency().double()
        ratios = []
        for d in deltas:
            noisy = (x[i : i + 1].double() + d).float()
            phi_d = salience.gradient(model, noisy, target[i : i + 1]).saliency().double()
            ratios.append(float((phi_d - phi).norm() / phi.norm()))
        assert res.max[i].item() == pytest.approx(max(ratios), rel=1e-6)
        assert res.mean[i].item() == pytest.approx(sum(ratios) / samples, rel=1e-6)
    one = max_sensitivity(model, x[1:2], "gradient", radius, samples=samples, seed=seed)
    assert one.max[0].item() == pytest.approx(res.max[1].item(), rel=1e-6)
    assert "gradient" in res.reading()


def test_max_sensitivity_forward_args_follow_their_rows() -> None:
    class WithBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _init(VGGish(), 0)

        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return self.net(x) * (1 + bias[:, :1])

    model = WithBias()
    x = images(3)
    bias = torch.rand(3, 10, generator=GEN)
    res = max_sensitivity(model, x, "gradient", 0.1, samples=3, forward_args=(bias,), batch_size=2)
    for i in range(3):
        one = max_sensitivity(
            model, x[i : i + 1], "gradient", 0.1, samples=3, forward_args=(bias[i : i + 1],)
        )
        assert one.max[0].item() == pytest.approx(res.max[i].item(), rel=1e-6)


# --------------------------------------------------------------------------- errors


def test_clear_errors() -> None:
    model = _init(VGGish(), 0)
    x = images(2)
    with pytest.raises(ValueError, match="double backprop"):
        fragility(model, x, "guided_backprop", epsilon=0.1)
    with pytest.raises(ValueError, match="epsilon must be a positive"):
        fragility(model, x, "gradient", epsilon=0.0)
    with pytest.raises(ValueError, match="unknown attack"):
        fragility(model, x, "gradient", epsilon=0.1, attack="mass")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k=1000 pixels"):
        fragility(model, x, "gradient", epsilon=0.1, k=1000)
    with pytest.raises(ValueError, match="unknown method"):
        max_sensitivity(model, x, "gradiant")
    with pytest.raises(TypeError, match="has no option"):
        max_sensitivity(model, x, "gradient", method_options={"stepz": 3})
    with pytest.raises(ValueError, match="radius must be a positive"):
        max_sensitivity(model, x, "gradient", -1.0)
    with pytest.raises(ValueError, match=r"\(N, classes\)"):
        fragility(lambda t: t.sum((1, 2, 3)), x, "gradient", epsilon=0.1)
    with pytest.raises(ValueError, match="outside bounds"):
        fragility(model, x, "gradient", epsilon=0.1, bounds=(-1.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        fragility(model, x, "integrated_gradients", epsilon=0.1,
                  method_options={"tolerance": 0.01})  # fmt: skip


def grad_map(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A user's callable gradient map, built with autograd so that the attack can see it."""
    x = inputs if inputs.requires_grad else inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        score = model(x).gather(1, target.view(-1, 1)).sum()
        (g,) = torch.autograd.grad(score, x, create_graph=True)
    return g.abs().amax(1)


def test_a_differentiable_callable_is_attacked_like_the_registered_method() -> None:
    model = _init(VGGish(), 0)
    x = images(3)
    ours = fragility(model, x, "gradient", epsilon=0.05, steps=4)
    theirs = fragility(model, x, grad_map, epsilon=0.05, steps=4)
    assert theirs.method == "grad_map"
    torch.testing.assert_close(theirs.perturbed, ours.perturbed)
    assert torch.equal(theirs.attacked.top_k_intersection, ours.attacked.top_k_intersection)


def test_works_under_no_grad_and_with_inputs_in_a_graph() -> None:
    model = _init(VGGish(), 0)
    x = images(2)
    ref = fragility(model, x, "gradient", epsilon=0.05, steps=2)
    with torch.no_grad():
        a = fragility(model, x, "gradient", epsilon=0.05, steps=2)
    leaf = x.clone().requires_grad_(True)
    b = fragility(model, leaf * 1.0, "gradient", epsilon=0.05, steps=2)
    assert leaf.grad is None
    for res in (a, b):
        assert torch.equal(res.perturbed, ref.perturbed)
    s = max_sensitivity(model, leaf * 1.0, "gradient", 0.1, samples=2)
    assert not s.max.requires_grad
