"""Tests of the CAM family: closed forms, paper properties, many targets, layers, errors."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import salience as sl
from salience import Attribution

CAM_METHODS = ["grad_cam", "grad_cam_plus_plus", "layer_cam", "score_cam"]
ALL_METHODS = [*CAM_METHODS, "cam", "guided_grad_cam"]


def _run(name: str, model: nn.Module, x: Tensor, target: Any = None, **kw: Any) -> Attribution:
    return sl.explain(model, x, name, target, **kw)


# -- a model small enough to compute every map by hand -----------------------------------------


class OneConv(nn.Module):
    """conv 1x1 (1 -> 2 channels: x and -x) -> ReLU -> global average pooling -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
            self.fc.bias.copy_(torch.tensor([0.5, 0.25]))
        self.double().eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


X_HAND = torch.tensor([[[[1.0, -2.0], [3.0, 0.0]]]], dtype=torch.float64)
A0 = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)  # relu(x)
A1 = torch.tensor([[0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)  # relu(-x)
BOTH = torch.tensor([[0, 1]])


def test_cam_by_hand() -> None:
    model = OneConv()
    a = sl.cam(model, X_HAND, BOTH)
    expected = torch.stack([1 * A0 + 2 * A1, 3 * A0 - 1 * A1])  # sum_k w_k^c A^k, signed
    torch.testing.assert_close(a.values[0], expected, rtol=0, atol=1e-12)
    assert a.layer == "relu"
    assert a.values.shape == (1, 2, 2, 2)
    # the spatial mean of the map plus the bias is the logit
    logits = torch.tensor([[2.5, 2.75]], dtype=torch.float64)
    torch.testing.assert_close(a.output, logits)
    torch.testing.assert_close(a.values.mean(dim=(2, 3)) + model.fc.bias, logits)
    torch.testing.assert_close(a.scores, logits)
    assert a.target is not None
    assert a.target.tolist() == [[0, 1]]


def test_grad_cam_by_hand() -> None:
    model = OneConv()
    signed = sl.grad_cam(model, X_HAND, BOTH, relu=False)
    # dy_c / dA^k_ij = w_k^c / 4, so alpha = w / 4
    expected = torch.stack([1 * A0 + 2 * A1, 3 * A0 - 1 * A1]) / 4
    torch.testing.assert_close(signed.values[0], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        signed.extras["weights"], torch.tensor([[[0.25, 0.5], [0.75, -0.25]]], dtype=torch.float64)
    )
    rectified = sl.grad_cam(model, X_HAND, BOTH)
    torch.testing.assert_close(rectified.values[0], expected.clamp(min=0), rtol=0, atol=1e-12)


def test_grad_cam_plus_plus_by_hand() -> None:
    # OneConv has a constant gradient per channel: alpha = 1 / (2 + sum A * g), the same at
    # every position. class 0: g = (1/4, 1/2), sum A = (4, 2): alpha = (1/3, 1/3),
    # w = sum_ij alpha relu(g) = 4 * (1/3) * g = (1/3, 2/3)
    # class 1: g = (3/4, -1/4): alpha_0 = 1 / (2 + 3) = 1/5, w_0 = 4 * 1/5 * 3/4 = 3/5; w_1 = 0
    a = sl.grad_cam_plus_plus(OneConv(), X_HAND, BOTH)
    torch.testing.assert_close(
        a.extras["weights"], torch.tensor([[[1 / 3, 2 / 3], [3 / 5, 0.0]]], dtype=torch.float64)
    )
    expected = torch.stack([A0 / 3 + 2 * A1 / 3, 3 * A0 / 5])
    torch.testing.assert_close(a.values[0], expected, rtol=0, atol=1e-12)


class PositionWeighted(nn.Module):
    """A layer whose gradient varies per position: y_c = sum_kij v_ck W_ij (A_ij^2 - A_ij).

    ``A = relu(conv(x))`` (1x1 conv, 2 channels), ``W`` a fixed non-uniform spatial weighting,
    so ``dy_c / dA^k_ij = v_ck W_ij (2 A^k_ij - 1)``: a different gradient at every position,
    positive where ``A > 1/2`` (or ``< 1/2`` where ``v_ck < 0``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -0.5]).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.2, 0.1]))
        spatial = torch.tensor([[1.0, 2.0, 0.5], [0.25, 3.0, 1.0], [1.5, 0.75, 2.0]])
        self.register_buffer("spatial", spatial)
        self.register_buffer("v", torch.tensor([[1.0, 0.5], [-0.5, 2.0]]))
        self.double().eval()

    def forward(self, x: Tensor) -> Tensor:
        a = self.relu(self.conv(x))
        return torch.einsum("nkhw,hw,ck->nc", a * a - a, self.spatial, self.v)


X_POS = torch.tensor(
    [[[[1.0, -2.0, 0.5], [3.0, 0.0, -1.0], [0.25, 2.0, -0.75]]]], dtype=torch.float64
)


def _position_weighted_by_hand(model: PositionWeighted) -> tuple[Tensor, Tensor]:
    """Layer activation ``(2, 3, 3)`` and analytic gradients ``(classes, 2, 3, 3)``."""
    x = X_POS[0, 0]
    w, b = model.conv.weight.detach().flatten(), model.conv.bias.detach()
    act = torch.stack([(w[k] * x + b[k]).clamp(min=0) for k in range(2)])
    grads = torch.stack(
        [
            torch.stack([model.v[c, k] * model.spatial * (2 * act[k] - 1) for k in range(2)])
            for c in (0, 1)
        ]
    )
    return act, grads


def _cam_from_weights(weights: list[list[float]], act: Tensor) -> Tensor:
    maps = [sum(wk * act[k] for k, wk in enumerate(row)) for row in weights]
    return torch.stack(maps).clamp(min=0)  # type: ignore[arg-type]


def _gcpp_weights(act: Tensor, grads: Tensor, *, torchcam_sum: bool) -> list[list[float]]:
    """Grad-CAM++ channel weights, written out position by position.

    Eq. 19 of Chattopadhyay et al.: alpha_ij = g_ij^2 / (2 g_ij^2 + sum_ab A_ab g_ij^3).
    ``torchcam_sum`` puts torchcam's sum_ab A_ab g_ab^3 in the denominator instead.
    """
    weights = []
    for c in range(grads.shape[0]):
        row = []
        for k in range(act.shape[0]):
            a, g = act[k].tolist(), grads[c, k].tolist()
            total = sum(sum(r) for r in a)
            cube = sum(a[i][j] * g[i][j] ** 3 for i in range(3) for j in range(3))
            wk = 0.0
            for i in range(3):
                for j in range(3):
                    if g[i][j] <= 0:
                        continue  # relu(g) = 0
                    third = cube if torchcam_sum else total * g[i][j] ** 3
                    wk += g[i][j] ** 2 / (2 * g[i][j] ** 2 + third) * g[i][j]
            row.append(wk)
        weights.append(row)
    return weights


def test_grad_cam_plus_plus_by_hand_with_gradients_that_vary_per_position() -> None:
    """Eq. 19 per position, and not torchcam's sum over positions in the denominator."""
    model = PositionWeighted()
    act, grads = _position_weighted_by_hand(model)
    assert bool((grads.flatten(2).std(dim=2) > 0.5).all())  # g varies over positions
    assert bool((grads > 0).any())  # and changes sign
    assert bool((grads < 0).any())
    a = sl.grad_cam_plus_plus(model, X_POS, BOTH, layer="relu", upsample=False)
    assert a.layer == "relu"
    paper = _gcpp_weights(act, grads, torchcam_sum=False)
    torch.testing.assert_close(a.extras["weights"][0], torch.tensor(paper, dtype=torch.float64))
    expected = _cam_from_weights(paper, act)
    torch.testing.assert_close(a.values[0], expected, rtol=1e-12, atol=1e-12)
    # torchcam's denominator gives other weights and another map on this model
    variant = _gcpp_weights(act, grads, torchcam_sum=True)
    other = _cam_from_weights(variant, act)
    assert (torch.tensor(paper) - torch.tensor(variant)).abs().max() > 0.1
    assert float((other - a.values[0]).abs().max()) > 0.1 * float(a.values.abs().max())


def test_layer_cam_by_hand() -> None:
    a = sl.layer_cam(OneConv(), X_HAND, BOTH)
    expected = torch.stack([A0 / 4 + 2 * A1 / 4, 3 * A0 / 4])  # relu(g) * A, summed over k
    torch.testing.assert_close(a.values[0], expected, rtol=0, atol=1e-12)


def test_score_cam_by_hand() -> None:
    # masks: H0 = minmax(A0) = [[1/3, 0], [1, 0]], H1 = minmax(A1) = [[0, 1], [0, 0]]
    # f(x * H0): A0' = [[1/3, 0], [3, 0]] (mean 5/6), A1' = 0 -> logits (4/3, 2.75)
    # f(x * H1): A0' = 0, A1' = [[0, 2], [0, 0]] (mean 1/2) -> logits (1.5, -0.25)
    model = OneConv()
    a = sl.score_cam(model, X_HAND, BOTH, score="logit", relu=False)
    alpha = torch.tensor([[[4 / 3, 1.5], [2.75, -0.25]]], dtype=torch.float64)
    torch.testing.assert_close(a.extras["weights"], alpha)
    expected = torch.stack([4 / 3 * A0 + 1.5 * A1, 2.75 * A0 - 0.25 * A1])
    torch.testing.assert_close(a.values[0], expected, rtol=0, atol=1e-12)
    # the default score is the softmax probability of the class on the masked input
    p = sl.score_cam(model, X_HAND, BOTH, relu=False)
    masked = torch.tensor([[4 / 3, 2.75], [1.5, -0.25]], dtype=torch.float64).softmax(dim=1)
    torch.testing.assert_close(p.extras["weights"][0], masked.T)


# -- paper properties --------------------------------------------------------------------------


def _assert_proportional(a: Tensor, b: Tensor, ratio: float, rtol: float) -> None:
    """``a == ratio * b`` everywhere it matters, and their correlation is 1."""
    a, b = a.double().flatten(), b.double().flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert abs(float(corr) - 1) < 1e-6, float(corr)
    big = a.abs() > 1e-3 * a.abs().max()
    torch.testing.assert_close(a[big] / b[big], torch.full_like(a[big], ratio), rtol=rtol, atol=0)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("upsample", [False, True])
def test_cam_equals_grad_cam_times_hw(resnet: nn.Module, relu: bool, upsample: bool) -> None:
    """Selvaraju et al. §3.1: on GAP + linear nets alpha_k^c = w_k^c / (hw), Grad-CAM = CAM/hw."""
    model = resnet.double()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)).double()
    target = torch.tensor([[0, 3], [1, 4], [2, 5], [9, 8]])
    c = sl.cam(model, x, target, relu=relu, upsample=upsample)
    g = sl.grad_cam(model, x, target, relu=relu, upsample=upsample)
    assert c.layer == g.layer == "layer2"
    _assert_proportional(c.values, g.values, 8 * 8, rtol=1e-10)
    torch.testing.assert_close(c.extras["weights"] / 64, g.extras["weights"])


