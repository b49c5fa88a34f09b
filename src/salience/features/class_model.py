r"""Feature visualization: what a class, a channel or a neuron looks like to the network.

:func:`class_model` is the class model visualization of Simonyan et al. (2013, §2): the image
that maximizes the class score :math:`S_c`, regularized by its L2 norm,

.. math:: I^* = \arg\max_I \; S_c(I) - \lambda \lVert I \rVert_2^2,

found by gradient ascent from the zero image (the mean image of the training data, in the
model's normalized input space). As in Yosinski et al. (2015), three image priors make the
result legible: random jitter (a translation of the image before each step), an occasional
Gaussian blur, and clipping to the range the preprocessing can produce.

The same ascent maximizes any unit (:mod:`salience.features.objectives`): the mean
activation of a channel of any layer, or one neuron. Olah et al. (2017) add two things that
are options here:

- **a decorrelated Fourier parameterisation** (``param="fourier"``): the image is the inverse
  FFT of parameters scaled by :math:`1/f` (so that all frequencies move at the same pace
  under gradient steps, not the high frequencies first), with the colours decorrelated by the
  square root of the ImageNet colour covariance and squashed into the valid pixel range by a
  sigmoid; optimized with Adam;
- **transformation robustness**: besides the jitter, a small random scale and rotation of the
  image at every step (``scale=``, ``rotate=``), so that the image must excite the unit
  whatever its exact placement.

Several objectives are optimized at once, one image each, in one batch (``objective=[...]``):
every image gets the same random transformations, so the batch is the objectives run one by
one with the same seed.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_model, check_positive_int
from .._forward import full_float32, kept_buffers
from .._io import Progress
from ..hooks import forward_hooks
from ..layers import find_layer
from ..methods.integrated import gaussian_blur
from .objectives import Objective, ObjectiveLike, to_objectives

__all__ = ["class_model"]

# Square root of the colour covariance of ImageNet pixels (Olah et al. 2017, Lucid's
# ``color_correlation_svd_sqrt``), normalized so that its largest column has unit norm.
_COLOR_SVD_SQRT = torch.tensor(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=torch.float64
)
_COLOR = _COLOR_SVD_SQRT / _COLOR_SVD_SQRT.norm(dim=0).max()
_FOURIER_SD = 0.01  # standard deviation of the initial spectrum (Lucid)
_FOURIER_MAGIC = 4.0  # Lucid's scale of the inverse FFT


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
    try:
        sides = [size, size] if isinstance(size, int) else list(size)
        height, width = (operator.index(v) for v in sides if not isinstance(v, bool))
    except (TypeError, ValueError):
        height = width = 0
    if height < 1 or width < 1:
        raise ValueError(f"size must be a positive int or (height, width) of them, got {size!r}")
    return height, width


class _Fourier:
    """The image as the inverse real FFT of a spectrum scaled by 1/frequency (Olah et al.)."""

    def __init__(
        self, n: int, channels: int, height: int, width: int, decorrelate: bool, seed: int
    ) -> None:
        fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
        fx = torch.fft.rfftfreq(width, dtype=torch.float64)[None, :]
        freqs = (fy * fy + fx * fx).sqrt()
        scale = 1.0 / freqs.clamp(min=1.0 / max(height, width))
        self.scale = (scale * math.sqrt(height * width)).float()
        self.size = (height, width)
        self.decorrelate = decorrelate
        generator = torch.Generator().manual_seed(seed)
        shape = (1, channels, height, width // 2 + 1, 2)
        # One draw for every row: the same seed gives each objective the start it gets alone.
        init = torch.randn(shape, generator=generator) * _FOURIER_SD
        self.init = init.expand(n, *shape[1:]).clone()

    def pixels(self, spectrum: Tensor) -> Tensor:
        """Pixels in ``[0, 1]``: inverse FFT, colour decorrelation, sigmoid."""
        scale = self.scale.to(spectrum.device, spectrum.dtype)
        complex_spectrum = torch.complex(spectrum[..., 0], spectrum[..., 1]) * scale
        image = torch.fft.irfft2(complex_spectrum, s=self.size) / _FOURIER_MAGIC
        if self.decorrelate:
            color = _COLOR.to(image.device, image.dtype)
            image = torch.einsum("nchw,dc->ndhw", image, color)
        return torch.sigmoid(image)


class _Adam:
    """Adam (Kingma & Ba 2015, default betas) ascending ``param`` in place, one row at a time.

    Written out rather than ``torch.optim.Adam``: elementwise, so each row of a batch moves as
    it would alone, and without the optimizer's first-call start-up cost.
    """

    def __init__(self, param: Tensor, lr: float) -> None:
        self.param, self.lr, self.t = param, lr, 0
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)

    def ascend(self, grad: Tensor, beta1: float = 0.9, beta2: float = 0.999) -> None:
        self.t += 1
        self.m.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = self.m / (1 - beta1**self.t)
        v_hat = self.v / (1 - beta2**self.t)
        self.param.data.add_(self.lr * m_hat / (v_hat.sqrt() + 1e-8))


def _transform(
    x: Tensor, shift: tuple[int, int], zoom: float, angle: float, affine: bool
) -> Tensor:
    """Shift (and with ``affine``, scale and rotate about the centre) a batch of images."""
    if not affine:
        return torch.roll(x, shifts=shift, dims=(2, 3))
    _, _, height, width = x.shape
    a = math.radians(angle)
    cos, sin = math.cos(a) / zoom, math.sin(a) / zoom
    # affine_grid maps output to input coordinates in [-1, 1]; a shift of d pixels is 2d/size.
    theta = torch.tensor(
        [
            [cos, -sin * height / width, -2.0 * shift[1] / width],
            [sin * width / height, cos, -2.0 * shift[0] / height],
        ],
        dtype=x.dtype,
        device=x.device,
    )
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)


def _objective_values(
    model: nn.Module,
    objectives: list[Objective],
    modules: list[tuple[str, nn.Module]],
    x: Tensor,
) -> Tensor:
    """Run the model on ``x`` and return each row's objective, ``(N,)``."""
    outputs: dict[str, Tensor] = {}

    def record(name: str, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not isinstance(output, Tensor):
            raise ValueError(
                f"layer {name!r} returns {type(output).__name__}, not a tensor: choose a module "
                "that returns a feature map"
            )
        outputs[name] = output  # the last call wins
        return output.clone()  # later in-place operations must not change what we read

    with forward_hooks(modules, record):
        output = model(x)
    values = []
    for row, objective in enumerate(objectives):
        if objective.layer is None:
            if not isinstance(output, Tensor) or output.ndim != 2 or output.shape[0] != len(x):
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output)
                raise ValueError(f"class objectives need (N, classes) model outputs, got {shape}")
            values.append(objective.value(output[row]))
        else:
            if objective.layer not in outputs:
                raise ValueError(
                    f"layer {objective.layer!r} did not run in the forward pass, so it has no "
                    "activation to maximize"
                )
            values.append(objective.value(outputs[objective.layer][row]))
    return torch.stack(values)


