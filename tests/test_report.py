"""Tests of salience.report and ``salience report``: one self-contained page that renders."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from salience import cli, report
from salience.attribution import Attribution

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _find_chromium() -> str | None:
    """The first Chromium on PATH, as CI finds it (``command -v chromium``)."""
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


pytestmark = pytest.mark.filterwarnings("ignore:unpickling:UserWarning")


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src") or "")
        for key in ("src", "href", "srcset", "poster", "data"):
            if key in values:
                self.links.append((tag, key, values[key] or ""))


def _parse(page: str) -> _Collector:
    collector = _Collector()
    collector.feed(page)
    return collector


def _photo(size: int = 20, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8))


def _preprocess(image: Image.Image) -> torch.Tensor:
    pixels = np.asarray(image.resize((16, 16)), dtype=np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1)[None] * 2 - 1


@pytest.fixture
def page(vgg) -> str:
    item = report.explain_image(
        vgg,
        _photo(),
        methods=["gradient", "grad_cam", "guided_backprop", "integrated_gradients", "cam"],
        options={"integrated_gradients": {"steps": 4}},
        preprocess=_preprocess,
        crop=lambda image: image.resize((16, 16)),
        title="photo <1>.png",
    )
    return report.to_html([item], title="test report", metadata={"model": "vgg"})


def test_page_is_self_contained(page):
    parsed = _parse(page)
    assert len(parsed.images) == 5  # the input and four maps (cam does not apply to a VGG)
    for tag, key, value in parsed.links:
        assert value.startswith("data:image/png;base64,"), (tag, key, value[:40])
    assert "<link" not in page
    assert "<script" not in page
    assert "url(" not in page
    for src in parsed.images:
        picture = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        picture.verify()


def test_page_shows_prediction_maps_and_metric_placeholder(page):
    assert "Top-5 prediction" in page
    assert page.count("<tr><td>") == 5
    for name in ("Gradient", "Grad-CAM", "Guided Backprop", "Integrated Gradients"):
        assert f"<b>{name}</b>" in page
    assert "completeness gap" in page  # IG's diagnostics are shown
    assert "Failed:" in page
    assert "cam (Zhou et al. 2016) applies only" in page
    assert "salience audit" in page
    assert "photo &lt;1&gt;.png" in page
    assert "photo <1>" not in page


def test_predict_top_k(vgg, images):
    predictions = report.predict(vgg, images[:1], k=3)
    assert [p.name for p in predictions] == [f"class {p.index}" for p in predictions]
    probabilities = [p.probability for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    with torch.no_grad():
        expected = vgg(images[:1]).softmax(1)[0].topk(3).indices.tolist()
    assert [p.index for p in predictions] == expected


def test_a_map_that_is_not_finite_is_noted():
    values = torch.zeros(1, 3, 4, 4)
    values[0, 0, 0, :2] = float("nan")
    values[0, 2, 1, 1] = float("inf")
    result = Attribution(values, None, torch.zeros(1), "gradient", reduction="abs_max")
    assert "not finite: 2 NaN (drawn as zero) and 1 infinite value(s)" in " ".join(
        report.method_notes(result)
    )


def test_a_model_whose_output_is_not_finite_still_gets_its_report():
    """An overflowed logit makes every probability NaN: shown as such, without a bar."""

    class Overflowed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.mean((2, 3))) + torch.tensor([float("inf"), 0.0, 0.0])

    item = report.explain_image(
        Overflowed(), _photo(8), methods=["gradient"], preprocess=lambda _: torch.rand(1, 3, 8, 8)
    )
    page = report.to_html([item])
    assert 'style="width:0px"></span>nan' in page


def _batchnorm_net() -> torch.nn.Module:
    """A net in training mode whose BatchNorm would update its statistics on every pass."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).train()