@pytest.mark.pretrained
def test_cam_equals_grad_cam_on_lite0(lite0: nn.Module, cat: Tensor) -> None:
    c = sl.cam(lite0, cat, 285, upsample=False)
    g = sl.grad_cam(lite0, cat, 285, upsample=False, relu=False)
    assert c.layer == g.layer == "_swish"
    _assert_proportional(c.values, g.values, 7 * 7, rtol=1e-4)


def test_counterfactual_is_grad_cam_of_the_negated_score(vgg: nn.Module, images: Tensor) -> None:
    target = torch.tensor([1, 4, 7])
    cf = sl.grad_cam(vgg, images, target, counterfactual=True)

    def negated(out: Tensor) -> Tensor:
        return -out.gather(1, target.view(-1, 1))[:, 0]

    torch.testing.assert_close(cf.values, sl.grad_cam(vgg, images, negated).values)
    signed = sl.grad_cam(vgg, images, target, counterfactual=True, relu=False)
    plain = sl.grad_cam(vgg, images, target, relu=False)
    torch.testing.assert_close(signed.values, -plain.values)
    assert cf.extras["counterfactual"] is True
    torch.testing.assert_close(cf.scores, plain.scores)  # the class score, not its negation


def test_counterfactual_grad_cam_by_hand(vgg: nn.Module, images: Tensor) -> None:
    """Selvaraju et al. §3.3: Grad-CAM with the negated gradients, computed here with a hook."""
    target = torch.tensor([1, 4, 7])
    store: list[Tensor] = []
    handle = vgg.features.register_forward_hook(lambda _m, _i, out: store.append(out))
    try:
        out = vgg(images.clone())
    finally:
        handle.remove()
    (act,) = store
    (g,) = torch.autograd.grad(out.gather(1, target.view(-1, 1)).sum(), act)
    alpha = (-g).mean(dim=(2, 3))  # (N, K)
    low = (alpha[:, :, None, None] * act.detach()).sum(1, keepdim=True).clamp(min=0)
    plain = (-alpha[:, :, None, None] * act.detach()).sum(1, keepdim=True).clamp(min=0)
    assert float(low.sum()) > 0  # not vacuous: both maps have support, in different places
    assert float((low - plain).abs().max()) > 0.1 * float(low.max())

    cf = sl.grad_cam(vgg, images, target, counterfactual=True, upsample=False)
    torch.testing.assert_close(cf.values, low, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cf.extras["weights"][:, 0], alpha, rtol=1e-5, atol=1e-8)
    # upsampled bilinearly with half-pixel centres (align_corners=False), as documented
    up = sl.grad_cam(vgg, images, target, counterfactual=True)
    expected = F.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up.values, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(up.scores, out.detach().gather(1, target.view(-1, 1))[:, 0])


