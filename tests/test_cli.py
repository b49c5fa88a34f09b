"""Tests of the ``salience`` command line, on tiny models (one test uses the pretrained one)."""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import salience
from salience import _io, cli, registry
from salience.registry import MethodSpec

# -- fixtures --------------------------------------------------------------------------------


def _tiny(classes: int) -> nn.Module:
    torch.manual_seed(classes)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    ).eval()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    """A pickled 10-class model (loading it needs --trust-model)."""
    path = tmp_path_factory.mktemp("models") / "tiny10.pt"
    torch.save(_tiny(10), path)
    return str(path)


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory) -> str:
    """A pickled 1000-class model: it gets the ImageNet class names."""
    path = tmp_path_factory.mktemp("models") / "tiny1000.pt"
    torch.save(_tiny(1000), path)
    return str(path)


def _tiny_args(model: str) -> list[str]:
    return ["--model", model, "--trust-model", "--input-size", "16", "--resize", "20", "-q"]


def _image(path: Path, mode: str = "RGB", size: tuple[int, int] = (24, 20)) -> str:
    rng = np.random.default_rng(abs(hash(mode)) % 1000)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, size[::-1], dtype=np.uint16))
    elif mode == "P":
        image = rgb.quantize(16)
    else:
        image = rgb.convert(mode)
    image.save(path)
    return str(path)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width × height`` pixels (the data is tiny)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


pytestmark = pytest.mark.filterwarnings("ignore:unpickling:UserWarning")


# -- help, methods, evaluate -----------------------------------------------------------------


def test_help_explains_every_option(capsys):
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {
        "explain",
        "compare",
        "report",
        "visualize-class",
        "methods",
        "evaluate",
        "audit",
        "batch",
        "features",
    }
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, (name, action.dest)
            assert action.help != argparse.SUPPRESS, (name, action.dest)
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, (name, flag)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = capsys.readouterr().out
    assert "exit status" in top
    assert "3   partial failure" in top


def test_methods_lists_the_registry(capsys):
    code, out, _ = run(["methods"], capsys)
    assert code == cli.EXIT_OK
    for name, description in salience.available_methods().items():
        assert any(line.startswith(name) and description in line for line in out.splitlines())
    code, out, _ = run(["methods", "--kind", "cam"], capsys)
    assert "grad_cam" in out
    assert "integrated_gradients" not in out


def test_installed_entry_point():
    exe = shutil.which("salience")
    if exe is None:
        pytest.skip("the salience entry point is not installed (pip install -e .)")
    result = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.strip() == f"salience {salience.__version__}"


# -- explain ---------------------------------------------------------------------------------


def test_explain_writes_png_overlays_and_raw_maps(tmp_path, model_file, capsys):
    image = _image(tmp_path / "cat.png")
    out = tmp_path / "out"
    argv = ["explain", image, "-m", "grad_cam,gradient", "-t", "top2", "-o", str(out)]
    code, stdout, err = run([*argv, *_tiny_args(model_file)], capsys)
    assert code == cli.EXIT_OK, err
    pngs = sorted(p.name for p in out.glob("*.png"))
    npys = sorted(p.name for p in out.glob("*.npy"))
    assert len(pngs) == len(npys) == 4
    for name in pngs:
        stem, method, label, ext = name.split(".")
        assert stem == "cat"
        assert method in ("grad_cam", "gradient")
        assert ext == "png"
        assert label.isdigit()  # a model without class names: the index alone
    maps = {p.name.split(".")[1]: np.load(p) for p in out.glob("*.npy")}
    assert maps["grad_cam"].shape == (1, 16, 16)
    assert maps["gradient"].shape == (3, 16, 16)
    assert Image.open(out / pngs[0]).size == (16, 16)
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{image}: class ")
    assert " p=" in lines[0]
    assert not list(out.glob(".*.tmp"))
    mode = (out / pngs[0]).stat().st_mode & 0o777
    assert mode & 0o600 == 0o600
    assert mode != 0o600


def test_explain_matches_the_library(tmp_path, model_file, capsys):
    image = _image(tmp_path / "a.png")
    out = tmp_path / "out"
    argv = ["explain", image, "-m", "integrated_gradients", "-t", "3", "-o", str(out)]
    argv += ["-O", "integrated_gradients.tolerance=none", "-O", "steps=8"]
    code, _, err = run([*argv, *_tiny_args(model_file)], capsys)
    assert code == cli.EXIT_OK, err
    model = salience.models.load(model_file, trust=True)
    x = salience.models.preprocess_image(
        image, size=16, resize=20, mean=cli.TORCHVISION_MEAN, std=cli.TORCHVISION_STD
    )
    expected = salience.integrated_gradients(model, x, 3, steps=8).values[0].numpy()
    saved = np.load(out / "a.integrated_gradients.3.npy")
    np.testing.assert_allclose(saved, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "I;16", "1", "CMYK"])
