r"""What a feature visualization maximizes: a class score, a channel, or one neuron.

An objective reads one row of the model output or of a layer output and returns the scalar
to maximize for that row:

- :func:`class_logit` ``(c)``: the unnormalized class score :math:`S_c` (Simonyan et al.
  2013);
- :func:`channel` ``(layer, c)``: the mean activation of channel ``c`` of ``layer`` over its
  spatial positions (Olah et al. 2017, "channel" objective);
- :func:`neuron` ``(layer, c, (y, x))``: one activation, channel ``c`` at position
  ``(y, x)`` of ``layer`` (the centre when the position is omitted).

Layers are dotted names of ``model.named_modules()``, read through
:func:`salience.hooks.forward_hooks`, as ``(N, C, h, w)`` maps or ``(N, C)`` features (for
which channel and neuron are the same feature); a 4-D output is read channels-first, as
PyTorch convolutions write it (a channels-last layer, such as a ConvNeXt or Swin block, would
be misread: choose a convolution). A module that runs several times in one forward pass is
read at its last call.

Shortcuts accepted wherever an objective is: an ``int`` is a class, ``(layer, c)`` a channel
and ``(layer, c, (y, x))`` a neuron.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

from torch import Tensor

__all__ = ["Objective", "ObjectiveLike", "channel", "class_logit", "neuron", "to_objective"]


@dataclass(frozen=True)
class Objective:
    """One quantity to maximize: a class logit (``layer is None``), a channel or a neuron.

    Attributes:
        layer: Dotted module name, or ``None`` for the model output.
        index: Class index (model output) or channel index (layer).
        position: ``(y, x)`` of one neuron; ``None`` for a class or a channel mean;
            ``"center"`` for the neuron at the centre of the map.
    """

    layer: str | None
    index: int
    position: tuple[int, int] | str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.index, bool) or not isinstance(self.index, int):
            raise TypeError(f"an objective's index must be an int, got {self.index!r}")
        if self.index < 0:
            raise ValueError(f"an objective's index must be non-negative, got {self.index}")
        if self.layer is not None and (not isinstance(self.layer, str) or not self.layer):
            raise TypeError(f"an objective's layer must be a module name, got {self.layer!r}")
        if self.layer is None and self.position is not None:
            raise ValueError("a class objective has no position")
        position = self.position
        if position is not None and position != "center":
            if (
                not isinstance(position, tuple | list)
                or len(position) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in position)
            ):
                raise TypeError(f"a neuron position must be (y, x) ints, got {position!r}")
            object.__setattr__(self, "position", (int(position[0]), int(position[1])))

    @property
    def label(self) -> str:
        """Short description, e.g. ``class 3``, ``features.3:5`` or ``features.3:5@(7, 7)``."""
        if self.layer is None:
            return f"class {self.index}"
        if self.position is None:
            return f"{self.layer}:{self.index}"
        return f"{self.layer}:{self.index}@{self.position}"

    def value(self, values: Tensor) -> Tensor:
        """Return the objective of one row: ``values``, that row of the model or layer output.

        Raises:
            ValueError: the index or position is outside the output, or the output has a
                shape the objective cannot read.
        """
        where = "the model output" if self.layer is None else f"layer {self.layer!r}"
        if self.layer is None:
            if values.ndim != 1:
                raise ValueError(
                    f"a class objective needs (N, classes) model outputs, got a row of shape "
                    f"{tuple(values.shape)}"
                )
            if self.index >= values.shape[0]:
                raise ValueError(
                    f"class_index {self.index} is out of range: the model has "
                    f"{values.shape[0]} classes"
                )
            return values[self.index]
        if values.ndim not in (1, 3):
            raise ValueError(
                f"{where} gives rows of shape {tuple(values.shape)}; channel and neuron "
                "objectives read (N, C, h, w) maps or (N, C) features"
            )
        if self.index >= values.shape[0]:
            raise ValueError(
                f"channel {self.index} is out of range: {where} has {values.shape[0]} channels"
            )
        plane = values[self.index]
        if values.ndim == 1:
            return plane
        if self.position is None:
            return plane.mean()
        h, w = plane.shape
        position = self.position
        y, x = (h // 2, w // 2) if isinstance(position, str) else position  # str: "center"
        if not (0 <= y < h and 0 <= x < w):
            raise ValueError(f"neuron position {(y, x)} is outside the {h}×{w} map of {where}")
        return plane[y, x]


ObjectiveLike: TypeAlias = (
    "Objective | int | tuple[str, int] | tuple[str, int, tuple[int, int] | str]"
)


def class_logit(index: int) -> Objective:
    """Maximize the logit of class ``index`` (Simonyan et al. 2013: the unnormalized score)."""
    return Objective(None, index)


def channel(layer: str, index: int) -> Objective:
    """Maximize the mean over positions of channel ``index`` of ``layer`` (Olah et al. 2017)."""
    return Objective(layer, index)


def neuron(layer: str, index: int, position: tuple[int, int] | str = "center") -> Objective:
    """Maximize channel ``index`` of ``layer`` at ``position`` ``(y, x)`` or ``"center"``."""
    return Objective(layer, index, position)


def to_objective(value: ObjectiveLike) -> Objective:
    """Turn an int, a ``(layer, channel[, (y, x)])`` tuple or an :class:`Objective` into one.

    Raises:
        TypeError: anything else, e.g. a class name (resolve it to an index first).
    """
    if isinstance(value, Objective):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return class_logit(value)
    if isinstance(value, tuple) and len(value) in (2, 3) and isinstance(value[0], str):
        if len(value) == 2:
            return channel(value[0], value[1])
        return neuron(value[0], value[1], value[2])
    raise TypeError(
        "an objective must be a class index (int), (layer, channel), (layer, channel, (y, x)) "
        f"or a salience.features.class_logit/channel/neuron object, got {value!r}"
    )


def to_objectives(value: ObjectiveLike | Sequence[ObjectiveLike]) -> list[Objective]:
    """One objective, or a list of them (one image each, optimized in one batch)."""
    if isinstance(value, list):
        if not value:
            raise ValueError("the list of objectives is empty")
        return [to_objective(v) for v in value]
    return [to_objective(value)]  # type: ignore[arg-type]