def test_guided_grad_cam_is_guided_backprop_times_grad_cam(
    resnet: nn.Module, images: Tensor
) -> None:
    a = sl.guided_grad_cam(resnet, images, 3, layer="layer1")
    gb = sl.guided_backprop(resnet, images, 3)
    gc = sl.grad_cam(resnet, images, 3, layer="layer1")
    torch.testing.assert_close(a.values, gb.values * gc.values, rtol=0, atol=0)
    assert a.values.shape == images.shape
    assert a.layer == "layer1"
    assert a.saliency().shape == (3, 16, 16)


# -- class discrimination on a model trained here ------------------------------------------------

SIZE, BOX = 20, 6
_HORIZONTAL = torch.zeros(BOX, BOX)
_HORIZONTAL[::2] = 1.0
PATTERNS = (_HORIZONTAL, _HORIZONTAL.T.contiguous())  # class 0: horizontal, 1: vertical stripes


def _scene(objects: list[tuple[int, int, int]], g: torch.Generator) -> Tensor:
    """One grey image: noise plus each (class, top, left) pattern."""
    x = 0.1 * torch.randn(1, SIZE, SIZE, generator=g)
    for c, top, left in objects:
        x[0, top : top + BOX, left : left + BOX] += PATTERNS[c]
    return x


class Stripes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.fc = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def stripes() -> nn.Module:
    return train_stripes()


