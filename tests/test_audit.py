"""salience.metrics.audit and ``salience audit``: the scorecard, its readings and its page."""

from __future__ import annotations

import copy
import importlib
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from salience import cli
from salience.attribution import Attribution
from salience.metrics import deletion, insertion
from salience.metrics.audit import MethodAudit, Reading, _read_invariance, _versus_chance, audit
from test_report import _batchnorm_net, _chromium_counts, _parse, _photo

# The module, not the function salience.metrics.audit that shadows it.
audit_module = importlib.import_module("salience.metrics.audit")
pytestmark = pytest.mark.filterwarnings("ignore:unpickling:UserWarning")


class Quadrant(nn.Module):
    """Class 0's logit counts bright pixels of the top-left quadrant; class 1's is constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        nn.init.constant_(self.conv.weight, 4.0)
        nn.init.constant_(self.conv.bias, -6.0)  # a pixel counts above a mean value of 0.5
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        kept = 8 * self.relu(self.conv(x))[:, 0, : h // 2, : w // 2].flatten(1).mean(1)
        return torch.stack([kept, torch.full_like(kept, 4.0)], dim=1)


@pytest.fixture
def quadrant_images() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_faithfulness_figures_are_those_of_the_metrics(vgg, images):
    result = audit(vgg, images, ["gradient", "grad_cam"], checks=["faithfulness"], steps=8)
    target = vgg(images).argmax(1)
    for row in result.methods:
        assert row.attribution is not None
        saliency = row.attribution.saliency()
        expected = deletion(vgg, images, saliency, target, steps=8).auc
        torch.testing.assert_close(row.deletion.auc, expected)
        expected = insertion(vgg, images, saliency, target, steps=8).auc
        torch.testing.assert_close(row.insertion.auc, expected)
        mean = float(row.deletion.auc.double().mean())
        assert row.readings["deletion"].value == pytest.approx(mean)
    noise = torch.rand((3, 16, 16), generator=torch.Generator().manual_seed(0))
    chance = deletion(vgg, images, noise, target, steps=8).auc
    torch.testing.assert_close(result.chance.deletion.auc, chance)
    table = result.table()
    assert [r["method"] for r in table] == ["gradient", "grad_cam", "random"]
    assert table[0]["deletion_auc"] == pytest.approx(float(result.methods[0].deletion.auc.mean()))
    assert table[0]["randomized_similarity"] is None  # not run


def test_a_map_on_the_evidence_reads_good(quadrant_images):
    model = Quadrant().eval()
    result = audit(model, quadrant_images, ["gradient"], target=0, checks=["faithfulness"])
    readings = result["gradient"].readings
    assert readings["deletion"].verdict == "good", readings
    assert readings["insertion"].verdict == "good", readings
    assert "faster than for a random map" in readings["deletion"].text


@pytest.mark.parametrize(
    ("value", "chance", "kind", "verdict", "words"),
    [
        (0.1, 0.5, "deletion", "good", "falls faster"),
        (0.45, 0.5, "deletion", "fair", "somewhat better"),
        (0.5, 0.5, "deletion", "bad", "no better"),
        (0.7, 0.5, "deletion", "bad", "worse"),
        (0.9, 0.5, "insertion", "good", "returns faster"),
        (0.5, 0.5, "insertion", "bad", "no better"),
        (0.3, 0.5, "insertion", "bad", "worse"),
        (0.0, 0.5, "deletion", "good", "falls faster"),
    ],
)
def test_readings_against_chance(value, chance, kind, verdict, words):
    reading = _versus_chance(value, chance, kind)
    assert isinstance(reading, Reading)
    assert reading.verdict == verdict
    assert words in reading.text


def test_a_failing_method_does_not_stop_the_others(vgg, images):
    result = audit(vgg, images, ["cam", "gradient"], checks=["faithfulness"], steps=4)
    assert "method" in result["cam"].errors
    assert result["cam"].readings["deletion"].verdict == "error"
    assert "method failed" in result["cam"].readings["deletion"].text
    assert result["gradient"].deletion is not None
    assert "cam" in str(result)
    assert "gradient" in str(result)


def test_the_model_and_inputs_are_untouched(vgg, images):
    vgg.train()
    state = copy.deepcopy(vgg.state_dict())
    before = images.clone()
    try:
        audit(vgg, images, ["gradient"], checks=["faithfulness"], steps=4)
        assert vgg.training
    finally:
        vgg.eval()
    for key, value in vgg.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert all(p.grad is None for p in vgg.parameters())
    torch.testing.assert_close(images, before, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:the model is in training mode")
def test_the_predicted_class_keeps_a_training_models_buffers():
    model = _batchnorm_net()
    state = copy.deepcopy(model.state_dict())
    audit(model, torch.rand(2, 3, 8, 8), ["gradient"], checks=["faithfulness"], steps=2)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} changed"


@pytest.mark.filterwarnings("ignore")
def test_zero_maps_are_undefined_not_stable_or_invariant():
    """A class the input does not reach has zero maps: that they stay zero under a shift or
    noise is no merit, and the scorecard says the figures are undefined."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()  # fmt: skip
    with torch.no_grad():
        net[4].weight[0].zero_()
    x = torch.rand(2, 3, 8, 8)
    zero = torch.zeros(2, dtype=torch.long)
    checks = ["invariance", "stability", "randomization"]
    result = audit(net, x, ["gradient"], target=zero, checks=checks, samples=2, checkpoints=2)
    readings = result.methods[0].readings
    assert readings["invariance"].text == readings["stability"].text == "undefined (zero maps)"
    assert readings["randomization"].text == "undefined (constant maps)"
    assert result.methods[0].randomization.verdict().startswith("gradient: undefined")
    # a class it reaches: the same figures are read
    result = audit(net, x, ["gradient"], target=zero + 1, checks=checks, samples=2, checkpoints=2)
    assert "undefined" not in result.methods[0].summary()


