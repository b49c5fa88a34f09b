"""One method call, one scope: extra forward arguments, TF32, in-place models, threads,
degenerate inputs and the small contract findings of the architecture review.

Buffers restored after every call (training mode, also when a method raises) are checked by the
contract suite, tests/test_contract.py."""

from __future__ import annotations

import threading
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from conftest import ResNetish, VGGish, _init
from salience.hooks import forward_hooks
from salience.methods.integrated import make_baseline

FAST: dict[str, dict[str, Any]] = {
    "smoothgrad": {"samples": 3},
    "integrated_gradients": {"steps": 6},
    "score_cam": {"batch_size": 4},
}
METHODS = sorted(salience.available_methods())


def run(name: str, model: Any, x: torch.Tensor, target: Any = None, **options: Any) -> Any:
    return salience.explain(
        model, x, method=name, target=target, **{**FAST.get(name, {}), **options}
    )


class TwoInput(nn.Module):
    """VQA-style: image features gated by a question embedding, GAP + linear head."""

    def __init__(self, dim: int = 6, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.gate = nn.Linear(dim, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor, question: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        features = self.act(self.conv(x) * torch.sigmoid(self.gate(question))[:, :, None, None])
        return self.head(features.mean((2, 3))) * scale


class Bound(nn.Module):
    """The reference: the two-input model with one sample's question fixed inside."""

    def __init__(self, model: TwoInput, question: torch.Tensor, scale: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.question = question
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.question.expand(x.shape[0], -1), self.scale)


@pytest.mark.parametrize("name", METHODS)
def test_forward_args_follow_their_rows(name: str) -> None:
    model = _init(TwoInput(), 4)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    question = torch.randn(3, 6, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    target = [0, 2, 3]
    batched = run(name, model, x, target, forward_args=(question,))
    keyword = run(name, model, x, target, forward_args={"question": question, "scale": 1.0})
    torch.testing.assert_close(batched.values, keyword.values)
    for i in range(3):
        alone = run(name, Bound(model, question[i : i + 1].detach()), x[i : i + 1], target[i])
        torch.testing.assert_close(batched.values[i : i + 1], alone.values, rtol=1e-5, atol=1e-6)
    assert question.grad is None  # extra arguments are data: no gradient flows into them


def test_forward_args_that_are_not_batched_pass_as_they_are() -> None:
    model = _init(TwoInput(), 4)
    x = torch.randn(2, 3, 8, 8)
    question = torch.randn(2, 6)
    twice = salience.integrated_gradients(
        model, x, 1, steps=4, forward_args={"question": question, "scale": 2.0}
    )
    once = salience.integrated_gradients(model, x, 1, steps=4, forward_args=(question,))
    torch.testing.assert_close(twice.values, 2 * once.values)
    with pytest.raises(TypeError, match="forward_args"):
        salience.gradient(model, x, forward_args=3)  # type: ignore[arg-type]


def test_a_model_without_its_extra_argument_fails_clearly() -> None:
    with pytest.raises(TypeError, match="question"):
        salience.gradient(_init(TwoInput(), 4), torch.randn(1, 3, 8, 8))


class FlagSpy(nn.Module):
    """Records the TF32 switches while the model runs."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _init(VGGish(), 0)
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return self.inner(x)


@pytest.fixture
def tf32_on() -> Any:
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.usefixtures("tf32_on")
@pytest.mark.parametrize("name", METHODS)
def test_tf32_is_off_during_the_call_and_restored(name: str) -> None:
    spy = FlagSpy()
    x = torch.randn(2, 3, 16, 16)
    if name == "cam":
        pytest.skip("cam needs a GAP head (its scoping is the same code)")
    run(name, spy, x)
    assert spy.seen
    assert set(spy.seen) == {(False, False)}
    assert torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32
    spy.seen.clear()
    run(name, spy, x, allow_tf32=True)
    assert set(spy.seen) == {(True, True)}


@pytest.mark.usefixtures("tf32_on")
def test_tf32_is_restored_when_the_method_raises_and_across_threads() -> None:
    spy = FlagSpy()
    with pytest.raises(ValueError, match="out of range"):
        salience.gradient(spy, torch.randn(1, 3, 16, 16), target=99)
    assert torch.backends.cudnn.allow_tf32

    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                salience.gradient(spy, torch.randn(1, 3, 16, 16))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32
    assert set(spy.seen) == {(False, False)}


@pytest.mark.skipif(
    not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="an older PyTorch"
)
@pytest.mark.parametrize("setting", ["fp32_precision", "set_float32_matmul_precision"])
def test_tf32_set_with_the_newer_settings_is_switched_through_them(setting: str) -> None:
    """After ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` the older flags cannot be
    read (PyTorch refuses to mix the two): every method raised. ``"high"`` round-trips through
    the flags."""
    conv, rnn = torch.backends.cudnn.conv, torch.backends.cudnn.rnn
    matmul = torch.backends.cuda.matmul
    before = (conv.fp32_precision, rnn.fp32_precision, matmul.fp32_precision)
    matmul_precision = torch.get_float32_matmul_precision()
    seen: list[tuple[str, str, str]] = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((conv.fp32_precision, rnn.fp32_precision, matmul.fp32_precision))
            return x.flatten(1)[:, :3] * 2

    try:
        if setting == "fp32_precision":
            conv.fp32_precision = matmul.fp32_precision = "tf32"
        else:
            torch.set_float32_matmul_precision("high")
        state = (conv.fp32_precision, rnn.fp32_precision, matmul.fp32_precision)
        salience.gradient(Spy(), torch.randn(1, 3, 4, 4), 0)
        assert len(seen) == 1
        if setting == "fp32_precision":
            assert seen == [("ieee", "ieee", "ieee")]  # cuDNN's RNNs too, as the flag's way
        else:
            assert torch.get_float32_matmul_precision() == "high"
        assert (conv.fp32_precision, rnn.fp32_precision, matmul.fp32_precision) == state
    finally:
        conv.fp32_precision, rnn.fp32_precision, matmul.fp32_precision = before
        torch.set_float32_matmul_precision(matmul_precision)
    assert torch.get_float32_matmul_precision() == matmul_precision


@pytest.mark.parametrize("precision", ["medium", "high", "highest"])
def test_the_float32_matmul_precision_is_put_back_as_it_was(precision: str) -> None:
    """``set_float32_matmul_precision("medium")`` allows TF32 (or bfloat16) matmuls as "high"
    does, and the flag ``allow_tf32`` only says "high" again: after a call PyTorch's getter
    raised (the settings then mixed the two ways)."""
    saved = torch.get_float32_matmul_precision()
    seen: list[tuple[bool, str]] = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(
                (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
            )
            return x.flatten(1)[:, :3] * 2

    try:
        torch.set_float32_matmul_precision(precision)
        before = _matmul_settings()
        salience.gradient(Spy(), torch.randn(1, 3, 4, 4), 0)
        assert seen == [(False, "highest")]  # readable inside the call (it raised there)
        assert _matmul_settings() == before
    finally:
        torch.set_float32_matmul_precision(saved)


@pytest.mark.skipif(
    not hasattr(torch.backends.mkldnn, "matmul"), reason="an older PyTorch: no newer settings"
)
@pytest.mark.parametrize("setting", ["high", "medium", "newer settings"])
def test_the_cpu_matmuls_run_in_float32_inside_a_call(setting: str) -> None:
    """``"high"`` and ``"medium"`` set oneDNN's matmuls (the CPU's) to TF32 and bfloat16 too,
    which the flag ``allow_tf32`` left so inside a call (lower precision on a CPU with AMX)."""
    saved = torch.get_float32_matmul_precision()
    cuda, cpu = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    newer = (cuda.fp32_precision, cpu.fp32_precision)
    seen: list[str] = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(cpu.fp32_precision)
            return x.flatten(1)[:, :3] * 2

    try:
        if setting == "newer settings":
            cuda.fp32_precision, cpu.fp32_precision = "tf32", "bf16"
        else:
            torch.set_float32_matmul_precision(setting)
        before = (cuda.fp32_precision, cpu.fp32_precision)
        salience.gradient(Spy(), torch.randn(1, 3, 4, 4), 0)
        assert seen == ["ieee"]
        assert (cuda.fp32_precision, cpu.fp32_precision) == before
    finally:
        torch.set_float32_matmul_precision(saved)
        cuda.fp32_precision, cpu.fp32_precision = newer


def _matmul_settings() -> dict[str, Any]:
    read: dict[str, Any] = {}
    for name, get in {
        "precision": torch.get_float32_matmul_precision,
        "cuda.matmul": lambda: torch.backends.cuda.matmul.fp32_precision,
        "mkldnn.matmul": lambda: torch.backends.mkldnn.matmul.fp32_precision,
        "matmul.allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
        "cudnn.allow_tf32": lambda: torch.backends.cudnn.allow_tf32,
    }.items():
        try:
            read[name] = get()
        except RuntimeError:
            read[name] = "refused"
    return read


@pytest.mark.skipif(
    not hasattr(torch.backends.mkldnn, "matmul"), reason="an older PyTorch: no newer settings"
)
@pytest.mark.parametrize("then", ["cpu matmuls ieee", "the matmul flag set"])
def test_medium_mixed_with_other_settings_is_put_back_as_it_was(then: str) -> None:
    """``"medium"`` and then a setting of the newer or the older kind: the call worked and
    changed nothing before this session's mend of ``"medium"``; the mend raised (PyTorch's
    getter refuses the second state) and put the CPU's matmuls to bfloat16 (the first)."""
    saved = torch.get_float32_matmul_precision()
    cuda, cpu = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    newer = (cuda.fp32_precision, cpu.fp32_precision)
    try:
        torch.set_float32_matmul_precision("medium")
        if then == "cpu matmuls ieee":
            torch.backends.mkldnn.matmul.fp32_precision = "ieee"
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
        before = _matmul_settings()
        salience.gradient(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), torch.randn(1, 3, 2, 2), 0)
        assert _matmul_settings() == before
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision(saved)
        cuda.fp32_precision, cpu.fp32_precision = newer
    assert _matmul_settings()["precision"] == saved


_LEAVES = {
    "cudnn.conv": lambda: torch.backends.cudnn.conv,
    "cudnn.rnn": lambda: torch.backends.cudnn.rnn,
    "cuda.matmul": lambda: torch.backends.cuda.matmul,
    "mkldnn.matmul": lambda: torch.backends.mkldnn.matmul,
    "mkldnn.conv": lambda: torch.backends.mkldnn.conv,
    "mkldnn.rnn": lambda: torch.backends.mkldnn.rnn,
}


def _leaves() -> dict[str, str]:
    return {name: leaf().fp32_precision for name, leaf in _LEAVES.items()}


@pytest.mark.skipif(
    not hasattr(torch.backends.mkldnn, "conv"), reason="an older PyTorch: no newer settings"
)
@pytest.mark.parametrize(
    "setting",
    ["cudnn's parent tf32, then highest", "cpu matmuls bf16", "cpu convolutions bf16"],
)
def test_every_newer_setting_is_float32_inside_a_call_and_put_back(setting: str) -> None:
    """A setting the flags do not reach: oneDNN's (the CPU's), set alone, stayed TF32 or
    bfloat16 inside a call; a parent's ``"tf32"`` inherited by cuDNN's convolutions and RNNs
    kept them TF32 after the flag was switched, and the flag then could not be read back (the
    call raised)."""
    saved = torch.get_float32_matmul_precision()
    parents = (torch.backends.cudnn.fp32_precision, torch.backends.mkldnn.fp32_precision)
    start = _leaves()
    seen: list[dict[str, str]] = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(_leaves())
            return x.flatten(1)[:, :3] * 2

    try:
        if setting == "cudnn's parent tf32, then highest":
            torch.backends.cudnn.fp32_precision = "tf32"
            torch.set_float32_matmul_precision("highest")
        elif setting == "cpu matmuls bf16":
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        else:
            torch.backends.mkldnn.conv.fp32_precision = "bf16"
        before = _leaves()
        salience.gradient(Spy(), torch.randn(1, 3, 4, 4), 0)
        assert all(value in ("ieee", "none") for value in seen[0].values()), seen[0]
        assert _leaves() == before
    finally:
        torch.backends.cudnn.fp32_precision, torch.backends.mkldnn.fp32_precision = parents
        torch.set_float32_matmul_precision(saved)
        for name, value in start.items():
            _LEAVES[name]().fp32_precision = value


class NormalisesInPlace(nn.Module):
    """A model whose pre-hook normalises its input in place, as some deployment code does."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _init(ResNetish(), 1)
        self.register_forward_pre_hook(lambda _m, args: (args[0].sub_(0.5).mul_(2.0),))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class NormalisesOutOfPlace(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - 0.5) * 2.0)


@pytest.mark.parametrize("name", METHODS)
def test_models_that_edit_their_input_in_place(name: str) -> None:
    model = NormalisesInPlace()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    kept = x.clone()
    result = run(name, model, x, 1)
    assert torch.equal(x, kept)
    expected = run(name, NormalisesOutOfPlace(model.net), x, 1)
    torch.testing.assert_close(result.values, expected.values, rtol=1e-5, atol=1e-6)


def test_layer_hooks_belong_to_the_calling_thread() -> None:
    model = _init(VGGish(), 0)
    seen: list[str] = []
    x = torch.randn(1, 3, 16, 16)
    with forward_hooks([("features", model.features)], lambda name, *_: seen.append(name)):
        other = threading.Thread(target=lambda: model(x))
        other.start()
        other.join()
        assert seen == []
        model(x)
        assert seen == ["features"]
    model(x)
    assert seen == ["features"]


def test_concurrent_cams_on_one_model() -> None:
    model = _init(ResNetish(), 1)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    expected = salience.grad_cam(model, x, 3)
    results: list[Any] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                results.append(salience.grad_cam(model, x, 3))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for r in results:
        assert r.extras["layer_calls"] == expected.extras["layer_calls"]
        torch.testing.assert_close(r.values, expected.values)


# -- degenerate inputs: a warning that says why, never a silent all-zero map -------------------


def test_smoothgrad_on_a_constant_image_warns() -> None:
    model = _init(VGGish(), 0)
    x = torch.full((1, 3, 16, 16), 0.3)
    with pytest.warns(UserWarning, match=r"constant.*plain gradient"):
        salience.smoothgrad(model, x, samples=2)


def test_uniform_baseline_on_a_constant_image_warns() -> None:
    model = _init(VGGish(), 0)
    x = torch.cat([torch.full((1, 3, 16, 16), 0.3), torch.randn(1, 3, 16, 16)])
    with pytest.warns(UserWarning, match=r"baseline equals input sample\(s\) \[0\]"):
        result = salience.integrated_gradients(model, x, baseline="uniform", steps=4)
    assert torch.count_nonzero(result.values[0]) == 0
    assert torch.count_nonzero(result.values[1]) > 0


def test_score_cam_on_a_blank_image_gives_zero_weights_and_says_so() -> None:
    model = _init(ResNetish(), 1)
    x = torch.zeros(2, 3, 16, 16)
    with pytest.warns(UserWarning, match="constant on sample"):
        result = salience.score_cam(model, x, 0, layer="stem")
    assert torch.count_nonzero(result.values) == 0
    assert torch.count_nonzero(result.extras["weights"]) == 0


def _no_positive_evidence() -> nn.Module:
    """conv (nonnegative features after the ReLU) -> GAP -> linear with class 0's row < 0."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 2),
    )  # fmt: skip
    with torch.no_grad():
        net[4].weight[0] = -net[4].weight[0].abs() - 0.1
    return net.eval()


def test_a_grad_cam_that_the_relu_clears_warns() -> None:
    """Class 0 has only negative weights on nonnegative channels: Grad-CAM is zero, which is
    said (with why), and its signed map is not zero (and not warned about)."""
    net = _no_positive_evidence()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match=r"sample\(s\) \[0, 1\] is zero.*'1'.*relu=False"):
        rectified = salience.grad_cam(net, x, 0)
    assert torch.count_nonzero(rectified.values) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        signed = salience.grad_cam(net, x, 0, relu=False)
    assert (signed.values.flatten(1).abs().amax(1) > 0).all()


@pytest.mark.parametrize("method", ["grad_cam_plus_plus", "layer_cam"])
@pytest.mark.parametrize("relu", [True, False])
def test_cams_of_positive_gradients_say_there_are_none(method: str, relu: bool) -> None:
    """Their weights keep only positive gradients: zero, rectified or not, and said so."""
    net = _no_positive_evidence()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match=r"\[0, 1\] is zero.*no channel of layer '1' has a pos"):
        result = salience.explain(net, x, method, 0, relu=relu)
    assert torch.count_nonzero(result.values) == 0


def test_a_blank_sample_of_score_cam_is_warned_about_once() -> None:
    model = _init(ResNetish(), 1)
    x = torch.cat([torch.zeros(1, 3, 16, 16), torch.randn(1, 3, 16, 16)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        salience.score_cam(model, x, 0, layer="stem")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "constant on sample(s) [0]" in messages[0]


def test_a_gradient_that_is_zero_everywhere_warns() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[1].bias.fill_(-100.0)  # every hidden unit dead
    with pytest.warns(UserWarning, match="zero everywhere"):
        salience.gradient(model, torch.randn(1, 3, 2, 2))


# -- scores of one-output models ----------------------------------------------------------------


class OneLogit(nn.Module):
    def __init__(self, sign: float = 1.0) -> None:
        super().__init__()
        self.net = _init(ResNetish(classes=1), 1)
        self.sign = sign

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sign * self.net(x)


def test_probability_of_a_one_logit_model_is_its_sigmoid() -> None:
    model = OneLogit()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    logit = model(x)[:, 0].detach()
    result = salience.gradient(model, x, 0, score="probability")
    torch.testing.assert_close(result.scores, torch.sigmoid(logit))
    log = salience.gradient(model, x, 0, score="log_probability")
    torch.testing.assert_close(log.scores, F.logsigmoid(logit))


def test_score_cam_tells_a_one_logit_head_from_its_negation() -> None:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    plus = salience.score_cam(OneLogit(1.0), x, 0, relu=False)
    minus = salience.score_cam(OneLogit(-1.0), x, 0, relu=False)
    assert not torch.allclose(plus.extras["weights"], minus.extras["weights"])
    # sigmoid(-z) = 1 - sigmoid(z): the weights of the negated head mirror around 1/2
    varying = plus.extras["weights"] != 0
    torch.testing.assert_close(
        minus.extras["weights"][varying], 1 - plus.extras["weights"][varying]
    )


# -- the review's small findings ---------------------------------------------------------------


def test_a_baseline_that_requires_grad_does_not_leak_its_graph() -> None:
    model = _init(VGGish(), 0)
    x = torch.randn(1, 3, 16, 16)
    baseline = torch.zeros(1, 3, 16, 16, requires_grad=True)
    result = salience.integrated_gradients(model, x, baseline=baseline, steps=4)
    assert not result.values.requires_grad
    assert result.values.grad_fn is None
    assert baseline.grad is None


def test_numpy_integer_targets() -> None:
    model = _init(VGGish(), 0)
    x = torch.randn(2, 3, 16, 16)
    expected = salience.gradient(model, x, [3, 5]).values
    for target in (np.array([3, 5]), [np.int64(3), np.int32(5)]):
        torch.testing.assert_close(salience.gradient(model, x, target).values, expected)
    torch.testing.assert_close(
        salience.gradient(model, x, np.int64(3)).values, salience.gradient(model, x, 3).values
    )


def test_indexing_past_the_batch_raises() -> None:
    result = salience.gradient(_init(VGGish(), 0), torch.randn(2, 3, 16, 16))
    assert result[-2].values.shape[0] == 1
    torch.testing.assert_close(result[-1].values, result.values[1:])
    for index in (2, 5, -3):
        with pytest.raises(IndexError, match="out of range"):
            result[index]


def test_adaptive_ig_that_runs_out_of_steps_warns() -> None:
    model = _init(VGGish(), 0)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    with pytest.warns(UserWarning, match="max_steps=5"):
        result = salience.integrated_gradients(model, x, tolerance=1e-9, steps=2, max_steps=5)
    assert int(result.extras["steps"][0]) <= 5


def test_black_baseline_in_pixel_space(lite0: nn.Module) -> None:
    x = torch.randn(1, 3, 8, 8)
    black = make_baseline(x, "black", model=lite0)  # mean = std = 0.5: black is -1
    torch.testing.assert_close(black, torch.full_like(x, -1.0))

    class Carries(nn.Module):
        mean = (0.485, 0.456, 0.406)
        std = (0.229, 0.224, 0.225)

    expected = torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(make_baseline(x, "black", model=Carries()), expected.expand_as(x))
    with pytest.raises(ValueError, match="'mean' and 'std'"):
        salience.integrated_gradients(
            _init(VGGish(), 0), torch.randn(1, 3, 16, 16), baseline="black"
        )


def test_hooks_are_registered_in_one_module() -> None:
    """Only salience/hooks.py registers hooks or installs function modes (one place to audit)."""
    import re
    from pathlib import Path

    root = Path(salience.__file__).parent
    pattern = re.compile(r"register_\w*hook|TorchFunctionMode|TorchDispatchMode")
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name != "hooks.py" and pattern.search(path.read_text())
    ]
    assert offenders == []
