"""LRP against Zennit 0.5 (peers' environment): the same rules give the same relevance.

Zennit starts the relevance from the one-hot output and salience from the explained logit, and
the rules are linear in the relevance they receive: salience's map is the logit times Zennit's.
Zennit's z⁺ and αβ keep the bias in their positive part by default (``zero_params=None``);
the papers (Bach et al. 2015, Montavon et al. 2017) and salience leave it out, so those are
compared with ``zero_params="bias"``. Remaining differences are Zennit's 1e-6 stabilizer in
the z⁺ / αβ denominators, which salience divides exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import salience
from conftest import VGGish, _init
from salience.methods.rules import CONV, AlphaBeta, Composite, Epsilon, Gamma, ZPlus

zennit = pytest.importorskip("zennit", reason="Zennit runs in the peers' environment")
from zennit import rules as zr  # noqa: E402
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import LayerMapComposite  # noqa: E402
from zennit.types import Activation, Convolution  # noqa: E402


@pytest.fixture
def model() -> nn.Module:
    vgg = _init(VGGish(), 0).double().eval()
    for m in vgg.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # Zennit's hooks need out-of-place activations
    return vgg


CASES = [
    ("epsilon", zr.Epsilon(1e-6), Epsilon(epsilon=1e-6), 1e-10),
    ("gamma", zr.Gamma(gamma=0.25), Gamma(gamma=0.25), 1e-10),
    ("zplus", zr.ZPlus(stabilizer=1e-6, zero_params="bias"), ZPlus(), 1e-5),
    ("alpha2beta1", zr.AlphaBeta(alpha=2, beta=1, zero_params="bias"), AlphaBeta(2, 1), 1e-5),
]


@pytest.mark.parametrize(("name", "theirs", "ours", "rtol"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("shift", [0.0, 0.5], ids=["positive-inputs", "signed-inputs"])
def test_conv_rules_equal_zennit(model, name, theirs, ours, rtol, shift):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    x = x - shift
    target = torch.tensor([2, 6])
    composite = LayerMapComposite(
        [(Activation, zr.Pass()), (Convolution, theirs), (nn.Linear, zr.Epsilon(1e-6))]
    )
    with Gradient(model=model, composite=composite) as attributor:
        out, relevance = attributor(x.clone(), torch.eye(10, dtype=torch.float64)[target])
    result = salience.lrp(
        model, x, target=target, composite=Composite({CONV: ours, nn.Linear: Epsilon(1e-6)})
    )
    logit = out.detach().gather(1, target[:, None]).view(-1, 1, 1, 1)
    expected = logit * relevance.detach()
    scale = float(expected.abs().max())
    assert float((result.values - expected).abs().max()) <= rtol * scale, name


def test_zennit_default_zplus_keeps_the_bias(model):
    """A documented difference, not a defect: with the bias in, Zennit's z⁺ differs."""
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = torch.tensor([2, 6])
    composite = LayerMapComposite(
        [(Activation, zr.Pass()), (Convolution, zr.ZPlus()), (nn.Linear, zr.Epsilon(1e-6))]
    )
    with Gradient(model=model, composite=composite) as attributor:
        out, relevance = attributor(x.clone(), torch.eye(10, dtype=torch.float64)[target])
    result = salience.lrp(model, x, target=target, composite="epsilon_plus", epsilon=1e-6)
    expected = out.detach().gather(1, target[:, None]).view(-1, 1, 1, 1) * relevance.detach()
    assert float((result.values - expected).abs().max()) > 1e-3 * float(expected.abs().max())