def test_grayscale_rgba_palette_16bit_images_work(tmp_path, model_file, mode, capsys):
    suffix = ".tif" if mode == "CMYK" else ".png"
    image = _image(tmp_path / f"img{suffix}", mode)
    argv = ["explain", image, "-m", "gradient", "-o", str(tmp_path / "out")]
    code, _stdout, err = run([*argv, *_tiny_args(model_file)], capsys)
    assert code == cli.EXIT_OK, err
    assert len(list((tmp_path / "out").glob("img.gradient.*.png"))) == 1


def _bad_images(tmp_path: Path) -> dict[str, str]:
    good = _image(tmp_path / "good.png", size=(64, 64))
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    data = bytearray(Path(good).read_bytes())
    data[200:1200] = bytes((b * 7 + 13) % 256 for b in data[200:1200])  # bit rot in the pixels
    corrupt = tmp_path / "bitrot.png"
    corrupt.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(good).read_bytes()[:2000])
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header(20_000, 20_000))
    return {
        "good": good,
        "text": str(text),
        "corrupt": str(corrupt),
        "truncated": str(truncated),
        "huge": str(huge),
        "missing": str(tmp_path / "missing.jpg"),
    }


def test_bad_inputs_fail_one_by_one_and_the_others_complete(tmp_path, model_file, capsys):
    files = _bad_images(tmp_path)
    out = tmp_path / "out"
    argv = ["explain", *files.values(), "-m", "gradient", "-o", str(out)]
    code, stdout, err = run([*argv, *_tiny_args(model_file)], capsys)
    assert code == cli.EXIT_PARTIAL
    assert [p.name.split(".")[0] for p in out.glob("*.png")] == ["good"]
    assert stdout.count("\n") == 1
    assert stdout.startswith(files["good"])
    errors = [line for line in err.splitlines() if line.startswith("salience explain: error:")]
    assert len(errors) == 5
    expected = {
        "text": "not an image",
        "corrupt": "corrupt or unreadable image",
        "truncated": "truncated",
        "huge": "decompression-bomb",
        "missing": "no such file",
    }
    for key, phrase in expected.items():
        line = next(line for line in errors if files[key] in line)
        assert phrase in line, line
    assert "5 of 6 images failed:" in err
    summary = err.split("5 of 6 images failed:")[1]
    assert all(files[key] in summary for key in expected)


def test_nothing_succeeded_exits_1(tmp_path, model_file, capsys):
    files = _bad_images(tmp_path)
    argv = ["explain", files["text"], files["missing"], "-o", str(tmp_path / "out")]
    code, _, err = run([*argv, *_tiny_args(model_file)], capsys)
    assert code == cli.EXIT_FAILURE
    assert "2 of 2 images failed" in err


def test_max_pixels_can_be_raised_or_lowered(tmp_path, model_file, capsys):
    image = _image(tmp_path / "small.png", size=(40, 30))
    argv = ["explain", image, "-m", "gradient", "-o", str(tmp_path / "out"), "--max-pixels"]
    code, _, err = run([*argv, "1000", *_tiny_args(model_file)], capsys)
    assert code == cli.EXIT_FAILURE
    assert "40×30 = 1,200 pixels" in err
    assert run([*argv, "0", *_tiny_args(model_file)], capsys)[0] == cli.EXIT_OK


def test_a_method_that_fails_is_reported_and_the_rest_written(tmp_path, model_file, capsys):
    image = _image(tmp_path / "x.png")
    argv = ["explain", image, "-m", "gradient,grad_cam", "--layer", "5", "-o", str(tmp_path)]
    code, _, err = run([*argv, *_tiny_args(model_file)], capsys)  # layer 5 is Flatten
    assert code == cli.EXIT_PARTIAL
    assert f"{image}: grad_cam:" in err
    assert len(list(tmp_path.glob("x.gradient.*.png"))) == 1


# -- classes ---------------------------------------------------------------------------------


