"""salience.batch: dataset-scale runs into an on-disk store, resumable, read back exactly."""

from __future__ import annotations

import csv
import importlib
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import salience
from salience import cli
from salience.batch import Store, find_images, run
from salience.metrics import deletion

pytestmark = pytest.mark.filterwarnings("ignore:unpickling:UserWarning")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    ).eval()


def _preprocess(image: Image.Image) -> torch.Tensor:
    pixels = np.asarray(image.convert("RGB").resize((16, 16)), dtype=np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1)[None] * 2 - 1


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i in range(5):
        pixels = np.random.default_rng(i).integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / ("sub" if i % 2 else ".") / f"im{i}.png")
    (root / "bad.png").write_text("not an image")
    (root / "notes.txt").write_text("not picked up: not an image ending")
    return root


def _run(folder, out, **kwargs):
    kwargs.setdefault("preprocess", _preprocess)
    return run(_model(), folder, ["gradient", "grad_cam"], out, **kwargs)


def test_maps_are_those_of_the_methods(folder, tmp_path):
    summary = _run(folder, tmp_path / "store", batch_size=2)
    assert summary.written == 10
    assert summary.skipped == 0
    assert [s.endswith("bad.png") for s, _ in summary.failures] == [True]
    assert "not an image" in summary.failures[0][1]
    store = Store(tmp_path / "store")
    assert len(store) == 10
    assert store.methods() == ["grad_cam", "gradient"]
    model = _model()
    for entry in store.entries():
        with Image.open(entry.source) as image:
            x = _preprocess(image)
        expected = salience.explain(model, x, entry.method)
        stored = store.load(entry.key, entry.method)
        torch.testing.assert_close(stored.values, expected.values, rtol=1e-6, atol=1e-7)
        assert int(stored.target[0]) == int(expected.target[0]) == entry.target
        assert stored.method == entry.method
        assert stored.extras["source"] == entry.source
        if entry.method == "grad_cam":
            assert stored.layer == expected.layer
    with open(tmp_path / "store" / "index.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 10
    assert {r["method"] for r in rows} == {"gradient", "grad_cam"}
    with open(tmp_path / "store" / "failures.csv", newline="") as handle:
        failures = list(csv.DictReader(handle))
    assert [f["source"].endswith("bad.png") for f in failures] == [True]


def test_results_do_not_depend_on_batch_size_or_workers(folder, tmp_path):
    _run(folder, tmp_path / "a", batch_size=1)
    _run(folder, tmp_path / "b", batch_size=4, num_workers=2)
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    assert [e.key for e in a] == [e.key for e in b]
    for entry in a:
        torch.testing.assert_close(
            a.load(entry.key, entry.method).values, b.load(entry.key, entry.method).values
        )


def test_a_rerun_resumes_and_an_interruption_leaves_no_partial_entry(folder, tmp_path, monkeypatch):
    out = tmp_path / "store"
    writes = []
    original = Store.write

    def interrupted(self, *args, **kwargs):
        if len(writes) == 3:
            raise KeyboardInterrupt
        writes.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Store, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(folder, out, batch_size=2)
    monkeypatch.setattr(Store, "write", original)
    assert len(Store(out)) == 3
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    summary = _run(folder, out, batch_size=2)
    assert (summary.written, summary.skipped) == (7, 3)
    again = _run(folder, out, batch_size=2)
    assert (again.written, again.skipped) == (0, 10)
    assert again.images == 0  # nothing was even decoded
    # the resumed store equals an uninterrupted run
    _run(folder, tmp_path / "whole", batch_size=2)
    whole = Store(tmp_path / "whole")
    for entry in whole:
        torch.testing.assert_close(
            Store(out).load(entry.key, entry.method).values,
            whole.load(entry.key, entry.method).values,
        )


def test_a_dataset_of_tensors_with_labels(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, 16, 16, generator=generator), i % 5) for i in range(6)]
    summary = run(_model(), data, ["gradient"], tmp_path / "s", target="label", batch_size=4)
    assert summary.written == 6
    store = Store(tmp_path / "s")
    assert sorted(e.target for e in store) == sorted(label for _, label in data)
    keys, maps = store.maps("gradient")
    assert maps.shape == (6, 16, 16)
    # The store is readable by the metrics: deletion on the stored maps.
    index = {e.key: int(e.source.split()[-1]) for e in store}
    x = torch.stack([data[index[k]][0] for k in keys])
    labels = torch.tensor([data[index[k]][1] for k in keys])
    curve = deletion(_model(), x, maps, labels, steps=4)
    assert curve.auc.shape == (6,)


