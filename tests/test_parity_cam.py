"""Parity of the CAM family with Captum 0.9, pytorch-grad-cam 1.5 and torchcam 0.5.

Captum (a test dependency) returns raw maps: they must equal ours to float precision.
pytorch-grad-cam (``pip install grad-cam``, test-only, it needs torchvision; skipped where it is
missing) returns maps that are ReLU'd, min-max normalised per image and resized with OpenCV:
ours are normalised the same way *here*, in the test, never in the methods. Two of its
conventions differ from the papers, and the tests neutralise them rather than loosen the
tolerance:

- Grad-CAM++ adds ``1e-6`` to the denominator of alpha; with the score scaled by ``1e5``
  (the same target for both) the term is negligible.
- Score-CAM takes a softmax over channels of the logits; with ``log softmax`` as its target
  that softmax becomes ``p_k / sum_j p_j``, proportional to our probability weights, and the
  factor vanishes in the normalisation. It upsamples masks with ``align_corners=True``; the
  test swaps in ``align_corners=False`` (the authors' code and ours) for the exact check, and
  checks separately that the native maps only differ by that.

torchcam (``pip install torchcam``, test-only, skipped where it is missing) returns
layer-resolution maps ``(N, h, w)``, ReLU'd and min-max normalised per sample unless
``normalized=False``: its raw Grad-CAM and LayerCAM maps must equal ours with
``upsample=False``. Its ``GradCAMpp`` is not Grad-CAM++ (see the test): ours must differ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import salience as sl

CASES = [("vgg", "features"), ("vgg", "features.3"), ("resnet", "layer2"), ("resnet", "layer1")]
TARGETS = [1, 2, 3]


def _model_and_inputs(request: pytest.FixtureRequest, name: str) -> tuple[nn.Module, Tensor]:
    model = request.getfixturevalue(name)
    size = 16 if name == "vgg" else 32  # the VGG head is fixed to 16x16 inputs
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(11))
    return model, x


def _minmax(values: Tensor) -> Tensor:
    """Per-image min-max normalisation of ``(N, H, W)`` maps (flat maps become 0)."""
    low = values.amin(dim=(1, 2), keepdim=True)
    span = values.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (values - low) / span.clamp(min=1e-30), 0.0)


# -- Captum ------------------------------------------------------------------------------------


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize(("model_name", "layer"), CASES)
def test_grad_cam_equals_captum(
    request: pytest.FixtureRequest, model_name: str, layer: str, relu: bool
) -> None:
    attr = pytest.importorskip("captum.attr")
    model, x = _model_and_inputs(request, model_name)
    target = torch.tensor(TARGETS)
    ref = attr.LayerGradCam(model, model.get_submodule(layer)).attribute(
        x, target=target, relu_attributions=relu
    )
    ours = sl.grad_cam(model, x, target, layer=layer, upsample=False, relu=relu)
    torch.testing.assert_close(ours.values, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("model_name", "layer"), CASES)
def test_guided_grad_cam_equals_captum(
    request: pytest.FixtureRequest, model_name: str, layer: str
) -> None:
    attr = pytest.importorskip("captum.attr")
    model, x = _model_and_inputs(request, model_name)
    target = torch.tensor(TARGETS)
    ref = attr.GuidedGradCam(model, model.get_submodule(layer)).attribute(
        x, target=target, interpolate_mode="bilinear"
    )
    ours = sl.guided_grad_cam(model, x, target, layer=layer)
    torch.testing.assert_close(ours.values, ref, rtol=1e-5, atol=1e-8)


@pytest.mark.pretrained
@pytest.mark.parametrize("layer", ["_bn1", "_blocks.15", "_blocks.10._project_conv"])
def test_grad_cam_equals_captum_on_lite0(lite0: nn.Module, cat: Tensor, layer: str) -> None:
    """Captum's guided backprop only modifies nn.ReLU, not ReLU6: Guided Grad-CAM is not compared
    on EfficientNet-Lite0 (see salience.hooks)."""
    attr = pytest.importorskip("captum.attr")
    ref = attr.LayerGradCam(lite0, lite0.get_submodule(layer)).attribute(cat, target=285)
    ours = sl.grad_cam(lite0, cat, 285, layer=layer, upsample=False, relu=False)
    torch.testing.assert_close(ours.values, ref, rtol=1e-4, atol=1e-6)


# -- pytorch-grad-cam --------------------------------------------------------------------------

SCALE = 1e5  # makes pytorch-grad-cam's 1e-6 in the Grad-CAM++ denominator negligible


def _pgc_targets(classes: list[int], scale: float = 1.0) -> list[Callable[[Tensor], Tensor]]:
    return [lambda out, c=c: scale * out[c] for c in classes]


def _our_target(classes: list[int], scale: float) -> Any:
    if scale == 1.0:
        return torch.tensor(classes)
    index = torch.tensor(classes).view(-1, 1)
    return lambda out: scale * out.gather(1, index)[:, 0]


def _pytorch_grad_cam(
    cls_name: str, model: nn.Module, layer: str, x: Tensor, targets: list[Any]
) -> Tensor:
    methods = pytest.importorskip("pytorch_grad_cam")
    with getattr(methods, cls_name)(model, [model.get_submodule(layer)]) as explainer:
        return torch.from_numpy(explainer(x, targets))


PGC = [
    ("GradCAM", "grad_cam", 1.0),
    ("GradCAMPlusPlus", "grad_cam_plus_plus", SCALE),
    ("LayerCAM", "layer_cam", 1.0),
]


@pytest.mark.parametrize(("pgc_name", "method", "scale"), PGC)
@pytest.mark.parametrize(("model_name", "layer"), CASES)
def test_gradient_cams_equal_pytorch_grad_cam(
    request: pytest.FixtureRequest,
    model_name: str,
    layer: str,
    pgc_name: str,
    method: str,
    scale: float,
) -> None:
    pytest.importorskip("pytorch_grad_cam")
    model, x = _model_and_inputs(request, model_name)
    ref = _pytorch_grad_cam(pgc_name, model, layer, x, _pgc_targets(TARGETS, scale))
    ours = sl.explain(model, x, method, _our_target(TARGETS, scale), layer=layer)
    torch.testing.assert_close(_minmax(ours.values[:, 0]), ref, rtol=0, atol=2e-5)


class _Logits(nn.Module):
    """A torchvision segmentation network returning its ``"out"`` logits (pytorch-grad-cam's
    semantic segmentation tutorial wraps DeepLabV3 so)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)["out"]


