"""Every registered method on every architecture of the zoo: a correct map or a clear error.

The expected outcome of each (method, model) cell is written down in :func:`expect` from the
specification, not from what the code does today:

- a *map*: an :class:`~salience.Attribution` with finite values of the documented shape, the
  same for a batch as for its samples one by one, and the model left as it was;
- a *clear error*: a ``ValueError``, ``TypeError`` or ``RuntimeError`` whose message is a
  sentence and names what matters (the activations a rectifier rule cannot apply to,
  ``layer=`` for a CAM layer that cannot be read as a grid), the model left as it was;
- *either*, where both are right (CAM on a head that is not GAP + linear, CAM on
  transformers), with conditions on each.

A cell that fails because a feature has not landed yet goes in :data:`MISSING` (and its
siblings), with the feature named: it becomes ``xfail(strict=False)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import salience
import zoo
from salience.registry import get_method
from test_contract import assert_same, snapshot

METHODS = sorted(salience.available_methods())
CHEAP: dict[str, dict[str, Any]] = {
    "smoothgrad": {"samples": 4},
    "integrated_gradients": {"steps": 8},
    "score_cam": {"batch_size": 64},
    "rise": {"masks": 16},
    "occlusion": {"window": 16, "stride": 16},
}
CAM_METHODS = {"cam", "grad_cam", "grad_cam_plus_plus", "layer_cam", "score_cam"}
# Methods that read a layer: the CAM family, and Guided Grad-CAM (pixel-shaped).
LAYER_METHODS = CAM_METHODS | {"guided_grad_cam"} | set(salience.available_methods("cam"))
# Methods that change the backward pass at rectifiers.
RECTIFIER_RULES = {"deconvnet", "guided_backprop", "guided_grad_cam"}
# Families without any ReLU / ReLU6 (GELU only).
NO_RECTIFIER = {"ConvNeXtish", "ViTish", "Swinish"}
# Families whose logits are one linear layer on the global average of the last feature map.
GAP_LINEAR = {"ResNetBN", "Inceptionish", "MobileNetish", "TwoInput"}
ERRORS = (ValueError, TypeError, RuntimeError)


@dataclass(frozen=True)
class Expect:
    """What a cell must do.

    Attributes:
        outcome: ``"map"``, ``"raise"`` or ``"either"``.
        mentions: An error message must contain one of these (case-insensitive).
        layout: A returned map must record ``extras["layout"]`` containing one of these.
    """

    outcome: str
    mentions: tuple[str, ...] = ()
    layout: tuple[str, ...] = ()


def expect(method: str, model: str) -> Expect:
    """The specified outcome of ``method`` on zoo model ``model``."""
    if method in RECTIFIER_RULES and model in NO_RECTIFIER:
        # No rectifier to modify: a guided/DeconvNet map would be a plain gradient under
        # another name. Guided Grad-CAM may stop earlier, at its Grad-CAM layer.
        also = ("layer=",) if method in LAYER_METHODS and model in {"ViTish", "Swinish"} else ()
        return Expect("raise", mentions=("GELU", *also))
    if method in LAYER_METHODS and model == "ViTish":
        also = ("grad_cam",) if method == "cam" else ()  # cam: not a GAP + linear head
        return Expect("either", mentions=("layer=", *also), layout=("token",))
    if method in LAYER_METHODS and model == "Swinish":
        return Expect("either", mentions=("layer=",), layout=("channels_last", "nhwc"))
    if method == "cam" and model not in GAP_LINEAR:
        return Expect("either")
    return Expect("map")


MISSING: dict[tuple[str, str], str] = {}
"""``(method, model)`` cells that fail because a feature has not landed: the reason.

