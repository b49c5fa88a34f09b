"""A small CNN for the synthetic benchmark (:mod:`salience.metrics.synthetic`), shipped trained.

The architecture is built so that every registered method applies to it, CAM included:

- ``features``: three stages of two 3x3 convolutions (padding 1) each followed by its own
  :class:`torch.nn.ReLU`, with a 2x2 max-pool between stages: 64x64 inputs give a 16x16 last
  feature map of 48 channels (a 4-pixel cell, receptive field 32 pixels, more than the largest
  object);
- ``pool``: global average pooling, ``flatten``, then ``fc``: a linear layer to the 6 classes of
  :data:`salience.metrics.synthetic.CLASSES` (the CAM head of Zhou et al. 2016).

Inputs are ``(N, 3, 64, 64)`` images in ``[0, 1]``, as :func:`~salience.metrics.synthetic.generate`
draws them; no normalization. The weights (``salience/data/synthetic_cnn.pt``, a float16 state
dict, about 100 KB) were trained by ``bench/train_synthetic.py`` on seed 1 of the generator; they
load offline, as float32.
"""

from __future__ import annotations

from importlib import resources

import torch
from torch import Tensor, nn

__all__ = ["SyntheticCNN", "synthetic_cnn", "synthetic_weights_path"]

_WEIGHTS = "synthetic_cnn.pt"


class SyntheticCNN(nn.Module):
    """Six 3x3 convolutions with ReLUs and two max-pools, global average pooling, linear.

    Args:
        classes: Number of outputs (6 for the synthetic benchmark).
        widths: Channels of the three stages.
    """

    def __init__(self, classes: int = 6, widths: tuple[int, int, int] = (16, 32, 48)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for stage, width in enumerate(widths):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        """Return the ``(N, classes)`` logits of ``(N, 3, H, W)`` images."""
        return self.fc(self.flatten(self.pool(self.features(x))))


def synthetic_weights_path() -> str:
    """Return the path of the shipped weights file (a float16 state dict)."""
    return str(resources.files("salience").joinpath("data").joinpath(_WEIGHTS))


def synthetic_cnn(pretrained: bool = True) -> SyntheticCNN:
    """Return the synthetic benchmark's CNN, in eval mode, on the CPU, in float32.

    Args:
        pretrained: Load the shipped weights (held-out accuracy and localization figures are in
            the README); ``False`` gives a randomly initialised network.

    Raises:
        FileNotFoundError: The weights file is missing from the installation.
    """
    model = SyntheticCNN()
    if pretrained:
        path = synthetic_weights_path()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"the synthetic CNN's weights are missing ({path}); reinstall salience, or "
                "retrain them with bench/train_synthetic.py"
            ) from None
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()