def train_stripes(steps: int = 120) -> nn.Module:
    """A two-class multi-label detector, trained in a few seconds on synthetic scenes."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = Stripes()
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    with torch.enable_grad():
        for _ in range(steps):
            xs, ys = [], []
            present = torch.rand(32, 2, generator=g) < 0.6
            for i in range(32):
                cells = torch.randperm(9, generator=g)[:2].tolist()
                objects = [
                    (c, cells[c] // 3 * 7, cells[c] % 3 * 7) for c in (0, 1) if present[i, c]
                ]
                xs.append(_scene(objects, g))
                ys.append(present[i].float())
            loss = F.binary_cross_entropy_with_logits(model(torch.stack(xs)), torch.stack(ys))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.mark.parametrize("method", ["grad_cam", "cam"])
def test_maps_of_each_class_peak_inside_its_object(stripes: nn.Module, method: str) -> None:
    g = torch.Generator().manual_seed(1)
    layouts = [((0, 0), (14, 14)), ((14, 14), (0, 0)), ((0, 14), (14, 0)), ((7, 7), (0, 0))]
    layouts += [((14, 0), (7, 14)), ((7, 0), (7, 14))]
    for box0, box1 in layouts:
        x = _scene([(0, *box0), (1, *box1)], g).unsqueeze(0)
        a = _run(method, stripes, x, torch.tensor([[0, 1]]))
        assert torch.sigmoid(a.output).min() > 0.9  # the model sees both objects
        for c, (top, left) in enumerate((box0, box1)):
            row, col = divmod(int(a.values[0, c].argmax()), SIZE)
            assert top <= row < top + BOX, (method, c, box0, box1)
            assert left <= col < left + BOX, (method, c, box0, box1)


# -- many targets at once ------------------------------------------------------------------------


@pytest.mark.parametrize("method", [*CAM_METHODS, "cam"])
def test_k_targets_equal_k_separate_calls(resnet: nn.Module, method: str) -> None:
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1], [0, 9, 0, 9, 7]])
    many = _run(method, resnet, x, target)
    assert many.values.shape == (3, 5, 16, 16)
    assert many.scores.shape == (3, 5)
    assert torch.equal(many.target, target)
    for k in range(5):
        one = _run(method, resnet, x, target[:, k])
        torch.testing.assert_close(many.values[:, k : k + 1], one.values, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(many.scores[:, k], one.scores)
    with pytest.raises(ValueError, match=r"values\[:, k\]"):
        many.saliency()


def test_k_targets_take_one_forward_and_one_batched_backward(
    vgg: nn.Module, images: Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    forwards: list[int] = []
    handle = vgg.register_forward_pre_hook(lambda *_: forwards.append(1))
    calls: list[dict[str, Any]] = []
    grad = torch.autograd.grad

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    try:
        sl.grad_cam(vgg, images, torch.arange(30).view(3, 10) % 10)
    finally:
        handle.remove()
    assert len(forwards) == 1
    assert len(calls) == 1
    assert calls[0]["is_grads_batched"] is True


@pytest.mark.parametrize("method", [*CAM_METHODS, "cam"])
def test_works_under_no_grad(resnet: nn.Module, images: Tensor, method: str) -> None:
    for target in (3, torch.tensor([[1, 2], [3, 4], [5, 6]])):
        reference = _run(method, resnet, images, target)
        with torch.no_grad():
            result = _run(method, resnet, images, target)
        torch.testing.assert_close(result.values, reference.values)


def test_pixel_methods_still_refuse_k_targets(vgg: nn.Module, images: Tensor) -> None:
    with pytest.raises(ValueError, match=r"must be \(N,\) class indices"):
        sl.gradient(vgg, images, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="once per column"):
        sl.guided_grad_cam(vgg, images, torch.zeros(3, 2, dtype=torch.long))


# -- Score-CAM ---------------------------------------------------------------------------------


def _score_cam_reference(model: nn.Module, x: Tensor, layer: nn.Module, c: int) -> Tensor:
    """The authors' loop, one channel and one sample at a time (batch of one)."""
    store: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: store.append(out.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    acts = store[0][0]
    weights = torch.zeros(acts.shape[0], dtype=x.dtype)
    for k, a in enumerate(acts):
        up = F.interpolate(a[None, None], x.shape[-2:], mode="bilinear", align_corners=False)
        if up.max() == up.min():
            continue
        with torch.no_grad():
            out = model(x * (up - up.min()) / (up.max() - up.min()))
        weights[k] = torch.softmax(out, dim=1)[0, c]
    cam = F.relu((weights[:, None, None] * acts).sum(0))
    return F.interpolate(cam[None, None], x.shape[-2:], mode="bilinear", align_corners=False)


def test_score_cam_matches_the_authors_loop(resnet: nn.Module) -> None:
    x = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    a = sl.score_cam(resnet, x, 6, layer="layer2")
    ref = _score_cam_reference(resnet, x, resnet.layer2, 6)
    torch.testing.assert_close(a.values, ref, rtol=1e-5, atol=1e-6)


def test_score_cam_evaluates_channels_with_the_same_mask_once() -> None:
    """Channels A, 2A and A / 2 share one normalised mask; -A has its own."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 1, 3, padding=1),
        nn.Conv2d(1, 4, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]).view(4, 1, 1, 1))
        model[1].bias.zero_()
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    a = sl.score_cam(model, x, 2, layer="1")
    assert a.extras["masked_inputs"] == 2
    weights = a.extras["weights"][0, 0]
    assert weights[0] == weights[1] == weights[2] != weights[3]
    ref = _score_cam_reference(model, x, model[1], 2)
    torch.testing.assert_close(a.values, ref, rtol=1e-5, atol=1e-6)


def test_score_cam_does_not_depend_on_batch_size(vgg: nn.Module, images: Tensor) -> None:
    runs = [sl.score_cam(vgg, images, [1, 2, 3], batch_size=b) for b in (1, 5, 16, 10_000)]
    for other in runs[1:]:
        torch.testing.assert_close(other.values, runs[0].values, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(other.extras["weights"], runs[0].extras["weights"])


def test_score_cam_skips_constant_channels_and_keeps_no_graph(resnet: nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    grad_modes: list[bool] = []
    handle = resnet.register_forward_pre_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    try:
        a = sl.score_cam(resnet, x, 0, layer="layer2")
    finally:
        handle.remove()
    assert not any(grad_modes)
    store: list[Tensor] = []
    with torch.no_grad():
        h = resnet.layer2.register_forward_hook(lambda _m, _i, out: store.append(out))
        resnet(x)
        h.remove()
    flat = store[0].flatten(2)
    varying = (flat.amax(2) > flat.amin(2)).any(0).sum()
    assert a.extras["masked_inputs"] <= 2 * int(varying)
    constant = flat.amax(2) == flat.amin(2)
    assert torch.all(a.extras["weights"][:, 0][constant] == 0)


# -- layers --------------------------------------------------------------------------------------


def test_default_layers(vgg: nn.Module, resnet: nn.Module, functional_relus: nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16)
    assert sl.grad_cam(vgg, x).layer == "features"
    assert sl.grad_cam(resnet, x).layer == "layer2"
    a = sl.grad_cam(functional_relus, x)  # the ReLU6 module runs twice; the last call is used
    assert a.layer == "act"
    assert a.extras["layer_calls"] == 2


def test_layer_by_module_equals_layer_by_name(resnet: nn.Module, images: Tensor) -> None:
    by_name = sl.grad_cam(resnet, images, 2, layer="layer1.conv2")
    by_module = sl.grad_cam(resnet, images, 2, layer=resnet.layer1.conv2)
    torch.testing.assert_close(by_name.values, by_module.values, rtol=0, atol=0)
    assert by_module.layer == "layer1.conv2"


def _grad_cam_reference(activation: Tensor, score: Tensor) -> Tensor:
    (g,) = torch.autograd.grad(score.sum(), activation)
    return (g.mean(dim=(2, 3), keepdim=True) * activation).sum(1, keepdim=True).detach()


def test_a_reused_module_is_explained_at_its_last_call(resnet: nn.Module, images: Tensor) -> None:
    """ResNetish.relu runs after the stem and after ``down``; the second output is explained."""
    a = sl.grad_cam(resnet, images, 1, layer="relu", upsample=False, relu=False)
    assert a.extras["layer_calls"] == 2
    m = resnet
    h = m.layer1(m.relu(m.stem(images)))
    act = m.relu(m.down(h)).detach().requires_grad_(True)
    score = m.fc(torch.flatten(m.pool(m.layer2(act)), 1))[:, 1]
    torch.testing.assert_close(a.values, _grad_cam_reference(act, score))


def test_inplace_relu_after_the_layer_leaves_its_activation_intact(
    vgg: nn.Module, images: Tensor
) -> None:
    """features.0 (a conv) is followed by ReLU(inplace=True): its own output is explained."""
    a = sl.grad_cam(vgg, images, 5, layer="features.0", relu=False)
    act = vgg.features[0](images).detach().requires_grad_(True)
    score = vgg.classifier(vgg.features[1:](act.clone()))[:, 5]
    torch.testing.assert_close(a.values, _grad_cam_reference(act, score))
    assert bool((a.values < 0).any())  # pre-ReLU activations: the map can be negative


@pytest.mark.pretrained
def test_lite0_default_layer_is_the_activated_head(lite0: nn.Module, cat: Tensor) -> None:
    """``_swish`` runs on the stem and the head; the default is its last call, the head."""
    a = sl.grad_cam(lite0, cat, 285, upsample=False, relu=False)
    assert a.layer == "_swish"
    assert a.extras["layer_calls"] == 2
    act = lite0.extract_features(cat).detach().requires_grad_(True)
    score = lite0._fc(lite0._avg_pooling(act).flatten(1))[:, 285]
    torch.testing.assert_close(a.values, _grad_cam_reference(act, score), rtol=1e-4, atol=1e-6)
    assert a.values.shape == (1, 1, 7, 7)


class TokenNet(nn.Module):
    """A ViT-shaped toy: patch tokens plus a class token, a token-wise block, mean pooling."""

    def __init__(self, d: int = 6, classes: int = 4, patch: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.mix = nn.Linear(d, d)
        self.act = nn.ReLU()
        self.fc = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1)
        return self.fc(self.act(self.mix(tokens))[:, 1:].mean(dim=1))


class TokenNetTwin(nn.Module):
    """The same network written as a CNN: the token-wise linear layer is a 1x1 convolution."""

    def __init__(self, net: TokenNet) -> None:
        super().__init__()
        self.embed = net.embed
        self.mix = nn.Conv2d(net.mix.in_features, net.mix.out_features, 1)
        with torch.no_grad():
            self.mix.weight.copy_(net.mix.weight[:, :, None, None])
            self.mix.bias.copy_(net.mix.bias)
        self.act = nn.ReLU()
        self.fc = net.fc

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.act(self.mix(self.embed(x))).mean(dim=(2, 3)))


@pytest.mark.parametrize("method", [*CAM_METHODS, "cam"])
def test_reshape_explains_tokens_like_the_equivalent_cnn(method: str) -> None:
    torch.manual_seed(0)
    net = TokenNet().eval()
    twin = TokenNetTwin(net).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def grid(t: Tensor) -> Tensor:
        return t[:, 1:].transpose(1, 2).unflatten(2, (4, 4))

    a = _run(method, net, x, [1, 3], layer="act", reshape=grid)
    b = _run(method, twin, x, [1, 3], layer="act")
    torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-6)


def test_reshape_must_only_rearrange() -> None:
    net = TokenNet().eval()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="only select and rearrange"):
        sl.grad_cam(
            net, x, layer="act", reshape=lambda t: 2 * t[:, 1:].transpose(1, 2).unflatten(2, (4, 4))
        )
    with pytest.raises(ValueError, match=r"must return a spatial feature map"):
        sl.grad_cam(net, x, layer="act", reshape=lambda t: t[:, 1:])
    with pytest.raises(ValueError, match="pass layer= as well"):
        sl.grad_cam(net, x, reshape=lambda t: t)


# -- segmentation: a callable target on a dense output --------------------------------------------


class TinySeg(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@pytest.fixture
def seg() -> nn.Module:
    torch.manual_seed(3)
    return TinySeg().eval()


def _masks(n: int) -> Tensor:
    masks = torch.zeros(n, 16, 16)
    for i in range(n):
        masks[i, 2 * i : 2 * i + 6, 3 : 3 + 5 + i] = 1
    return masks


def test_segmentation_mask_target_closed_forms(seg: nn.Module, images: Tensor) -> None:
    """S = sum_hw mask (W_c . A + b_c): dS/dA_k = W_ck mask, so alpha_k = W_ck mean(mask)."""
    masks = _masks(3)
    target = sl.mask_target(2, masks)
    gc = sl.grad_cam(seg, images, target, relu=False)
    assert gc.layer == "body"
    assert gc.target is None
    w = seg.head.weight[2, :, 0, 0].detach()
    act = seg.body(images).detach()
    expected = (
        masks.mean(dim=(1, 2)).view(3, 1, 1, 1) * torch.einsum("k,nkhw->nhw", w, act)[:, None]
    )
    torch.testing.assert_close(gc.values, expected)
    lc = sl.layer_cam(seg, images, target)
    expected = masks[:, None] * torch.einsum("k,nkhw->nhw", w.clamp(min=0), act)[:, None]
    torch.testing.assert_close(lc.values, expected)
    torch.testing.assert_close(gc.scores, (seg(images)[:, 2] * masks).sum(dim=(1, 2)))


@pytest.mark.parametrize("method", [*CAM_METHODS, "guided_grad_cam", "gradient", "guided_backprop"])
def test_segmentation_targets_work_per_sample(seg: nn.Module, images: Tensor, method: str) -> None:
    """A batch with per-sample masks gives the maps of the samples explained one by one."""
    masks = _masks(3)
    batch = _run(method, seg, images, sl.mask_target(1, masks))
    assert torch.isfinite(batch.values).all()
    assert batch.values.abs().sum() > 0
    for i in range(3):
        one = _run(method, seg, images[i : i + 1], sl.mask_target(1, masks[i : i + 1]))
        torch.testing.assert_close(batch.values[i : i + 1], one.values, rtol=1e-5, atol=1e-6)


# -- models with other inputs: a question, a caption ----------------------------------------


class VQA(nn.Module):
    """Image features (pooled to ``pool``) gated by a question's mean word embedding."""

    def __init__(self, pool: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(pool)
        )
        self.words = nn.Embedding(11, 8)
        self.fc = nn.Linear(8, 6)

    def forward(self, x: Tensor, question: Tensor) -> Tensor:
        h = self.features(x)
        q = self.words(question).mean(1)  # (N, length, 8): read as tokens, it would be a map
        return self.fc((h * q[:, :, None, None]).mean((2, 3)))


class Captioner(nn.Module):
    """Teacher-forced: each caption token's state holds the pooled image features."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.words = nn.Embedding(20, 8)
        self.decoder = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20)

    def forward(self, x: Tensor, tokens: Tensor) -> Tensor:
        image = self.encoder(x).mean((2, 3))
        return self.out(torch.tanh(self.decoder(self.words(tokens) + image[:, None])))


class PatchTokens(nn.Module):
    """Patches by unfold and nn.Linear (no convolution shows the grid), with a keep mask."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.mix, self.fc = nn.Linear(48, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        patches = F.unfold(x, 4, stride=4).transpose(1, 2)  # (N, 16, 48): 4 x 4 patches
        tokens = torch.relu(self.mix(self.embed(patches))) * keep[..., None]
        return self.fc(tokens.mean(1))


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_a_mask_of_patches_is_no_question(dtype: torch.dtype) -> None:
    """A (N, 16) mask beside 16 patch tokens: its length is no text's."""
    x, keep = torch.randn(2, 3, 16, 16), torch.ones(2, 16, dtype=dtype)
    found = sl.grad_cam(PatchTokens(), x, 1, forward_args=(keep,))
    assert (found.layer, str(found.extras["layout"])) == ("mix", "tokens 4x4")


class Siamese(nn.Module):
    """One backbone run on the image, then on a second input (a reference) that the score
    ignores; with ``twice=False`` the reference is not run."""

    def __init__(self, twice: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU())
        self.head = nn.Linear(6, 4)
        self.twice = twice

    def forward(self, x: Tensor, reference: Tensor) -> Tensor:
        logits = self.head(self.body(x).mean((2, 3)))
        if self.twice:
            logits = logits + 0 * self.body(reference).mean()
        return logits


@pytest.mark.parametrize("method", CAM_METHODS)
def test_a_backbone_run_twice_is_read_at_the_images_call(method: str) -> None:
    """Score-CAM found the image's call with gradients, then recorded the layer again by name:
    its last call, the reference's (a zero map)."""
    x, reference = torch.randn(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)
    found = _run(method, Siamese(True), x, 1, forward_args=(reference,))
    expected = _run(method, Siamese(False), x, 1, forward_args=(reference,))
    assert found.layer == "body"
    assert (found.extras["layer_call"], found.extras["layer_calls"]) == (1, 2)
    torch.testing.assert_close(found.values, expected.values)
    assert found.values.abs().sum() > 0


@pytest.mark.parametrize(
    ("model", "length", "layer"),
    [
        (VQA(16), 5, "features"),  # 5 tokens would be 1 + 2 x 2 patches of 8
        (VQA(4), 16, "features"),  # 16 tokens fit the 4 x 4 grid the image made
        (Captioner(), 5, "encoder"),  # the caption's states depend on the image too
    ],
    ids=["vqa-5", "vqa-16", "captioner"],
)
@pytest.mark.parametrize("method", [*CAM_METHODS, "guided_grad_cam"])
def test_the_default_layer_is_the_images_not_the_texts(
    method: str, model: nn.Module, length: int, layer: str
) -> None:
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 3, 16, 16)
    tokens = torch.randint(0, 11, (2, length))
    target = 1 if isinstance(model, VQA) else (lambda out: out[:, 2, 3])
    found = _run(method, model, x, target, forward_args=(tokens,))
    expected = _run(method, model, x, target, forward_args=(tokens,), layer=layer)
    assert found.layer == layer
    torch.testing.assert_close(found.values, expected.values)