def test_overlays_are_written_on_request(folder, tmp_path):
    _run(folder, tmp_path / "s", overlays=True, crop=lambda image: image.resize((16, 16)))
    pictures = sorted((tmp_path / "s" / "overlays").rglob("*.png"))
    assert len(pictures) == 10
    with Image.open(pictures[0]) as picture:
        assert picture.size == (16, 16)


def test_bad_arguments_are_refused_before_any_work(folder, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a salience store"):
        _run(folder, tmp_path / "other")
    with pytest.raises(ValueError, match="grad_cam"):
        run(_model(), folder, ["grad_cma"], tmp_path / "new")
    with pytest.raises(ValueError, match="label"):
        run(_model(), folder, ["gradient"], tmp_path / "new", target="labels")
    assert not (tmp_path / "new").exists()
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_images(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        find_images(str(tmp_path / "*.jpeg"))
    with pytest.raises(FileNotFoundError, match="no salience store"):
        Store(tmp_path / "nowhere")


def test_find_images_walks_folders_and_globs(folder):
    files = find_images(folder)
    assert len(files) == 6  # five images and bad.png; notes.txt is not an image ending
    assert find_images(str(folder / "sub" / "*.png")) == sorted(
        str(p) for p in (folder / "sub").glob("*.png")
    )


def test_a_missing_file_or_broken_link_is_reported_and_the_run_goes_on(folder, tmp_path):
    (folder / "gone.png").symlink_to(folder / "nowhere.png")  # a broken link in the folder
    named = [str(folder / "im0.png"), str(folder / "typo.png")]
    assert find_images(named) == named
    summary = _run([*named], tmp_path / "a")
    assert summary.written == 2
    assert [(s, e.split(":")[0]) for s, e in summary.failures] == [(named[1], "no such file")]
    summary = _run(folder, tmp_path / "b")
    failed = sorted(Path(s).name for s, _ in summary.failures)
    assert failed == ["bad.png", "gone.png"]
    assert summary.written == 10


def test_batch_command(folder, tmp_path, capsys):
    model_path = tmp_path / "tiny.pt"
    torch.save(_model(), model_path)
    out = tmp_path / "store"
    argv = ["batch", str(folder), "-m", "gradient,grad_cam", "--out", str(out), "-q"]
    argv += ["--model", str(model_path), "--trust-model", "--input-size", "16", "--workers", "0"]
    assert cli.main(argv) == cli.EXIT_PARTIAL
    captured = capsys.readouterr()
    assert "10 maps written" in captured.out
    assert "bad.png: not an image" in captured.err
    assert cli.main(argv) == cli.EXIT_PARTIAL
    assert "0 maps written, 10 already stored" in capsys.readouterr().out
    assert cli.main([*argv[:-2], "--target", "top2"]) == cli.EXIT_USAGE


@pytest.mark.parametrize(
    ("engine", "cores", "workers"),
    [("local", 1, 0), ("local", 2, 0), ("local", 3, 3), ("local", 16, 4), ("ray", 2, 2)],
)
def test_the_default_workers(engine, cores, workers):
    from salience.cli.batch import default_workers

    assert default_workers(engine, cores) == workers


def test_the_batch_command_takes_the_default_workers(folder, tmp_path, monkeypatch):
    import salience.batch

    seen = {}
    real = salience.batch.run

    def run(*args, **kwargs):
        seen["workers"] = kwargs["num_workers"]
        return real(*args, **kwargs)

    monkeypatch.setattr(salience.batch, "run", run)
    monkeypatch.setattr("salience.cli.batch.usable_cores", lambda: 2)
    model_path = tmp_path / "tiny.pt"
    torch.save(_model(), model_path)
    argv = ["batch", str(folder / "im0.png"), "-m", "gradient", "--out", str(tmp_path / "s")]
    argv += ["-q", "--model", str(model_path), "--trust-model", "--input-size", "16"]
    assert cli.main(argv) == cli.EXIT_OK
    assert seen == {"workers": 0}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own, at start-up
def test_the_ray_engine_gives_the_local_results(tmp_path):
    pytest.importorskip("ray.data", reason="the optional Ray engine: pip install 'ray[data]'")
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(3, 16, 16, generator=generator), i % 5) for i in range(8)]
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    remote = run(
        model, data, ["gradient", "grad_cam"], tmp_path / "ray", engine="ray", num_workers=2,
        batch_size=3, target="label",
    )  # fmt: skip
    local = run(model, data, ["gradient", "grad_cam"], tmp_path / "local", target="label")
    assert (remote.written, local.written) == (16, 16)
    a, b = Store(tmp_path / "ray"), Store(tmp_path / "local")
    assert [(e.key, e.method, e.target) for e in a] == [(e.key, e.method, e.target) for e in b]
    for entry in a:
        assert torch.equal(
            a.load(entry.key, entry.method).values, b.load(entry.key, entry.method).values
        )
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    # resuming on Ray skips what is stored
    again = run(
        model, data, ["gradient"], tmp_path / "ray", engine="ray", num_workers=2, target="label"
    )
    assert (again.written, again.skipped) == (0, 8)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own, at start-up