def test_the_invariance_reading_shows_the_worst_image():
    """The method passes only when every image's map is invariant: the cell shows the worst."""
    change = torch.tensor([0.001, 0.001, 0.011])
    rows = {
        tolerance: MethodAudit(
            "gradient", invariance=SimpleNamespace(change=change, tolerance=tolerance)
        )
        for tolerance in (0.01, 0.02)
    }
    failed, passed = _read_invariance(rows[0.01]), _read_invariance(rows[0.02])
    # a zero map that does not stay zero under the shift is a failure, not left out
    zero_map = Attribution(torch.zeros(2, 1, 2, 2), None, torch.zeros(2), "gradient")
    row = MethodAudit("gradient", attribution=zero_map, invariance=SimpleNamespace(
        change=torch.tensor([math.inf, 0.0]), tolerance=0.01
    ))  # fmt: skip
    reading = _read_invariance(row)
    assert reading is not None
    assert (reading.value, reading.verdict) == (math.inf, "bad")
    assert failed is not None
    assert passed is not None
    assert failed.value == passed.value == pytest.approx(0.011)
    assert (failed.verdict, passed.verdict) == ("bad", "good")
    assert failed.text.startswith("changes by up to 1.1 %")


def test_bad_arguments_fail_before_any_work(vgg, images):
    with pytest.raises(ValueError, match="unknown check"):
        audit(vgg, images, ["gradient"], checks=["faithfulness", "vibes"])
    with pytest.raises(ValueError, match="grad_cam"):
        audit(vgg, images, ["grad_cma"])
    with pytest.raises(ValueError, match="at least one method"):
        audit(vgg, images, [])
    with pytest.raises(TypeError, match="steps"):
        audit(vgg, images, ["gradient"], options={"gradient": {"steps": 3}})


def test_page_is_self_contained_and_renders(vgg, images, tmp_path):
    pictures = [_photo(16, seed=i) for i in range(3)]
    result = audit(
        vgg, images, ["gradient", "grad_cam"], checks=["faithfulness"], steps=4, images=pictures
    )
    path = result.write_html(tmp_path / "audit.html", metadata={"model": "vgg <1>"})
    page = (tmp_path / "audit.html").read_text("utf-8")
    assert str(path).endswith("audit.html")
    parsed = _parse(page)
    for _tag, _key, value in parsed.links:
        assert value.startswith("data:image/png;base64,")
    assert "<script" not in page
    assert "<link" not in page
    assert "vgg &lt;1&gt;" in page
    assert "Scorecard" in page
    assert "Random map (chance)" in page
    assert page.count('<td class="') >= 2 * 3  # two readings for each of three rows
    # two maps and the deletion/insertion figure
    assert len(parsed.images) == 3
    assert _chromium_counts(tmp_path / "audit.html", tmp_path) == (3, 0)


def _tiny_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 1000),
    ).eval()
    path = tmp_path / "tiny.pt"
    torch.save(model, path)
    return path


