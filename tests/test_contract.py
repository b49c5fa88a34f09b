"""The contract every registered method keeps, parametrized over the registry.

A method added later is covered automatically: no side effects on the model or the inputs
(also when the call raises), batch consistency, determinism, documented shapes, clear errors.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import warnings
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn
from torch.overrides import _get_current_function_mode_stack

import salience
from conftest import ResNetish, VGGish, _init
from salience._checks import modules_of
from salience.registry import get_method

# Cheaper options for the slow methods; everything else runs with its defaults.
FAST: dict[str, dict[str, Any]] = {
    "smoothgrad": {"samples": 4},
    "integrated_gradients": {"steps": 8},
    "score_cam": {"batch_size": 4},
    "rise": {"masks": 256},
}
METHODS = sorted(salience.available_methods())
MODELS = {"vgg": (VGGish, 0), "resnet": (ResNetish, 1)}
# Zhou et al.'s CAM is only defined for a global-average-pooling + linear head (it raises on
# VGG, see test_cam.py) and explains classes, not callables (it raises a TypeError).
NEEDS_GAP = {"cam"}
CLASS_TARGETS_ONLY = {"cam"}


def model_for(name: str) -> nn.Module:
    """The VGG-style net, or the ResNet-style one for methods that need a GAP head."""
    return _init(ResNetish(), 1) if name in NEEDS_GAP else _init(VGGish(), 0)


def skip_if_not_applicable(name: str, model_key: str) -> None:
    if name in NEEDS_GAP and model_key != "resnet":
        pytest.skip(f"{name} needs a GAP + linear head; its error on {model_key} is tested")


def run(
    name: str, model: nn.Module, inputs: torch.Tensor, target: Any = None, **options: Any
) -> Any:
    options = {**FAST.get(name, {}), **options}
    return salience.explain(model, inputs, method=name, target=target, **options)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a method must leave as it found it."""
    from torch.nn.modules import module as module_globals

    hook_dicts = [
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_state_dict_hooks",
    ]
    return {
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules()],
        "attributes": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "hooks": {
            (n, h): list(getattr(m, h, {}).keys())
            for n, m in model.named_modules()
            for h in hook_dicts
        },
        "global_hooks": [
            len(getattr(module_globals, g, {}))
            for g in (
                "_global_forward_hooks",
                "_global_forward_pre_hooks",
                "_global_backward_hooks",
                "_global_backward_pre_hooks",
            )
        ],
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "grad_ids": {n: id(p.grad) for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "forward": {n: m.forward for n, m in model.named_modules()},
        "grad_enabled": torch.is_grad_enabled(),
        "modes": len(_get_current_function_mode_stack()),
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in before:
        b, a = before[key], after[key]
        if key in ("params", "buffers"):
            assert b.keys() == a.keys()
            for n in b:
                assert torch.equal(b[n], a[n]), f"{key} {n} changed"
        elif key == "grads":
            for n in b:
                if b[n] is None:
                    assert a[n] is None, f".grad of {n} was created"
                else:
                    assert torch.equal(b[n], a[n]), f".grad of {n} changed"
        elif key == "forward":
            assert {n: getattr(f, "__func__", f) for n, f in b.items()} == {
                n: getattr(f, "__func__", f) for n, f in a.items()
            }, "a forward method was replaced"
        else:
            assert b == a, f"{key} changed"


def prepared(model_key: str, training: bool = False) -> nn.Module:
    """A model with a stale ``.grad`` and a frozen parameter; BatchNorm updates its running
    statistics on every forward pass when ``training``, which the methods must undo."""
    cls, seed = MODELS[model_key]
    model = _init(cls(), seed).train(training)
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.5)  # a stale .grad the user left
    params[1].requires_grad_(False)  # a frozen parameter
    return model


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))