# -- hygiene -----------------------------------------------------------------------------------


def _state(model: nn.Module) -> tuple[Any, ...]:
    hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )
    params = [(p.detach().clone(), p.requires_grad, p.grad) for p in model.parameters()]
    return hooks, [m.training for m in model.modules()], params


def _assert_same_state(before: tuple[Any, ...], after: tuple[Any, ...]) -> None:
    assert before[0] == after[0]  # no hook left behind
    assert before[1] == after[1]  # train/eval flags
    for (v0, r0, g0), (v1, r1, g1) in zip(before[2], after[2], strict=True):
        assert torch.equal(v0, v1)
        assert r0 == r1
        assert g0 is None
        assert g1 is None


@pytest.mark.parametrize("method", ALL_METHODS)
def test_no_side_effects(resnet: nn.Module, images: Tensor, method: str) -> None:
    resnet.fc.train()  # a flag the user set must stay as it is
    resnet.fc.weight.requires_grad_(False)
    before = _state(resnet)
    x = images.clone()
    _run(method, resnet, images, 2)
    _assert_same_state(before, _state(resnet))
    assert torch.equal(images, x)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_hooks_are_removed_when_the_call_fails(vgg: nn.Module, images: Tensor, method: str) -> None:
    before = _state(vgg)
    with pytest.raises((ValueError, TypeError)):
        _run(method, vgg, images, 99)  # class out of range: raised after the forward pass
    with pytest.raises((ValueError, TypeError)):
        _run(method, vgg, images, 0, layer="classifier.1")
    _assert_same_state(before, _state(vgg))