def class_model(
    model: nn.Module,
    objective: ObjectiveLike | list[ObjectiveLike],
    *,
    steps: int = 200,
    lr: float = 0.05,
    l2: float = 1e-4,
    jitter: int = 8,
    blur_every: int = 4,
    blur_sigma: float = 0.5,
    param: Literal["pixel", "fourier"] = "pixel",
    decorrelate: bool = True,
    scale: float = 0.0,
    rotate: float = 0.0,
    size: int | Sequence[int] | None = None,
    channels: int = 3,
    input_range: tuple[float, float] | None = None,
    seed: int = 0,
    progress: bool | None = False,
) -> Tensor:
    r"""Class model visualization (Simonyan et al. 2013, §2), for a class or any unit.

    Maximizes :math:`S(I) - \lambda \lVert I\rVert_2^2`, where :math:`S` is the objective: a
    class logit (an int, as in the paper), the mean activation of a channel of a layer
    (``("features.3", 5)`` or :func:`~salience.features.channel`), or one neuron
    (``("features.3", 5, (7, 7))`` or :func:`~salience.features.neuron`). Each step

    1. transforms the image: a random shift of up to ``jitter`` pixels (``torch.roll``), and
       when ``scale`` or ``rotate`` is set, a random zoom by a factor in
       :math:`[1 - s, 1 + s]` and a rotation of up to ``rotate`` degrees (bilinear, mirrored
       borders), all differentiable;
    2. takes the gradient of the objective with respect to the image (or its spectrum);
    3. with ``param="pixel"``, moves the image along it by ``lr`` times the gradient divided by
       its mean magnitude (so that ``lr`` is a step in input units whatever the scale of the
       scores), blurs every ``blur_every`` steps, and clips to the range the preprocessing can
       produce; with ``param="fourier"``, takes an Adam step of size ``lr`` on the spectrum
       (Olah et al. 2017; the sigmoid keeps pixels in range, so no blur or clipping).

    With a list of objectives, one image per objective is optimized in one batch; the random
    transformations and (for ``"fourier"``) the initial spectrum are shared, so each image is
    the one that objective gets alone with the same seed, up to float rounding (a convolution
    may round a batch of two differently from one image), which gradient ascent can amplify:
    on EfficientNet-Lite0 with ``rotate=5``, 0.2 of the [-1, 1] range after 4 steps.

    The model is not changed: gradients are taken with ``torch.autograd.grad`` with respect to
    the image only, buffers are restored, and the train/eval flag is left as it is (use eval
    mode). Layers are read with :func:`salience.hooks.forward_hooks`.

    Args:
        model: A model taking ``(N, channels, H, W)`` inputs; for class objectives it returns
            ``(N, classes)`` scores.
        objective: What to maximize: a class index, ``(layer, channel)``,
            ``(layer, channel, (y, x))``, an :class:`~salience.features.Objective`, or a list
            of these (one image each).
        steps: Number of gradient-ascent steps.
        lr: Step size: in units of the (normalized) input for ``"pixel"``, Adam's for
            ``"fourier"``.
        l2: The L2 weight :math:`\lambda` of the objective (on the image in input space).
        jitter: Largest random shift in pixels; 0 disables it.
        blur_every: Blur every this many steps; 0 disables blurring (``"pixel"`` only).
        blur_sigma: Standard deviation of the blur, in pixels.
        param: ``"pixel"`` (Simonyan et al.) or ``"fourier"`` (Olah et al.).
        decorrelate: With ``"fourier"``, decorrelate the colours (3-channel images only).
        scale: Largest relative zoom of the random scaling; 0 disables it.
        rotate: Largest random rotation in degrees; 0 disables it.
        size: ``(H, W)`` or an int; default ``model.input_size``, else 224.
        channels: Input channels.
        input_range: ``(low, high)`` bounds of the input; by default derived from
            ``model.mean`` and ``model.std`` (pixels in ``[0, 1]`` normalized). Without either,
            ``"pixel"`` does not clip and ``"fourier"`` makes pixels in ``[0, 1]``.
        seed: Seed of the random transformations and of the initial spectrum.
        progress: Show a progress bar on stderr: ``True``, ``False``, or ``None`` to show it
            only on a terminal.

    Returns:
        The optimized images, ``(N, channels, H, W)`` with one row per objective, in the
        model's input space, on the model's device (``model.to_image`` turns them into
        pixels).

    Raises:
        ValueError: Bad arguments, an unknown layer, a channel, position or class outside the
            model, or a model output that is not ``(N, classes)`` for a class objective.
        TypeError: An objective of an unknown kind (a class name: look its index up first).

    References:
        Simonyan, Vedaldi, Zisserman. Deep Inside Convolutional Networks: Visualising Image
        Classification Models and Saliency Maps. ICLR Workshop 2014, arXiv:1312.6034.
        Yosinski, Clune, Nguyen, Fuchs, Lipson. Understanding Neural Networks Through Deep
        Visualization. ICML Deep Learning Workshop 2015, arXiv:1506.06579.
        Olah, Mordvintsev, Schubert. Feature Visualization. Distill 2017,
        doi:10.23915/distill.00007.
    """
    check_model(model)
    check_positive_int("steps", steps)
    check_positive_int("channels", channels)
    objectives = to_objectives(objective)
    for name, value in (("lr", lr), ("blur_sigma", blur_sigma)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if l2 < 0:
        raise ValueError(f"l2 must be non-negative, got {l2}")
    for name, count in (("jitter", jitter), ("blur_every", blur_every)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {count!r}")
    if not 0 <= scale < 1:
        raise ValueError(f"scale must be in [0, 1), got {scale}")
    if not 0 <= rotate <= 180:
        raise ValueError(f"rotate must be in [0, 180] degrees, got {rotate}")
    if param not in ("pixel", "fourier"):
        raise ValueError(f"unknown param {param!r}; expected 'pixel' or 'fourier'")
    if param == "fourier" and decorrelate and channels != 3:
        raise ValueError(
            f"decorrelate=True decorrelates RGB colours, but the images have {channels} "
            "channels: pass decorrelate=False"
        )
    modules = []
    if isinstance(model, nn.Module):
        names = sorted({o.layer for o in objectives if o.layer is not None})
        modules = [find_layer(model, name) for name in names]
    elif any(o.layer is not None for o in objectives):
        raise TypeError("layer objectives need an nn.Module model (to read its layers)")

    height, width = _size(model, size)
    n = len(objectives)
    param_t = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    device = param_t.device if param_t is not None else torch.device("cpu")
    dtype = param_t.dtype if param_t is not None and param_t.is_floating_point() else torch.float32
    bounds = _input_range(model, input_range)
    if bounds is not None:
        bounds = (bounds[0].to(device, dtype), bounds[1].to(device, dtype))
    affine = bool(scale or rotate)

    generator = torch.Generator().manual_seed(seed)
    fourier: _Fourier | None = None
    if param == "fourier":
        fourier = _Fourier(n, channels, height, width, decorrelate, seed)
        spectrum = fourier.init.to(device, dtype).requires_grad_(True)
        adam = _Adam(spectrum, lr)
        lo, hi = (0.0, 1.0) if bounds is None else bounds

        def image_of(spec: Tensor) -> Tensor:
            return lo + (hi - lo) * fourier.pixels(spec)  # type: ignore[union-attr]

    image = torch.zeros((n, channels, height, width), device=device, dtype=dtype)
    label = ", ".join(o.label for o in objectives[:3]) + (", ..." if n > 3 else "")
    with (
        full_float32(),
        kept_buffers(model),
        Progress(steps, f"class model {label}", enabled=progress) as bar,
    ):
        for step in range(steps):
            shift = (0, 0)
            if jitter:
                dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
                shift = (dy, dx)
            zoom, angle = 1.0, 0.0
            if scale:
                zoom += (2 * torch.rand((), generator=generator).item() - 1) * scale
            if rotate:
                angle = (2 * torch.rand((), generator=generator).item() - 1) * rotate
            with torch.enable_grad():
                if fourier is not None:
                    leaf = spectrum
                    x = image_of(spectrum)
                else:
                    leaf = x = image.detach().requires_grad_(True)
                values = _objective_values(
                    model, objectives, modules, _transform(x, shift, zoom, angle, affine)
                )
                total = values.sum() - l2 * (x * x).sum()
                (grad,) = torch.autograd.grad(total, leaf)
            with torch.no_grad():
                if fourier is not None:
                    adam.ascend(grad)
                else:
                    magnitude = grad.abs().mean(dim=(1, 2, 3), keepdim=True)
                    image = image + lr * grad / (magnitude + 1e-12)
                    if blur_every and (step + 1) % blur_every == 0 and min(height, width) > 1:
                        image = gaussian_blur(image, blur_sigma)
                    if bounds is not None:
                        image = torch.maximum(torch.minimum(image, bounds[1]), bounds[0])
            bar.update()
    if fourier is not None:
        with torch.no_grad():
            image = image_of(spectrum)
    return image.detach()
