"""The result type every method returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ._containers import map_tensors

__all__ = ["Attribution", "Reduction"]

Reduction = Literal["abs_max", "sum", "abs_sum", "mean", "none"]
"""How :meth:`Attribution.saliency` collapses the channel axis.

- ``"abs_max"``: max over channels of ``|values|`` (Simonyan et al. 2013, Eq. 10).
- ``"sum"``: signed sum over channels (gradient × input, Integrated Gradients).
- ``"abs_sum"``: sum over channels of ``|values|``.
- ``"none"``: the map already has one channel (CAM family); it is squeezed. A CAM of ``K``
  targets per sample has ``K`` channels, one map per target: :meth:`Attribution.saliency`
  refuses to merge them; take ``values[:, k]`` for target ``k``.
"""


@dataclass(frozen=True, eq=False)
class Attribution:
    """What a saliency method found, with everything needed to interpret it.

    ``values`` are raw: signed and unnormalized, on the device and in the dtype of the inputs.
    Nothing is clipped or rescaled behind your back; normalization for display lives in
    :mod:`salience.viz`.

    Attributes:
        values: The attribution. Pixel methods give the shape of ``inputs``, ``(N, C, H, W)``.
        target: ``(N,)`` long tensor of the explained classes (``(N, K)`` when a CAM method
            explained ``K`` classes per sample), or ``None`` when the target was a callable on
            the model output.
        scores: ``(N,)`` the explained score of each sample (the differentiated quantity);
            ``(N, K)`` for ``K`` targets per sample.
        method: The registered name of the method that produced the map.
        output: The model output on ``inputs`` (detached).
        extras: Method-specific diagnostics, e.g. ``"delta"`` (completeness gap) and
            ``"steps"`` for Integrated Gradients.
        reduction: How :meth:`saliency` reduces the channel axis; set from the method's paper.
        layer: For layer methods (the CAM family), the dotted name of the layer explained.
    """

    values: Tensor
    target: Tensor | None
    scores: Tensor
    method: str
    output: Tensor | Any = None
    extras: Mapping[str, Any] = field(default_factory=dict)
    reduction: Reduction = "sum"
    layer: str | None = None

    def __post_init__(self) -> None:
        # the output may keep the graph of the pass alive (tensors nested in a dict, a
        # dataclass, a named tuple): hold it detached
        object.__setattr__(self, "output", map_tensors(Tensor.detach, self.output))

    def saliency(self) -> Tensor:
        """Return the ``(N, H, W)`` map, reducing channels as the method's paper does.

        The reduction is :attr:`reduction`: Simonyan et al. take the max over channels of the
        absolute gradient; gradient × input and Integrated Gradients sum the signed
        attributions over channels, so that the map still sums to the explained score change.
        Perturbation methods (occlusion, RISE) give every channel the pixel's value: the mean
        is that value.
        """
        v = self.values
        if v.ndim < 3:
            raise ValueError(f"values of shape {tuple(v.shape)} have no spatial axes to show")
        if self.reduction == "abs_max":
            return v.abs().amax(dim=1)
        if self.reduction == "abs_sum":
            return v.abs().sum(dim=1)
        if self.reduction == "sum":
            return v.sum(dim=1)
        if self.reduction == "mean":  # occlusion, RISE: every channel holds the pixel's value
            return v.mean(dim=1)
        if v.shape[1] != 1:
            raise ValueError(
                f"these values hold {v.shape[1]} maps per sample, one per target: there is no "
                "single map to return; take values[:, k], the (N, H, W) map of target k"
            )
        return v[:, 0]

    @property
    def batch_size(self) -> int:
        """Number of samples explained."""
        return int(self.values.shape[0])

    def __getitem__(self, index: int | slice) -> Attribution:
        """Select samples: ``attribution[0]`` keeps the batch axis, as a batch of one.

        Raises:
            IndexError: an integer index outside the batch.
        """
        if isinstance(index, int):
            n = self.batch_size
            if not -n <= index < n:
                raise IndexError(f"sample {index} is out of range for a batch of {n}")
            index = index % n
            index = slice(index, index + 1)

        def pick(x: Any) -> Any:
            if isinstance(x, Tensor) and x.ndim > 0 and x.shape[0] == self.batch_size:
                return x[index]
            return x

        return Attribution(
            values=self.values[index],
            target=None if self.target is None else self.target[index],
            scores=self.scores[index],
            method=self.method,
            output=map_tensors(pick, self.output),
            extras={k: pick(v) for k, v in self.extras.items()},
            reduction=self.reduction,
            layer=self.layer,
        )

    def __repr__(self) -> str:
        target = None if self.target is None else self.target.tolist()
        shape = tuple(self.values.shape)
        extras = ", ".join(self.extras)
        return (
            f"Attribution(method={self.method!r}, values={shape}, target={target}, "
            f"layer={self.layer!r}, extras=[{extras}])"
        )

    def _repr_png_(self) -> bytes | None:
        """Return a PNG of the map(s), for Jupyter (drawn by :mod:`salience.viz`, lazily)."""
        from .viz import _repr_png

        return _repr_png(self)

    def _repr_html_(self) -> str | None:
        """Return the map(s) with a caption as HTML, for Jupyter (drawn by :mod:`salience.viz`)."""
        from .viz import _repr_html

        return _repr_html(self)

    def to(self, device: torch.device | str) -> Attribution:
        """Move every tensor of the result to ``device``."""

        def move(x: Any) -> Any:
            return x.to(device) if isinstance(x, Tensor) else x

        return Attribution(
            values=self.values.to(device),
            target=move(self.target),
            scores=self.scores.to(device),
            method=self.method,
            output=map_tensors(move, self.output),
            extras={k: move(v) for k, v in self.extras.items()},
            reduction=self.reduction,
            layer=self.layer,
        )
