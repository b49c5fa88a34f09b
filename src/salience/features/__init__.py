"""Seeing what a network learned.

- :func:`class_model`: the image that maximizes a class score (Simonyan et al. 2013, §2), a
  channel or a neuron of any layer (:func:`class_logit`, :func:`channel`, :func:`neuron`),
  optionally in a decorrelated Fourier basis with transformation robustness (Olah et al.
  2017);
- :func:`reconstruct`: the DeconvNet projection of one strong activation back to pixels, with
  its receptive field (Zeiler & Fergus 2013);
- :func:`top_activating`: the images and patches that excite a channel most, and
  :func:`top_grid`, the figure of patches beside their reconstructions.
"""

from __future__ import annotations

from .class_model import class_model
from .objectives import Objective, channel, class_logit, neuron
from .reconstruct import Reconstruction, receptive_field, reconstruct
from .top import TopActivating, top_activating, top_grid

__all__ = [
    "Objective",
    "Reconstruction",
    "TopActivating",
    "channel",
    "class_logit",
    "class_model",
    "neuron",
    "receptive_field",
    "reconstruct",
    "top_activating",
    "top_grid",
]
