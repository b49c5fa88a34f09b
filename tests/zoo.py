"""An architecture zoo: one small, seeded, local model per family that users bring.

Every factory in :data:`ZOO` builds its model with a fixed seed, in eval mode, for 3x32x32
inputs; :func:`build` returns it with a batch of inputs, the extra forward arguments and the
target the model needs. The models are tiny (a few thousand parameters) so that every
registered method can run on every model in a few seconds on two CPU cores.

:func:`planted` builds variants whose every logit depends on the top-left quadrant of the
image only: a fixed mask zeroes everything else inside ``forward`` (early, so that no input
outside the quadrant reaches the head, and again as the last layer before the head, so that
the default CAM layer holds nothing outside the quadrant). Pixel gradients and CAMs must then
put their mass in that quadrant.

No torchvision or timm: the families are written out here, in the ways real code writes them
(reused ReLU modules, functional ``torch.cat``, ``permute`` to channels-last, in-place ReLUs,
functional upsampling).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import conftest

__all__ = [
    "CAM_LAYER",
    "PLANTED",
    "ZOO",
    "Case",
    "build",
    "planted",
    "quadrant_mask",
]

SIZE = 32  # input side
CLASSES = 10
QUESTION = 12  # width of the TwoInput question embedding
KEEP = 3  # a planted model keeps a KEEP x KEEP corner of its 8x8 grid


def _init(model: nn.Module, seed: int) -> nn.Module:
    """The tests' seeded initialisation, then non-zero class tokens, positions and scales."""
    conftest._init(model, seed)
    for name, p in model.named_parameters():
        if name.endswith(("cls_token", "pos_embed", "gamma")):
            with torch.no_grad():
                p.copy_(0.5 * torch.randn_like(p))
    return model.eval()


def _corner(grid: int = 8, keep: int = KEEP) -> Tensor:
    """A ``(grid, grid)`` float mask that keeps the top-left ``keep x keep`` positions."""
    mask = torch.zeros(grid, grid)
    mask[:keep, :keep] = 1.0
    return mask


class Mask(nn.Module):
    """Multiply by a fixed 0/1 mask over the spatial grid: the planted dependence.

    ``layout`` says where the grid axes are: ``"nchw"``, ``"nhwc"``, or ``"tokens"`` for
    ``(N, 1 + h*w, D)`` with a class token (kept).
    """

    def __init__(self, mask: Tensor, layout: str) -> None:
        super().__init__()
        self.layout = layout
        if layout == "nchw":
            shaped = mask[None, None]
        elif layout == "nhwc":
            shaped = mask[None, :, :, None]
        else:
            shaped = torch.cat([torch.ones(1), mask.flatten()])[None, :, None]
        self.register_buffer("mask", shaped)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask


# -- convolutional networks ----------------------------------------------------------------


