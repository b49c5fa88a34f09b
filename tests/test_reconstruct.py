"""Tests of salience.features.reconstruct, receptive_field and top_activating (Zeiler & Fergus).

The exact checks: the projection equals a DeconvNet written by hand (max unpooling through the
switches, rectified signal, transposed convolutions); it is non-zero only inside the unit's
receptive field, computed analytically from the kernels, strides and paddings, and measured
empirically as the gradient support of a copy with positive weights and no gating.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import salience.cli as cli
from salience.features import receptive_field, reconstruct, top_activating, top_grid
from salience.models import preprocess_image

# (kernel, stride, padding) of every spatial layer up to each recorded layer.
_GEOMETRY = {
    "1": [(3, 1, 1)],
    "4": [(3, 1, 1), (2, 2, 0), (3, 1, 1)],
    "6": [(3, 1, 1), (2, 2, 0), (3, 1, 1), (3, 2, 1)],
}
SIZE = 20


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    ).eval()


def _analytic_box(layer: str, y: int, x: int, size: int = SIZE) -> tuple[int, int, int, int]:
    """Receptive field of unit (y, x): go back through each (kernel, stride, padding)."""
    top, bottom, left, right = y, y, x, x
    for k, s, p in reversed(_GEOMETRY[layer]):
        top, bottom = top * s - p, bottom * s - p + k - 1
        left, right = left * s - p, right * s - p + k - 1
    return max(top, 0), max(left, 0), min(bottom, size - 1) + 1, min(right, size - 1) + 1


def _gradient_support(model: nn.Module, layer: str, c: int, y: int, x: int) -> torch.Tensor:
    """Pixels the unit depends on: gradient support of a copy with positive weights, average
    pooling instead of max pooling and no ReLU (nothing gates or cancels the gradient)."""
    twin = copy.deepcopy(model)
    for i, module in enumerate(twin):
        if isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.abs() + 0.01
        elif isinstance(module, nn.MaxPool2d):
            twin[i] = nn.AvgPool2d(module.kernel_size, module.stride)
        elif isinstance(module, nn.ReLU):
            twin[i] = nn.Identity()
    inputs = torch.randn(1, 3, SIZE, SIZE, requires_grad=True)
    out = twin[: int(layer) + 1](inputs)
    (grad,) = torch.autograd.grad(out[0, c, y, x], inputs)
    return grad[0].abs().sum(0) > 0


def _box_of(mask: torch.Tensor) -> tuple[int, int, int, int]:
    ys, xs = mask.nonzero(as_tuple=True)
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def _deconvnet_by_hand(model: nn.Module, x: torch.Tensor, layer: str, channel: int | None):
    """Zeiler & Fergus's DeconvNet, written out: unpool with switches, rectify, transpose."""
    conv1, conv2, conv3 = model[0], model[3], model[5]
    with torch.no_grad():
        r1 = F.relu(conv1(x))
        pooled, switches = F.max_pool2d(r1, 2, return_indices=True)
        r2 = F.relu(conv2(pooled))
        r3 = F.relu(conv3(r2))
        a = {"1": r1, "4": r2, "6": r3}[layer]
        seed = torch.zeros_like(a)
        for n in range(len(x)):
            plane = a[n] if channel is None else a[n, channel : channel + 1]
            c, y, x_ = np.unravel_index(int(plane.argmax()), tuple(plane.shape))
            c = int(c) if channel is None else channel
            seed[n, c, y, x_] = a[n, c, y, x_]
        s = seed
        if layer == "6":
            s = F.conv_transpose2d(F.relu(s), conv3.weight, stride=2, padding=1, output_padding=1)
        if layer in ("4", "6"):
            s = F.conv_transpose2d(F.relu(s), conv2.weight, padding=1)
            s = F.max_unpool2d(s, switches, 2, output_size=r1.shape[-2:])
        return F.conv_transpose2d(F.relu(s), conv1.weight, padding=1)


# -- reconstruct -------------------------------------------------------------------------------