@pytest.mark.parametrize(
    ("make", "layer"),
    [
        # the sum of two 1x1 classifiers (early and late features), resized: the late branch's
        # last feature map, not a classifier
        ("lraspp_mobilenet_v3_large", "model.classifier.cbr"),
        # the head's last feature map (before its 1x1 classifier), with an auxiliary head after
        ("deeplabv3_mobilenet_v3_large", "model.classifier.3"),
    ],
)
def test_torchvision_segmentation_default_layer_and_pytorch_grad_cam(make: str, layer: str) -> None:
    segmentation = pytest.importorskip("torchvision.models.segmentation")
    pytest.importorskip("pytorch_grad_cam")
    torch.manual_seed(0)
    options = {"aux_loss": True} if make.startswith("deeplab") else {}
    net = getattr(segmentation, make)(weights=None, weights_backbone=None, num_classes=4, **options)
    model = _Logits(net.eval())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    ours = sl.grad_cam(model, x, sl.mask_target(1))
    assert ours.layer == layer
    ref = _pytorch_grad_cam("GradCAM", model, layer, x, [lambda out: out[1].sum()] * 2)
    torch.testing.assert_close(_minmax(ours.values[:, 0]), ref, rtol=0, atol=5e-5)


class _HalfPixelUpsampling(nn.Module):
    """``UpsamplingBilinear2d`` with ``align_corners=False``, as in the Score-CAM authors' code."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


def _log_softmax_targets(classes: list[int]) -> list[Callable[[Tensor], Tensor]]:
    return [lambda out, c=c: torch.log_softmax(out, dim=-1)[c] for c in classes]


@pytest.mark.parametrize(("model_name", "layer"), CASES)
def test_score_cam_equals_pytorch_grad_cam(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, model_name: str, layer: str
) -> None:
    pytest.importorskip("pytorch_grad_cam")
    model, x = _model_and_inputs(request, model_name)
    ours = _minmax(sl.score_cam(model, x, TARGETS, layer=layer).values[:, 0])
    native = _pytorch_grad_cam("ScoreCAM", model, layer, x, _log_softmax_targets(TARGETS))
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn, "UpsamplingBilinear2d", _HalfPixelUpsampling)
        ref = _pytorch_grad_cam("ScoreCAM", model, layer, x, _log_softmax_targets(TARGETS))
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5)
    # with its own mask upsampling the maps differ, but only by that
    corr = torch.corrcoef(torch.stack([ours.flatten(), native.flatten()]))[0, 1]
    assert corr > 0.95


@pytest.mark.pretrained
@pytest.mark.parametrize(("pgc_name", "method", "scale"), PGC)
def test_gradient_cams_equal_pytorch_grad_cam_on_lite0(
    lite0: nn.Module, cat: Tensor, pgc_name: str, method: str, scale: float
) -> None:
    """At ``_bn1``, a module that runs once (``_swish`` runs twice; pytorch-grad-cam would pair
    the stem's activation with the stem's gradient)."""
    pytest.importorskip("pytorch_grad_cam")
    ref = _pytorch_grad_cam(pgc_name, lite0, "_bn1", cat, _pgc_targets([285], scale))
    ours = sl.explain(lite0, cat, method, _our_target([285], scale), layer="_bn1")
    torch.testing.assert_close(_minmax(ours.values[:, 0]), ref, rtol=0, atol=5e-5)


@pytest.mark.pretrained
def test_score_cam_equals_pytorch_grad_cam_on_lite0(
    lite0: nn.Module, cat: Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At ``_blocks.0`` (16 channels, 112x112): 16 masked forward passes."""
    pytest.importorskip("pytorch_grad_cam")
    monkeypatch.setattr(torch.nn, "UpsamplingBilinear2d", _HalfPixelUpsampling)
    ref = _pytorch_grad_cam("ScoreCAM", lite0, "_blocks.0", cat, _log_softmax_targets([285]))
    ours = sl.score_cam(lite0, cat, 285, layer="_blocks.0")
    torch.testing.assert_close(_minmax(ours.values[:, 0]), ref, rtol=0, atol=5e-5)


