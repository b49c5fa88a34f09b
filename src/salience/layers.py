"""Finding a layer of a model and recording what it computes, for the duration of one call.

Layer methods (the CAM family) need the output ``A`` of an inner layer, still attached to the
autograd graph of the score. The recorders here are context managers over
:func:`salience.hooks.forward_hooks`: hooks live for the block and for the calling thread.

A *layer* is a submodule, given as the module itself or as its dotted name in
``model.named_modules()`` (``"layer4"``, ``"features.28"``, ``"_blocks.15"``).

**A module that runs several times in one forward pass** (a ReLU module reused inside a
ResNet block, the ``_swish`` ReLU6 of EfficientNet-Lite0, which runs on the stem and on the
head) has several outputs. The layer is then explained at its **last** call: that is the output
that is closest to the prediction and, for a module reused for the final activation, the
feature map that the classifier pools. The number of calls is reported
(``Attribution.extras["layer_calls"]``) so that a reused module never goes unnoticed.

Recording never changes what the model computes: the hook hands the model an identical copy
of the layer output, so that in-place operations later in the forward pass (``ReLU(inplace=True)``
after a convolution) cannot alter the recorded activation or its place in the graph.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from .hooks import forward_hooks

__all__ = [
    "LayerLike",
    "LayerRecord",
    "Reshape",
    "SpatialRecord",
    "check_reshape",
    "find_layer",
    "record_last_spatial",
    "record_layer",
]

LayerLike: TypeAlias = "nn.Module | str"
Reshape: TypeAlias = "Callable[[Tensor], Tensor]"


def find_layer(model: nn.Module, layer: LayerLike) -> tuple[str, nn.Module]:
    """Return ``(dotted name, module)`` of ``layer`` in ``model``.

    Raises:
        ValueError: an unknown name (with the closest names as suggestions), a module that is
            not part of ``model``, or the model itself.
        TypeError: ``layer`` is neither a module nor a string.
    """
    if isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer and layer in modules:
            return layer, modules[layer]
        names = [name for name in modules if name]
        close = difflib.get_close_matches(layer, names, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        example = ", ".join(repr(name) for name in names[-3:])
        raise ValueError(
            f"the model has no layer named {layer!r}{hint} Layers are the dotted names of "
            f"model.named_modules(), e.g. {example}"
        )
    if isinstance(layer, nn.Module):
        if layer is model:
            raise ValueError("layer must be a submodule of the model, not the model itself")
        for name, module in model.named_modules():
            if module is layer and name:
                return name, module
        raise ValueError(
            f"the {type(layer).__name__} module passed as layer is not a submodule of the "
            "model (was it copied, or taken from another instance?)"
        )
    raise TypeError(
        f"layer must be an nn.Module of the model or its dotted name, got {type(layer).__name__}"
    )


@dataclass
class LayerRecord:
    """What a layer computed during a forward pass.

    Attributes:
        name: Dotted name of the layer.
        calls: How many times the layer ran.
        output: Its output at the last call (in the autograd graph when gradients were on).
    """

    name: str
    calls: int = 0
    output: Tensor | None = None
    _version: int = field(default=0, repr=False)

    def activation(self) -> Tensor:
        """Return the last output, after checking that it is still what the layer computed.

        Raises:
            ValueError: the layer never ran in the forward pass.
            RuntimeError: the forward pass modified the recorded tensor in place afterwards.
        """
        if self.calls == 0 or self.output is None:
            raise ValueError(
                f"layer {self.name!r} did not run in the forward pass of the model, so it has "
                "no activation to explain; pick a layer that forward() calls"
            )
        if self.output._version != self._version:
            raise RuntimeError(
                f"the output of layer {self.name!r} was modified in place later in the forward "
                "pass, so its recorded value is no longer what the layer computed; pick the "
                "layer after the in-place operation"
            )
        return self.output

    def _store(self, output: Tensor) -> None:
        self.calls += 1
        self.output = output
        self._version = output._version


@contextlib.contextmanager
def record_layer(module: nn.Module, name: str) -> Iterator[LayerRecord]:
    """Record the output of ``module`` (named ``name``) while the block runs.

    The output of the last call is kept; the model continues with a copy of it, so that its own
    in-place operations leave the recorded tensor intact.

    Raises:
        TypeError: inside the forward pass, when the layer returns something other than a
            tensor.
    """
    record = LayerRecord(name)

    def hook(_name: str, _module: nn.Module, _args: Any, output: Any) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"layer {name!r} returned a {type(output).__name__}, not a tensor; pick a layer "
                "that returns a feature map tensor"
            )
        record._store(output)
        return output.clone()

    with forward_hooks([(name, module)], hook):
        yield record


@dataclass
class SpatialRecord:
    """The spatial feature maps a forward pass produced, in the order the modules returned.

    Only the last two distinct tensors are held (with every module name that returned them):
    the answer is the last one unless it is the model output, and holding every map would keep
    the activations of a whole network alive.
    """

    batch: int
    found: list[tuple[str, Tensor, int]] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)

    def _add(self, name: str, output: Tensor) -> None:
        if self.found and self.found[-1][1] is not output:
            previous = self.found[-1][1]
            self.found = [entry for entry in self.found if entry[1] is previous]
        self.found.append((name, output, output._version))

    def last(self, model_output: object) -> LayerRecord:
        """Return the last spatial map that is not the model output itself.

        A container returns after its children, so for a ``Sequential`` or a ResNet stage the
        container's name is chosen over the name of its last child: it is the same tensor, and
        the container usually runs once where the child (a reused ReLU) may run several times.

        Raises:
            ValueError: no module produced a spatial feature map.
        """
        for name, tensor, version in reversed(self.found):
            if tensor is model_output:
                continue
            record = LayerRecord(name, calls=self.calls[name], output=tensor)
            record._version = version
            return record
        raise ValueError(
            "found no layer whose output is a spatial feature map (N, K, h, w) with h * w > 1; "
            "pass layer= (a module of the model or its dotted name), and reshape= for layers "
            "whose output is not (N, K, h, w), such as the token sequences of a transformer"
        )


@contextlib.contextmanager
def record_last_spatial(model: nn.Module, batch: int) -> Iterator[SpatialRecord]:
    """Record the spatial feature maps that submodules return while the block runs.

    Maps are ``(batch, K, h, w)`` with ``h * w > 1``; the last one is the default layer of a
    CAM.

    Nothing is copied: :meth:`LayerRecord.activation` checks afterwards that the chosen map
    was not modified in place later in the forward pass.
    """
    record = SpatialRecord(batch)

    def hook(name: str, _module: nn.Module, _args: Any, output: Any) -> None:
        record.calls[name] = record.calls.get(name, 0) + 1
        if (
            isinstance(output, Tensor)
            and output.ndim == 4
            and output.shape[0] == batch
            and output.shape[2] * output.shape[3] > 1
        ):
            record._add(name, output)

    with forward_hooks(((n, m) for n, m in model.named_modules() if n), hook):
        yield record


def check_reshape(reshape: Reshape, raw: Tensor, layer: str) -> None:
    """Check that ``reshape`` only selects and rearranges elements of the layer output.

    CAM gradients are taken with respect to the layer output and rearranged by the same
    ``reshape``; that is the gradient with respect to the reshaped map only when ``reshape``
    is a re-indexing (slicing, ``reshape``, ``permute``), not arithmetic. The check applies
    ``reshape`` to a tensor of element indices.

    Raises:
        ValueError: the result is not ``(N, K, h, w)`` or is not a re-indexing.
    """
    probe = torch.arange(raw.numel(), dtype=torch.float64, device=raw.device).view(raw.shape)
    out = reshape(probe)
    if not isinstance(out, Tensor) or out.ndim != 4 or out.shape[0] != raw.shape[0]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"reshape turned the output {tuple(raw.shape)} of layer {layer!r} into {shape}; "
            f"it must return a spatial feature map (N, K, h, w) with N = {raw.shape[0]}"
        )
    flat = out.flatten()
    shifted = reshape(probe * 3 + 7)  # a re-indexing commutes with elementwise maps
    index_map = (
        bool((flat == flat.round()).all())
        and bool(((flat >= 0) & (flat < raw.numel())).all())
        and torch.unique(flat).numel() == flat.numel()
        and isinstance(shifted, Tensor)
        and shifted.shape == out.shape
        and torch.equal(shifted, out * 3 + 7)
    )
    if not index_map:
        raise ValueError(
            "reshape must only select and rearrange elements of the layer output (slicing, "
            "reshape, permute), because the same function is applied to its gradient; it "
            "computes new values or repeats elements"
        )