@pytest.mark.parametrize("method", [*CAM_METHODS, "guided_grad_cam"])
def test_batch_equals_samples_one_by_one(vgg: nn.Module, images: Tensor, method: str) -> None:
    batch = _run(method, vgg, images, [3, 1, 4])
    for i, c in enumerate([3, 1, 4]):
        one = _run(method, vgg, images[i : i + 1], c)
        torch.testing.assert_close(batch.values[i : i + 1], one.values, rtol=1e-5, atol=1e-7)


def test_registered_with_their_kind() -> None:
    assert set(sl.available_methods(kind="cam")) >= {"cam", *CAM_METHODS}
    assert "guided_grad_cam" in sl.available_methods(kind="pixel")
    spec = sl.get_method("score_cam")
    assert "batch_size" in spec.options
    assert "layer" in spec.options


# -- errors ------------------------------------------------------------------------------------


class WithBranch(nn.Module):
    """An auxiliary head that runs but does not reach the output, and a layer that never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.aux = nn.Conv2d(4, 4, 1)
        self.unused = nn.Conv2d(4, 4, 1)
        self.pair = nn.Identity()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x))
        self.aux(h)
        return self.fc(h.mean(dim=(2, 3)))


class ReturnsTuple(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x


@pytest.mark.parametrize(
    ("layer", "error", "match"),
    [
        ("featurs", ValueError, r"no layer named 'featurs'; did you mean 'features'"),
        ("classifier.1", ValueError, r"outputs shape \(3, 32\), not a spatial feature map"),
        (nn.Conv2d(3, 3, 1), ValueError, "not a submodule of the model"),
        (3, TypeError, "layer must be an nn.Module"),
    ],
)
def test_bad_layers(vgg: nn.Module, images: Tensor, layer: Any, error: type, match: str) -> None:
    for method in CAM_METHODS:
        with pytest.raises(error, match=match):
            _run(method, vgg, images, layer=layer)


def test_layer_that_never_runs_or_does_not_matter(images: Tensor) -> None:
    model = WithBranch().eval()
    with pytest.raises(ValueError, match="'unused' did not run in the forward pass"):
        sl.grad_cam(model, images, layer="unused")
    with pytest.raises(ValueError, match="does not depend on layer 'aux'"):
        sl.grad_cam(model, images, layer="aux")
    model.pair = ReturnsTuple()
    model.forward = lambda x: model.fc(torch.relu(model.conv(model.pair(x)[0])).mean(dim=(2, 3)))  # type: ignore[method-assign]
    with pytest.raises(TypeError, match="'pair' returned a tuple, not a tensor"):
        sl.grad_cam(model, images, layer="pair")
    assert not any(m._forward_hooks for m in model.modules())


def test_cam_refuses_other_architectures(vgg: nn.Module, images: Tensor) -> None:
    with pytest.raises(ValueError, match=r"global average.*Use grad_cam"):
        sl.cam(vgg, images)
    with pytest.raises(TypeError, match="use grad_cam"):
        sl.cam(vgg, images, lambda out: out[:, 0])

    class SoftmaxHead(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x).softmax(dim=1)

    resnet = SoftmaxHead(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    )
    with pytest.raises(ValueError, match="not the output of its last linear layer"):
        sl.cam(resnet.eval(), images)
    # a non-linearity between the pooled layer and the classifier
    body = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Tanh(), nn.Linear(4, 3)
    )
    with pytest.raises(ValueError, match="differs from the spatial mean"):
        sl.cam(body.eval(), images, layer="0")


@pytest.mark.parametrize("fc", [None, "head"])
def test_cam_with_a_one_by_one_convolution_as_classifier(fc: str | None) -> None:
    """DLA's and DPN's head: global average pooling kept 1 x 1, a 1 x 1 convolution, flatten."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            body=nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 1)),
            pool=nn.AdaptiveAvgPool2d(1),
            head=nn.Conv2d(6, 5, 1),
            flat=nn.Flatten(),
        )
    ).double().eval()  # fmt: skip
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    c = sl.cam(model, x, [1, 4], fc=fc, upsample=False)
    assert c.layer == "body"
    w = model.head.weight.detach()[[1, 4], :, 0, 0]
    expected = torch.einsum("nk,nkhw->nhw", w, model.body(x).detach())[:, None]
    torch.testing.assert_close(c.values, expected)
    g = sl.grad_cam(model, x, [1, 4], relu=False, upsample=False)
    _assert_proportional(c.values, g.values, 8 * 8, rtol=1e-10)  # CAM = Grad-CAM x hw
    with pytest.raises(TypeError, match=r"nn.Linear or a 1 x 1 nn.Conv2d\); 'body.0' is Conv2d"):
        sl.cam(model, x, fc="body.0")