@pytest.mark.filterwarnings("ignore:the model is in training mode")
def test_the_prediction_and_the_report_keep_a_training_models_buffers() -> None:
    model = _batchnorm_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 8, 8)
    report.predict(model, x)
    methods = ["gradient"]
    report.explain_image(model, _photo(8), methods=methods, target=1, preprocess=lambda _: x[:1])
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} changed"


def _chromium_counts(html_path: Path, tmp_path: Path) -> tuple[int, int]:
    """Open the page in headless Chromium; return (images, images that failed to render)."""
    chromium = _find_chromium()
    if chromium is None:
        pytest.skip(f"none of {', '.join(CHROMIUM_NAMES)} is on PATH (apt-get install chromium)")
    marker = """<script>
window.addEventListener("load", function () {
  var all = Array.from(document.images);
  var bad = all.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute("data-images", all.length + ":" + bad.length);
});
</script>"""
    probe = tmp_path / f"probe-{html_path.name}"
    probe.write_text(html_path.read_text("utf-8").replace("</body>", marker + "</body>"))
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe.as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    match = re.search(r'data-images="(\d+):(\d+)"', result.stdout)
    assert match, f"no marker in Chromium's DOM dump: {result.stderr[-2000:]}"
    return int(match.group(1)), int(match.group(2))


def test_chromium_is_found_on_path_under_any_usual_name(tmp_path, monkeypatch):
    for name in ("chromium-browser", "chromium"):
        fake = tmp_path / name
        fake.write_text("#!/bin/sh\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", str(tmp_path))
        assert _find_chromium() == str(fake)  # "chromium" first once both exist
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert _find_chromium() is None


def test_every_image_renders_in_chromium(page, tmp_path):
    path = Path(report.write_html(tmp_path / "report.html", page))
    assert _chromium_counts(path, tmp_path) == (5, 0)
    # the check can fail: a broken image is caught
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("</footer>", '</footer><img src="data:image/png;base64,AAAA">'))
    assert _chromium_counts(broken, tmp_path) == (6, 1)


def test_report_command(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 1000),
    ).eval()
    model_path = tmp_path / "tiny.pt"
    torch.save(model, model_path)
    good = tmp_path / "good.png"
    _photo(seed=1).save(good)
    gray = tmp_path / "gray.png"
    _photo(seed=2).convert("L").save(gray)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    out = tmp_path / "site" / "report.html"
    argv = ["report", str(good), str(gray), str(bad), "--out", str(out), "-m", "grad_cam"]
    argv += ["-m", "gradient", "--model", str(model_path), "--trust-model"]
    argv += ["--input-size", "16", "-q", "--title", "My report"]
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == cli.EXIT_PARTIAL
    assert f"wrote {out}" in captured.out
    assert "bad.png: not an image" in captured.err
    page = out.read_text("utf-8")
    assert "<title>My report</title>" in page
    assert page.count('<section class="image"') == 3
    assert "Failures" in page
    assert "bad.png" in page
    assert len(_parse(page).images) == 2 * 3  # input + two maps, for the two good images
    assert _chromium_counts(out, tmp_path) == (6, 0)


@pytest.mark.pretrained
def test_pretrained_report_names_the_cat(lite0, tmp_path):
    item = report.explain_image(lite0, _cat_path(), methods=["grad_cam"], title="chelsea")
    assert "cat" in item.predictions[0].name
    assert item.methods[0].picture is not None
    assert item.methods[0].picture.size == (224, 224)


def _cat_path() -> Image.Image:
    from salience import models

    return models.sample_image("chelsea")


def test_method_notes_name_the_layer_its_layout_and_the_rectifiers():
    from conftest import ResNetish, _init
    from salience import grad_cam, guided_backprop
    from salience.report import method_notes

    model = _init(ResNetish(), 1)
    x = torch.randn(1, 3, 16, 16)
    assert method_notes(grad_cam(model, x))[0] == "layer layer2 (NCHW)"
    # ResNetish: the stem and down-sampling ReLU plus the block's ReLU module, twice per block
    assert method_notes(guided_backprop(model, x)) == ["6 rectifier calls modified"]