def test_the_ray_engine_keeps_the_callers_sigterm_handler(tmp_path):
    """Ray's start put its own SIGTERM handler (sys.exit) over the command line's, which stops
    as Ctrl-C does: a batch run with --engine ray, killed, exited 15 without its message."""
    pytest.importorskip("ray.data", reason="the optional Ray engine: pip install 'ray[data]'")
    import ray

    if ray.is_initialized():
        ray.shutdown()  # (the handler is put over the caller's when Ray starts)

    def handler(signum, frame):  # the caller's
        raise KeyboardInterrupt

    seen = []
    before = signal.signal(signal.SIGTERM, handler)
    try:
        data = [torch.randn(3, 16, 16) for _ in range(2)]
        data[1][0, 0, 0] = float("nan")  # one failure: the log runs during the run
        run(
            _model(), data, ["gradient"], tmp_path / "ray", engine="ray", num_workers=1,
            log=lambda _line: seen.append(signal.getsignal(signal.SIGTERM)),
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, before)
    assert seen == [handler]


def test_maps_come_back_in_the_order_of_the_inputs(tmp_path):
    """Keys sort as text (item-10 before item-2): the store gives the run's order back."""
    generator = torch.Generator().manual_seed(2)
    data = [torch.randn(3, 16, 16, generator=generator) for _ in range(12)]
    model = _model()
    run(model, data, ["gradient"], tmp_path / "s", batch_size=5)
    store = Store(tmp_path / "s")
    keys, maps = store.maps("gradient")
    assert [e.position for e in store.entries("gradient")] == list(range(12))
    expected = salience.gradient(model, torch.stack(data)).saliency()
    torch.testing.assert_close(maps, expected)
    rows = list(csv.DictReader((tmp_path / "s" / "index.csv").open()))
    assert [int(r["position"]) for r in rows] == list(range(12))
    assert [r["key"] for r in rows] == keys


def test_targets_are_checked_before_anything_runs(tmp_path):
    data = [torch.randn(3, 16, 16) for _ in range(6)]
    for bad in (torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor(1), 2.5, True, "cat"):
        with pytest.raises(ValueError, match="target must be None, a class index, 'label'"):
            run(_model(), data, ["gradient"], tmp_path / "s", target=bad)
    with pytest.raises(ValueError, match="options for grad_cam, which this run does not use"):
        run(_model(), data, ["gradient"], tmp_path / "s", options={"grad_cam": {"relu": False}})
    assert not (tmp_path / "s").exists()