@pytest.mark.parametrize(("layer", "channel"), [("1", 2), ("4", None), ("4", 5), ("6", 0)])
def test_matches_a_deconvnet_written_by_hand(layer, channel):
    model = _net()
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    result = reconstruct(model, x, layer, channel)
    expected = _deconvnet_by_hand(model, x, layer, channel)
    assert result.projection.shape == x.shape
    assert expected.abs().max() > 0
    torch.testing.assert_close(result.projection, expected, rtol=1e-5, atol=1e-6)
    if channel is not None:
        assert result.channel.tolist() == [channel] * 3


@pytest.mark.parametrize("layer", ["4", "6"])
def test_projection_is_non_zero_only_inside_the_receptive_field(layer):
    model = _net()
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    channels = model[3].out_channels if layer == "4" else model[5].out_channels
    for c in range(channels):
        result = reconstruct(model, x, layer, c)
        for n in range(len(x)):
            y, x_ = result.position[n].tolist()
            box = tuple(result.box[n].tolist())
            assert box == _analytic_box(layer, y, x_)
            support = _gradient_support(model, layer, c, y, x_)
            assert _box_of(support) == box
            assert int(support.sum()) == (box[2] - box[0]) * (box[3] - box[1])  # a full box
            nonzero = result.projection[n].abs().sum(0) > 0
            assert bool(nonzero.any()) == bool(result.activation[n] > 0)
            top, left, bottom, right = box
            outside = nonzero.clone()
            outside[top:bottom, left:right] = False
            assert not outside.any(), (c, n, box)


def test_receptive_field_of_every_unit_is_the_analytic_box():
    model = _net()
    x = torch.randn(1, 3, SIZE, SIZE)
    for layer, side in (("1", 20), ("4", 10), ("6", 5)):
        units = [(1, y, x_) for y in range(side) for x_ in range(side)]
        boxes = receptive_field(model, x, layer, units)
        expected = [_analytic_box(layer, y, x_) for _, y, x_ in units]
        assert [tuple(b) for b in boxes.tolist()] == expected


def test_channel_none_projects_the_strongest_activation_of_the_layer():
    model = _net()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    result = reconstruct(model, x, "4")
    with torch.no_grad():
        a = model[:5](x)
    for n in range(2):
        c, (y, x_) = int(result.channel[n]), result.position[n].tolist()
        assert float(result.activation[n]) == pytest.approx(float(a[n].max()))
        assert float(a[n, c, y, x_]) == pytest.approx(float(a[n].max()))
    patch = result.patch(x, 1)
    top, left, bottom, right = result.box[1].tolist()
    assert patch.shape == (3, bottom - top, right - left)


def test_batch_equals_one_by_one_and_leaves_everything_alone():
    model = _net()
    model[3].weight.requires_grad_(False)
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    saved = x.clone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = reconstruct(model, x, "6", 1)
    for n in range(3):
        alone = reconstruct(model, x[n : n + 1], "6", 1)
        torch.testing.assert_close(alone.projection[0], batch.projection[n], rtol=1e-5, atol=1e-7)
        assert torch.equal(alone.box[0], batch.box[n])
        assert torch.equal(alone.position[0], batch.position[n])
    assert torch.equal(x, saved)
    assert not model.training
    assert not model[3].weight.requires_grad
    assert model[0].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("pool", [False, True])
