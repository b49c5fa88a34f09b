"""Small networks shared by the tests, and the pretrained model fixture."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

torch.set_num_threads(min(2, torch.get_num_threads()))


class VGGish(nn.Module):
    """VGG-style: conv blocks with in-place ReLU and max-pooling, then an MLP head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(inplace=True), nn.Linear(32, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()  # reused twice per forward, as torchvision does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class ResNetish(nn.Module):
    """ResNet-style: BatchNorm, skip connections, a reused ReLU module, GAP + linear head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(8)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16))
        self.layer2 = BasicBlock(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(x))
        x = self.layer1(x)
        x = self.relu(self.down(x))
        x = self.layer2(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class FunctionalRelus(nn.Module):
    """Every way of writing a rectifier: modules (reused), functions, methods, clipped ones."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, 6, 3, padding=1) for c in (3, 6, 6, 6, 6, 6, 6))
        self.act = nn.ReLU6()
        self.fc = nn.Linear(6 * 8 * 8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.convs
        x = self.act(c[0](x))  # nn.ReLU6 module ...
        x = F.relu(c[1](x))
        x = torch.relu(c[2](x))
        x = c[3](x).relu_()
        x = F.relu6(c[4](x))
        x = F.hardtanh(c[5](x), 0.0, 6.0)
        x = self.act(c[6](x))  # ... reused
        return self.fc(torch.flatten(F.max_pool2d(x, 2), 1))


def slow_spearman(a: object, b: object) -> float:
    """Spearman's rho written out: average ranks by a loop over tie groups, then Pearson.

    The independent reference of every rank correlation in salience (``a``, ``b``: tensors
    or arrays, flattened).
    """

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return out

    ra = ranks(torch.as_tensor(a).flatten().tolist())
    rb = ranks(torch.as_tensor(b).flatten().tolist())
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((p - ma) * (q - mb) for p, q in zip(ra, rb, strict=True))
    va = math.sqrt(sum((p - ma) ** 2 for p in ra))
    vb = math.sqrt(sum((q - mb) ** 2 for q in rb))
    return cov / (va * vb)


def _init(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.uniform_(m.bias, -0.1, 0.1)
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
        if isinstance(m, nn.LayerNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


@pytest.fixture
def vgg() -> nn.Module:
    return _init(VGGish(), 0)


@pytest.fixture
def resnet() -> nn.Module:
    return _init(ResNetish(), 1)


@pytest.fixture
def functional_relus() -> nn.Module:
    return _init(FunctionalRelus(), 2)


@pytest.fixture
def images() -> torch.Tensor:
    """A batch of three 16x16 RGB inputs."""
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="session")
def lite0() -> nn.Module:
    """The pretrained EfficientNet-Lite0 (eval mode)."""
    from salience import models

    return models.load("efficientnet_lite0")


@pytest.fixture(scope="session")
def cat(lite0: nn.Module) -> torch.Tensor:
    """The bundled cat photo, preprocessed for EfficientNet-Lite0: (1, 3, 224, 224)."""
    from salience import models

    return lite0.preprocess(models.sample_image("chelsea"))


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A folder of two small random photos, ``img0.png`` and ``img1.png`` (64 x 48)."""
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i}.png")
    return root