def test_a_rerun_must_ask_what_the_store_holds(tmp_path):
    """A store answers one question: the same model, target and options of each method."""
    data = [torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    out = tmp_path / "s"
    run(_model(), data[:2], ["grad_cam"], out, target=3)
    with pytest.raises(ValueError, match="holds maps of target 3, not 4"):
        run(_model(), data, ["grad_cam"], out, target=4)
    with pytest.raises(ValueError, match=r"holds maps of grad_cam with options \{\}"):
        run(_model(), data, ["grad_cam"], out, target=3, options={"grad_cam": {"relu": False}})
    other = _model()
    with torch.no_grad():
        other[0].bias.add_(1)
    with pytest.raises(ValueError, match="holds maps of model"):
        run(other, data, ["grad_cam"], out, target=3)
    # the same question resumes, and another method extends the store
    summary = run(_model(), data, ["grad_cam", "gradient"], out, target=3)
    assert (summary.written, summary.skipped) == (4, 2)
    assert Store(out).info["methods"] == ["grad_cam", "gradient"]


def test_a_damaged_map_file_is_named(tmp_path):
    data = [torch.randn(3, 16, 16) for _ in range(2)]
    run(_model(), data, ["gradient"], tmp_path / "s")
    store = Store(tmp_path / "s")
    broken = tmp_path / "s" / store.entries()[0].file
    broken.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{broken.name}: a damaged map file .* delete it"):
        store.entries()


def test_a_file_is_one_entry_however_its_path_is_typed(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(folder.parent)
    first = _run(folder.name, tmp_path / "s")
    again = _run(str(folder.resolve()), tmp_path / "s")
    assert (first.written, again.written, again.skipped) == (10, 0, 10)
    assert len(Store(tmp_path / "s")) == 10


def test_an_interrupted_run_leaves_the_index_of_what_it_did(tmp_path, monkeypatch):
    run_module = importlib.import_module("salience.batch.run")
    process = run_module._Job.process
    calls = []

    def interrupted(self, batch):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return process(self, batch)

    monkeypatch.setattr(run_module._Job, "process", interrupted)
    data = [torch.randn(3, 16, 16) for _ in range(6)]
    with pytest.raises(KeyboardInterrupt):
        run(_model(), data, ["gradient"], tmp_path / "s", batch_size=2)
    rows = list(csv.DictReader((tmp_path / "s" / "index.csv").open()))
    assert [int(r["position"]) for r in rows] == [0, 1]
    assert (tmp_path / "s" / "failures.csv").is_file()


def test_a_model_with_batchnorm_and_tensor_options_are_described(tmp_path):
    """BatchNorm's counter and a tensor option are 0-dim: they are described, not crashed on."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).eval()  # fmt: skip
    data = [torch.randn(3, 8, 8) for _ in range(2)]
    options = {"integrated_gradients": {"baseline": torch.tensor(0.0), "steps": 4}}
    run(model, data, ["integrated_gradients"], tmp_path / "s", options=options)
    again = run(model, data, ["integrated_gradients"], tmp_path / "s", options=options)
    assert (again.written, again.skipped) == (0, 2)
    described = Store(tmp_path / "s").info["options"]["integrated_gradients"]["baseline"]
    assert described.startswith("tensor [] torch.float32 ")


def test_the_order_is_that_of_the_last_runs_inputs(tmp_path):
    """A rerun on a grown folder: the maps it skipped take their places among the new ones."""
    root = tmp_path / "images"
    root.mkdir()
    for name in "cd":
        Image.fromarray(np.full((16, 16, 3), ord(name), dtype=np.uint8)).save(root / f"{name}.png")
    _run(root, tmp_path / "s")
    for name in "ab":
        Image.fromarray(np.full((16, 16, 3), ord(name), dtype=np.uint8)).save(root / f"{name}.png")
    _run(root, tmp_path / "s")
    entries = Store(tmp_path / "s").entries("gradient")
    assert [Path(e.source).stem for e in entries] == ["a", "b", "c", "d"]
    assert [e.position for e in entries] == [0, 1, 2, 3]


def test_maps_the_last_run_did_not_have_come_after_without_a_position(folder, tmp_path):
    _run(folder, tmp_path / "s")
    one = sorted(str(p) for p in folder.glob("im*.png"))[:1]
    again = _run(one, tmp_path / "s")
    assert (again.written, again.skipped) == (0, 2)
    entries = Store(tmp_path / "s").entries("gradient")
    assert [e.position for e in entries] == [0, None, None, None, None]
    assert entries[0].source == one[0]
    rows = list(csv.DictReader((tmp_path / "s" / "index.csv").open()))
    assert [r["position"] for r in rows[:2]] == ["0", ""]  # no two rows at position 0


def test_a_run_with_no_inputs_leaves_no_positions(tmp_path):
    data = [torch.randn(3, 16, 16) for _ in range(3)]
    run(_model(), data, ["gradient"], tmp_path / "s")
    run(_model(), [], ["gradient"], tmp_path / "s")
    assert [e.position for e in Store(tmp_path / "s").entries()] == [None, None, None]


class _DiesInAWorker(torch.utils.data.Dataset):
    """Input 2 kills the loader process that loads it (as an out-of-memory kill would),
    ``delay`` seconds after it starts loading it."""

    def __init__(self, delay: float = 0.0) -> None:
        generator = torch.Generator().manual_seed(2)
        self.items = [torch.randn(3, 16, 16, generator=generator) for _ in range(8)]
        self.delay = delay

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 2 and torch.utils.data.get_worker_info() is not None:
            import os
            import signal

            time.sleep(self.delay)
            os.kill(os.getpid(), signal.SIGKILL)
        return self.items[i]


class _Slow(nn.Module):
    """The test model, with a pause in its forward pass: the main process busy in a method."""

    def __init__(self, pause: float) -> None:
        super().__init__()
        self.net, self.pause = _model(), pause

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.pause)
        return self.net(x)


@pytest.mark.parametrize(
    ("pause", "delay"), [(0.0, 0.0), (1.0, 0.3)], ids=["waiting for a batch", "inside a method"]
)
def test_a_dead_loader_process_leaves_the_rest_to_this_one(tmp_path, pause, delay):
    # "inside a method": batch 0 is being explained (a 1 s pause) when the worker loading
    # batch 1 dies; torch's SIGCHLD handler would raise inside the method
    said = []
    with pytest.warns(UserWarning, match="a loader process died .* loaded in this process"):
        summary = run(
            _Slow(pause).eval(), _DiesInAWorker(delay), ["gradient"], tmp_path / "s",
            batch_size=2, num_workers=1, log=said.append, progress=False,
        )  # fmt: skip
    assert summary.written == 8
    assert summary.images == 8
    assert not summary.failures
    assert not said  # the log is for failures
    alone = run(_model(), _DiesInAWorker(), ["gradient"], tmp_path / "t", batch_size=2)
    keys, maps = summary.store.maps("gradient")
    _, expected = alone.store.maps("gradient")
    assert len(keys) == 8
    torch.testing.assert_close(torch.as_tensor(maps), torch.as_tensor(expected))


def test_a_file_name_with_a_newline_is_one_line_of_the_log(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(folder / "good.png")
    (folder / "bad\nname.png").write_text("not an image")
    model_path = tmp_path / "tiny.pt"
    torch.save(_model(), model_path)
    argv = ["batch", str(folder), "-m", "gradient", "--out", str(tmp_path / "s"), "-q"]
    argv += ["--model", str(model_path), "--trust-model", "--input-size", "16", "--workers", "0"]
    assert cli.main(argv) == cli.EXIT_PARTIAL
    lines = capsys.readouterr().err.splitlines()
    bad = [line for line in lines if "name.png" in line]
    assert len(bad) == 1
    assert "bad\\nname.png: " in bad[0]
    assert bad[0].count("name.png") == 1  # named once, not again inside the reason
    assert "not an image" in bad[0]
