"""Check that a call computes in full float32 whatever TF32 setting the process uses.

    python bench/check_tf32.py                  # on a GPU (convolutions, RNNs, matmuls)
    python bench/check_tf32.py --device cpu     # a smoke test: the settings' round trips

For each way a process can allow TF32 (the default; the flags ``allow_tf32``;
``torch.set_float32_matmul_precision("high")``; the newer ``fp32_precision`` settings of
cuDNN's convolutions and RNNs and of CUDA's matmuls, which PyTorch refuses to read the flags
beside), a small network with a convolution, an RNN and a linear layer is explained with the
gradient, and three things are printed:

- the map's largest difference from a float64 map of the same network, relative to the map's
  largest value (full float32: about 1e-6; TF32: about 1e-3);
- the same for a hand-written pass under the same setting (on a GPU that allows TF32 this one
  is about 1e-3: it shows that the setting is in force, so the first column can fail);
- whether the settings read the same after the call as before it.

Exit status 1 if a map of salience's is off by more than 1e-4 or a setting is not put back.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

import salience


class Mixed(nn.Module):
    """A convolution, an RNN over the image's rows and a linear layer: each TF32 path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        self.rnn = nn.RNN(64 * 32, 128, batch_first=True)
        self.fc = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x))  # (N, 64, 32, 32)
        rows = h.permute(0, 2, 1, 3).flatten(2)  # (N, 32 rows, 64 * 32)
        out, _ = self.rnn(rows)
        return self.fc(out[:, -1])


def settings() -> dict[str, Any]:
    """What each TF32 setting reads now (``"refused"`` where PyTorch will not read it)."""
    read: dict[str, Any] = {}
    for name, get in {
        "cudnn.allow_tf32": lambda: torch.backends.cudnn.allow_tf32,
        "matmul.allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision,
        "cudnn.conv.fp32_precision": lambda: torch.backends.cudnn.conv.fp32_precision,
        "cudnn.rnn.fp32_precision": lambda: torch.backends.cudnn.rnn.fp32_precision,
        "matmul.fp32_precision": lambda: torch.backends.cuda.matmul.fp32_precision,
    }.items():
        try:
            read[name] = get()
        except (RuntimeError, AttributeError) as error:
            read[name] = f"refused ({type(error).__name__})"
    return read


def _newer(value: str) -> Callable[[], None]:
    def apply() -> None:
        torch.backends.cudnn.conv.fp32_precision = value
        torch.backends.cudnn.rnn.fp32_precision = value
        torch.backends.cuda.matmul.fp32_precision = value

    return apply


def _flags() -> None:
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True


SETUPS: dict[str, Callable[[], None]] = {
    "default": lambda: None,
    "allow_tf32 flags": _flags,
    'set_float32_matmul_precision("high")': lambda: torch.set_float32_matmul_precision("high"),
    'set_float32_matmul_precision("medium")': lambda: torch.set_float32_matmul_precision("medium"),
    'fp32_precision = "tf32"': _newer("tf32"),
}


@contextlib.contextmanager
def defaults_after() -> Iterator[None]:
    """Put PyTorch's TF32 defaults back when the block exits."""
    try:
        yield
    finally:
        if hasattr(torch.backends.cudnn, "conv"):
            _newer("none")()  # "none": the newer settings defer to the flags again
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions
        torch.backends.cuda.matmul.allow_tf32 = False


def hand_written(model: nn.Module, x: Tensor, target: int) -> Tensor:
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)[:, target].sum(), x)
    return grad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Mixed().to(device)  # training mode (no dropout, no BatchNorm): cuDNN's RNN
    # backward refuses eval mode
    x = torch.randn(4, 3, 32, 32, device=device)
    target = 3
    exact = hand_written(model.double(), x.double(), target).float()
    model.float()
    scale = exact.abs().max().item()

    failed = False
    print(f"device {device}, torch {torch.__version__}")
    print("| setting | salience vs float64 | hand-written vs float64 | put back |")
    print("|---|---:|---:|---|")
    for name, apply in SETUPS.items():
        with defaults_after():
            try:
                apply()
            except (RuntimeError, AttributeError) as error:  # a setting this PyTorch lacks
                print(f"| {name} | not run: {type(error).__name__}: {error} | | |")
                continue
            before = settings()
            ours = salience.gradient(model, x, target=target).values
            after = settings()
            theirs = hand_written(model, x, target)
        ours_off = (ours - exact).abs().max().item() / scale
        theirs_off = (theirs - exact).abs().max().item() / scale
        kept = before == after
        failed |= ours_off > 1e-4 or not kept
        print(f"| {name} | {ours_off:.1e} | {theirs_off:.1e} | {'yes' if kept else after} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
