"""salience: why an image classifier decided, and how far each map can be trusted.

Every method is a function ``method(model, inputs, target=None, **options) -> Attribution``;
:func:`explain` dispatches by registered name and :func:`available_methods` lists them.
"""

from __future__ import annotations

from . import targets
from ._performance import PerformanceSettings, get_performance, performance, set_performance
from .attribution import Attribution
from .methods import (
    cam,
    deconvnet,
    deeplift,
    grad_cam,
    grad_cam_plus_plus,
    gradient,
    guided_backprop,
    guided_grad_cam,
    input_x_gradient,
    integrated_gradients,
    layer_cam,
    lrp,
    occlusion,
    rise,
    score_cam,
    smoothgrad,
)
from .registry import available_methods, explain, get_method
from .targets import mask_target, resolve_target

__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "PerformanceSettings",
    "__version__",
    "available_methods",
    "cam",
    "deconvnet",
    "deeplift",
    "evaluate",
    "explain",
    "get_method",
    "get_performance",
    "grad_cam",
    "grad_cam_plus_plus",
    "gradient",
    "guided_backprop",
    "guided_grad_cam",
    "input_x_gradient",
    "integrated_gradients",
    "layer_cam",
    "lrp",
    "mask_target",
    "occlusion",
    "performance",
    "resolve_target",
    "rise",
    "score_cam",
    "set_performance",
    "smoothgrad",
    "targets",
]

_LAZY_SUBMODULES = {
    "batch": "batch",
    "features": "features",
    "metrics": "metrics",
    "models": "models",
    "report": "report",
    "viz": "viz",
}


def __getattr__(name: str) -> object:
    """Import ``salience.viz``, ``.features``, ``.report`` and ``.models`` on first use.

    They pull in matplotlib or model weights, which ``import salience`` does not need.
    """
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f".{_LAZY_SUBMODULES[name]}", __name__)
    if name == "evaluate":  # the benchmark runner lives with the metrics it runs
        from .metrics import evaluate

        return evaluate
    raise AttributeError(f"module 'salience' has no attribute {name!r}")