class _TwoHeads(nn.Module):
    """GAP + linear with a 1 x 1 convolution in the body that notes the hooks it runs under,
    and a second head the forward pass switches to with ``use_b``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Conv2d(4, 4, 1)  # a candidate classifier for the search (1 x 1)
        self.last = nn.Conv2d(4, 4, 3, padding=1)
        self.fc_a, self.fc_b = nn.Linear(4, 3), nn.Linear(4, 3)
        self.use_b, self.softmax = False, False
        self.hooked: list[int] = []  # forward hooks on the 1 x 1 convolution, per pass

    def forward(self, x: Tensor) -> Tensor:
        self.hooked.append(len(self.mix._forward_hooks))
        feats = self.last(torch.relu(self.mix(torch.relu(self.conv(x)))))
        out = (self.fc_b if self.use_b else self.fc_a)(feats.mean(dim=(2, 3)))
        return out.softmax(1) if self.softmax else out


def test_cam_remembers_the_classifier_and_searches_again_when_it_no_longer_fits() -> None:
    """Finding the classifier hooks every linear layer and 1 x 1 convolution; later calls hook
    the one found, and search again when the model takes another head or adds a softmax."""
    torch.manual_seed(0)
    model, x = _TwoHeads().double().eval(), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    first = sl.cam(model, x, [0, 2])
    # the searches of the layer and of the classifier hook every module, `mix` too
    assert first.layer == "last"
    assert first.extras["fc"] == "fc_a"
    assert model.hooked == [2]
    second = sl.cam(model, x, [0, 2])
    assert model.hooked == [2, 0]  # the layer and the classifier alone
    assert torch.equal(second.values, first.values)
    torch.testing.assert_close(first.values, sl.cam(model, x, [0, 2], fc="fc_a").values)
    model.use_b = True  # fc_a no longer runs: searched again, fc_b's weights
    b = sl.cam(model, x, [0, 2])
    assert b.extras["fc"] == "fc_b"
    assert model.hooked[-2:] == [0, 1]
    torch.testing.assert_close(b.values, sl.cam(model, x, [0, 2], fc="fc_b").values)
    assert not torch.allclose(b.values, first.values)
    model.softmax = True  # fc_b still runs, its output is no longer the output: the search says
    with pytest.raises(ValueError, match="not the output of its last linear layer 'fc_b'") as info:
        sl.cam(model, x, [0, 2])
    assert type(info.value) is ValueError  # (said as itself, not as a private class)
    model.softmax, model.use_b = False, False
    model.fc_a = nn.Linear(4, 3).double()  # replaced: the new weights
    torch.testing.assert_close(
        sl.cam(model, x, [0, 2]).values, sl.cam(model, x, [0, 2], fc="fc_a").values
    )
    assert not any(m._forward_hooks for m in model.modules())


class _WithEmbedding(nn.Module):
    """GAP + linear, and on request a projection of the pooled features after the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc, self.proj = nn.Linear(4, 5), nn.Linear(4, 2)

    def forward(self, x: Tensor, embed: bool = False) -> Tensor:
        f = self.conv(x).mean((2, 3))
        out = self.fc(f)
        if embed:
            self.last_embedding = self.proj(f)  # kept on the side
        return out


def test_cam_finds_the_classifier_before_a_projection_kept_on_the_side() -> None:
    """A fresh model raised ('not the output of its last linear layer 'proj''), the same call
    after one without the projection gave the map: the result hung on the calls before."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    fresh = sl.cam(_WithEmbedding().eval(), x, 1, forward_args={"embed": True})
    assert fresh.extras["fc"] == "fc"
    model = _WithEmbedding().eval()
    sl.cam(model, x, 1)
    again = sl.cam(model, x, 1, forward_args={"embed": True})
    assert again.extras["fc"] == "fc"


def test_cam_follows_the_reshape_its_layer_error_advises() -> None:
    """A last map of 1x1 is not read as a grid: the error shows layer= and reshape=, which
    cam takes like the other CAM methods (a 1x1 map: the logit minus the bias everywhere)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 16, 16)
    assert sl.grad_cam(net, x, [1, 2]).layer == "1"  # by default: the last map of more cells
    with pytest.raises(ValueError, match=r"layer='3', reshape=lambda t: t \(channels first\)"):
        sl.cam(net, x, [1, 2], layer="3")
    a = sl.cam(net, x, [1, 2], layer="3", reshape=lambda t: t)
    logits = net(x).detach()[[0, 1], [1, 2]] - net[6].bias.detach()[[1, 2]]
    torch.testing.assert_close(a.values, logits.view(2, 1, 1, 1).expand(2, 1, 16, 16))
    assert a.extras["layout"] == "custom"


def test_cam_with_explicit_layer_and_fc(resnet: nn.Module, images: Tensor) -> None:
    a = sl.cam(resnet, images, 1, layer=resnet.layer2, fc="fc")
    torch.testing.assert_close(a.values, sl.cam(resnet, images, 1).values)
    with pytest.raises(TypeError, match=r"fc must be a linear layer"):
        sl.cam(resnet, images, 1, fc="pool")


def test_models_that_cannot_be_hooked(images: Tensor) -> None:
    with pytest.raises(TypeError, match=r"must be an nn\.Module"):
        sl.grad_cam(lambda x: x.mean(dim=(2, 3)), images)