Each becomes ``xfail(strict=False, reason=...)``; :data:`COUNT_MISSING`,
:data:`PLANTED_MISSING` and :data:`REAL_MISSING` do the same for the other tests. All empty:
every cell passes.
"""


def cells(names: list[str], missing: dict[tuple[str, str], str]) -> list[Any]:
    params = []
    for model in zoo.ZOO:
        for method in names:
            reason = missing.get((method, model))
            marks = [pytest.mark.xfail(strict=False, reason=reason)] if reason else []
            params.append(pytest.param(method, model, marks=marks, id=f"{method}-{model}"))
    return params


def explain(method: str, case: zoo.Case, inputs: Tensor, forward_args: tuple, target: Any) -> Any:
    options = dict(CHEAP.get(method, {}))
    if forward_args:
        options["forward_args"] = forward_args
    return salience.explain(case.model, inputs, method=method, target=target, **options)


def one(case: zoo.Case, i: int) -> tuple[Tensor, tuple, Any]:
    """Sample ``i`` of a case: its input, forward arguments and target, as a batch of one."""
    n = case.inputs.shape[0]
    args = tuple(
        a[i : i + 1] if isinstance(a, Tensor) and a.ndim and a.shape[0] == n else a
        for a in case.forward_args
    )
    target = [case.target[i]] if isinstance(case.target, list) else case.target
    return case.inputs[i : i + 1], args, target


def check_error(error: BaseException, rule: Expect) -> None:
    message = str(error)
    assert len(message) > 40, f"unhelpful error: {message!r}"
    if rule.mentions:
        found = [m for m in rule.mentions if m.lower() in message.lower()]
        assert found, f"the error should mention one of {rule.mentions}: {message!r}"


def check_map(method: str, result: Any, case: zoo.Case, rule: Expect) -> None:
    assert isinstance(result, salience.Attribution)
    assert result.method == method
    values = result.values
    n, _, h, w = case.inputs.shape
    if get_method(method).kind == "cam":
        assert values.shape == (n, 1, h, w)
    else:
        assert values.shape == case.inputs.shape
    assert values.dtype == case.inputs.dtype
    assert torch.isfinite(values).all(), "non-finite values"
    if method in LAYER_METHODS:
        assert isinstance(result.layer, str), "no layer recorded"
        assert result.layer, "no layer recorded"
    if rule.layout:
        assert "k_norm" not in result.layer, f"picked the attention k_norm: {result.layer!r}"
        layout = str(result.extras.get("layout", "")).lower()
        assert any(k in layout for k in rule.layout), (
            f"layer {result.layer!r} read with layout {layout or 'unrecorded'!r}; expected "
            f"one of {rule.layout}"
        )


def check_batch(method: str, together: Any, case: zoo.Case) -> None:
    """The batch gives what its samples give one by one."""
    scale = float(together.values.abs().max()) or 1.0
    for i in range(case.inputs.shape[0]):
        x, args, target = one(case, i)
        alone = explain(method, case, x, args, target)
        torch.testing.assert_close(
            together.values[i : i + 1], alone.values, rtol=1e-4, atol=1e-5 * scale
        )
        torch.testing.assert_close(together.scores[i : i + 1], alone.scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("method", "model"), cells(METHODS, MISSING))
def test_correct_map_or_clear_error(method: str, model: str) -> None:
    rule = expect(method, model)
    case = zoo.build(model)
    before = snapshot(case.model)
    try:
        result = explain(method, case, case.inputs, case.forward_args, case.target)
    except ERRORS as error:
        assert_same(before, snapshot(case.model))
        if rule.outcome == "map":
            raise
        check_error(error, rule)
        return
    assert_same(before, snapshot(case.model))
    assert rule.outcome != "raise", f"{method} returned a map on {model}; expected an error"
    check_map(method, result, case, rule)
    check_batch(method, result, case)


RECTIFIED = [m for m in zoo.ZOO if m not in NO_RECTIFIER]


COUNT_MISSING: dict[tuple[str, str], str] = {}


@pytest.mark.parametrize(
    ("method", "model"),
    [c for c in cells(sorted(RECTIFIER_RULES), COUNT_MISSING) if c.values[1] in RECTIFIED],
)
def test_rectifier_rules_count_the_rectifiers(method: str, model: str) -> None:
    """On a network with ReLU/ReLU6, the rule reports how many rectifier calls it modified."""
    case = zoo.build(model)
    result = explain(method, case, case.inputs, case.forward_args, case.target)
    counts = {k: v for k, v in result.extras.items() if "rectifier" in k.lower()}
    assert len(counts) == 1, f"expected one extras key naming 'rectifier': {list(result.extras)}"
    (count,) = counts.values()
    assert int(torch.as_tensor(count).min()) > 0


PLANTED_CAM = ["grad_cam", "grad_cam_plus_plus", "layer_cam", "score_cam"]
PLANTED_PIXEL = ["gradient", "integrated_gradients"]
PLANTED_MISSING: dict[tuple[str, str], str] = {}


def planted_cells() -> list[Any]:
    params = []
    for model in zoo.PLANTED:
        for method in PLANTED_CAM + PLANTED_PIXEL:
            reason = PLANTED_MISSING.get((method, model))
            marks = [pytest.mark.xfail(strict=False, reason=reason)] if reason else []
            params.append(pytest.param(method, model, marks=marks, id=f"{method}-{model}"))
    return params


@pytest.mark.parametrize(("method", "model"), planted_cells())
def test_planted_dependence_is_found(method: str, model: str) -> None:
    """Every logit depends on the top-left quadrant only: the map must say so (>= 90 %)."""
    net, inputs, quadrant = zoo.planted(model)
    options = dict(CHEAP.get(method, {}))
    try:
        result = salience.explain(net, inputs, method=method, target=0, **options)
    except ValueError as error:
        # A transformer may refuse to guess its CAM layer; then the explicit layer must work.
        if model not in zoo.CAM_LAYER or "layer=" not in str(error):
            raise
        _, reshape = zoo.CAM_LAYER[model]
        result = salience.explain(
            net, inputs, method=method, target=0, layer="plant", reshape=reshape, **options
        )
    cam = method in PLANTED_CAM
    mass = result.values[:, 0].clamp(min=0) if cam else result.values.abs().sum(1)
    total = mass.flatten(1).sum(1)
    inside = (mass * quadrant).flatten(1).sum(1)
    assert (total > 0).all(), "an empty map"
    share = inside / total
    assert (share >= 0.9).all(), (
        f"{method} on planted {model} (layer {result.layer!r}) puts only "
        f"{[round(s, 3) for s in share.tolist()]} of its mass in the planted quadrant"
    )


@pytest.mark.parametrize("method", METHODS)
def test_a_missing_forward_argument_is_a_clear_error(method: str) -> None:
    """TwoInput without forward_args=(question,): the model's own TypeError, nothing hidden."""
    case = zoo.build("TwoInput")
    before = snapshot(case.model)
    with pytest.raises(TypeError, match="question"):
        explain(method, case, case.inputs, (), case.target)
    assert_same(before, snapshot(case.model))