def test_without_max_pooling_the_projection_of_a_unit_ignores_the_image(pool):
    # The DeconvNet backward at a rectifier ignores the forward pass: only max-pooling
    # switches carry the image. A 1x1 layer makes every image project the same unit.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.MaxPool2d(2) if pool else nn.Identity(),
        nn.Conv2d(4, 6, 4 if pool else 8),
        nn.ReLU(),
    ).eval()
    x = torch.randn(6, 3, 10, 10, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        channel = int((model(x)[:, :, 0, 0] > 0).sum(0).argmax())  # the most often active
    result = reconstruct(model, x, "4", channel)
    keep = result.activation > 0
    assert int(keep.sum()) >= 2
    unit = result.projection[keep] / result.activation[keep].view(-1, 1, 1, 1)
    same = torch.allclose(unit, unit[:1].expand_as(unit), rtol=1e-4, atol=1e-6)
    assert same != pool


def test_a_reused_rectifier_is_read_at_its_last_call():
    relu = nn.ReLU()

    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3), relu

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.b(self.relu(self.a(x)))).mean((2, 3))

    torch.manual_seed(0)
    model = Reuse().eval()
    result = reconstruct(model, torch.randn(1, 3, 10, 10), "relu", 0)
    assert result.layer_calls == 2
    y, x_ = result.position[0].tolist()
    # the first 3x3 convolution is padded, the second not: 8x8 output, 5x5 fields
    expected = (max(y - 1, 0), max(x_ - 1, 0), min(y + 4, 10), min(x_ + 4, 10))
    assert tuple(result.box[0].tolist()) == expected


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_refusals_are_clear():
    torch.manual_seed(0)
    gelu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.LazyLinear(2)).eval()
    gelu(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"needs rectifiers.*GELU"):
        reconstruct(gelu, torch.randn(1, 3, 8, 8), "0")
    model = _net()
    x = torch.randn(1, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match=r"'9' is not spatial.*\(1, 3\)"):
        reconstruct(model, x, "9")
    with pytest.raises(ValueError, match=r"channel 6 is out of range"):
        reconstruct(model, x, "4", 6)
    with pytest.raises(ValueError, match="no layer named"):
        reconstruct(model, x, "conv1")
    with pytest.raises(TypeError, match="TorchScript"):
        reconstruct(torch.jit.script(model), x, "4")
    with pytest.raises(ValueError, match="outside"):
        receptive_field(model, x, "6", [(0, 5, 0)])


# -- top_activating ----------------------------------------------------------------------------


def _brute_force(model: nn.Module, images: torch.Tensor, layer: int, channel: int, k: int):
    with torch.no_grad():
        scores = model[: layer + 1](images)[:, channel].flatten(1).amax(1)
    order = sorted(range(len(images)), key=lambda i: (-float(scores[i]), i))[:k]
    return order, scores[order]


