"""Tests of salience.models: architecture, weights, class names, preprocessing, loading."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from salience import models
from salience.models import imagenet
from salience.models.efficientnet_lite import (
    Conv2dStaticSamePadding,
    EfficientNetLite0,
    MBConvBlock,
    pretrained_weights_path,
)

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def pretrained() -> EfficientNetLite0:
    model = models.load("efficientnet_lite0")
    assert isinstance(model, EfficientNetLite0)
    return model


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    return torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)


def _probabilities(model: nn.Module, image: Image.Image) -> torch.Tensor:
    with torch.no_grad():
        return model(model.preprocess(image)).softmax(-1)[0]


# -- architecture ---------------------------------------------------------------------------


@pytest.mark.pretrained
def test_state_dict_keys_match_checkpoint_in_order(checkpoint):
    model = EfficientNetLite0()
    assert list(model.state_dict()) == list(checkpoint)
    for key, value in model.state_dict().items():
        assert value.shape == checkpoint[key].shape, key


def test_architecture_details():
    model = EfficientNetLite0()
    assert len(model._blocks) == 16
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    assert all(bn.eps == 1e-3 for bn in bns)
    assert isinstance(model._swish, nn.ReLU6)
    assert model._dropout.p == 0.2
    assert model._fc.in_features == 1280
    assert model._fc.out_features == 1000
    # TF "SAME" padding for 224x224: stem 224 -> 112 pads bottom/right only.
    assert isinstance(model._conv_stem, Conv2dStaticSamePadding)
    assert isinstance(model._conv_stem.static_padding, nn.ZeroPad2d)
    assert model._conv_stem.static_padding.padding == (0, 1, 0, 1)
    assert model._blocks[3]._depthwise_conv.static_padding.padding == (1, 2, 1, 2)  # k5 s2
    assert model._blocks[4]._depthwise_conv.static_padding.padding == (2, 2, 2, 2)  # k5 s1


def test_one_relu6_per_block_is_reused():
    """Each block owns exactly one ReLU6, called for both of its activations."""
    model = EfficientNetLite0().eval()
    for block in model._blocks:
        assert isinstance(block, MBConvBlock)
        relus = [m for m in block.modules() if isinstance(m, nn.ReLU6)]
        assert relus == [block._swish]
    calls: dict[str, int] = {}
    handles = [
        module.register_forward_hook(
            lambda _m, _i, _o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)
        )
        for name, module in model.named_modules()
        if isinstance(module, nn.ReLU6)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for handle in handles:
        handle.remove()
    assert calls["_swish"] == 2  # stem and head
    assert calls["_blocks.0._swish"] == 1  # expand ratio 1: depthwise activation only
    assert all(calls[f"_blocks.{i}._swish"] == 2 for i in range(1, 16))


def test_forward_shapes():
    model = EfficientNetLite0().eval()
    with torch.no_grad():
        assert model.extract_features(torch.zeros(1, 3, 224, 224)).shape == (1, 1280, 7, 7)
        assert model(torch.zeros(2, 3, 160, 192)).shape == (2, 1000)


@pytest.mark.pretrained
def test_matches_reference_implementation(pretrained, checkpoint):
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    reference = reference_package.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(checkpoint, strict=True)
    reference.eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (pretrained(x) - reference(x)).abs().max().item()
    assert diff < 1e-4


# -- pretrained weights ---------------------------------------------------------------------


@pytest.mark.pretrained
def test_weights_load_strictly(checkpoint):
    model = EfficientNetLite0()
    result = model.load_state_dict(checkpoint, strict=True)
    assert not result.missing_keys
    assert not result.unexpected_keys


@pytest.mark.pretrained
@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet-lite0", "EfficientNet-Lite0"])
def test_load_by_name_is_eval(name, pretrained):
    model = pretrained if name == "efficientnet_lite0" else models.load(name)
    assert isinstance(model, EfficientNetLite0)
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert model.input_size == (224, 224)
    assert model.mean == (0.5, 0.5, 0.5)
    assert model.std == (0.5, 0.5, 0.5)
    assert len(model.class_names) == 1000
    assert model.class_names[281] == "tabby"


@pytest.mark.pretrained
def test_chelsea_is_a_cat(pretrained):
    probs = _probabilities(pretrained, models.sample_image("chelsea"))
    top = int(probs.argmax())
    assert top in (281, 282, 285)  # observed: 285 Egyptian cat, 282 tiger cat a close second
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.8


@pytest.mark.pretrained
def test_coffee_is_espresso(pretrained):
    probs = _probabilities(pretrained, models.sample_image("coffee"))
    assert int(probs.argmax()) == 967  # espresso (observed p ~ 0.95)
    assert float(probs[[967, 968, 504]].sum()) > 0.9


def test_unknown_model_name():
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        models.load("resnet-9000")
    assert models.available_models() == ["efficientnet_lite0"]


def test_sample_images():
    assert models.sample_images() == ["chelsea", "coffee"]
    for name in models.sample_images():
        image = models.sample_image(name)
        assert image.mode == "RGB"
        assert min(image.size) >= 224
    with pytest.raises(ValueError, match="chelsea"):
        models.sample_image("dog")


# -- class names ----------------------------------------------------------------------------


def test_class_names_file():
    path = Path(imagenet.__file__).parents[1] / "data" / "imagenet_classes.json"
    data = json.loads(path.read_text("utf-8"))
    assert len(data) == 1000
    assert all(isinstance(names, list) and names for names in data)
    assert data[281] == ["tabby", "tabby cat"]
    assert data[285][0] == "Egyptian cat"
    assert data[967] == ["espresso"]
    assert data[504] == ["coffee mug"]
    assert len({names[0] for names in data}) == 1000  # display names are unique


def test_class_lookup():
    names = models.class_names()
    assert len(names) == 1000
    assert names[0] == "tench"
    assert models.class_name(282) == "tiger cat"
    assert models.class_index("tabby") == 281
    assert models.class_index("Tabby Cat") == 281
    assert models.class_index("egyptian cat") == 285
    assert models.class_index("espresso") == 967
    assert models.class_index(504) == 504
    assert models.class_index(np.int64(968)) == 968
    assert models.class_index("968") == 968
    # The one name shared by two classes up to case: exact case decides.
    assert models.class_index("Cardigan") == 264
    assert models.class_index("cardigan") == 474


def test_class_lookup_errors():
    with pytest.raises(ValueError, match=r"'tabyy cat'.*did you mean.*'tabby cat' \(281\)"):
        models.class_index("tabyy cat")
    with pytest.raises(ValueError, match=r"ambiguous.*134.*517"):
        models.class_index("crane")
    with pytest.raises(ValueError, match="out of range"):
        models.class_index(1000)
    with pytest.raises(ValueError, match="out of range"):
        models.class_index("-1")
    with pytest.raises(ValueError, match="out of range"):
        models.class_name(-1)


# -- preprocessing --------------------------------------------------------------------------


def _check_input(x: torch.Tensor) -> None:
    assert x.shape == (1, 3, 224, 224)
    assert x.dtype == torch.float32
    assert float(x.min()) >= -1.0
    assert float(x.max()) <= 1.0


def test_preprocess_rgb_path_and_array(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    from_pil = models.preprocess_image(Image.fromarray(pixels))
    from_path = models.preprocess_image(path)
    from_str = models.preprocess_image(str(path))
    from_array = models.preprocess_image(pixels)
    from_float = models.preprocess_image(pixels.astype(np.float32) / 255.0)
    for x in (from_pil, from_path, from_str, from_array, from_float):
        _check_input(x)
        torch.testing.assert_close(x, from_pil, atol=1e-6, rtol=0)


def test_preprocess_resizes_shorter_side_and_center_crops():
    # A 256x512 image is only cropped: the result is its central 224x224 window.
    pixels = np.zeros((256, 512, 3), dtype=np.uint8)
    pixels[:, 256:] = 255  # right half white
    crop = models.resize_center_crop(pixels)
    assert crop.size == (224, 224)
    array = np.asarray(crop)
    assert (array[:, :112] == 0).all()
    assert (array[:, 112:] == 255).all()
    x = models.preprocess_image(pixels)
    assert float(x[0, :, :, :112].max()) == -1.0
    assert float(x[0, :, :, 112:].min()) == 1.0


def test_an_extreme_aspect_ratio_is_refused_before_it_is_resized():
    """A 3000 x 1 PNG is 88 bytes; resized to a shorter side of 256 it would be 196 M pixels."""
    thin = np.zeros((1, 3000, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"3000x1 image .* 768000x256 pixels, over Pillow's limit"):
        models.resize_center_crop(thin)
    models.resize_center_crop(np.zeros((1, 300, 3), dtype=np.uint8))  # 76800x256: in bounds


def test_preprocess_other_modes(tmp_path):
    gray = Image.fromarray(np.full((240, 320), 128, dtype=np.uint8))
    rgba = Image.new("RGBA", (320, 240), (255, 0, 0, 0))  # fully transparent red
    palette = Image.new("RGB", (300, 300), (10, 200, 30)).convert("P")
    sixteen = np.full((240, 320), 65535, dtype=np.uint16)
    sixteen_path = tmp_path / "sixteen.png"
    Image.fromarray(sixteen).save(sixteen_path)
    assert Image.open(sixteen_path).mode.startswith("I")
    for image in (gray, rgba, palette, sixteen_path, sixteen, gray.convert("LA")):
        _check_input(models.preprocess_image(image))
    # 16-bit white is white, not saturated garbage; transparent pixels become white.
    assert models.to_rgb(sixteen_path).getpixel((0, 0)) == (255, 255, 255)
    half = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # 128 * 257
    assert models.to_rgb(half).getpixel((0, 0)) == (128, 128, 128)
    assert models.to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert models.to_rgb(gray).getpixel((0, 0)) == (128, 128, 128)


def test_preprocess_rejects_bad_input():
    with pytest.raises(ValueError, match="channels-first"):
        models.preprocess_image(np.zeros((3, 224, 224), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        models.preprocess_image(np.full((224, 224, 3), 2.0))
    with pytest.raises(TypeError):
        models.preprocess_image(42)  # type: ignore[arg-type]


def test_crop_and_to_image_round_trip():
    model = EfficientNetLite0()
    image = models.sample_image("chelsea")
    crop = model.crop(image)
    assert crop.size == (224, 224)
    assert crop.mode == "RGB"
    x = model.preprocess(image)
    _check_input(x)
    restored = model.to_image(x[0])
    assert restored.dtype == np.uint8
    assert restored.shape == (224, 224, 3)
    np.testing.assert_array_equal(restored, np.asarray(crop))
    np.testing.assert_array_equal(model.to_image(x), restored)


# -- loading files --------------------------------------------------------------------------


def _tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_pickled_model_needs_trust(tmp_path):
    tiny = _tiny().train()
    path = tmp_path / "tiny.pt"
    torch.save(tiny, path)
    with pytest.raises(ValueError, match=r"tiny\.pt.*trust=True.*--trust-model"):
        models.load(path)
    with pytest.warns(UserWarning, match="arbitrary code"):
        loaded = models.load(path, trust=True)
    assert isinstance(loaded, nn.Sequential)
    assert not loaded.training
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(loaded(x), tiny(x))


def test_state_dict_needs_architecture(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(_tiny().state_dict(), path)
    with pytest.raises(ValueError, match=r"weights\.pth.*state dict.*architecture"):
        models.load(path)
    with pytest.raises(ValueError, match=r"weights\.pth.*does not fit"):
        models.load(path, architecture="efficientnet_lite0")


def test_state_dict_into_architecture(tmp_path):
    model = EfficientNetLite0()
    path = tmp_path / "lite0.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    loaded = models.load(path, architecture="efficientnet-lite0")
    assert isinstance(loaded, EfficientNetLite0)
    assert not loaded.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript(tmp_path):
    tiny = _tiny().eval()
    path = tmp_path / "tiny.ts"
    torch.jit.save(torch.jit.script(tiny), path)
    loaded = models.load(path)  # no trust needed
    assert not loaded.training
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), tiny(x))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_corrupt_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a model")
    with pytest.raises(ValueError, match=r"garbage\.pt"):
        models.load(garbage)
    truncated = tmp_path / "truncated.pt"
    buffer = io.BytesIO()
    torch.save(_tiny().state_dict(), buffer)
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match=r"truncated\.pt"):
        models.load(truncated)
    scripted = tmp_path / "broken.ts"
    torch.jit.save(torch.jit.script(_tiny()), scripted)
    data = scripted.read_bytes()
    scripted.write_bytes(data[: len(data) - 200])
    with pytest.raises((ValueError, OSError), match=r"broken\.ts"):
        models.load(scripted)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ValueError, match=r"tensor\.pt.*not a model"):
        models.load(tensor)
    with pytest.raises(FileNotFoundError, match="missing"):
        models.load(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="directory"):
        models.load(tmp_path)
