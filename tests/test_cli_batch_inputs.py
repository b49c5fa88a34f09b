"""The command line: batch overlay options and bundled photos, audit and report pages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from salience import cli

pytestmark = pytest.mark.filterwarnings("ignore:unpickling:UserWarning")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    """A pickled 10-class model (loading it needs --trust-model)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 10),
    ).eval()
    path = tmp_path_factory.mktemp("models") / "tiny10.pt"
    torch.save(model, path)
    return str(path)


def _tiny(model_file: str) -> list[str]:
    return ["--model", model_file, "--trust-model", "--input-size", "16", "--resize", "20", "-q"]


def test_batch_percentile_changes_the_overlays(photos, tmp_path, model_file, capsys):
    pictures = {}
    for percentile in ("50", "99"):
        out = tmp_path / f"p{percentile}"
        argv = ["batch", str(photos), "-m", "gradient", "--out", str(out), "--overlays"]
        assert cli.main([*argv, "--percentile", percentile, *_tiny(model_file)]) == cli.EXIT_OK
        pictures[percentile] = [p.read_bytes() for p in sorted(out.rglob("*.png"))]
    capsys.readouterr()
    assert len(pictures["50"]) == 2
    assert pictures["50"] != pictures["99"]


def test_batch_overlays_asked_on_a_rerun_are_drawn(photos, tmp_path, model_file, capsys):
    argv = [
        "batch",
        str(photos),
        "-m",
        "gradient",
        "--out",
        str(tmp_path / "ov"),
        *_tiny(model_file),
    ]
    assert cli.main(argv) == cli.EXIT_OK
    assert cli.main([*argv, "--overlays"]) == cli.EXIT_OK
    assert "0 maps written, 2 already stored, 2 overlays drawn" in capsys.readouterr().out
    assert len(list((tmp_path / "ov" / "overlays").rglob("*.png"))) == 2


def test_batch_takes_the_bundled_photos(tmp_path, model_file, capsys):
    out = tmp_path / "s"
    argv = ["batch", "sample:chelsea", "sample:coffee", "-m", "gradient", "--out", str(out)]
    assert cli.main([*argv, *_tiny(model_file)]) == cli.EXIT_OK
    assert "2 maps written" in capsys.readouterr().out
    argv = ["batch", "sample:dog", "-m", "gradient", "--out", str(out), *_tiny(model_file)]
    assert cli.main(argv) == cli.EXIT_FAILURE
    assert "sample:dog: unknown sample image; expected one of sample:chelsea" in (
        capsys.readouterr().err
    )


def test_batch_counts_a_file_typed_three_ways_once(
    photos, tmp_path, model_file, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    names = ["photos/img0.png", "./photos/img0.png", str(photos.resolve() / "img0.png")]
    argv = ["batch", *names, "-m", "gradient", "--out", str(tmp_path / "s"), *_tiny(model_file)]
    assert cli.main(argv) == cli.EXIT_OK
    captured = capsys.readouterr()
    assert "1 maps written" in captured.out
    assert "2 inputs are a file given earlier" in captured.err


def test_the_audit_page_names_the_images(photos, tmp_path, model_file, capsys):
    odd = photos / "a<b>.png"
    (photos / "img1.png").rename(odd)
    out = tmp_path / "audit.html"
    argv = ["audit", str(photos / "img0.png"), str(odd), "-m", "gradient", "--out", str(out)]
    argv += ["--check", "faithfulness", "--steps", "2", *_tiny(model_file)]
    assert cli.main(argv) == cli.EXIT_OK
    capsys.readouterr()
    page = out.read_text("utf-8")
    assert f"images: 2 ({photos / 'img0.png'}, {photos / 'a&lt;b&gt;.png'})" in page


def test_the_report_names_a_failed_image_once(photos, tmp_path, model_file, capsys):
    bad = photos / "corrupt.png"
    bad.write_text("not an image")
    out = tmp_path / "rep" / "mix.html"
    argv = ["report", str(photos / "img0.png"), str(bad), "-m", "gradient", "--out", str(out)]
    assert cli.main([*argv, *_tiny(model_file)]) == cli.EXIT_PARTIAL
    capsys.readouterr()
    page = out.read_text("utf-8")
    assert f"<li>{bad}: not an image" in page
    assert f"{bad}: {bad}" not in page


def test_sigterm_stops_a_batch_run_as_ctrl_c_does(photos, tmp_path, model_file, monkeypatch):
    """Python's default ended the process at once: the store had no index, no failures."""
    import os
    import signal

    from salience.batch.run import _Job

    process = _Job.process

    def terminated(self, batch):  # the scheduler's time limit, during the first batch
        os.kill(os.getpid(), signal.SIGTERM)
        return process(self, batch)

    monkeypatch.setattr(_Job, "process", terminated)
    before = signal.getsignal(signal.SIGTERM)  # (Ray, once used in the process, sets one)
    out = tmp_path / "term"
    argv = ["batch", str(photos), "-m", "gradient", "--out", str(out), "--batch-size", "1"]
    assert cli.main([*argv, *_tiny(model_file)]) == cli.EXIT_TERMINATED
    assert (out / "index.csv").is_file()
    assert signal.getsignal(signal.SIGTERM) is before  # put back
    monkeypatch.setattr(_Job, "process", process)
    assert cli.main([*argv, *_tiny(model_file)]) == cli.EXIT_OK  # and the rerun resumes