def test_audit_command(tmp_path, capsys):
    model_path = _tiny_model(tmp_path)
    good = tmp_path / "good.png"
    _photo(seed=1).save(good)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    out = tmp_path / "site" / "audit.html"
    argv = ["audit", str(good), str(bad), "--out", str(out), "-m", "gradient,grad_cam"]
    argv += ["--model", str(model_path), "--trust-model", "--input-size", "16", "-q"]
    argv += ["--check", "faithfulness", "--steps", "4", "--title", "My audit"]
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == cli.EXIT_PARTIAL
    assert "bad.png: not an image" in captured.err
    assert "| gradient |" in captured.out
    assert "| random |" in captured.out
    assert f"wrote {out}" in captured.out
    page = out.read_text("utf-8")
    assert "<title>My audit</title>" in page
    assert _chromium_counts(out, tmp_path) == (3, 0)


def test_audit_command_usage_errors(tmp_path, capsys):
    model_path = _tiny_model(tmp_path)
    base = ["audit", "sample:chelsea", "--model", str(model_path), "--trust-model", "-q"]
    assert cli.main([*base, "--check", "vibes"]) == cli.EXIT_USAGE
    assert "--check 'vibes'" in capsys.readouterr().err
    assert cli.main([*base, "-t", "top3"]) == cli.EXIT_USAGE
    assert "one class per image" in capsys.readouterr().err


def test_an_interrupted_audit_leaves_no_page(tmp_path, monkeypatch, capsys):
    model_path = _tiny_model(tmp_path)
    good = tmp_path / "good.png"
    _photo(seed=1).save(good)
    out = tmp_path / "audit.html"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(audit_module._RUNNERS, "faithfulness", interrupted)
    argv = ["audit", str(good), "--out", str(out), "-m", "gradient", "--model", str(model_path)]
    argv += ["--trust-model", "--input-size", "16", "-q", "--check", "faithfulness"]
    assert cli.main(argv) == cli.EXIT_INTERRUPTED
    assert not out.exists()
    assert list(tmp_path.glob("*.html*")) == []
    assert "interrupted" in capsys.readouterr().err


def test_randomization_and_invariance_are_those_of_the_metrics(vgg, images):
    from salience.metrics import input_invariance, parameter_randomization

    result = audit(
        vgg, images, ["gradient", "input_x_gradient"], checks=["randomization", "invariance"],
        checkpoints=3, seed=1,
    )  # fmt: skip
    target = vgg(images).argmax(1)
    for row in result.methods:
        check = parameter_randomization(vgg, images, row.method, target, seed=1, checkpoints=3)
        reading = row.readings["randomization"]
        assert reading.value == pytest.approx(check.average("spearman_abs"))
        assert reading.verdict == {True: "good", False: "bad", None: "fair"}[check.passed]
        change = input_invariance(vgg, images, [row.method], target)[row.method].change
        assert row.readings["invariance"].value == pytest.approx(float(change.max()))
    # Kindermans et al.: the gradient is invariant to the mean shift, gradient x input is not.
    assert result["gradient"].readings["invariance"].verdict == "good"
    assert result["input_x_gradient"].readings["invariance"].verdict == "bad"
    assert "Kindermans" in result["input_x_gradient"].readings["invariance"].text
    page = result.to_html()
    assert "Model randomization" in page
    assert "similarity under randomization" in page


def test_stability_is_max_sensitivity(vgg, images):
    from salience.metrics import max_sensitivity

    result = audit(vgg, images, ["gradient", "grad_cam"], checks=["stability"], samples=3)
    target = vgg(images).argmax(1)
    radius = 0.02 * float(images.amax() - images.amin())
    for row in result.methods:
        expected = max_sensitivity(vgg, images, row.method, radius, target=target, samples=3)
        torch.testing.assert_close(row.sensitivity, expected.max)
        reading = row.readings["stability"]
        assert reading.value == pytest.approx(float(expected.max.mean()))
        assert reading.verdict in ("good", "fair", "bad")
    assert "max-sensitivity" in result.to_markdown()


def test_a_constant_method_is_perfectly_stable():
    from salience.metrics.audit import _read_stability

    row = audit_module.MethodAudit("x", sensitivity=torch.zeros(2))
    assert _read_stability(row).verdict == "good"
    row = audit_module.MethodAudit("x", sensitivity=torch.full((2,), 0.9))
    assert _read_stability(row).verdict == "bad"
