"""salience: why an image classifier decided, and how far each map can be trusted.

Every method is a function ``method(model, inputs, target=None, **options) -> Attribution``;
:func:`explain` dispatches by registered name and :func:`available_methods` lists them.
"""

from __future__ import annotations

from . import targets
from .attribution import Attribution
from .gradient import deconvnet, gradient, guided_backprop, input_x_gradient, smoothgrad
from .integrated import integrated_gradients
from .registry import available_methods, explain, get_method
from .targets import mask_target, resolve_target

__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "__version__",
    "available_methods",
    "deconvnet",
    "explain",
    "get_method",
    "gradient",
    "guided_backprop",
    "input_x_gradient",
    "integrated_gradients",
    "mask_target",
    "resolve_target",
    "smoothgrad",
    "targets",
]
