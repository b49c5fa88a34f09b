"""Input invariance (Kindermans et al.): the mean-shifted twin is exact, and the methods that
the paper finds invariant are, and the others are not."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience.metrics import InputInvariance, input_invariance, mean_shift_twin
from salience.models.efficientnet_lite import Conv2dStaticSamePadding
from test_contract import assert_same, snapshot

GEN = torch.Generator().manual_seed(17)


def _init(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None:
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.double().eval()


def conv_net(first: nn.Module | None = None) -> nn.Module:
    """Conv (zero padding 1) -> ReLU -> conv -> ReLU -> pool -> linear, in float64."""
    return _init(
        nn.Sequential(
            first if first is not None else nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 5),
        )
    )


def images(n: int = 3, size: int = 12) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=GEN, dtype=torch.float64) * 2 - 1


SHIFTS = [1.0, -0.7, [0.5, -1.0, 2.0]]


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize(
    "first",
    [
        "conv_padding",
        "zero_pad_module",
        "static_same_padding",
        "constant_pad",
        "reflect_padding",
        "same_string",
        "weight_norm",
    ],
)
def test_twin_is_exact(first, shift):
    layers = {
        "conv_padding": lambda: nn.Conv2d(3, 6, 3, padding=1),
        "zero_pad_module": lambda: nn.Sequential(nn.ZeroPad2d((1, 2, 0, 1)), nn.Conv2d(3, 6, 3)),
        # EfficientNet-Lite0's stem: a ZeroPad2d child called inside the conv's forward
        "static_same_padding": lambda: Conv2dStaticSamePadding(3, 6, 3, 2, image_size=12),
        "constant_pad": lambda: nn.Sequential(nn.ConstantPad2d(1, 0.25), nn.Conv2d(3, 6, 3)),
        "reflect_padding": lambda: nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"),
        "same_string": lambda: nn.Conv2d(3, 6, 4, padding="same", bias=False),
        # a parametrization runs when the conv reads its weight: it is no step on the input
        "weight_norm": lambda: nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 6, 3).double()),
    }
    model = conv_net(layers[first]())
    x = images()
    before = snapshot(model)
    twin = mean_shift_twin(model, x, shift)
    assert_same(before, snapshot(model))
    s = torch.as_tensor(shift, dtype=torch.float64).view(1, -1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(twin(x + s), model(x), rtol=0, atol=1e-12)
        # the twin is a different network: on the unshifted input it differs
        assert not torch.allclose(twin(x), model(x), atol=1e-3)
    # module and parameter names are kept; a first layer without bias gets one
    names = {n for n, _ in model.named_parameters()}
    assert names <= {n for n, _ in twin.named_parameters()}
    added = len(list(twin.parameters())) - len(names)
    assert added == (first in ("same_string", "static_same_padding"))


@pytest.mark.parametrize("wrap", [nn.utils.weight_norm, nn.utils.spectral_norm])
def test_twin_of_a_legacy_normed_model_after_a_pass_with_gradients(wrap):
    """Its computed weight, kept as an attribute, is in an autograd graph after any method's
    pass: the twin is copied with it detached, and is exact."""
    model = conv_net(wrap(nn.Conv2d(3, 6, 3, padding=1).double()))
    x = images()
    salience.gradient(model, x, 0)
    twin = mean_shift_twin(model, x, 1.0)
    with torch.no_grad():
        assert torch.allclose(twin(x + 1.0), model(x), rtol=0, atol=1e-12)


def test_zero_padding_needs_the_shifted_pad_value():
    """Bias absorption alone is wrong at the border of a zero-padded convolution."""
    model = conv_net()
    x = images()
    naive = mean_shift_twin(model, x, 1.0)
    with torch.no_grad():
        conv = naive[0]
        out = F.conv2d(F.pad(x + 1, (1, 1, 1, 1)), conv.weight, conv.bias)  # pads with zeros
        want = model[0](x)
        inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
        assert torch.allclose(out[inner], want[inner], atol=1e-12)
        assert (out - want).abs()[:, :, 0].max() > 0.1  # the border is off
        assert torch.allclose(conv(x + 1), want, atol=1e-12)  # the twin pads with the shift


def test_first_linear_layer_after_flatten_with_a_per_channel_shift():
    model = _init(nn.Sequential(nn.Flatten(), nn.Linear(3 * 5 * 5, 7), nn.ReLU(), nn.Linear(7, 3)))
    x = images(4, 5)
    twin = mean_shift_twin(model, x, [1.0, 2.0, -3.0])
    s = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(twin(x + s), model(x), atol=1e-12)


class _SkipFromInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)) + x.mean())


class _PaddedInside(nn.Conv2d):
    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1)))


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 3)), r"goes through '0' \(ReLU\)"),
        (nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)), r"'0' \(BatchNorm2d\)"),
        (_SkipFromInput(), "does not reproduce the model's outputs"),
        (nn.Sequential(nn.ConvTranspose2d(3, 4, 3)), "runs no nn.Conv1d/2d/3d"),
        (nn.Sequential(nn.Flatten(), nn.ReLU()), "no first layer"),
        (_PaddedInside(3, 4, 3, padding=1), "pads with zeros inside its own forward"),
    ],
)
def test_twin_refuses_what_it_cannot_absorb(model, match):
    model = model.double().eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        mean_shift_twin(model, images(2, 8), 1.0)
    assert_same(before, snapshot(model))


def test_bad_shifts():
    model = conv_net()
    with pytest.raises(ValueError, match="one number per input channel"):
        mean_shift_twin(model, images(), [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        mean_shift_twin(model, images(), float("nan"))
    with pytest.raises(TypeError, match="number"):
        mean_shift_twin(model, images(), "one")


def test_kindermans_property_on_a_small_network():
    model = conv_net()
    x = images(4)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = input_invariance(
            model, x,
            ["gradient", "input_x_gradient", "integrated_gradients", "guided_backprop",
             "grad_cam"],
            shift=[1.0, -0.5, 2.0], options={"integrated_gradients": {"steps": 16}},
        )  # fmt: skip
    assert_same(before, snapshot(model))
    assert isinstance(result, InputInvariance)
    assert list(result) == [
        "gradient",
        "input_x_gradient",
        "integrated_gradients",
        "guided_backprop",
        "grad_cam",
    ]
    assert result.layer == "0"
    assert result.padding == ("0",)
    assert result.output_change < 1e-12
    for name in ("gradient", "guided_backprop", "grad_cam"):
        assert result[name].passed, name
        assert result[name].change.max() < 1e-10
    for name in ("input_x_gradient", "integrated_gradients"):
        assert not result[name].passed, name
        assert result[name].change.min() > 0.1
    assert "passes" in result["gradient"].verdict()
    assert "not invariant" in result["input_x_gradient"].verdict()
    rows = result.table()
    assert [r["invariant"] for r in rows] == [True, False, False, True, True]
    assert "InputInvariance" in repr(result)
    # the attributions are kept for inspection
    assert result["gradient"].shifted.values.shape == x.shape


def test_integrated_gradients_with_a_baseline_shifted_alongside_is_invariant():
    model = conv_net()
    x = images(3)
    baseline = torch.rand(1, 3, 12, 12, generator=GEN, dtype=torch.float64) - 0.5
    for base in ("zeros", -0.3, baseline):
        opts = {"integrated_gradients": {"steps": 16, "baseline": base}}
        fixed = input_invariance(model, x, ["integrated_gradients"], shift=1.5, options=opts)
        moved = input_invariance(
            model, x, ["integrated_gradients"], shift=1.5, options=opts, shift_baseline=True
        )
        assert not fixed["integrated_gradients"].passed
        assert moved["integrated_gradients"].change.max() < 1e-10
    with pytest.raises(ValueError, match="does not follow the input"):
        input_invariance(
            model, x, ["integrated_gradients"], options={"integrated_gradients":
                                                         {"baseline": "black"}},
            shift_baseline=True,
        )  # fmt: skip


def test_bad_arguments():
    model = conv_net()
    with pytest.raises(ValueError, match="unknown method"):
        input_invariance(model, images(), ["gradiant"])
    with pytest.raises(TypeError, match="has no option"):
        input_invariance(model, images(), ["gradient"], options={"gradient": {"steps": 2}})
    with pytest.raises(ValueError, match="tolerance"):
        input_invariance(model, images(), ["gradient"], tolerance=0)
    with pytest.raises(ValueError, match="not run"):
        input_invariance(model, images(), ["gradient"], options={"smoothgrad": {}})


def test_twin_agrees_with_quantus_and_quantus_shift_misses_a_pixel():
    """Quantus 0.6 builds the same twin for an unpadded first convolution (it shifts the bias
    of the first registered module by its response to a constant image). Its InputInvariance
    verdict cannot be compared: its perturbation leaves the first value of every sample
    unshifted (pixel (0, 0) of channel 0), so even the gradient is "not invariant" there."""
    quantus = pytest.importorskip("quantus")
    from quantus.functions.perturb_func import perturb_batch
    from quantus.helpers.model.pytorch_model import PyTorchModel

    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 10 * 10, 4)
    ).eval()
    x = torch.rand(4, 3, 12, 12, generator=GEN)
    theirs = PyTorchModel(model, channel_first=True, softmax=False, device="cpu")
    theirs = theirs.add_mean_shift_to_first_layer(-1.0, (1, 3, 12, 12))
    ours = mean_shift_twin(model, x, -1.0)
    assert torch.allclose(ours[0].bias, theirs[0].bias, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(ours(x - 1), theirs(x - 1), atol=1e-6)

    metric = quantus.InputInvariance(input_shift=-1, disable_warnings=True)
    arr = x.numpy()
    shifted = perturb_batch(
        perturb_func=metric.perturb_func, arr=arr, indexed_axes=np.arange(0, arr[0].ndim),
        indices=np.tile(np.arange(0, arr[0].size), (len(arr), 1)),
    )  # fmt: skip
    unshifted = np.argwhere(np.abs(shifted - arr) < 1e-6)
    if quantus.__version__.startswith("0.6"):
        assert unshifted.tolist() == [[i, 0, 0, 0] for i in range(4)]


@pytest.mark.pretrained
def test_kindermans_property_on_lite0(lite0, cat):
    """Lite0 pads its stem with a ZeroPad2d: the twin pads with the shift instead, and is exact.

    Measured on the cat (float32): outputs agree to 3e-7 of the largest logit; the gradient
    changes by 2.2e-3 (relative L2; a few ReLU6 units at a kink switch under float32
    rounding; in float64 it agrees bit for bit), gradient x input by 283 %, zero-baseline IG
    (4 steps) by 173 %; IG with the baseline shifted alongside by 1.7e-3.
    """
    result = input_invariance(
        lite0, cat, ["gradient", "input_x_gradient", "integrated_gradients"], shift=1.0,
        options={"integrated_gradients": {"steps": 4}},
    )  # fmt: skip
    assert result.layer == "_conv_stem"
    assert result.padding == ("_conv_stem.static_padding",)
    assert result.output_change < 1e-5
    assert result["gradient"].passed
    assert result["gradient"].rank_correlation.min() > 0.99
    assert result["input_x_gradient"].change.min() > 0.5
    assert result["integrated_gradients"].change.min() > 0.5
    shifted = input_invariance(
        lite0, cat, ["integrated_gradients"], shift=1.0, shift_baseline=True,
        options={"integrated_gradients": {"steps": 4}},
    )  # fmt: skip
    assert shifted["integrated_gradients"].passed
