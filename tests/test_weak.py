"""salience._weak.ByIdentity: per-model memory, keyed by identity, held weakly."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import salience
from salience._weak import ByIdentity


@dataclass(eq=True)
class Equal(nn.Module):
    """A module that compares by value: unhashable (``__hash__`` is None)."""

    width: int = 3

    def __post_init__(self) -> None:
        super().__init__()


def test_keys_by_identity_even_unhashable_and_equal_ones() -> None:
    memo: ByIdentity[nn.Module, int] = ByIdentity()
    a, b = Equal(), Equal()
    assert a == b
    with pytest.raises(TypeError):
        hash(a)
    memo[a] = 1
    assert memo.get(a) == 1
    assert b not in memo  # equal, not the same
    memo[b] = 2
    assert (memo[a], memo[b], len(memo)) == (1, 2, 2)
    del memo[a]
    assert a not in memo
    assert list(memo) == [b]
    memo.clear()
    assert len(memo) == 0


def test_an_entry_dies_with_its_key_and_an_id_reused_finds_nothing() -> None:
    memo: ByIdentity[nn.Module, str] = ByIdentity()
    module = nn.Linear(2, 2)
    number = id(module)
    memo[module] = "kept"
    del module
    gc.collect()
    assert len(memo) == 0
    assert number not in memo._data
    memo[nn.Linear(2, 2)] = "another"  # may take the same id: a different entry
    gc.collect()
    assert len(memo) == 0


def test_keys_must_take_weak_references() -> None:
    memo: ByIdentity[object, int] = ByIdentity()
    with pytest.raises(TypeError):
        memo[3] = 1


def test_an_unhashable_model_gets_its_gradient() -> None:
    class Net(Equal):
        def __post_init__(self) -> None:
            super().__post_init__()
            self.bn = nn.BatchNorm2d(3)
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.bn(x).mean((2, 3)))

    model = Net().eval()
    x = torch.randn(1, 3, 4, 4)
    for method in ("gradient", "integrated_gradients", "deeplift"):
        assert salience.explain(model, x, method, 0).values.abs().sum() > 0