@pytest.mark.parametrize("method", CAM_METHODS)
def test_a_compiled_model_is_refused_with_what_to_pass(
    method: str, vgg: nn.Module, images: Tensor
) -> None:
    """Compiled code runs no hooks: the search found no layer, or said the layer did not run."""
    compiled = torch.compile(vgg, backend="eager")
    compiled(images)
    with pytest.raises(TypeError, match=r"torch\.compile .*\(model\._orig_mod\)"):
        _run(method, compiled, images)


# -- a layer given by name: the autograd graph starts at the layer ------------------------------


def _whole_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record the whole graph even at a named layer (what the capture does without a name)."""
    import importlib

    cam = importlib.import_module("salience.methods.cam")
    capture = cam._capture
    monkeypatch.setattr(cam, "_capture", lambda *a, **k: capture(*a, **k, _whole_graph=True))


LATE_CASES = [
    ("vgg", "features.0"),  # a convolution followed by an in-place ReLU
    ("vgg", "features.6"),
    ("resnet", "relu"),  # a ReLU module run three times: the last call is explained
    ("resnet", "layer1"),
]


@pytest.mark.parametrize("method", ["grad_cam", "grad_cam_plus_plus", "layer_cam"])
@pytest.mark.parametrize(("net", "layer"), LATE_CASES)
def test_a_named_layer_gives_the_whole_graph_map(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    images: Tensor,
    method: str,
    net: str,
    layer: str,
) -> None:
    model = request.getfixturevalue(net)
    late = sl.explain(model, images, method, 1, layer=layer)
    _whole_graph(monkeypatch)
    whole = sl.explain(model, images, method, 1, layer=layer)
    assert late.extras["layer_calls"] == whole.extras["layer_calls"]
    assert whole.values.abs().amax() > 0
    torch.testing.assert_close(late.values, whole.values, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(late.scores, whole.scores, rtol=1e-6, atol=1e-7)


def test_lite0_reused_swish_and_counterfactual(
    monkeypatch: pytest.MonkeyPatch, lite0: nn.Module, cat: Tensor
) -> None:
    late = [sl.grad_cam(lite0, cat, 281, layer="_swish", counterfactual=c) for c in (False, True)]
    _whole_graph(monkeypatch)
    whole = [sl.grad_cam(lite0, cat, 281, layer="_swish", counterfactual=c) for c in (False, True)]
    for a, b in zip(late, whole, strict=True):
        assert a.extras["layer_calls"] == 2
        torch.testing.assert_close(a.values, b.values, rtol=1e-6, atol=1e-7)


def _saved_bytes(run: Any) -> int:
    """Bytes that autograd saved for the backward pass during ``run()``."""
    saved = [0]

    def pack(t: Tensor) -> Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return saved[0]


def test_the_graph_before_a_named_layer_is_not_recorded(
    monkeypatch: pytest.MonkeyPatch, vgg: nn.Module, images: Tensor
) -> None:
    late = _saved_bytes(lambda: sl.grad_cam(vgg, images, 1, layer="features.6"))
    _whole_graph(monkeypatch)
    whole = _saved_bytes(lambda: sl.grad_cam(vgg, images, 1, layer="features.6"))
    # features.0-5 (two convolutions at full resolution) hold most of the activations
    assert late < 0.5 * whole, (late, whole)


def test_the_remembered_default_layer_keeps_only_the_graph_after_it(
    vgg: nn.Module, images: Tensor
) -> None:
    """The first call chooses the default layer on the whole graph; the next, which remembers
    it, records the graph from the layer on, with the same map."""
    results: list[sl.Attribution] = []
    first = _saved_bytes(lambda: results.append(sl.grad_cam(vgg, images, 1)))
    second = _saved_bytes(lambda: results.append(sl.grad_cam(vgg, images, 1)))
    assert second < 0.5 * first, (second, first)
    assert results[0].layer == results[1].layer
    torch.testing.assert_close(results[0].values, results[1].values, rtol=1e-6, atol=1e-7)


class GradInside(nn.Module):
    """Runs its features inside ``torch.enable_grad()``: leaving the block turns autograd off
    again when the call began without it."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        with torch.enable_grad():
            a = self.features(x)
        return self.head(a.mean((2, 3)))


def test_autograd_switched_off_after_the_layer_records_the_whole_graph(images: Tensor) -> None:
    model = GradInside().eval()
    result = sl.grad_cam(model, images, 2, layer="features.0")
    a = model.features[0](images).detach().requires_grad_(True)  # Grad-CAM by hand
    (g,) = torch.autograd.grad(model.head(torch.relu(a).mean((2, 3)))[:, 2].sum(), a)
    expected = (g.mean((2, 3), keepdim=True) * a).sum(1).clamp(min=0).detach()
    assert expected.abs().amax() > 0
    torch.testing.assert_close(result.values[:, 0], expected, rtol=1e-5, atol=1e-6)


class TorchvisionVGG(nn.Module):
    """torchvision's VGG layout: features, an adaptive average pool to a fixed grid, an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Linear(8 * 16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


@pytest.mark.parametrize("size", [16, 8, 12], ids=["identity", "upsampled", "resampled"])
def test_an_adaptive_pool_that_only_resamples_is_no_default_layer(size: int) -> None:
    """At 16² the pool is the identity, at 8² it copies a 2 x 2 map to 4 x 4, at 12² it
    resamples 3 x 3 to 4 x 4: the map is the last one the convolutions computed."""
    torch.manual_seed(0)
    model = TorchvisionVGG().eval()
    x = torch.randn(2, 3, size, size)
    found = sl.grad_cam(model, x, 1)
    assert found.layer == "features"
    torch.testing.assert_close(found.values, sl.grad_cam(model, x, 1, layer="features").values)
    assert sl.grad_cam(model, x, 1, layer="avgpool").layer == "avgpool"  # still yours to pick


class RectifiedByFunction(nn.Module):
    """conv -> F.relu -> an identity adaptive pool: the rectified map is no module's output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.avgpool = nn.AdaptiveAvgPool2d((8, 8))
        self.fc = nn.Linear(6 * 64, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(F.relu(self.conv(x))).flatten(1))


def test_a_pool_after_a_functional_rectifier_is_the_rectified_map() -> None:
    """Passing over the pool would fall back to the convolution before the ReLU."""
    found = sl.grad_cam(RectifiedByFunction().eval(), torch.randn(2, 3, 8, 8), 1)
    assert found.layer == "avgpool"