# -- real architectures, where timm is installed ----------------------------------------------

# (timm name, input side, extra create_model arguments): small inputs where the model allows.
REAL: dict[str, tuple[int, dict[str, Any]]] = {
    "resnet18": (64, {}),
    "vgg11": (64, {}),
    "densenet121": (64, {}),
    "inception_v3": (107, {}),  # the smallest side with a 2x2 last map (96 gives 1x1)
    "regnetx_002": (64, {}),
    "efficientnet_b0": (64, {}),
    "mobilenetv3_small_050": (64, {}),
    "convnext_atto": (64, {}),
    "vit_tiny_patch16_224": (64, {"img_size": 64}),
    "swin_tiny_patch4_window7_224": (64, {"img_size": 64, "window_size": 4}),
}
_RECTIFIER_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
# Too slow for a batch-vs-one-by-one check on real networks (covered on the zoo).
_NO_BATCH_CHECK = {"score_cam", "smoothgrad", "integrated_gradients"}
REAL_MISSING: dict[tuple[str, str], str] = {}  # keyed (arch, method)


@functools.cache
def real_model(arch: str) -> tuple[nn.Module, Tensor]:
    """The timm model ``arch`` with random weights (never downloaded), and two inputs."""
    timm = pytest.importorskip("timm")
    side, kwargs = REAL[arch]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=10, **kwargs).eval()
    return model, torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))


def real_expect(method: str, arch: str, model: nn.Module) -> Expect:
    """The zoo's expectations, by what the real model contains."""
    if method in RECTIFIER_RULES and not any(
        isinstance(m, _RECTIFIER_MODULES) for m in model.modules()
    ):
        names = {type(m).__name__ for m in model.modules()}
        activations = sorted(n for n in names if n.lower().endswith(("lu", "swish", "mish")))
        transformer = arch.startswith(("vit", "swin"))
        also = ("layer=",) if method in LAYER_METHODS and transformer else ()
        return Expect("raise", mentions=(*activations, *also))
    if method in LAYER_METHODS and arch.startswith("vit"):
        also = ("grad_cam",) if method == "cam" else ()
        return Expect("either", mentions=("layer=", *also), layout=("token",))
    if method in LAYER_METHODS and arch.startswith("swin"):
        return Expect("either", mentions=("layer=",), layout=("channels_last", "nhwc"))
    if method == "cam":
        return Expect("either")
    return Expect("map")


def real_cells() -> list[Any]:
    params = []
    for arch in REAL:
        for method in METHODS:
            reason = REAL_MISSING.get((arch, method))
            marks = [pytest.mark.xfail(strict=False, reason=reason)] if reason else []
            params.append(pytest.param(arch, method, marks=marks, id=f"{arch}-{method}"))
    return params


@pytest.mark.parametrize(("arch", "method"), real_cells())
def test_real_architectures(arch: str, method: str) -> None:
    """timm models with random weights: a correct map or a clear error, as on the zoo.

    Runs only where timm is installed. Score-CAM explains one input (one masked forward pass
    per channel of a real network is slow on a CPU); the others explain two.
    """
    model, inputs = real_model(arch)
    if method == "score_cam":
        inputs = inputs[:1]
    case = zoo.Case(model, inputs, (), [3, 7][: inputs.shape[0]])
    rule = real_expect(method, arch, model)
    before = snapshot(model)
    try:
        result = explain(method, case, inputs, (), case.target)
    except ERRORS as error:
        assert_same(before, snapshot(model))
        if rule.outcome == "map":
            raise
        check_error(error, rule)
        return
    assert_same(before, snapshot(model))
    assert rule.outcome != "raise", f"{method} returned a map on {arch}; expected an error"
    check_map(method, result, case, rule)
    if method not in _NO_BATCH_CHECK:
        check_batch(method, result, case)