@pytest.mark.filterwarnings("ignore:the model is in training mode")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("model_key", sorted(MODELS))
@pytest.mark.parametrize("name", METHODS)
def test_no_side_effects(name: str, model_key: str, training: bool, batch: torch.Tensor) -> None:
    skip_if_not_applicable(name, model_key)
    model = prepared(model_key, training)
    inputs = batch.clone()
    version = inputs._version
    before = snapshot(model)
    result = run(name, model, inputs)
    assert_same(before, snapshot(model))
    assert torch.equal(inputs, batch), "inputs were modified"
    assert inputs._version == version, "inputs were modified in place"
    assert result.method == name


class Boom(Exception):
    pass


@pytest.mark.filterwarnings("ignore:the model is in training mode")
@pytest.mark.parametrize("fail_at", [1, 2])
@pytest.mark.parametrize("name", METHODS)
def test_no_side_effects_when_the_model_raises(
    name: str, fail_at: int, batch: torch.Tensor
) -> None:
    model = prepared("resnet", training=True)  # BatchNorm statistics move before the raise
    calls = {"n": 0}

    def explode(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        calls["n"] += 1
        if calls["n"] == fail_at:  # fail mid-forward, in the first or the second pass
            raise Boom

    handle = model.layer2.register_forward_hook(explode)
    try:
        before = snapshot(model)
        try:
            run(name, model, batch)
        except Boom:
            pass
        else:
            assert fail_at > 1, "the first forward pass raised, the method must not swallow it"
        before["hooks"] = snapshot(model)["hooks"]  # the test's own hook is expected
        after = snapshot(model)
        assert_same(before, after)
        assert calls["n"] >= 1
    finally:
        handle.remove()


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.filterwarnings("ignore:the model is in training mode")
def test_no_side_effects_when_the_target_raises(name: str, batch: torch.Tensor) -> None:
    model = prepared("resnet", training=True)
    before = snapshot(model)

    def target(output: torch.Tensor) -> torch.Tensor:
        raise Boom

    expected = TypeError if name in CLASS_TARGETS_ONLY else Boom
    with pytest.raises(expected):
        run(name, model, batch, target=target)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("model_key", sorted(MODELS))
@pytest.mark.parametrize("name", METHODS)
def test_batch_equals_samples_one_by_one(name: str, model_key: str, batch: torch.Tensor) -> None:
    skip_if_not_applicable(name, model_key)
    model = _init(MODELS[model_key][0](), MODELS[model_key][1])
    targets = [1, 4, 7]
    together = run(name, model, batch, target=targets)
    for i in range(batch.shape[0]):
        alone = run(name, model, batch[i : i + 1], target=targets[i])
        torch.testing.assert_close(together.values[i : i + 1], alone.values, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(together.scores[i : i + 1], alone.scores)


@pytest.mark.parametrize("name", METHODS)
def test_shapes_dtypes_and_determinism(name: str, batch: torch.Tensor) -> None:
    model = model_for(name)
    spec = get_method(name)
    first = run(name, model, batch)
    second = run(name, model, batch)
    assert torch.equal(first.values, second.values), "not deterministic"
    n = batch.shape[0]
    assert first.values.dtype == batch.dtype
    assert first.values.device == batch.device
    assert first.values.shape[0] == n
    if spec.kind == "pixel":
        assert first.values.shape == batch.shape
    else:
        assert first.values.shape == (n, 1, *batch.shape[-2:])
    assert first.scores.shape == (n,)
    assert first.target is not None
    assert first.target.dtype == torch.long
    assert torch.equal(first.target, model(batch).argmax(1))
    assert first.saliency().shape == (n, *batch.shape[-2:])
    assert torch.isfinite(first.values).all()


@pytest.mark.parametrize("name", METHODS)
def test_works_under_no_grad_and_with_inputs_in_a_graph(name: str, batch: torch.Tensor) -> None:
    model = model_for(name)
    reference = run(name, model, batch)
    leaf = batch.clone().requires_grad_(True)
    inputs = leaf * 1.0  # part of the user's own graph
    with torch.no_grad():
        result = run(name, model, inputs)
    torch.testing.assert_close(result.values, reference.values)
    assert leaf.grad is None


@pytest.mark.parametrize("name", METHODS)
def test_training_mode_warns_and_is_kept(name: str, batch: torch.Tensor) -> None:
    model = _init(ResNetish(), 0).train()
    with pytest.warns(UserWarning, match="training mode"):
        run(name, model, batch)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("name", METHODS)
def test_bad_inputs_get_clear_errors(name: str, batch: torch.Tensor) -> None:
    model = model_for(name)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        run(name, model, batch[0])
    with pytest.raises(TypeError, match="floating point"):
        run(name, model, (batch * 10).long())
    bad = batch.clone()
    bad[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        run(name, model, bad)
    with pytest.raises(ValueError, match="out of range"):
        run(name, model, batch, target=10)
    with pytest.raises(ValueError, match="3 inputs"):
        run(name, model, batch, target=[1, 2])
    with pytest.raises(TypeError, match="target"):
        run(name, model, batch, target="cat")
    with pytest.raises(TypeError, match="has no option"):
        salience.explain(model, batch, method=name, not_an_option=1)


def test_unknown_method_suggests_names() -> None:
    with pytest.raises(ValueError, match="did you mean 'gradient'"):
        salience.explain(nn.Identity(), torch.zeros(1, 3, 4, 4), method="gradiant")


class Dense(nn.Module):
    """A segmentation-style model: (N, classes, H, W) output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("name", METHODS)
def test_dense_output_needs_a_callable_target(name: str, batch: torch.Tensor) -> None:
    model = _init(Dense(), 0)
    with pytest.raises(ValueError, match=r"\(N, classes\)"):
        run(name, model, batch)
    mask = torch.zeros(16, 16)
    mask[4:10, 4:10] = 1
    if name in CLASS_TARGETS_ONLY:
        with pytest.raises(TypeError, match="grad_cam"):
            run(name, model, batch, target=salience.mask_target(2, mask))
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(name, model, batch, target=salience.mask_target(2, mask))
    # the one warning allowed says which maps are all zero (Score-CAM here: every masked
    # input scores below 0, so the ReLU clears its map), and only those
    zero = (result.values.flatten(1).abs().amax(1) == 0).nonzero().flatten().tolist()
    assert [str(w.message) for w in caught] == ([str(caught[0].message)] if zero else []), (
        "a warning other than one zero-map warning"
    )
    if zero:
        assert f"sample(s) {zero} is zero everywhere" in str(caught[0].message)
    assert result.target is None
    expected = (model(batch)[:, 2] * mask).sum((1, 2))
    torch.testing.assert_close(result.scores, expected.detach())


def test_the_model_walk_finds_every_module_once() -> None:
    """``modules_of`` (the walk of every call: buffers, training flags) is ``model.modules()``."""
    shared = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    model = nn.Sequential(
        shared,
        nn.ModuleDict({"again": shared, "deep": nn.ModuleList([nn.ReLU(), nn.Sequential(shared)])}),
    )
    model.register_module("empty", None)
    walked = modules_of(model)
    assert walked[0] is model
    assert len(walked) == len({id(m) for m in walked}) == len(list(model.modules()))
    assert {id(m) for m in walked} == {id(m) for m in model.modules()}


# -- structured outputs: a target written for the model's own output type ----------------------


class _Named(NamedTuple):
    logits: torch.Tensor
    aux: torch.Tensor


@dataclasses.dataclass
class _Fields:
    logits: torch.Tensor
    extra: str = "kept"


class _ModelOutput(collections.OrderedDict):
    """Hugging Face's ModelOutput, trimmed: a dataclass whose fields are also its items."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            if getattr(self, field.name) is not None:
                self[field.name] = getattr(self, field.name)

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("ModelOutput has no update()")

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __reduce__(self) -> Any:
        rebuild, _, *rest = super().__reduce__()
        return (rebuild, tuple(getattr(self, f.name) for f in dataclasses.fields(self)), *rest)  # type: ignore[arg-type]


@dataclasses.dataclass
class _HubOutput(_ModelOutput):
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


class _Configured(collections.OrderedDict):
    """A dict subclass whose constructor needs an argument: copied as a plain dict."""

    def __init__(self, config: str, **items: Any) -> None:
        super().__init__(**items)
        self.config = config


class Structured(nn.Module):
    """The VGG-style net, its logits wrapped in a named tuple, a dataclass or a hub output."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = model_for("gradient")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> Any:
        logits = self.net(x)
        if self.kind == "named":
            return _Named(logits, logits.sum(1))
        if self.kind == "dataclass":
            return _Fields(logits)
        if self.kind == "configured":
            return _Configured("cfg", logits=logits)
        return _HubOutput(logits=logits)


@pytest.mark.parametrize("kind", ["named", "dataclass", "hub", "configured"])
@pytest.mark.parametrize("name", sorted(set(METHODS) - CLASS_TARGETS_ONLY))
def test_a_target_on_a_structured_output_sees_one_batch_at_a_time(
    name: str, kind: str, batch: torch.Tensor
) -> None:
    """A per-sample target (``gather`` with the batch's labels) on a structured output gives
    the map of the same classes on the bare logits: methods that run several copies of the
    batch per pass (SmoothGrad, IG, Score-CAM, occlusion, RISE) hand it one copy at a time,
    in the model's own output type (occlusion's traced passes included)."""
    model = Structured(kind)
    labels = torch.tensor([1, 4, 7])

    own = type(model(batch))
    copied = dict if kind == "configured" else own  # its copies are plain dicts

    def picked(out: Any) -> torch.Tensor:
        assert type(out) in (own, copied)
        logits = out["logits"] if kind == "configured" else out.logits
        if kind == "hub":
            assert logits is out["logits"]  # mapped once: the field is the item
        return logits.gather(1, labels[:, None])[:, 0]

    options = {**FAST.get(name, {})}
    if name in ("score_cam", "rise"):
        options["score"] = "logit"  # what a callable target explains
    expected = salience.explain(model.net, batch, method=name, target=labels, **options)
    options.pop("score", None)
    found = salience.explain(model, batch, method=name, target=picked, **options)
    torch.testing.assert_close(found.values, expected.values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(found.scores, expected.scores)
    assert type(found.output) is copied
    first = found[0]  # the output is sliced with the maps
    assert type(first.output) is copied
    logits = found.output["logits"] if kind == "configured" else found.output.logits
    torch.testing.assert_close(
        first.output["logits"] if kind == "configured" else first.output.logits, logits[:1]
    )
    assert not logits.requires_grad  # held detached, not the pass's graph


class _WithAnchors(nn.Module):
    """A detector-like output: per-image logits beside tensors of other lengths first."""

    def __init__(self) -> None:
        super().__init__()
        self.net = model_for("gradient")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        anchors = torch.arange(48.0).view(12, 4)  # 12 rows: a multiple of any small batch
        return {"anchors": anchors, "seq_first": logits.T[:, :, None], "logits": logits}


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("name", sorted(set(METHODS) - CLASS_TARGETS_ONLY))
def test_tensors_of_other_lengths_are_not_taken_for_copies_of_the_batch(
    name: str, n: int, batch: torch.Tensor
) -> None:
    """Only a pass's own rows are cut: with one image, 12 anchors made 12 'batches' (a map
    12 times too large); several copies with no tensor of their rows first are refused."""
    model, x = _WithAnchors(), batch[:n]
    labels = torch.tensor([1, 4, 7])[:n]
    options = {**FAST.get(name, {})}
    if name in ("score_cam", "rise"):
        options["score"] = "logit"
    expected = salience.explain(model.net, x, method=name, target=labels, **options)
    options.pop("score", None)

    def picked(out: dict[str, torch.Tensor]) -> torch.Tensor:
        return out["logits"].gather(1, labels[:, None])[:, 0]

    found = salience.explain(model, x, method=name, target=picked, **options)
    torch.testing.assert_close(found.values, expected.values, rtol=1e-4, atol=1e-5)
    assert found.scores.shape == (n,)
    if name == "gradient":  # one copy: a sequence-first tensor is the target's to read
        by_time = salience.gradient(model, x, target=lambda out: out["seq_first"][1, :, 0])
        torch.testing.assert_close(by_time.values, salience.gradient(model.net, x, 1).values)
    if name == "smoothgrad":  # copies of the batch: a sequence-first output cannot be cut
        with pytest.raises(ValueError, match="needs the batch on the first axis"):
            salience.smoothgrad(
                lambda t: model(t)["seq_first"], x, target=lambda o: o[1, :, 0], samples=4
            )


class Checkpointed(nn.Module):
    """The VGG-style net with its features under ``torch.utils.checkpoint`` (non-reentrant)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = model_for("gradient")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.utils.checkpoint.checkpoint(self.net.features, x, use_reentrant=False)
        return self.net.classifier(features)


RULES_AT_CALLS = {"deeplift", "lrp"}  # rules installed around the forward pass's calls


@pytest.mark.parametrize("name", sorted(set(METHODS) - NEEDS_GAP))
def test_a_checkpointed_model_gives_its_maps_or_a_clear_error(
    name: str, batch: torch.Tensor
) -> None:
    """Checkpointing recomputes a part of the forward pass in the backward pass: the methods
    that read gradients see the same graph; the rules at calls (DeepLIFT, LRP) would not
    reach the recomputation, and refuse rather than give another method's map."""
    model = Checkpointed()
    if name in RULES_AT_CALLS:
        with pytest.raises(RuntimeError, match=rf"{name} cannot explain a model that checkpoints"):
            run(name, model, batch, target=[1, 4, 7])
        return
    found = run(name, model, batch, target=[1, 4, 7])
    expected = run(name, model.net, batch, target=[1, 4, 7])
    torch.testing.assert_close(found.values, expected.values)


HOOKS_OR_RULES = {
    "cam", "grad_cam", "grad_cam_plus_plus", "layer_cam", "score_cam", "guided_grad_cam",
    "deconvnet", "guided_backprop", "deeplift", "lrp",
}  # fmt: skip


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("trace", [False, True], ids=["scripted", "traced"])
@pytest.mark.parametrize("name", METHODS)
def test_a_torchscript_model_gives_its_maps_or_a_clear_error(
    name: str, trace: bool, batch: torch.Tensor
) -> None:
    """Methods that only run the model and its gradient work on TorchScript (its BatchNorm
    buffers kept as well); those that hook layers or change backward rules say that
    TorchScript runs outside Python."""
    model = _init(ResNetish(), 1)
    compiled = torch.jit.trace(model, batch) if trace else torch.jit.script(model)
    if name in HOOKS_OR_RULES:
        with pytest.raises(TypeError, match="TorchScript"):
            run(name, compiled, batch, target=[1, 4, 7])
        return
    found = run(name, compiled, batch, target=[1, 4, 7])
    expected = run(name, model, batch, target=[1, 4, 7])
    torch.testing.assert_close(found.values, expected.values, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("check", ["parameter_randomization", "input_invariance"])
def test_metrics_that_hook_layers_refuse_torchscript_clearly(
    check: str, batch: torch.Tensor
) -> None:
    from salience import metrics

    compiled = torch.jit.script(model_for("gradient"))
    methods = "gradient" if check == "parameter_randomization" else ["gradient"]
    with pytest.raises(TypeError, match="TorchScript models run no hooks"):
        getattr(metrics, check)(compiled, batch, methods, target=1)


class StemWithoutGrad(nn.Module):
    """The VGG-style net with its first convolution run under ``torch.no_grad``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = model_for("gradient")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.net.features[:2](x)
        return self.net.classifier(self.net.features[2:](h))


INPUT_GRADIENTS = {
    "gradient", "input_x_gradient", "deconvnet", "guided_backprop", "smoothgrad",
    "integrated_gradients", "deeplift", "lrp", "guided_grad_cam",
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(INPUT_GRADIENTS))
def test_a_score_cut_off_from_the_inputs_is_a_clear_error(name: str, batch: torch.Tensor) -> None:
    """The graph holds the later weights but not the input: no torch internals, no zero map."""
    with pytest.raises(ValueError, match="does not depend on the inputs through autograd"):
        run(name, StemWithoutGrad(), batch, target=[1, 4, 7])


@pytest.mark.parametrize("name", METHODS)
def test_switches_take_true_or_false_only(name: str, batch: torch.Tensor) -> None:
    """A string is true: ``relu="false"``, or a typo from the command line, would turn a
    switch on silently."""
    spec = get_method(name)
    params = inspect.signature(spec.func).parameters.values()
    switches = [p.name for p in params if p.annotation in ("bool", bool)]
    assert "allow_tf32" in switches
    for switch in switches:
        for bad in ("false", None, 0):
            with pytest.raises(TypeError, match=rf"{name}: {switch} must be True or False"):
                run(name, model_for(name), batch, **{switch: bad})


@pytest.mark.parametrize(
    "wrap",
    [torch.nn.utils.spectral_norm, torch.nn.utils.parametrizations.spectral_norm],
    ids=["legacy", "parametrization"],
)
def test_spectral_norm_in_training_mode_is_warned_of(wrap: Any, batch: torch.Tensor) -> None:
    """Its power iteration moves the weight at every pass: IG's or SmoothGrad's passes would
    see different models."""
    model = model_for("gradient")
    wrap(model.features[0])
    model.features[0].train()
    with pytest.warns(UserWarning, match=r"training mode \(features\.0.*spectral norm"):
        salience.gradient(model, batch)
    model.features[0].eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        salience.gradient(model, batch)


class ScriptedStem(nn.Module):
    """The VGG-style net with its first convolution and ReLU compiled by TorchScript."""

    def __init__(self) -> None:
        super().__init__()
        self.net = model_for("gradient")
        self.stem = torch.jit.script(self.net.features[:2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.classifier(self.net.features[2:](self.stem(x)))


RULES = {"deconvnet", "guided_backprop", "guided_grad_cam", "deeplift", "lrp"}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", sorted(set(METHODS) - NEEDS_GAP))
def test_a_scripted_part_is_refused_by_rules_and_passed_over_by_hooks(
    name: str, batch: torch.Tensor
) -> None:
    """DeepLIFT's map was 62 % off, silently: its rules did not reach the scripted block. A
    CAM cannot tell where a scripted block runs: its default layer comes with a warning (a
    search passing the block over took a layer before a scripted backbone, silently)."""
    model = ScriptedStem()
    if name in RULES:
        with pytest.raises(TypeError, match="TorchScript module 'stem'"):
            run(name, model, batch, target=[1, 4, 7])
        return
    options = {}
    if get_method(name).kind == "cam":
        with pytest.warns(UserWarning, match=r"holds TorchScript module 'stem'.*Pass layer="):
            run(name, model, batch, target=[1, 4, 7])
        with pytest.raises(TypeError, match=r"'stem\.0' is in TorchScript module 'stem'"):
            run(name, model, batch, target=[1, 4, 7], layer="stem.0")
        options["layer"] = "features.2"  # the features past the stem, as the slice runs them
    found = run(name, model, batch, target=[1, 4, 7], **{k: f"net.{v}" for k, v in options.items()})
    expected = run(name, model.net, batch, target=[1, 4, 7], **options)
    torch.testing.assert_close(found.values, expected.values, rtol=1e-4, atol=1e-6)


class _ClipLike(nn.Module):
    """Image embeddings beside a fixed set of prompts' embeddings (as many as a pass's rows)."""

    def __init__(self, prompts: int) -> None:
        super().__init__()
        self.net = model_for("gradient")
        generator = torch.Generator().manual_seed(2)
        self.text = nn.Parameter(torch.randn(prompts, 10, generator=generator))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image_embeds": self.net(x), "text_embeds": self.text * 1}


def test_per_sample_tensors_are_told_from_others_by_the_first_pass(batch: torch.Tensor) -> None:
    """4 prompts and passes of 4 rows (IG, batch_size=4 on one image): the prompts were cut
    as if they were copies of the image (a map 0.71 off)."""
    model, x = _ClipLike(prompts=4), batch[:1]

    def similarity(out: dict[str, torch.Tensor]) -> torch.Tensor:
        return (out["image_embeds"] @ out["text_embeds"].T)[:, 0]

    grouped = salience.integrated_gradients(model, x, similarity, steps=8, batch_size=4)
    alone = salience.integrated_gradients(model, x, similarity, steps=8, batch_size=1)
    torch.testing.assert_close(grouped.values, alone.values, rtol=1e-4, atol=1e-6)


@dataclasses.dataclass
class _ItemsAndFields(collections.OrderedDict):
    """A dict and a dataclass whose field ``prompts`` is no item (unlike a ModelOutput's)."""

    logits: torch.Tensor | None = None
    prompts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self["logits"] = self.logits


def test_a_field_that_is_no_item_is_walked_in_the_same_order() -> None:
    """The per-sample flags of the first pass are read in map_tensors' order: with the field
    left out of the walk, the prompts took the logits' flag and were cut, silently."""
    prompts = torch.arange(3.0)[:, None]  # 3 x 1: no row per sample

    class Model(nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            logits = x.flatten(1)[:, :4] * 10
            return (_ItemsAndFields(logits=logits, prompts=prompts), logits)

    def target(out: Any) -> torch.Tensor:
        return out[1][:, 1] + out[0].prompts.sum()

    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    resolved = salience.resolve_target(target, Model()(x), 2)
    copies = Model()(torch.cat([x, x * 2]))
    expected = torch.cat([x[:, 0, 0, 1] * 10, x[:, 0, 0, 1] * 20]) + 3
    torch.testing.assert_close(resolved.scores(copies, torch.arange(4) % 2), expected)


class _Scored(tuple):
    """A tuple subclass with a constructor of its own and an attribute holding a tensor."""

    def __new__(cls, logits: torch.Tensor, doubled: torch.Tensor) -> _Scored:
        made = super().__new__(cls, (logits,))
        made.doubled = doubled
        return made


def test_a_tuple_subclass_keeps_its_attributes_through_the_copies(batch: torch.Tensor) -> None:
    """IG cuts each pass's output into copies of the batch: the attribute was lost (and the
    target raised AttributeError), the constructor of its own being bypassed for a tuple."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model_for("gradient")

        def forward(self, x: torch.Tensor) -> _Scored:
            logits = self.net(x)
            return _Scored(logits, logits * 2)

    model, x = Model(), batch[:2]
    grouped = salience.integrated_gradients(
        model, x, lambda out: out.doubled[:, 1], steps=4, batch_size=8
    )
    plain = salience.integrated_gradients(model.net, x, 1, steps=4, batch_size=1)
    torch.testing.assert_close(grouped.values, 2 * plain.values, rtol=1e-4, atol=1e-6)
    assert isinstance(grouped.output, _Scored)
    torch.testing.assert_close(grouped.output.doubled, 2 * grouped.output[0])


class _Varargs(tuple):
    """A tuple subclass whose constructor takes its members one by one."""

    def __new__(cls, *items: Any) -> _Varargs:
        return super().__new__(cls, items)


class _Listed(list):
    """A list subclass with a slot and a constructor that counts its calls."""

    __slots__ = ("aux",)
    made = 0

    def __init__(self, *args: Any) -> None:
        type(self).made += 1
        super().__init__(*args)


def test_containers_keep_their_shape_whatever_their_constructor() -> None:
    from salience._containers import map_tensors, tensors_in

    one, two = torch.zeros(1), torch.ones(2)
    spread = map_tensors(lambda t: t + 1, _Varargs(one, two))  # was nested in one member
    assert isinstance(spread, _Varargs)
    assert [t.tolist() for t in spread] == [[1.0], [2.0, 2.0]]
    listed = _Listed([one])
    listed.aux = two
    made = _Listed.made
    copied = map_tensors(lambda t: t * 3, listed)
    assert _Listed.made == made  # its constructor is not run again
    assert isinstance(copied, _Listed)
    assert copied[0].tolist() == [0.0]
    assert copied.aux.tolist() == [3.0, 3.0]
    assert [t is u for t, u in zip(tensors_in(listed), [one, two], strict=True)] == [True, True]
