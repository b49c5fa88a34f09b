"""Judging saliency maps: whether a map follows the model, and whether it points at the object.

Each metric returns one figure per sample (or a curve per sample), computed in batches on the
model's device, without changing the model. Sanity checks, input invariance, fragility and the
audit report are still to come.

- :func:`deletion` and :func:`insertion`: perturb pixels in the order of the map and follow
  the score (Petsiuk, Das and Saenko, RISE, BMVC 2018).
- :func:`box_from_map`, :func:`iou`, :func:`localization_error`, :func:`pointing_game` and
  :func:`pointing_energy`: whether a map points at the object (CAM, Zhou et al. 2016; the
  pointing game, Zhang et al. 2016; its energy variant, Score-CAM, Wang et al. 2020).
"""

from __future__ import annotations

from .audit import Audit, MethodAudit, audit
from .faithfulness import PerturbationCurve, Substrate, deletion, insertion
from .localization import box_from_map, iou, localization_error, pointing_energy, pointing_game

__all__ = [
    "Audit",
    "MethodAudit",
    "PerturbationCurve",
    "Substrate",
    "audit",
    "box_from_map",
    "deletion",
    "insertion",
    "iou",
    "localization_error",
    "pointing_energy",
    "pointing_game",
]