# -- torchcam ----------------------------------------------------------------------------------

TORCHCAM = [("GradCAM", "grad_cam"), ("LayerCAM", "layer_cam")]


def _torchcam(
    cls_name: str, model: nn.Module, layer: str, x: Tensor, classes: list[int], normalized: bool
) -> Tensor:
    methods = pytest.importorskip("torchcam.methods")
    with getattr(methods, cls_name)(model, layer, input_shape=tuple(x.shape[1:])) as extractor:
        scores = model(x)
        (maps,) = extractor(class_idx=classes, scores=scores, normalized=normalized)
    return maps.detach()


def _torchcam_normalise(maps: Tensor) -> Tensor:
    """torchcam's ``_CAM._normalize``: ``(m - min) / (max(m - min) + 1e-8)`` per sample."""
    low = maps - maps.amin(dim=(1, 2), keepdim=True)
    return low / (low.amax(dim=(1, 2), keepdim=True) + 1e-8)


@pytest.mark.parametrize(("tc_name", "method"), TORCHCAM)
@pytest.mark.parametrize(("model_name", "layer"), CASES)
def test_gradient_cams_equal_torchcam(
    request: pytest.FixtureRequest, model_name: str, layer: str, tc_name: str, method: str
) -> None:
    pytest.importorskip("torchcam.methods")
    model, x = _model_and_inputs(request, model_name)
    ours = sl.explain(model, x, method, torch.tensor(TARGETS), layer=layer, upsample=False)
    raw = _torchcam(tc_name, model, layer, x, TARGETS, normalized=False)
    assert raw.shape == ours.values[:, 0].shape
    assert float(raw.amax()) > 0
    torch.testing.assert_close(ours.values[:, 0], raw, rtol=1e-5, atol=1e-7)
    # its default output: the same maps, normalised per sample at the layer's resolution
    normalised = _torchcam(tc_name, model, layer, x, TARGETS, normalized=True)
    torch.testing.assert_close(
        _torchcam_normalise(ours.values[:, 0]), normalised, rtol=0, atol=1e-5
    )


def test_grad_cam_plus_plus_differs_from_torchcam_where_gradients_vary() -> None:
    """torchcam 0.5's ``GradCAMpp`` is not Eq. 19 of Chattopadhyay et al.

    Its documented denominator sums ``A_ab g_ab^3`` over positions instead of taking ``g_ij^3``
    at each position (the two agree only where ``g`` is the same at every position), and in
    0.5.0 the division is lost as well: ``alpha[idx][mask].div_(...)`` divides a copy made by
    boolean indexing, so its weights are ``sum_ij g_ij^2 relu(g_ij)``. On a layer whose
    gradient varies per position (the model of test_cam), ours is Eq. 19 computed by hand, and
    torchcam's map is that undivided formula, far from ours.
    """
    pytest.importorskip("torchcam.methods")
    from test_cam import (
        X_POS,
        PositionWeighted,
        _cam_from_weights,
        _gcpp_weights,
        _position_weighted_by_hand,
    )

    model = PositionWeighted()
    act, grads = _position_weighted_by_hand(model)
    ours = sl.grad_cam_plus_plus(model, X_POS, torch.tensor([[0, 1]]), layer="relu", upsample=False)
    paper = _cam_from_weights(_gcpp_weights(act, grads, torchcam_sum=False), act)
    torch.testing.assert_close(ours.values[0], paper, rtol=1e-12, atol=1e-12)
    for c in (0, 1):
        theirs = _torchcam("GradCAMpp", model, "relu", X_POS, [c], normalized=False)[0]
        # what torchcam 0.5.0 computes: alpha = g^2, never divided
        undivided = [float((grads[c, k] ** 2 * grads[c, k].clamp(min=0)).sum()) for k in range(2)]
        torch.testing.assert_close(theirs, _cam_from_weights([undivided], act)[0])
        # compared after each library's normalisation, the maps still disagree
        gap = _torchcam_normalise(theirs[None]) - _torchcam_normalise(ours.values[0, c : c + 1])
        assert float(gap.abs().max()) > 0.1
