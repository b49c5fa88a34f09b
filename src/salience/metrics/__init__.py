"""Judging saliency maps: whether a map follows the model, and whether it points at the object.

Each metric returns one figure per sample (or a curve per sample), computed in batches on the
model's device, without changing the model; :func:`audit` turns them into a scorecard.

- :func:`deletion` and :func:`insertion`: perturb pixels in the order of the map and follow
  the score (Petsiuk, Das and Saenko, RISE, BMVC 2018).
- :func:`box_from_map`, :func:`iou`, :func:`localization_error`, :func:`pointing_game` and
  :func:`pointing_energy`: whether a map points at the object (CAM, Zhou et al. 2016; the
  pointing game, Zhang et al. 2016; its energy variant, Score-CAM, Wang et al. 2020).
- :func:`parameter_randomization`: the sanity check of Adebayo et al. (NeurIPS 2018):
  randomize the layers of a copy of the model, from the top (cascading) or one at a time,
  and measure how similar the maps stay (Spearman, SSIM, HOG; :class:`SanityCheck`).
- :func:`input_invariance` and :func:`mean_shift_twin`: Kindermans et al. (2019): a twin
  model whose first layer absorbs a constant input shift; does each map stay the same?
- :func:`fragility` (Ghorbani et al. 2019): a label-preserving attack within an L∞ budget that
  moves the map, beside random noise of the same size; :func:`max_sensitivity` (Yeh et al.
  2019), as Quantus computes it.
- :func:`occlusion_correlation`: rank correlation of a map with the occlusion map
  (Grad-CAM, Selvaraju et al. 2017).
- :func:`evaluate`: run methods through these metrics on images with known objects, one
  row per method (:class:`EvaluationTable`, CSV/JSON/Markdown); :mod:`.synthetic` draws such
  images (shapes on clutter, with distractors) for the shipped model
  :func:`salience.models.synthetic_cnn`.
"""

from __future__ import annotations

from . import synthetic
from .audit import Audit, MethodAudit, audit
from .evaluate import EvaluationTable, evaluate
from .faithfulness import PerturbationCurve, Substrate, deletion, insertion
from .fragility import Fragility, FragilityScores, fragility, top_k_intersection
from .invariance import InputInvariance, MethodInvariance, input_invariance, mean_shift_twin
from .localization import box_from_map, iou, localization_error, pointing_energy, pointing_game
from .occlusion import occlusion_correlation
from .sanity import (
    SanityCheck,
    hog_features,
    hog_similarity,
    parameter_randomization,
    plot_sanity_checks,
    randomization_layers,
    rank_correlation,
    ssim,
)
from .sensitivity import Sensitivity, max_sensitivity

__all__ = [
    "Audit",
    "EvaluationTable",
    "Fragility",
    "FragilityScores",
    "InputInvariance",
    "MethodAudit",
    "MethodInvariance",
    "PerturbationCurve",
    "SanityCheck",
    "Sensitivity",
    "Substrate",
    "audit",
    "box_from_map",
    "deletion",
    "evaluate",
    "fragility",
    "hog_features",
    "hog_similarity",
    "input_invariance",
    "insertion",
    "iou",
    "localization_error",
    "max_sensitivity",
    "mean_shift_twin",
    "occlusion_correlation",
    "parameter_randomization",
    "plot_sanity_checks",
    "pointing_energy",
    "pointing_game",
    "randomization_layers",
    "rank_correlation",
    "ssim",
    "synthetic",
    "top_k_intersection",
]