def test_class_names_are_accepted_where_indices_are(tmp_path, imagenet_file, capsys):
    image = _image(tmp_path / "x.png")
    argv = ["explain", image, "-m", "gradient", "-t", "tiger cat", "-t", "tabby", "-t", "1"]
    code, _, err = run([*argv, "-o", str(tmp_path / "o"), *_tiny_args(imagenet_file)], capsys)
    assert code == cli.EXIT_OK, err
    names = sorted(p.name for p in (tmp_path / "o").glob("*.png"))
    assert names == [
        "x.gradient.1-goldfish.png",
        "x.gradient.281-tabby.png",
        "x.gradient.282-tiger_cat.png",
    ]


def test_unknown_class_name_suggests_close_names(tmp_path, imagenet_file, capsys):
    image = _image(tmp_path / "x.png")
    argv = ["explain", image, "-t", "tabbby", "-o", str(tmp_path)]
    code, _, err = run([*argv, *_tiny_args(imagenet_file)], capsys)
    assert code == cli.EXIT_USAGE
    assert err.count("\n") == 1
    assert "tabbby" in err
    assert "did you mean" in err
    assert "'tabby'" in err


def test_labels_file_names_the_classes_of_a_custom_model(tmp_path, model_file, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"animal {c}" for c in "abcdefghij"))
    image = _image(tmp_path / "x.png")
    argv = ["explain", image, "-m", "gradient", "-t", "animal_c", "--labels", str(labels)]
    code, out, err = run([*argv, "-o", str(tmp_path / "o"), *_tiny_args(model_file)], capsys)
    assert code == cli.EXIT_OK, err
    assert [p.name for p in (tmp_path / "o").glob("*.png")] == ["x.gradient.2-animal_c.png"]
    assert "animal " in out
    code, _, err = run(
        ["explain", image, "-t", "animal", "--labels", str(labels), *_tiny_args(model_file)],
        capsys,
    )
    assert code == cli.EXIT_USAGE
    assert "did you mean" in err
    labels.write_text("\n".join(["cat", "dog", "bird", "Cat", *"efghij"]))  # one name twice
    code, _, err = run(
        ["explain", image, "-t", "cat", "--labels", str(labels), *_tiny_args(model_file)],
        capsys,
    )
    assert code == cli.EXIT_USAGE
    assert "class name 'cat' is ambiguous: it names classes 0 ('cat'), 3 ('Cat')" in err


# -- usage errors, models, devices -----------------------------------------------------------


def test_unknown_method_and_bad_options_are_usage_errors(tmp_path, model_file, capsys):
    image = _image(tmp_path / "x.png")
    base = ["explain", image, "-o", str(tmp_path), *_tiny_args(model_file)]
    code, _, err = run([*base, "-m", "grad_cma"], capsys)
    assert code == cli.EXIT_USAGE
    assert "'grad_cam'" in err
    code, _, err = run([*base, "-m", "gradient", "-O", "stepz=3"], capsys)
    assert code == cli.EXIT_USAGE
    assert "stepz" in err
    code, _, err = run([*base, "-m", "gradient", "-O", "nonsense"], capsys)
    assert code == cli.EXIT_USAGE
    assert "KEY=VALUE" in err


def test_method_options():
    options = cli.method_options(
        ["integrated_gradients.steps=8", "samples=3", "score=probability"],
        ["integrated_gradients", "smoothgrad", "grad_cam"],
        "features",
    )
    assert options["integrated_gradients"] == {
        "tolerance": 0.01,
        "steps": 8,
        "max_steps": 128,
        "score": "probability",
    }
    assert options["smoothgrad"] == {"samples": 3, "score": "probability"}
    assert options["grad_cam"] == {"layer": "features", "score": "probability"}
    fixed = cli.method_options(["quadrature=riemann_left"], ["integrated_gradients"], None)
    assert "tolerance" not in fixed["integrated_gradients"]
    with pytest.raises(cli.UsageError, match="not among the requested"):
        cli.method_options(["gradient.score=logit"], ["grad_cam"], None)
    with pytest.raises(cli.UsageError, match="--layer"):
        cli.method_options([], ["gradient"], "features")
    assert cli.method_options(["relu=off"], ["grad_cam"], None)["grad_cam"]["relu"] is False
    with pytest.raises(cli.UsageError, match=r"grad_cam\.relu: a switch, true or false"):
        cli.method_options(["relu=flase"], ["grad_cam"], None)  # a typo: no ReLU turned on


