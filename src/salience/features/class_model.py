r"""Feature visualization: what a class looks like to the network.

:func:`class_model` is the class model visualization of Simonyan et al. (2013, §2): the image
that maximizes the class score :math:`S_c`, regularized by its L2 norm,

.. math:: I^* = \arg\max_I \; S_c(I) - \lambda \lVert I \rVert_2^2,

found by gradient ascent from the zero image (the mean image of the training data, in the
model's normalized input space). As in Yosinski et al. (2015), three image priors make the
result legible: random jitter (a translation of the image before each step), an occasional
Gaussian blur, and clipping to the range the preprocessing can produce.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._checks import check_model, check_positive_int
from .._io import Progress
from ..methods.integrated import gaussian_blur

__all__ = ["class_model"]


def _input_range(
    model: nn.Module, input_range: tuple[float, float] | None
) -> tuple[Tensor, Tensor] | None:
    if input_range is not None:
        lo, hi = float(input_range[0]), float(input_range[1])
        if not lo < hi:
            raise ValueError(f"input_range must be (low, high) with low < high, got {input_range}")
        return torch.tensor(lo).view(1, 1, 1, 1), torch.tensor(hi).view(1, 1, 1, 1)
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    if mean is None or std is None:
        return None
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (0.0 - m) / s, (1.0 - m) / s


def _size(model: nn.Module, size: int | Sequence[int] | None) -> tuple[int, int]:
    if size is None:
        size = getattr(model, "input_size", 224)
    if isinstance(size, int):
        return size, size
    height, width = (int(v) for v in size)
    return height, width


def class_model(
    model: nn.Module,
    class_index: int,
    *,
    steps: int = 200,
    lr: float = 0.05,
    l2: float = 1e-4,
    jitter: int = 8,
    blur_every: int = 4,
    blur_sigma: float = 0.5,
    size: int | Sequence[int] | None = None,
    channels: int = 3,
    input_range: tuple[float, float] | None = None,
    seed: int = 0,
    progress: bool | None = False,
) -> Tensor:
    r"""Class model visualization (Simonyan et al. 2013, §2) by regularized gradient ascent.

    Starting from the zero image, each step

    1. shifts the image by a random offset of up to ``jitter`` pixels (``torch.roll``),
    2. takes the gradient of :math:`S_c(I) - \lambda \lVert I\rVert_2^2` with respect to the
       image (the unnormalized class score, the logit, as in the paper),
    3. moves the image along it by ``lr`` times the gradient divided by its mean magnitude,
       so that ``lr`` is a step in input units whatever the scale of the scores,
    4. every ``blur_every`` steps blurs the image (Gaussian, ``blur_sigma`` pixels), and
    5. clips it to the range the preprocessing can produce.

    The model is not changed: gradients are taken with ``torch.autograd.grad`` with respect to
    the image only, and the train/eval flag is left as it is (use eval mode).

    Args:
        model: A classifier taking ``(1, channels, H, W)`` inputs and returning
            ``(1, classes)`` scores.
        class_index: The class to visualize.
        steps: Number of gradient-ascent steps.
        lr: Step size, in units of the (normalized) input.
        l2: The L2 weight :math:`\lambda` of the objective.
        jitter: Largest random shift in pixels; 0 disables it.
        blur_every: Blur every this many steps; 0 disables blurring.
        blur_sigma: Standard deviation of the blur, in pixels.
        size: ``(H, W)`` or an int; default ``model.input_size``, else 224.
        channels: Input channels.
        input_range: ``(low, high)`` bounds of the input; by default derived from
            ``model.mean`` and ``model.std`` (pixels in ``[0, 1]`` normalized), and no clipping
            for models without them.
        seed: Seed of the jitter.
        progress: Show a progress bar on stderr: ``True``, ``False``, or ``None`` to show it
            only on a terminal.

    Returns:
        The optimized image, ``(1, channels, H, W)``, in the model's input space, on the
        model's device (``model.to_image`` turns it into pixels).

    Raises:
        ValueError: Bad arguments, or a model output that is not ``(1, classes)``.

    References:
        Simonyan, Vedaldi, Zisserman. Deep Inside Convolutional Networks: Visualising Image
        Classification Models and Saliency Maps. ICLR Workshop 2014, arXiv:1312.6034.
        Yosinski, Clune, Nguyen, Fuchs, Lipson. Understanding Neural Networks Through Deep
        Visualization. ICML Deep Learning Workshop 2015, arXiv:1506.06579.
    """
    check_model(model)
    check_positive_int("steps", steps)
    check_positive_int("channels", channels)
    if isinstance(class_index, bool) or not isinstance(class_index, int):
        raise TypeError(f"class_index must be an int, got {type(class_index).__name__}")
    for name, value in (("lr", lr), ("blur_sigma", blur_sigma)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if l2 < 0:
        raise ValueError(f"l2 must be non-negative, got {l2}")
    for name, count in (("jitter", jitter), ("blur_every", blur_every)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {count!r}")
    height, width = _size(model, size)
    param = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    bounds = _input_range(model, input_range)
    if bounds is not None:
        bounds = (bounds[0].to(device, dtype), bounds[1].to(device, dtype))

    generator = torch.Generator().manual_seed(seed)
    image = torch.zeros((1, channels, height, width), device=device, dtype=dtype)
    with Progress(steps, f"class model {class_index}", enabled=progress) as bar:
        for step in range(steps):
            shift = (0, 0)
            if jitter:
                dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
                shift = (dy, dx)
            x = image.detach().requires_grad_(True)
            with torch.enable_grad():
                output = model(torch.roll(x, shifts=shift, dims=(2, 3)))
                if not isinstance(output, Tensor) or output.ndim != 2 or output.shape[0] != 1:
                    shape = tuple(output.shape) if isinstance(output, Tensor) else type(output)
                    raise ValueError(f"class_model needs (1, classes) model outputs, got {shape}")
                if not 0 <= class_index < output.shape[1]:
                    raise ValueError(
                        f"class_index {class_index} is out of range: the model has "
                        f"{output.shape[1]} classes"
                    )
                objective = output[0, class_index] - l2 * (x * x).sum()
                (grad,) = torch.autograd.grad(objective, x)
            with torch.no_grad():
                image = image + lr * grad / (grad.abs().mean() + 1e-12)
                if blur_every and (step + 1) % blur_every == 0 and min(height, width) > 1:
                    image = gaussian_blur(image, blur_sigma)
                if bounds is not None:
                    image = torch.maximum(torch.minimum(image, bounds[1]), bounds[0])
            bar.update()
    return image.detach()