def test_top_activating_over_a_stream_of_batches_is_the_brute_force_ranking():
    model = _net()
    images = torch.randn(13, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    order, scores = _brute_force(model, images, 4, 3, 5)
    stream = [images[:3], images[3], images[4:9], images[9:]]  # batches and a single image
    for batch_size in (1, 4, 64):
        result = top_activating(model, iter(stream), "4", 3, 5, batch_size=batch_size)
        assert result.labels == [f"#{i}" for i in order]
        torch.testing.assert_close(result.activations, scores, rtol=1e-5, atol=1e-6)
        assert result.seen == 13
        assert torch.equal(result.images, images[order])
    direct = reconstruct(model, images[order], "4", 3)
    torch.testing.assert_close(result.reconstruction.projection, direct.projection)
    assert torch.equal(result.boxes, direct.box)
    picture = top_grid(result)
    assert picture.mode == "RGB"
    assert picture.size[0] > picture.size[1]  # 3 pairs per row, 2 rows
    # Layer 5 is a convolution followed by an in-place ReLU: it is read before the ReLU.
    order, scores = _brute_force(model, images, 5, 1, 13)
    assert float(scores.min()) < 0  # after the ReLU it would be 0
    before_relu = top_activating(model, stream, "5", 1, 13, reconstructions=False)
    torch.testing.assert_close(before_relu.activations, scores, rtol=1e-5, atol=1e-6)
    # An image with NaN is reported and skipped; the rest of its batch is kept.
    broken = images[:3].clone()
    broken[1, 0, 0, 0] = float("nan")
    skipped: list[tuple[str, str]] = []
    partial = top_activating(model, [broken], "4", 3, 5, on_skip=lambda *a: skipped.append(a))
    assert skipped == [("#1", "contains NaN or inf values")]
    assert partial.seen == 2
    assert sorted(partial.labels) == ["#0", "#2"]
    positions_only = top_activating(model, stream, "4", 3, 5, reconstructions=False)
    assert torch.equal(positions_only.boxes, direct.box)
    assert positions_only.reconstruction.projection is None


def _folder(tmp_path: Path, count: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (22 + i, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "notes.txt").write_text("not an image, and not an image name")
    return tmp_path


def _preprocess(image):
    return preprocess_image(image, size=16, resize=20, mean=(0.5,) * 3, std=(0.25,) * 3)


def test_top_activating_over_a_folder_reports_and_skips_a_bad_file(tmp_path):
    folder = _folder(tmp_path)
    model = _net()
    model.preprocess = _preprocess  # the model's own pipeline is used by default
    with pytest.warns(UserWarning, match=r"skipped broken\.png: not an image"):
        result = top_activating(model, folder, "4", 2, k=4, progress=True)
    assert result.seen == 6
    assert [label for label, _ in result.skipped] == ["broken.png"]
    images = torch.cat([_preprocess(Image.open(folder / f"img{i}.png")) for i in range(6)])
    order, scores = _brute_force(model, images, 4, 2, 4)
    assert result.labels == [f"img{i}.png" for i in order]
    torch.testing.assert_close(result.activations, scores, rtol=1e-5, atol=1e-6)
    reasons: list[tuple[str, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = top_activating(
            _net(),
            folder,
            "4",
            2,
            k=4,
            preprocess=_preprocess,
            on_skip=lambda *a: reasons.append(a),
        )
    assert again.labels == result.labels
    assert reasons == result.skipped
    with pytest.raises(TypeError, match="preprocess"):
        top_activating(_net(), folder, "4", 2, on_skip=lambda *a: None)
    with pytest.raises(ValueError, match="channel 6 is out of range"):
        top_activating(model, folder, "4", 6, on_skip=lambda *a: None)


# -- command line ------------------------------------------------------------------------------


@pytest.fixture
def model_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "net.pt"
    torch.save(_net(), path)
    return str(path)


def _args(model: str) -> list[str]:
    return ["--model", model, "--trust-model", "--input-size", "16", "--resize", "20", "-q"]


@pytest.mark.filterwarnings("ignore:unpickling:UserWarning")
def test_cli_features_writes_the_figure_and_reports_the_bad_file(tmp_path, model_file, capsys):
    folder = _folder(tmp_path / "images" if (tmp_path / "images").mkdir() is None else tmp_path)
    out = tmp_path / "figure.png"
    argv = ["features", str(folder), "--layer", "4", "--channel", "1", "-k", "3", "--out", str(out)]
    code = cli.main([*argv, *_args(model_file)])
    captured = capsys.readouterr()
    assert code == cli.EXIT_PARTIAL, captured.err
    assert "broken.png: not an image" in captured.err
    assert Image.open(out).mode == "RGB"
    lines = captured.out.splitlines()
    assert [line.split(".")[0] for line in lines[:3]] == ["1", "2", "3"]
    assert "activation" in lines[0]
    assert "patch rows" in lines[0]
    assert lines[-1].startswith(f"wrote {out} (3 of 6 images)")
    code = cli.main(
        ["features", str(folder), "--layer", "4x", "--channel", "1", *_args(model_file)]
    )
    assert code == cli.EXIT_USAGE
    assert "did you mean '4'" in capsys.readouterr().err
    code = cli.main(["features", str(out), "--layer", "4", "--channel", "1", *_args(model_file)])
    assert code == cli.EXIT_FAILURE
    assert "not a folder" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:unpickling:UserWarning")
def test_cli_visualize_class_maximizes_a_channel(tmp_path, model_file, capsys):
    argv = [
        "visualize-class",
        "--layer",
        "3",
        "--channel",
        "2",
        "--steps",
        "5",
        "-o",
        str(tmp_path),
    ]
    code = cli.main([*argv, *_args(model_file)])
    captured = capsys.readouterr()
    assert code == cli.EXIT_OK, captured.err
    assert Image.open(tmp_path / "unit.3.2.png").size == (16, 16)
    assert captured.out.startswith("3 channel 2: mean activation ")
    code = cli.main(["visualize-class", "1", "--layer", "3", "--channel", "2", *_args(model_file)])
    assert code == cli.EXIT_USAGE
    assert "not both" in capsys.readouterr().err
    code = cli.main(["visualize-class", "--layer", "3", *_args(model_file)])
    assert code == cli.EXIT_USAGE
    code = cli.main(["visualize-class", "--layer", "3", "--channel", "9", *_args(model_file)])
    assert code == cli.EXIT_USAGE
    assert "out of range" in capsys.readouterr().err