def test_unreadable_model_file_is_one_line_naming_the_file(tmp_path, capsys):
    image = _image(tmp_path / "x.png")
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(b"not a model at all" * 10)
    expected = {
        str(garbage): "not a TorchScript archive or a torch.save file",
        str(tmp_path / "absent.pt"): "does not exist",
        "no_such_model": "unknown model",
    }
    for model, phrase in expected.items():
        code, _, err = run(["explain", image, "--model", model, "-o", str(tmp_path)], capsys)
        assert code == cli.EXIT_FAILURE
        assert err.count("\n") == 1, err
        assert Path(model).name in err, err
        assert phrase in err, err


def test_pickled_model_needs_trust(tmp_path, model_file, capsys):
    image = _image(tmp_path / "x.png")
    code, _, err = run(["explain", image, "--model", model_file, "-o", str(tmp_path)], capsys)
    assert code == cli.EXIT_FAILURE
    assert "--trust-model" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path, model_file, capsys):
    image = _image(tmp_path / "x.png")
    argv = ["explain", image, "--device", "cuda", *_tiny_args(model_file)]
    code, _, err = run(argv, capsys)
    assert code == cli.EXIT_USAGE
    assert "CUDA is not available" in err


def test_missing_optional_hub_packages(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_hubs(name, *args, **kwargs):
        if name in ("torchvision", "timm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hubs)
    image = _image(tmp_path / "x.png")
    for spec, package in (("torchvision:resnet18", "torchvision"), ("timm:resnet18", "timm")):
        code, _, err = run(["explain", image, "--model", spec], capsys)
        assert code == cli.EXIT_FAILURE
        assert f"pip install {package}" in err


# -- outputs are atomic ----------------------------------------------------------------------


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "map.png"
    target.write_bytes(b"old")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(_io.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _io.save_png(Image.new("RGB", (4, 4)), target)
    assert target.read_bytes() == b"old"
    monkeypatch.undo()
    monkeypatch.setattr(_io.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _io.save_npy(np.zeros(3), tmp_path / "new.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.png"]
    monkeypatch.undo()
    _io.save_npy(np.arange(3), tmp_path / "new.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "new.npy"), [0, 1, 2])


def test_interrupt_exits_130(tmp_path, model_file, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("salience.report.explain", interrupted)
    image = _image(tmp_path / "x.png")
    code, _, err = run(["explain", image, "-o", str(tmp_path), *_tiny_args(model_file)], capsys)
    assert code == cli.EXIT_INTERRUPTED
    assert "interrupted" in err


# -- compare, visualize-class ----------------------------------------------------------------


def test_compare_methods_follow_the_registry(monkeypatch):
    assert cli.compare_methods() == [
        "gradient",
        "guided_backprop",
        "grad_cam",
        "guided_grad_cam",
        "integrated_gradients",
        "lrp",
    ]
    spec = MethodSpec("lrp_epsilon", salience.gradient, "LRP", "pixel")
    monkeypatch.setitem(registry._REGISTRY, "lrp_epsilon", spec)
    assert cli.compare_methods()[-1] == "lrp_epsilon"


def test_compare_writes_one_figure_per_image(tmp_path, model_file, capsys):
    images = [_image(tmp_path / "one.png"), _image(tmp_path / "sub.png", "L")]
    out = tmp_path / "out"
    code, stdout, err = run(
        ["compare", *images, "-o", str(out), "--panel-size", "1", *_tiny_args(model_file)],
        capsys,
    )
    assert code == cli.EXIT_OK, err
    figures = sorted(p.name for p in out.glob("*.png"))
    assert len(figures) == 2
    assert all(".compare." in f for f in figures)
    assert Image.open(out / figures[0]).width > 5 * Image.open(out / figures[0]).height / 2
    assert len(stdout.strip().splitlines()) == 2


def test_visualize_class(tmp_path, imagenet_file, capsys):
    argv = ["visualize-class", "goldfish", "--steps", "3", "--jitter", "1", "-o", str(tmp_path)]
    code, stdout, err = run([*argv, *_tiny_args(imagenet_file)], capsys)
    assert code == cli.EXIT_OK, err
    picture = Image.open(tmp_path / "class_model.1-goldfish.png")
    assert picture.size == (16, 16)
    assert picture.mode == "RGB"
    assert stdout.startswith("goldfish (1): p=")
    code, _, err = run(["visualize-class", "goldfsh", *_tiny_args(imagenet_file)], capsys)
    assert code == cli.EXIT_USAGE
    assert "'goldfish'" in err
    # bad numbers are bad command lines (exit 2), for a class as for a channel
    for option, value in (("--lr", "-1"), ("--l2", "-1"), ("--jitter", "-2"),
                          ("--blur-every", "x"), ("--blur-sigma", "0")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error
            run(["visualize-class", "goldfish", option, value, *_tiny_args(imagenet_file)], capsys)
        assert exit_info.value.code == cli.EXIT_USAGE, option
        assert option in capsys.readouterr().err


@pytest.mark.pretrained
def test_compare_on_the_bundled_cat_with_the_pretrained_model(tmp_path, capsys):
    argv = ["compare", "sample:chelsea", "-m", "gradient,grad_cam", "-o", str(tmp_path), "-q"]
    code, stdout, err = run(argv, capsys)
    assert code == cli.EXIT_OK, err
    assert stdout.startswith("sample:chelsea: Egyptian cat (285) p=")
    figure = tmp_path / "chelsea.compare.285-Egyptian_cat.png"
    assert Image.open(figure).width > 600


def test_integrated_gradients_gap_over_tolerance_is_noted(tmp_path, model_file, capsys):
    image = _image(tmp_path / "x.png")
    argv = ["explain", image, "-m", "integrated_gradients", "-o", str(tmp_path)]
    argv += ["-O", "tolerance=1e-9", "-O", "steps=1", "-O", "max_steps=3"]
    code, _, err = run([*argv, *_tiny_args(model_file)], capsys)
    assert code == cli.EXIT_OK
    assert "completeness gap" in err
    assert "after 3 steps" in err
    assert "adaptive path" not in err  # the library's warning is not repeated


def test_library_warnings_are_one_line_each(tmp_path, capsys):
    dead = _tiny(10)
    with torch.no_grad():
        dead[0].bias.fill_(-100.0)  # every unit of the first layer is dead: zero gradients
    model = tmp_path / "dead.pt"
    torch.save(dead, model)
    image = _image(tmp_path / "x.png")
    argv = ["explain", image, "-m", "gradient", "-o", str(tmp_path)]
    code, _, err = run([*argv, *_tiny_args(str(model))], capsys)
    assert code == cli.EXIT_OK, err
    lines = [line for line in err.splitlines() if "zero everywhere" in line]
    assert len(lines) == 1
    assert lines[0].startswith("salience: warning: gradient: the map of sample(s) [0] is zero")


@pytest.mark.parametrize(
    ("command", "option", "value", "expected"),
    [
        ("compare", "--panel-size", "0", "inches above 0"),
        ("compare", "--panel-size", "1000", "at most 20"),
        ("explain", "--alpha", "5", "from 0 to 1"),
        ("explain", "--cmap", "jeet", "unknown colormap 'jeet'; did you mean 'jet'?"),
        ("report", "--percentile", "0", "above 0, at most 100"),
        ("explain", "--percentile", "nan", "above 0, at most 100"),
        ("explain", "--std", "0,0,0", "three positive numbers"),
        ("explain", "--max-pixels", "-1", "an integer >= 0"),
        ("batch", "--workers", "-1", "an integer >= 0"),
    ],
)
def test_display_and_input_options_are_checked_before_any_work(
    tmp_path, capsys, command, option, value, expected
):
    """These failed after the maps were computed (a traceback for --panel-size 0) or ran on
    with every image failing (--std 0,0,0, --max-pixels -1)."""
    image = _image(tmp_path / "x.png")
    argv = [command, image, "-m", "gradient", option, value]
    argv += ["--out" if command == "batch" else "-o", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error
        run(argv, capsys)
    assert exit_info.value.code == cli.EXIT_USAGE
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_long_file_name_still_gets_its_outputs(tmp_path, model_file, capsys):
    """A 230-byte name is legal; with '.gradient.<class>.png' after it, it was not."""
    image = _image(tmp_path / f"{'x' * 230}.png")
    code, _, err = run(
        ["explain", image, "-m", "gradient", "-o", str(tmp_path / "o"), *_tiny_args(model_file)],
        capsys,
    )
    assert code == cli.EXIT_OK, err
    (written,) = (tmp_path / "o").glob("*.png")
    assert written.name.startswith("x" * 120 + ".gradient.")


def test_failures_that_are_no_images_are_not_counted_as_images(capsys):
    from salience.cli._run import Run

    run_ = Run("audit")
    run_.fail("gradient: randomization: out of memory")  # a check failed, every image is fine
    run_.finish(4)
    assert "salience audit: 1 failure(s):" in capsys.readouterr().err
    run_.images_failed = 1
    run_.finish(4)
    assert "1 of 4 images failed:" in capsys.readouterr().err
