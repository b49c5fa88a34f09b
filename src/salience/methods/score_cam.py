r"""Score-CAM (Wang et al. 2020): each channel weighted by the score of the input it masks.

Score-CAM needs no gradient: the weight of a channel is the score of the input masked by that
channel's upsampled, normalised map. It shares the rest with the other CAMs of
:mod:`salience.methods.cam`: the layer and how it is read (default layer, ``layer=``,
``reshape=``), the kernel ``Up(ReLU(sum_k w_k * A_k))``, ``(N, K)`` targets, and the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import warn
from .._chunks import BatchSize, Chunker
from .._forward import ForwardArgs, model_scope
from ..attribution import Attribution
from ..layers import LayerLike
from ..layouts import Reshape
from ..registry import register
from ..targets import Score, TargetLike
from ._cam_capture import _capture, _combine, _result, _size

__all__ = ["score_cam"]


@register("score_cam", kind="cam")
def score_cam(
    model: nn.Module,
    inputs: Tensor,
    target: TargetLike = None,
    *,
    layer: LayerLike | None = None,
    reshape: Reshape | None = None,
    relu: bool = True,
    upsample: bool = True,
    score: Score | None = None,
    batch_size: BatchSize = "auto",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
) -> Attribution:
    r"""Score-CAM (Wang et al. 2020): each channel weighted by the score of the input it masks.

    .. math:: H^k = \frac{\mathrm{Up}(A^k) - \min \mathrm{Up}(A^k)}
              {\max \mathrm{Up}(A^k) - \min \mathrm{Up}(A^k)}, \qquad
              \alpha^c_k = \mathrm{softmax}\big(f(x \odot H^k)\big)_c, \qquad
              L^c = \mathrm{ReLU}\Big(\sum_k \alpha^c_k A^k\Big)

    No gradient is used. The masked inputs run without an autograd graph, ``batch_size``
    rows per forward pass (the result does not depend on it), and the target classes of all
    ``K`` targets are read from the same passes, so ``(N, K)`` targets cost no more than one.
    Two savings are exact:

    - a channel whose map is constant has no normalised mask (0/0); it is left out, as in the
      authors' code. For the all-zero channels that follow a ReLU this changes nothing, since
      :math:`\alpha_k A^k = 0`, and it saves their forward passes;
    - channels whose maps are positive affine images of each other have the same mask, since
      :math:`s(\mathrm{Up}(aA + b)) = s(\mathrm{Up}(A))` for :math:`a > 0`. Masks are computed
      as :math:`s(\mathrm{Up}(s(A)))`, which equals :math:`s(\mathrm{Up}(A))`, and channels
      whose normalised maps :math:`s(A)` are bitwise equal share one masked input. On a sparse
      ReLU layer that is common: every channel active at one single position has the same
      mask (388 distinct masks for the 441 active head channels of EfficientNet-Lite0 on the
      cat photo).

    Definitions differ between implementations; this one follows the paper's score (the
    softmax probability of the class on the masked input, ``score="probability"``, as in the
    authors' code, ``score="logit"`` for the raw CIC score of Def. 2 without baseline) and
    combines the weights with the layer-resolution activations before the ReLU, as the paper
    writes it. pytorch-grad-cam instead takes a softmax *over channels* of the logits,
    :math:`\alpha_k = e^{y^c(x \odot H^k)}/\sum_j e^{y^c(x \odot H^j)}`, and upsamples masks
    with ``align_corners=True``; torchcam (0.5) takes the softmax over channels of the logit
    increase over a baseline, and min-max normalizes activations before upsampling them. The
    masks here are upsampled bilinearly with ``align_corners=False``, as in the authors' code.

    Args:
        model: Any network with a spatial layer (or ``reshape``); no gradients needed.
        inputs: ``(N, C, H, W)`` preprocessed images.
        target: What to explain; ``(N, K)`` for ``K`` maps per sample. A callable target is
            evaluated on each batch of ``N`` masked inputs (one per sample, in order).
        layer: See :func:`grad_cam`.
        reshape: See :func:`grad_cam`.
        relu: Apply the paper's ReLU to the map.
        upsample: Resize the map to the input size (bilinear).
        score: For class targets, ``"probability"`` (the default, ``None``), ``"logit"`` or
            ``"log_probability"``; a callable target gives its own score.
        batch_size: Masked inputs per forward pass (rounded down to a multiple of ``N``,
            at least ``N``), or ``"auto"``: from the device (see :mod:`salience._chunks`).
        forward_args: Extra arguments for the model after the image (see
            :func:`salience.gradient`).
        allow_tf32: Let CUDA use TF32 (faster, less exact); off by default.

    Returns:
        ``values`` ``(N, 1, H, W)`` or ``(N, K, H, W)``; ``extras["weights"]``: ``alpha``,
        ``(N, T, K)``; ``extras["masked_inputs"]``: the number of masked inputs evaluated.

    References:
        Wang, Wang, Du, Yang, Zhang, Ding, Mardziel, Hu. Score-CAM: Score-Weighted Visual
        Explanations for Convolutional Neural Networks. CVPR Workshops 2020,
        arXiv:1910.01279.
    """
    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as fwd:
        if score is None:
            score = (
                "logit" if callable(target) and not isinstance(target, Tensor) else "probability"
            )
        cap = _capture(fwd, inputs, target, layer=layer, reshape=reshape, score=score, grad=False)
        activation = cap.activation
        n, k = activation.shape[:2]
        size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
        chunker = Chunker(inputs, batch_size, owner=fwd.model, kind="score_cam")

        # s(Up(s(A))) = s(Up(A)) for the min-max normalisation s, since bilinear upsampling commutes
        # with positive affine maps; channels whose normalised maps s(A) are bitwise equal in every
        # sample share one masked input. Channels constant in every sample have no mask, weight 0.
        unit, varying = _min_max(activation.flatten(2), 2)  # varying: (N, K, 1)
        blank = (~varying[..., 0].any(dim=1)).nonzero().flatten().tolist()
        if blank:
            warn(
                f"score_cam: every channel of layer {cap.layer!r} is constant on sample(s) "
                f"{blank[:10]} (a blank image or a dead layer), so no channel gives a mask and "
                "their maps are zero: Score-CAM cannot tell anything about them",
            )
        channels = varying[..., 0].any(dim=0).nonzero().flatten()
        keys = unit[:, channels].transpose(0, 1).reshape(len(channels), unit[:, 0].numel())
        distinct, group = torch.unique(keys, dim=0, return_inverse=True)  # keys: (C, N * h * w)
        distinct = distinct.view(distinct.shape[0], n, 1, *activation.shape[2:])  # (U, N, 1, h, w)

        x = inputs.detach()
        samples = torch.arange(n, device=x.device)
        scores = x.new_zeros(distinct.shape[0], n, cap.scores.shape[1], dtype=activation.dtype)
        masked = 0
        with torch.inference_mode():  # no autograd: ~5 % faster than no_grad on Lite0
            # Whole copies of the batch per pass: rows r0 .. r1 are channels r0 / n .. r1 / n.
            # A pass that runs out of memory is redone (its scores are written last).
            for chunk in chunker.passes(distinct.shape[0] * n, n, even=False):
                with chunk as (r0, r1):
                    start = r0 // n
                    maps = distinct[start : r1 // n].flatten(0, 1)  # channel-major
                    if tuple(maps.shape[-2:]) != size:
                        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
                    masks, ok = _min_max(maps, (2, 3))
                    rows = samples.repeat(maps.shape[0] // n)  # whole copies of the batch
                    out = fwd(x[rows] * masks, rows)
                    part = cap.resolved.scores(out, rows).reshape(-1, n, scores.shape[2])
                    scores[start : start + part.shape[0]] = part * ok.reshape(-1, n, 1)
                    masked += rows.numel()
        weights = torch.zeros(n, k, scores.shape[2], dtype=activation.dtype, device=x.device)
        weights[:, channels] = scores[group].transpose(0, 1)
        weights = weights.transpose(1, 2)  # (N, T, K)
        values = _combine(
            weights[..., None, None], activation, relu=relu, size=_size(inputs, upsample)
        )
        extras = {"weights": weights, "masked_inputs": masked}
        return _result("score_cam", cap, values, extras, relu=relu, told=blank)


def _min_max(t: Tensor, dims: int | tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """``(t - min) / (max - min)`` over ``dims``, 0 where ``t`` is constant there; and where not."""
    low = t.amin(dim=dims, keepdim=True)
    span = t.amax(dim=dims, keepdim=True) - low
    varying = span > 0
    return torch.where(varying, (t - low) / torch.where(varying, span, 1.0), 0.0), varying
