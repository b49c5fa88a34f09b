"""The attribution methods, one module per family; importing a module registers its methods.

- :mod:`.gradient`: gradient, gradient × input, DeconvNet, guided backprop, SmoothGrad;
- :mod:`.integrated`: Integrated Gradients;
- :mod:`.deeplift`: DeepLIFT (Rescale, RevealCancel);
- :mod:`.cam`: CAM, Grad-CAM, Guided Grad-CAM, Grad-CAM++, LayerCAM;
- :mod:`.score_cam`: Score-CAM;
- :mod:`.perturbation`: occlusion, RISE.

Users call them as ``salience.<method>`` or through :func:`salience.explain`.
"""

from __future__ import annotations

from .cam import cam, grad_cam, grad_cam_plus_plus, guided_grad_cam, layer_cam
from .gradient import deconvnet, gradient, guided_backprop, input_x_gradient, smoothgrad
from .score_cam import score_cam

# isort: split
# Methods are listed (by the registry and the CLI) in the order they register: gradient methods
# (imported by .cam), CAMs, Score-CAM, then Integrated Gradients, then the others.
from .integrated import integrated_gradients

# isort: split
from .deeplift import deeplift
from .lrp import lrp
from .perturbation import occlusion, rise

__all__ = [
    "cam",
    "deconvnet",
    "deeplift",
    "grad_cam",
    "grad_cam_plus_plus",
    "gradient",
    "guided_backprop",
    "guided_grad_cam",
    "input_x_gradient",
    "integrated_gradients",
    "layer_cam",
    "lrp",
    "occlusion",
    "rise",
    "score_cam",
    "smoothgrad",
]