class PlainCNN(nn.Module):
    """VGG-style: conv / in-place ReLU / max-pool blocks, flatten, an MLP head (no GAP).

    Exercises the plain case; CAM does not apply (no global average pooling).
    """

    def __init__(self, classes: int = CLASSES, planted: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        # The receptive field of feature (i, j) is pixels 4i-3 .. 4i+6: rows and columns 0..2
        # of the 8x8 grid see the top-left quadrant only.
        self.plant = Mask(_corner(), "nchw") if planted else None
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU(inplace=True), nn.Linear(32, classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        if self.plant is not None:
            x = self.plant(x)
        return self.classifier(x)


class BasicBlock(nn.Module):
    """A ResNet basic block whose single ``nn.ReLU`` module runs twice."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class ResNetBN(nn.Module):
    """ResNet-style: BatchNorm, residual adds, a reused ``nn.ReLU`` module, GAP + linear head.

    Exercises module reuse (``layer_calls``), in-place ReLU after an add, and CAM's exact
    GAP + linear pattern.
    """

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(8)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16))
        self.layer2 = BasicBlock(16)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.relu(self.down(x))
        x = self.layer2(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class DenseBlock(nn.Module):
    """DenseNet block: each layer sees ``torch.cat`` of all earlier feature maps."""

    def __init__(self, channels: int, growth: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.BatchNorm2d(channels + i * growth),
                nn.ReLU(inplace=True),
                nn.Conv2d(channels + i * growth, growth, 3, padding=1, bias=False),
            )
            for i in range(layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class DenseNetish(nn.Module):
    """DenseNet-style: ``torch.cat`` concatenation, transitions, a final functional in-place ReLU.

    As in torchvision, ``forward`` applies ``F.relu(features, inplace=True)`` to the output of
    the ``features`` Sequential (ending in ``norm5``) before pooling: the default CAM layer is
    modified in place after it ran.
    """

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            DenseBlock(8, 4, 2),
            nn.Sequential(  # transition
                nn.BatchNorm2d(16),
                nn.ReLU(inplace=True),
                nn.Conv2d(16, 8, 1, bias=False),
                nn.AvgPool2d(2),
            ),
            DenseBlock(8, 4, 2),
            nn.BatchNorm2d(16),  # norm5
        )
        self.classifier = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.features(x), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class Mixed(nn.Module):
    """Inception module: parallel 1x1, 3x3, 5x5 and pool branches, concatenated."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBNReLU(cin, 4, 1)
        self.branch3x3 = nn.Sequential(ConvBNReLU(cin, 4, 1), ConvBNReLU(4, 4, 3))
        self.branch5x5 = nn.Sequential(ConvBNReLU(cin, 2, 1), ConvBNReLU(2, 4, 5))
        self.branch_pool = ConvBNReLU(cin, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        pool = F.avg_pool2d(x, 3, stride=1, padding=1)
        return torch.cat(
            [self.branch1x1(x), self.branch3x3(x), self.branch5x5(x), self.branch_pool(pool)], 1
        )


class Inceptionish(nn.Module):
    """Inception-style: parallel branches concatenated, max-pool between modules, GAP + linear.

    Exercises a default layer that is a module returning a concatenation, and dropout.
    """

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        self.stem = ConvBNReLU(3, 8, 3, stride=2)
        self.mixed_a = Mixed(8)
        self.pool = nn.MaxPool2d(2)
        self.mixed_b = Mixed(16)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mixed_b(self.pool(self.mixed_a(self.stem(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.dropout(x))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: a sigmoid gate per channel from the pooled features."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expand, 3x3 depthwise, SE, 1x1 project, optional residual."""

    def __init__(self, cin: int, hidden: int, cout: int, stride: int, act: type[nn.Module]):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden))
        self.act1 = act()
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
        )
        self.act2 = act()
        self.se = SqueezeExcite(hidden, max(4, hidden // 4))
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.expand(x))
        out = self.se(self.act2(self.depthwise(out)))
        out = self.project(out)
        return out + x if self.residual else out


class MobileNetish(nn.Module):
    """MobileNetV3-style: depthwise convs, squeeze-and-excitation, ReLU6 and Hardswish.

    Exercises clipped rectifiers (ReLU6), non-rectifier activations (Hardswish, sigmoid
    gates), and (N, K, 1, 1) maps inside SE that are no spatial layer.
    """

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardswish()
        )
        self.blocks = nn.Sequential(
            InvertedResidual(8, 16, 8, 1, nn.ReLU6),
            InvertedResidual(8, 24, 16, 2, nn.Hardswish),
        )
        self.head = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.head_act = nn.Hardswish()
        self.classifier = nn.Linear(32, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head_act(self.head(self.blocks(self.stem(x))))
        return self.classifier(x.mean((2, 3)))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map, done channels-last with ``permute``."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7, channels-last LayerNorm, GELU MLP, layer scale."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        out = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        out = self.pwconv2(self.act(self.pwconv1(self.norm(out))))
        return x + (self.gamma * out).permute(0, 3, 1, 2)


class ConvNeXtish(nn.Module):
    """ConvNeXt-style: 4x4 patchify stem, depthwise 7x7, LayerNorm via permute, GELU only.

    No rectifier anywhere, and (N, H, W, 4C) channels-last tensors inside every block.
    The planted variant masks the stem output and the last feature map.
    """

    def __init__(self, classes: int = CLASSES, planted: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), LayerNorm2d(16))
        self.early = Mask(_corner(), "nchw") if planted else None
        self.stages = nn.Sequential(ConvNeXtBlock(16), ConvNeXtBlock(16))
        self.plant = Mask(_corner(), "nchw") if planted else None
        self.head_norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        if self.early is not None:
            x = self.early(x)
        x = self.stages(x)
        if self.plant is not None:
            x = self.plant(x)
        return self.head(self.head_norm(x.mean((2, 3))))


# -- transformers ----------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with q/k/v Linears and a per-head ``k_norm``.

    ``k_norm`` is a LayerNorm on ``(B, heads, tokens, head_dim)``: a 4-D tensor with the
    batch first that is no spatial feature map.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.k_norm = nn.LayerNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.split(self.q(x)), self.k_norm(self.split(self.k(x))), self.split(self.v(x))
        attn = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).flatten(2)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block on tokens ``(N, T, D)``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTish(nn.Module):
    """ViT-style: 4x4 patch embedding, class token, positional embedding, 2 blocks, GELU only.

    Tokens are ``(N, 1 + 8*8, 32)``; the head reads the class token. Exercises token layers
    (no (N, K, h, w) map after the patch embedding), the 4-D ``k_norm`` output that must never
    be taken for a feature map, and the absence of rectifiers. The planted variant masks the
    patch tokens after the embedding and after the final norm, and averages the patch tokens
    (as timm's ``global_pool="avg"``) so that the last token layer carries the score.
    """

    def __init__(self, classes: int = CLASSES, planted: bool = False) -> None:
        super().__init__()
        dim, self.grid = 32, SIZE // 4
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        self.early = Mask(_corner(self.grid), "tokens") if planted else None
        self.blocks = nn.Sequential(Block(dim, 4), Block(dim, 4))
        self.norm = nn.LayerNorm(dim)
        self.plant = Mask(_corner(self.grid), "tokens") if planted else None
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, h*w, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        if self.early is not None:
            x = self.early(x)
        x = self.norm(self.blocks(x))
        if self.plant is not None:
            return self.head(self.plant(x)[:, 1:].mean(1))
        return self.head(x[:, 0])


class WindowAttention(nn.Module):
    """Self-attention inside non-overlapping ``window x window`` windows of an NHWC map."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.attn = Attention(dim, heads)

    def forward(self, x: Tensor) -> Tensor:
        n, h, w, c = x.shape
        s = self.window
        windows = x.view(n, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5)
        out = self.attn(windows.reshape(-1, s * s, c))
        out = out.view(n, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5)
        return out.reshape(n, h, w, c)


class SwinBlock(nn.Module):
    """Swin block on ``(N, H, W, C)``: window attention and a GELU MLP, both pre-norm."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbedNHWC(nn.Module):
    """4x4 patch embedding returning channels-last ``(N, h, w, C)``, as timm's Swin does."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 4, stride=4)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class Swinish(nn.Module):
    """Swin-style: every layer after the patch embedding keeps ``(N, H, W, C)`` channels-last.

    4x4 windows on the 8x8 grid (each window sees one image quadrant), GELU only, a final
    ``norm`` returning ``(N, h, w, C)``, then the mean over ``h, w`` and a linear head.
    Exercises 4-D channels-last maps that read as (N, K, h, w) would be silently wrong. The
    planted variant masks the output of ``norm``; windows already keep the top-left window
    independent of the rest of the image.
    """

    def __init__(self, classes: int = CLASSES, planted: bool = False) -> None:
        super().__init__()
        dim = 16
        self.patch_embed = PatchEmbedNHWC(dim)
        self.layers = nn.Sequential(SwinBlock(dim, 2, 4), SwinBlock(dim, 2, 4))
        self.norm = nn.LayerNorm(dim)
        self.plant = Mask(_corner(), "nhwc") if planted else None
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.layers(self.patch_embed(x)))
        if self.plant is not None:
            x = self.plant(x)
        return self.head(x.mean((1, 2)))


# -- other input / output structures -----------------------------------------------------------


class TwoInput(nn.Module):
    """VQA-style: ``forward(image, question)``, an ``(N, 12)`` question embedding gating the map.

    The fused map ``relu(features * gate(question))`` is averaged and classified (GAP +
    linear). Exercises extra forward arguments (``forward_args=``) that must follow the image
    through batching, noise samples, integration steps and masked inputs.
    """

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
        )
        self.question = nn.Linear(QUESTION, 16)
        self.fuse = nn.ReLU()
        self.answer = nn.Linear(16, classes)

    def forward(self, image: Tensor, question: Tensor) -> Tensor:
        gate = torch.sigmoid(self.question(question))[:, :, None, None]
        fused = self.fuse(self.features(image) * gate)
        return self.answer(fused.mean((2, 3)))


class DenseOutput(nn.Module):
    """Segmentation-style: output ``(N, 3, H, W)``, upsampled with ``F.interpolate`` at the end.

    Needs a callable target (``salience.targets.mask_target``). The upsampling is
    functional, so the last module output is the low-resolution class map.
    """

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Conv2d(16, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.classifier(self.encoder(x))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


# -- registry ------------------------------------------------------------------------------------


ZOO: dict[str, Callable[[], nn.Module]] = {
    "PlainCNN": lambda: _init(PlainCNN(), 0),
    "ResNetBN": lambda: _init(ResNetBN(), 1),
    "DenseNetish": lambda: _init(DenseNetish(), 2),
    "Inceptionish": lambda: _init(Inceptionish(), 3),
    "MobileNetish": lambda: _init(MobileNetish(), 4),
    "ConvNeXtish": lambda: _init(ConvNeXtish(), 5),
    "ViTish": lambda: _init(ViTish(), 6),
    "Swinish": lambda: _init(Swinish(), 7),
    "TwoInput": lambda: _init(TwoInput(), 8),
    "DenseOutput": lambda: _init(DenseOutput(), 9),
}
"""Every zoo model by family name: a factory building it seeded and in eval mode."""


def _shift_norm(model: nn.Module) -> nn.Module:
    """Shift the final LayerNorm's bias up: mostly positive features, as after a ReLU.

    Score-CAM weighs channels with positive probabilities; on signed LayerNorm features the
    weighted sum can be negative everywhere, an empty map that would say nothing.
    """
    with torch.no_grad():
        model.get_submodule("norm").bias.add_(1.0)
    return model


PLANTED: dict[str, Callable[[], nn.Module]] = {
    "PlainCNN": lambda: _init(PlainCNN(planted=True), 10),
    "ConvNeXtish": lambda: _init(ConvNeXtish(planted=True), 11),
    "ViTish": lambda: _shift_norm(_init(ViTish(planted=True), 12)),
    "Swinish": lambda: _shift_norm(_init(Swinish(planted=True), 13)),
}
"""Planted-dependence variants: every logit depends on the top-left image quadrant only."""


def _grid_of_tokens(t: Tensor) -> Tensor:
    g = SIZE // 4
    return t[:, 1:].unflatten(1, (g, g)).permute(0, 3, 1, 2)


def _channels_first(t: Tensor) -> Tensor:
    return t.permute(0, 3, 1, 2)


CAM_LAYER: dict[str, tuple[str, Callable[[Tensor], Tensor]]] = {
    "ViTish": ("norm", _grid_of_tokens),
    "Swinish": ("norm", _channels_first),
}
"""An explicit ``(layer, reshape)`` for CAM methods on the transformers.

The planted variants' last layer before the head is ``"plant"``, with the same reshape.
"""


class Case(NamedTuple):
    """A zoo model ready to explain: ``explain(model, inputs, target=..., forward_args=...)``."""

    model: nn.Module
    inputs: Tensor
    forward_args: tuple[Any, ...]
    target: Any


def _inputs(batch: int, seed: int) -> Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def build(name: str, batch: int = 2) -> Case:
    """Return the zoo model ``name`` with ``batch`` inputs, extra forward arguments and target.

    The target is one class per sample (``[3, 7, 1, ...]``), or ``mask_target(1)`` for the
    dense-output model; ``forward_args`` is ``(question,)`` for :class:`TwoInput`, else empty.
    """
    from salience.targets import mask_target

    model = ZOO[name]()
    inputs = _inputs(batch, 100 + list(ZOO).index(name))
    forward_args: tuple[Any, ...] = ()
    if name == "TwoInput":
        question = torch.randn(batch, QUESTION, generator=torch.Generator().manual_seed(99))
        forward_args = (question,)
    target: Any = [(3 + 4 * i) % CLASSES for i in range(batch)]
    if name == "DenseOutput":
        target = mask_target(1)
    return Case(model, inputs, forward_args, target)


def quadrant_mask() -> Tensor:
    """The ``(H, W)`` boolean mask of the top-left image quadrant."""
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[: SIZE // 2, : SIZE // 2] = True
    return mask


def planted(name: str, batch: int = 2) -> tuple[nn.Module, Tensor, Tensor]:
    """Return ``(model, inputs, quadrant_mask)`` of the planted-dependence variant ``name``.

    Every logit of the model depends on the pixels under ``quadrant_mask`` only, and its last
    layer before the head is zero outside that quadrant.
    """
    return PLANTED[name](), _inputs(batch, 200 + list(PLANTED).index(name)), quadrant_mask()
