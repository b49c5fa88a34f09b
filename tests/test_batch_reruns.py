"""salience.batch: a failed run, a bad input, lost overlays, damaged files and duplicate inputs."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from salience.batch import Store, run
from test_batch import _model, _preprocess  # the same tiny model and preprocessing

pytestmark = pytest.mark.filterwarnings("ignore:unpickling:UserWarning")

run_module = importlib.import_module("salience.batch.run")


def _crop(image: Image.Image) -> Image.Image:
    return image.convert("RGB").resize((16, 16))


def _data(n: int = 2) -> list[torch.Tensor]:
    return [torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(n)]


# -- 1. a failed run leaves a store the corrected rerun takes ----------------------------------


def test_a_store_with_no_map_takes_the_corrected_options(tmp_path):
    out = tmp_path / "s"
    failed = run(_model(), _data(), ["smoothgrad"], out, options={"smoothgrad": {"samples": 0}})
    assert (failed.written, len(failed.failures)) == (0, 2)
    fixed = run(_model(), _data(), ["smoothgrad"], out, options={"smoothgrad": {"samples": 4}})
    assert (fixed.written, fixed.failures) == (2, [])
    assert Store(out).info["options"] == {"smoothgrad": {"samples": 4}}
    # a store that holds maps still refuses another question
    with pytest.raises(ValueError, match=r"holds maps of smoothgrad with options \{'samples': 4"):
        run(_model(), _data(), ["smoothgrad"], out, options={"smoothgrad": {"samples": 2}})


def test_a_store_with_no_map_takes_the_corrected_layer_and_target(tmp_path):
    out = tmp_path / "s"
    bad = {"grad_cam": {"layer": "bogus.layer"}}
    failed = run(_model(), _data(), ["grad_cam"], out, target=3, options=bad)
    assert (failed.written, len(failed.failures)) == (0, 2)
    fixed = run(_model(), _data(), ["grad_cam"], out)
    assert (fixed.written, fixed.failures) == (2, [])
    assert Store(out).info["target"] is None
    assert Store(out).info["options"] == {"grad_cam": {}}
    with pytest.raises(ValueError, match="holds maps of target None, not 3"):
        run(_model(), _data(), ["grad_cam"], out, target=3)


def test_a_method_with_no_map_takes_new_options_in_a_store_with_maps(tmp_path):
    out = tmp_path / "s"
    run(_model(), _data(), ["gradient", "smoothgrad"], out, options={"smoothgrad": {"samples": 0}})
    summary = run(
        _model(), _data(), ["gradient", "smoothgrad"], out, options={"smoothgrad": {"samples": 3}}
    )
    assert (summary.written, summary.skipped, summary.failures) == (2, 2, [])


@pytest.mark.skipif(
    importlib.util.find_spec("ray") is not None, reason="checks the run without Ray installed"
)
def test_a_missing_ray_is_said_before_the_store_is_made(tmp_path):
    out = tmp_path / "s"
    with pytest.raises(ImportError, match="needs Ray Data"):
        run(_model(), _data(), ["gradient"], out, engine="ray", target=4)
    assert not out.exists()
    assert run(_model(), _data(), ["gradient"], out).written == 2


# -- 2. one bad input fails alone ---------------------------------------------------------------


def test_one_bad_input_does_not_fail_the_others_of_its_batch(tmp_path):
    data = _data(4)
    data[1] = data[1].clone()
    data[1][0, 2, 2] = float("nan")
    summary = run(_model(), data, ["gradient"], tmp_path / "s", batch_size=4)
    assert [source for source, _ in summary.failures] == ["item 1"]
    assert "NaN" in summary.failures[0][1]
    assert (summary.written, summary.images) == (3, 3)  # the throughput counts explained inputs
    # the good inputs get the maps they get in a batch of their own
    run(_model(), [data[0], data[2], data[3]], ["gradient"], tmp_path / "good")
    _, maps = Store(tmp_path / "s").maps("gradient")
    _, expected = Store(tmp_path / "good").maps("gradient")
    torch.testing.assert_close(maps, expected)


# -- 3. overlays are drawn on resume -----------------------------------------------------------


def _no_explaining(*args, **kwargs):
    raise AssertionError("a stored map was computed again")


def test_a_rerun_with_overlays_draws_them_from_the_stored_maps(photos, tmp_path, monkeypatch):
    kwargs = {"preprocess": _preprocess, "crop": _crop}
    fresh = run(_model(), photos, ["gradient"], tmp_path / "fresh", overlays=True, **kwargs)
    assert fresh.written == 2
    out = tmp_path / "s"
    run(_model(), photos, ["gradient"], out, **kwargs)
    assert not (out / "overlays").exists()
    monkeypatch.setattr(run_module, "explain", _no_explaining)
    summary = run(_model(), photos, ["gradient"], out, overlays=True, **kwargs)
    assert (summary.written, summary.skipped, summary.overlays) == (0, 2, 2)
    assert summary.failures == []
    drawn = sorted((out / "overlays").rglob("*"))
    expected = sorted((tmp_path / "fresh" / "overlays").rglob("*"))
    assert [p.name for p in drawn] == [p.name for p in expected]
    for mine, theirs in zip(drawn, expected, strict=True):
        if mine.is_file():
            with Image.open(mine) as a, Image.open(theirs) as b:
                assert np.array_equal(np.asarray(a), np.asarray(b))
    again = run(_model(), photos, ["gradient"], out, overlays=True, **kwargs)
    assert (again.written, again.skipped, again.overlays) == (0, 2, 0)


def test_an_overlay_interrupted_while_drawn_is_drawn_by_the_rerun(photos, tmp_path, monkeypatch):
    import salience._io

    out = tmp_path / "s"
    kwargs = {"preprocess": _preprocess, "crop": _crop, "overlays": True, "batch_size": 1}
    real = salience._io.atomic_write
    calls = {"overlays": 0}

    def interrupted(path, data):
        if Path(path).suffix == ".png":
            calls["overlays"] += 1
            if calls["overlays"] == 2:  # the second overlay: its map is stored, it is not
                raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(salience._io, "atomic_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(_model(), photos, ["gradient"], out, **kwargs)
    monkeypatch.setattr(salience._io, "atomic_write", real)
    assert len(list((out / "maps").rglob("*.npz"))) == 2
    assert len(list((out / "overlays").rglob("*.png"))) == 1
    monkeypatch.setattr(run_module, "explain", _no_explaining)
    summary = run(_model(), photos, ["gradient"], out, **kwargs)
    assert (summary.written, summary.skipped, summary.overlays) == (0, 2, 1)
    assert len(list((out / "overlays").rglob("*.png"))) == 2


def test_overlay_options_reach_the_drawing(photos, tmp_path):
    kwargs = {"preprocess": _preprocess, "crop": _crop, "overlays": True}
    run(
        _model(), photos, ["gradient"], tmp_path / "a", overlay_options={"percentile": 50}, **kwargs
    )
    run(
        _model(), photos, ["gradient"], tmp_path / "b", overlay_options={"percentile": 99}, **kwargs
    )
    a = sorted((tmp_path / "a" / "overlays").rglob("*.png"))
    b = sorted((tmp_path / "b" / "overlays").rglob("*.png"))
    assert len(a) == len(b) == 2
    assert a[0].read_bytes() != b[0].read_bytes()
    with pytest.raises(ValueError, match="overlay_options takes alpha, cmap, percentile, style"):
        run(_model(), photos, ["gradient"], tmp_path / "c", overlay_options={"dpi": 3}, **kwargs)


# -- 8. damaged files and duplicate inputs ------------------------------------------------------


def test_loading_a_damaged_map_file_names_it(tmp_path):
    run(_model(), _data(), ["gradient"], tmp_path / "s")
    store = Store(tmp_path / "s")
    entry = store.entries()[0]
    (tmp_path / "s" / entry.file).write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=rf"{entry.key}.npz: a damaged map file .* delete it"):
        store.load(entry.key, "gradient")


def test_one_file_typed_three_ways_is_explained_once(photos, tmp_path, monkeypatch):
    monkeypatch.chdir(photos.parent)
    names = ["photos/img0.png", "./photos/img0.png", os.path.abspath("photos/img0.png")]
    with pytest.warns(UserWarning, match="2 inputs are a file given earlier, explained once"):
        summary = run(_model(), names, ["gradient"], tmp_path / "s", preprocess=_preprocess)
    assert (summary.written, summary.images, summary.failures) == (1, 1, [])
    assert len(Store(tmp_path / "s")) == 1
