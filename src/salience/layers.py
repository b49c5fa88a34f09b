"""Finding a layer of a model, recording what it computes, and reading it as a spatial map.

Layer methods (the CAM family) need the output ``A`` of an inner layer, still attached to the
autograd graph of the score, read as a spatial map ``(N, K, h, w)``. The recorder here
(:func:`search_layers`) is a context manager over :func:`salience.hooks.forward_hooks`: hooks
live for the block and for the calling thread.

A *layer* is a submodule, given as the module itself or as its dotted name in
``model.named_modules()`` (``"layer4"``, ``"features.28"``, ``"blocks.11.norm1"``).

**Layouts.** A layer output is read as a map ``(N, K, h, w)`` in one of the layouts of
:mod:`salience.layouts` (:class:`~salience.layouts.Layout`): a convolutional map ``"NCHW"``,
a channels-last map ``"NHWC"`` (permuted), or a token sequence ``"tokens"`` whose leading
special tokens are dropped and whose patch tokens are folded into the grid.

The layout is decided from what the model computes, not from shapes alone:

1. *What the module is* (:func:`salience.layouts.axis_of`). Convolutions, batch/group/instance
   norms, 2-D pools, upsampling and pixel shuffles produce channels-first tensors;
   ``nn.Linear`` and LayerNorm/RMSNorm over the last axis act on (and produce) channels-last
   tensors. A module that returns a tensor of the shape of its input keeps the layout of its
   input (activations, residual blocks, dropout, masks), and the model input itself is
   channels-first.
2. *The input size* (:func:`salience.layouts.fits`). A grid must fit the ``H x W`` input:
   ``(h, w) ~ (H / s, W / s)`` for some stride ``s``, within one cell (padding, odd sizes). A
   channels-last tensor whose two middle axes are no such grid is no map: attention tensors
   ``(N, heads, tokens, head_dim)`` (a ``k_norm`` output) and attention weights
   ``(N, heads, T, T)`` are never read as maps (the latter are also recognised by their token
   count). A token sequence is folded into the grid of the patch embedding (a channels-first
   map computed before it, such as the output of a ``Conv2d`` with the patch size as stride,
   ``h * w = T - s``), or else into the grid ``(H / p, W / p)`` of one patch size ``p``:
   whole patches first (``p`` divides both sides), then the fewest special tokens; sides
   rounded, both down or both up, only if no whole patches fit.
3. A 4-D tensor that nothing identifies is read channels-first if the model computes nothing
   channels-last (no token sequences, no channels-last map): that is PyTorch's convention and
   every CNN's, as before. In a model that mixes layouts it must fit the input; if it fits
   both ways, the layer is **ambiguous** and the methods raise an error that names the
   candidates and shows the ``layer=`` and ``reshape=`` to pass.

**The default layer** is the last readable layer output of the forward pass (the container's
name when a container returns the tensor of its last child) with these exceptions:

- the model output itself is never chosen, nor a class map that the model output merely
  resizes (a segmentation network that upsamples its logits with ``F.interpolate``), nor the
  class maps it resizes the sum of (torchvision's LRASPP adds a 1x1 classifier of early
  features to one of late features): they are the logit head, and the feature map before it
  is taken (LRASPP: ``classifier.cbr``, the late branch; its early branch reaches the score
  through a classifier only, so read ``backbone`` layers with ``layer=`` to see it);
- with gradients on, a layer the score does not reach (an auxiliary head) is passed over;
  methods that run without gradients (Score-CAM, CAM) search on one forward pass with
  gradients too where the model's output holds several tensors (DeepLabV3's auxiliary head
  comes last) or their choice has as many channels as a 4-D output has classes (a logit head
  whose other summand was computed too early to be held), so that every method picks the
  same layer;
- in a model with class or register tokens, so is a layer whose map (patch tokens) has a zero
  gradient: a ViT that classifies its class token reads the final ``norm``, and every
  per-token layer of the last block, at the class token only (a Grad-CAM there is zero), so
  the default is ``blocks[-1].norm1``, the input of the last attention, where the patch tokens
  are mixed into the class token (the layer pytorch-grad-cam recommends). Methods that run
  without gradients (Score-CAM, CAM) find it on one forward pass with gradients and take it,
  detached, so that every method picks the same layer;
- token sequences computed inside an attention module (its q/k/v projections) are passed over
  in favour of the attention's input;
- a map of one cell (``1 x 1``: a small input through a deep network) is no grid: the last
  map with more cells is taken (timm's ``selecsls42b`` at 64², whose head ends at ``1 x 1``:
  ``head.1``, ``2 x 2``). Read the ``1 x 1`` map itself with ``layer=`` and
  ``reshape=lambda t: t``, or give a larger input;
- an adaptive pooling that does not shrink its input only resamples the map before it
  (torchvision VGG's ``avgpool`` to ``7 x 7``: the identity at 224², an upsampled copy at
  128²): the map before it is taken (``features``);
- with other inputs beside the image (``forward_args``: a question, a caption), a layer not
  computed from the image is passed over, and a token sequence as long as such an input is
  read as image tokens only on a grid the image made.

If token sequences that fit no grid (more than :data:`~salience.layouts.MAX_SPECIAL_TOKENS`
special tokens, tokens at the end) come after that layer, the methods raise rather than
explain an early map, with the ``layer=`` and ``reshape=`` for the tokens.

**A module that runs several times in one forward pass** (a ReLU module reused inside a
ResNet block, the ``_swish`` ReLU6 of EfficientNet-Lite0, which runs on the stem and on the
head) has several outputs. The layer is then explained at its **last** call: that is the output
that is closest to the prediction and, for a module reused for the final activation, the
feature map that the classifier pools (the default layer: its last call computed from the
image, so that a backbone run on the image and then on a reference from ``forward_args`` is
read at the image's call; ``layer=`` reads the last call). The number of calls is reported
(``Attribution.extras["layer_calls"]``), and the call explained (``extras["layer_call"]``),
so that a reused module never goes unnoticed.

Recording never changes what the model computes: for a layer chosen with ``layer=``, the hook
hands the model an identical copy of the layer output, so that in-place operations later in
the forward pass (``ReLU(inplace=True)`` after a convolution) cannot alter the recorded
activation or its place in the graph. The default layer is found without copies; if the
forward pass modified it in place afterwards, the methods record it again by name.

**The autograd graph of a named layer starts at the layer.** A gradient with respect to the
layer's output needs the graph between the layer and the score only; the CAM methods run the
forward pass without autograd up to a layer given with ``layer=`` and switch it on at the layer
(``graph_from_layer`` of :func:`search_layers`), so the activations before it are not kept for
a backward pass (Grad-CAM at batch 8: 428 MB → 1 MB kept on the VGG-style benchmark net at its
last map, 645 MB → 7 MB on EfficientNet-Lite0 at ``_bn1``). A module that runs several times
starts the graph again at every call (Lite0's ``_swish`` runs on the stem: nearly the whole
graph). If autograd is off again after the layer (a grad-mode block of the model,
``torch.enable_grad()`` or ``no_grad()``, began before it and ended after), the call records the
whole graph instead. The default layer is chosen with the
whole graph (the score must reach it).

**What a search found is remembered.** Finding the default layer, or the layout of a named
layer whose type does not say it (an activation module, a block), hooks every module of the
model, which costs more than the pass itself on a small input (PyTorch's hook dispatch, about
12 µs per module call). What such a search found is kept per model (weakly: it goes with the
model) and input shape, dtype and device (:func:`recall`, :func:`remember`), and later calls
hook that one layer, as torchcam does once per extractor. It is used only while the model holds
the same modules (the same objects of the same classes, in order, each in the same training or
evaluation mode) and only if the layer then
still runs, with the output shape found and, for the gradient methods, reached by the score;
otherwise the call searches again, so the maps are those of a fresh search. Not kept: choices
that depend on more than the model's structure (a layer passed over because the score does not
reach it, special tokens, a module's earlier call) and calls with extra forward arguments.
"""

from __future__ import annotations

import collections
import contextlib
import difflib
import re
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import is_training, modules_of
from ._layer_messages import _LayerMessages
from ._weak import ByIdentity
from .hooks import forward_hooks
from .layouts import (
    MAX_SPECIAL_TOKENS,
    Axis,
    Layout,
    axis_of,
    fits,
    is_channels_first,
    patch_grid,
)

__all__ = [
    "Known",
    "LayerChoice",
    "LayerLike",
    "LayerRecord",
    "LayerSearch",
    "find_layer",
    "forget",
    "reaches",
    "recall",
    "remember",
    "search_layers",
]

LayerLike: TypeAlias = "nn.Module | str"

_KEEP_WITH_GRAD = 64  # layer outputs held for the choice when the score can be checked
_KEEP_WITHOUT_GRAD = 8  # ... and without gradients: the last map, the logit head, the output


def find_layer(model: nn.Module, layer: LayerLike) -> tuple[str, nn.Module]:
    """Return ``(dotted name, module)`` of ``layer`` in ``model``.

    Raises:
        ValueError: an unknown name (with the closest names as suggestions), a module that is
            not part of ``model``, or the model itself.
        TypeError: ``layer`` is neither a module nor a string.
    """
    if isinstance(layer, str):
        if layer and not isinstance(model, torch.jit.ScriptModule):
            try:  # a walk down the dotted path, not over the whole model
                return layer, model.get_submodule(layer)
            except AttributeError:
                pass
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


# -- what the model computes -------------------------------------------------------------------

_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_CONTAINER = re.compile(r"block|layer|stage|list|sequential|dict", re.IGNORECASE)


def _is_attention(module: nn.Module, name: str) -> bool:
    """Whether ``module`` (named ``name`` in its parent) is an attention module, not a block."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    kind = type(module).__name__
    return not _CONTAINER.search(kind) and bool(_ATTENTION.search(kind) or _ATTENTION.search(name))


class _Cell:
    """What is known of one tensor's layout; shared by a tensor and its recorded copy."""

    __slots__ = ("axis",)

    def __init__(self, axis: Axis) -> None:
        self.axis: Axis = axis


@dataclass(eq=False, slots=True)
class _Entry:
    """A distinct 3-D or 4-D layer output, with every module name that returned it."""

    names: list[str]
    ref: weakref.ref[Tensor]
    tensor: Tensor | None  # held only for the last few entries
    version: int
    shape: tuple[int, ...]
    cell: _Cell
    grids: int  # how many grids had been seen before it
    attention_like: bool  # a 4-D tensor with the token count on an axis
    call: int  # which call of the module ``name`` returned it (1 for the first)

    @property
    def name(self) -> str:
        return self.names[-1]


@dataclass
class LayerRecord:
    """What a layer computed during a forward pass.

    Attributes:
        name: Dotted name of the layer.
        calls: How many times the layer ran.
        output: Its output at the call recorded (in the autograd graph when gradients were on).
        call: Which call that is, from 1 (``None``: the last).
    """

    name: str
    calls: int = 0
    output: Tensor | None = None
    call: int | None = None
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


@dataclass(frozen=True)
class LayerChoice:
    """The default layer: its record, how it is read, and whether that still needs gradients.

    ``needs_gradients`` is true when the choice was made without gradients and is a token
    sequence with special tokens, whose patch tokens the score may not depend on (a class-token
    head), a map with as many channels as a 4-D output has classes (a logit head whose sum
    with an earlier one, no longer held, the output resizes), or any map of a model whose output
    holds several tensors (the score may not read the branch computed last: DeepLabV3's
    auxiliary head): the caller should search again on a forward pass with gradients.
    ``structural`` is true when the choice follows from the model's structure alone (the last
    readable layer output, at the last call of its module, in a model without special tokens),
    so that it can be remembered (:func:`remember`).
    """

    record: LayerRecord
    layout: Layout
    needs_gradients: bool = False
    structural: bool = False


def _tensors_in(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    values = output.values() if isinstance(output, Mapping) else output
    if isinstance(values, tuple | list) or isinstance(output, Mapping):
        return [v for v in values if isinstance(v, Tensor)]
    return []


_RESIZES: tuple[tuple[str, bool | None], ...] = (
    ("bilinear", False),
    ("bilinear", True),
    ("nearest", None),
    ("nearest-exact", None),
    ("bicubic", False),
    ("bicubic", True),
)


_HEADS_SUMMED = 4
"""The most class maps a model output may be the resized sum of (LRASPP sums two), among the
latest ones."""


def _logit_heads(maps: list[_Entry], outputs: list[Tensor]) -> set[int]:
    """Return the ids of the logit heads among ``maps``: class maps an output resizes.

    ``maps``: the held channels-first entries, the latest first. A 4-D output ``(N, classes,
    H, W)`` that is a class map resized (a segmentation network upsampling its logits with
    ``F.interpolate``), or the resized sum of a few of the latest class maps of one size
    (LRASPP adds a classifier of early features to one of late features, then upsamples; its
    head module returns the sum, a head too): those maps are the logit head, not features to
    explain. Every class map is tried alone; sums, of runs of the :data:`_HEADS_SUMMED` latest
    ones only (from each of them on: an auxiliary head computed after the main one has their
    shape and is not part of the sum), so that a network with many maps of as many channels
    as classes costs a few checks more, not a few per map.
    """
    heads: set[int] = set()
    for out in outputs:
        if out.ndim != 4 or not out.is_floating_point():
            continue
        same = [e for e in maps if e.shape[:2] == tuple(out.shape[:2]) and e.tensor is not out]
        alone = {id(e) for e in same if _is_resized_to(e.tensor, [out])}  # type: ignore[arg-type]
        heads |= alone
        latest = same[:_HEADS_SUMMED]
        for start, first in enumerate(latest):
            if id(first) in alone:
                continue  # a head by itself (what an untrained net adds to it is ~0)
            run = [e for e in latest[start:] if e.shape == first.shape and id(e) not in alone]
            total: Tensor | None = None
            for i, entry in enumerate(run):
                assert entry.tensor is not None  # held (see the caller)
                with torch.no_grad():
                    t = entry.tensor.detach()
                    total = t if total is None else total + t
                if i > 0 and _is_resized_to(total, [out]):
                    heads.update(id(e) for e in run[: i + 1])
                    break
    return heads


def _is_resized_to(t: Tensor, outputs: list[Tensor]) -> bool:
    """Whether a model output is ``t`` resized (a logit head upsampled functionally)."""
    with torch.no_grad():
        for out in outputs:
            if (
                out.ndim != 4
                or tuple(out.shape[:2]) != tuple(t.shape[:2])
                or not out.is_floating_point()
            ):
                continue
            target = out.detach()
            source = t.detach().to(target.dtype)
            tolerance = 1e-5 * float(target.abs().amax()) + 1e-12
            if target.shape == source.shape:
                if torch.allclose(source, target, rtol=1e-4, atol=tolerance):
                    return True
                continue
            size = tuple(target.shape[-2:])
            for mode, corners in _RESIZES:
                # one map of one sample first: most maps tried are no head, told at 1/(N C)
                # of the cost (a network with many maps of as many channels as classes)
                one = F.interpolate(source[:1, :1], size=size, mode=mode, align_corners=corners)
                if not torch.allclose(one, target[:1, :1], rtol=1e-4, atol=tolerance):
                    continue
                resized = F.interpolate(source, size=size, mode=mode, align_corners=corners)
                if torch.allclose(resized, target, rtol=1e-4, atol=tolerance):
                    return True
    return False


class _Graph:
    """Which autograd nodes the scores reach, explored lazily from the scores backwards."""

    def __init__(self, scores: Tensor) -> None:
        root = scores.grad_fn
        self.seen: set[Any] = {root}
        self.frontier: list[Any] = [root]
        self.leaves: set[int] = set()  # ids of the leaf tensors reached

    def reaches(self, t: Tensor) -> bool:
        """Whether the scores were computed from ``t`` (a leaf or not)."""
        node = t.grad_fn
        if node is None and not t.requires_grad:
            return False
        while self.frontier and (node not in self.seen if node else id(t) not in self.leaves):
            for following, _ in self.frontier.pop().next_functions:
                if following is not None and following not in self.seen:
                    self.seen.add(following)
                    self.frontier.append(following)
                    leaf = getattr(following, "variable", None)  # AccumulateGrad
                    if leaf is not None:
                        self.leaves.add(id(leaf))
        return node in self.seen if node else id(t) in self.leaves


def reaches(scores: Tensor, t: Tensor) -> bool:
    """Whether ``scores`` were computed from ``t`` through autograd (a walk of their graph)."""
    return scores.grad_fn is not None and _Graph(scores).reaches(t)


class LayerSearch(_LayerMessages):
    """The 3-D and 4-D layer outputs of one forward pass, with what is known of their layout.

    Use it through :func:`search_layers`. With ``layer`` given, only that layer is recorded
    (with a copy handed to the model, see the module documentation) and :meth:`layer_layout`
    reads it; otherwise :meth:`choose` picks the default layer. ``graph_from_layer`` and
    ``layout``: see :func:`search_layers`.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Tensor,
        layer: tuple[str, nn.Module] | None = None,
        *,
        keep: int = _KEEP_WITH_GRAD,
        graph_from_layer: bool = False,
        layout: Layout | None = None,
        texts: frozenset[int] = frozenset(),
    ) -> None:
        self.model = model
        self._texts = texts  # sequence lengths of the model's other inputs (a question)
        self.n = int(inputs.shape[0])
        self.size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
        self.calls: dict[str, int] = {}
        self.entries: list[_Entry] = []
        self.record: LayerRecord | None = None if layer is None else LayerRecord(layer[0])
        self._layer = layer
        self._layer_entry: _Entry | None = None
        self._keep = 0 if layer is not None else keep
        self._graph_from_layer = graph_from_layer and layer is not None
        self._cells: dict[int, tuple[weakref.ref[Tensor], _Cell]] = {}
        self._held: collections.deque[_Entry] = collections.deque()  # entries holding tensors
        self._grids: list[tuple[int, int]] = []
        self._token_counts: set[int] = set()
        self._mixed: bool | None = None
        # the layer's layout, known before the pass
        self._known = layout if layer is not None else None

    # -- recording ---------------------------------------------------------------------------

    def seed(self, inputs: Tensor) -> None:
        """Declare the tensor given to the model: an image batch, channels first."""
        self._cell(inputs).axis = "first"

    def _cell(self, t: Tensor, cell: _Cell | None = None) -> _Cell:
        found = self._cells.get(id(t))
        if found is not None and found[0]() is t:
            return found[1]
        cell = cell or _Cell(None)
        self._cells[id(t)] = (weakref.ref(t), cell)
        return cell

    def _hook(self, name: str, module: nn.Module, args: Any, output: Any) -> Tensor | None:
        self.calls[name] = self.calls.get(name, 0) + 1
        chosen = self._layer is not None and module is self._layer[1]
        if not isinstance(output, Tensor):
            if chosen:
                raise TypeError(
                    f"layer {name!r} returned a {type(output).__name__}, not a tensor; pick a "
                    "layer that returns a feature map tensor"
                )
            return None
        source = None
        for a in args:
            if isinstance(a, Tensor):
                source = a
                break
        cell = self._cell(output)
        axis = axis_of(module, output)
        if axis is not None:
            cell.axis = axis
            if source is not None and source.ndim == output.ndim and source is not output:
                known = self._cell(source)
                known.axis = known.axis or axis
        elif cell.axis is None and source is not None and source.shape == output.shape:
            cell.axis = self._cell(source).axis
        # an adaptive pooling that only resamples the last map (torchvision VGG's 7 x 7
        # avgpool: the identity at 224², a resampled copy at other sizes) is no map of its own;
        # one that resamples a map no module returned (after a functional ReLU) stays
        resamples = (
            isinstance(module, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d)
            and source is not None
            and source.ndim == output.ndim == 4
            and output.shape[2] * output.shape[3] >= source.shape[2] * source.shape[3]
            and bool(self.entries)
            and self.entries[-1].ref() is source
        )
        entry = self._add(name, output, cell, force=chosen, skip=resamples)
        if not chosen:
            return None
        assert self.record is not None
        assert entry is not None
        self._layer_entry = entry
        if self._graph_from_layer:
            # The graph starts here: a leaf holding the layer's values, and autograd on for the
            # rest of the forward pass (the caller's grad mode comes back when its block ends).
            output = output.detach().requires_grad_(True)
            self._cell(output, cell)
            torch.set_grad_enabled(True)
        self.record._store(output)
        copy = output.clone()
        self._cell(copy, cell)  # the copy the model goes on with is the same layer output
        return copy

    def _add(
        self, name: str, output: Tensor, cell: _Cell, *, force: bool, skip: bool = False
    ) -> _Entry | None:
        shape = tuple(output.shape)
        ndim = len(shape)
        candidate = (ndim == 3 or ndim == 4) and shape[0] == self.n and shape[1] > 1 and not skip
        if ndim == 4:
            candidate = candidate and (shape[2] * shape[3] > 1 or shape[2] * shape[1] > 1)
        if not (candidate or force):
            return None
        last = self.entries[-1] if self.entries else None
        if candidate and last is not None and last.ref() is output:
            last.names.append(name)
            last.version = output._version
            last.call = self.calls[name]
            return last
        entry = _Entry(
            names=[name],
            ref=weakref.ref(output),
            tensor=None,
            version=output._version,
            shape=shape,
            cell=cell,
            grids=len(self._grids),
            attention_like=bool(self._token_counts)
            and ndim == 4
            and (shape[2] in self._token_counts or shape[3] in self._token_counts),
            call=self.calls[name],
        )
        if not candidate:
            return entry
        self.entries.append(entry)
        if self._keep and self._may_be_read(entry):
            entry.tensor = output
            self._held.append(entry)
            if len(self._held) > self._keep:
                self._held.popleft().tensor = None
        if ndim == 3 and cell.axis != "first":
            if cell.axis == "last" or self._tokens(shape[1], len(self._grids)) is not None:
                self._token_counts.add(shape[1])  # a token sequence (features last)
        elif ndim == 4 and cell.axis == "first":
            self._grids.append((shape[2], shape[3]))
        elif ndim == 4 and cell.axis == "last" and fits(shape[1], shape[2], self.size):
            self._grids.append((shape[1], shape[2]))
        return entry

    def _may_be_read(self, e: _Entry) -> bool:
        """Whether ``e`` may turn out readable once the whole forward pass is known."""
        if len(e.shape) == 3:
            return e.cell.axis != "first" and self._tokens(e.shape[1], e.grids) is not None
        _, d1, d2, d3 = e.shape
        nhwc = fits(d1, d2, self.size)
        if e.cell.axis == "first":
            return d2 * d3 > 1
        if e.cell.axis == "last":
            return nhwc
        return not e.attention_like and (d2 * d3 > 1 or nhwc)

    # -- reading -----------------------------------------------------------------------------

    def _tokens(self, count: int, grids: int, most: int = MAX_SPECIAL_TOKENS) -> Layout | None:
        """Return the token layout of ``count`` tokens: a grid seen before, else a patch grid.

        Of the grids seen before, the one that leaves the fewest special tokens (the latest of
        equals). Without one (a patch embedding by ``nn.Linear``), patches that divide
        the input exactly come first, then the fewest special tokens: 20 tokens of a 64²
        input are 4 special tokens and ``4 x 4`` patches of 16, not ``4 x 5`` of no size.
        At most ``most`` special tokens (more only to suggest a ``reshape=`` in a message). A
        count as long as another input's sequence (``texts``) is read only on a seen grid.
        """
        seen = [
            (count - h * w, -i, (h, w))
            for i, (h, w) in enumerate(self._grids[:grids])
            if 0 <= count - h * w <= most and h * w > 1
        ]
        if seen:  # Twins' 4 x 4 tokens are no 12 + 2 x 2 of its attention's reduced keys
            fewest, _, seen_grid = min(seen)
            return Layout("tokens", seen_grid, fewest)
        if count in self._texts:
            return None  # as long as a question or caption given with the image: its tokens
        for exact in (True, False):
            for special in range(most + 1):
                grid = patch_grid(count - special, self.size, exact=exact)
                if grid is not None:
                    return Layout("tokens", grid, special)
        return None

    def mixed(self) -> bool:
        """Whether the model computes token sequences or channels-last maps anywhere."""
        if self._mixed is None:
            self._mixed = any(self._channels_last(e) for e in self.entries)
        return self._mixed

    def _channels_last(self, e: _Entry) -> bool:
        if len(e.shape) == 3:  # a token sequence, even one that fits no grid
            if e.cell.axis == "last":
                return True
            return e.cell.axis is None and self._tokens(e.shape[1], e.grids) is not None
        _, d1, d2, d3 = e.shape
        if not fits(d1, d2, self.size):
            return False
        if e.cell.axis == "last":
            return True
        return e.cell.axis is None and not e.attention_like and not fits(d2, d3, self.size)

    def layouts(self, e: _Entry) -> list[Layout]:
        """How ``e`` can be read: no way, one way, or two (ambiguous)."""
        shape, axis = e.shape, e.cell.axis
        if len(shape) == 4 and shape[0] == self.n:
            _, d1, d2, d3 = shape
            nchw = Layout("NCHW", (d2, d3))
            nhwc = Layout("NHWC", (d1, d2))
            if axis == "first":
                return [nchw] if d2 * d3 > 1 else []
            if axis == "last":
                return [nhwc] if fits(d1, d2, self.size) else []
            if e.attention_like:
                return []
            if not self.mixed():
                return [nchw] if d2 * d3 > 1 else []
            return [
                *([nchw] if fits(d2, d3, self.size) else []),
                *([nhwc] if fits(d1, d2, self.size) else []),
            ]
        if len(shape) == 3 and shape[0] == self.n and axis != "first":
            tokens = self._tokens(shape[1], e.grids)
            return [tokens] if tokens is not None else []
        return []

    # -- the default layer -------------------------------------------------------------------

    def choose(
        self, output: Any, scores: Tensor | None = None, image: Tensor | None = None
    ) -> LayerChoice:
        """Pick the default layer (see the module documentation).

        Args:
            output: The model output (never chosen, nor a map it merely resizes).
            scores: The explained scores, in the autograd graph, to pass over layers they do
                not depend on; ``None`` when the forward pass ran without gradients.
            image: With ``scores``, the leaf the image batch was fed from (it requires grad):
                layers that do not depend on it (a question's embedding) are passed over.

        Raises:
            ValueError: no layer can be read as a map, or the chosen one is ambiguous.
        """
        outputs = _tensors_in(output)
        held: list[tuple[_Entry, list[Layout]]] = []
        for entry in reversed(self.entries):
            layouts = self.layouts(entry)
            if not layouts:
                continue
            if entry.tensor is None:
                break  # beyond the outputs held for the choice
            held.append((entry, layouts))
        maps = [e for e, layouts in held if len(layouts) == 1 and layouts[0].kind == "NCHW"]
        heads = _logit_heads([e for e in maps if len(e.shape) == 4], outputs)
        pool = [
            (entry, layouts)
            for entry, layouts in held
            if not any(entry.tensor is out for out in outputs) and id(entry) not in heads
        ]  # the output is no layer, nor a head it resizes
        if not pool:
            raise ValueError(self._nothing_readable())
        special = self._special_tokens()
        graph = scores is not None and scores.grad_fn is not None
        entry, layouts = self._pick(
            pool, scores if graph else None, check_maps=special, image=image if graph else None
        )
        if len(layouts) > 1:
            raise ValueError(self._ambiguous(entry, pool))
        later = self.entries[self.entries.index(entry) + 1 :]
        unread = [e for e in later if len(e.shape) == 3 and e.cell.axis == "last"]
        unread = [e for e in unread if not self.layouts(e) and e.shape[1] not in self._texts]
        if unread:
            # a transformer whose tokens fit no grid: an early map would explain little
            raise ValueError(self._unread_tokens(unread[-1], entry, layouts[0]))
        calls = self.calls[entry.name]
        record = LayerRecord(entry.name, calls=calls, output=entry.tensor, call=entry.call)
        record._version = entry.version
        structural = entry is pool[0][0] and entry.call == calls and not special
        # Without gradients only the last few outputs are held: a class map chosen then may be
        # one of a sum whose other maps were computed earlier (a logit head); and of an output
        # of several tensors, which the score reads is unknown (an auxiliary head's branch may
        # come last). Both search again with gradients.
        head_like = any(
            out.ndim == 4 and entry.shape[:2] == tuple(out.shape[:2]) for out in outputs
        )
        return LayerChoice(
            record,
            layouts[0],
            needs_gradients=scores is None and (special or head_like or len(outputs) > 1),
            structural=structural,
        )

    def _special_tokens(self) -> bool:
        """Whether the model computes token sequences with special (class, register) tokens."""
        for e in self.entries:
            if len(e.shape) == 3:
                layouts = self.layouts(e)
                if layouts and layouts[0].special > 0:
                    return True
        return False

    def _pick(
        self,
        pool: list[tuple[_Entry, list[Layout]]],
        scores: Tensor | None,
        *,
        check_maps: bool,
        image: Tensor | None = None,
    ) -> tuple[_Entry, list[Layout]]:
        """Return the latest entry of ``pool`` that the scores depend on.

        With ``scores`` (in the graph), entries the scores do not reach are passed over, and
        with ``check_maps`` also entries whose map (patch tokens) has a zero gradient: in a
        class-token model, the per-token layers after the last attention. With ``image``,
        entries not computed from it are passed over too.
        """
        graph = None if scores is None else _Graph(scores)
        total = None if scores is None else scores.sum()
        matters: dict[int, bool] = {}  # id(entry) -> the score depends on its map
        chunks: list[int] = []

        def depends(i: int) -> bool:
            if graph is None:
                return True
            entry = pool[i][0]
            assert entry.tensor is not None
            if not graph.reaches(entry.tensor):
                return False
            if image is not None and not reaches(entry.tensor, image):
                return False
            if not check_maps:
                return True
            if id(entry) not in matters:
                # backward passes from the scores to the next 1, 4, 16, ... layers: each goes
                # only as deep as its earliest layer
                size = 4 ** len(chunks)
                chunks.append(size)
                todo = [pool[i]] + [
                    (e, ls)
                    for e, ls in pool[i + 1 : i + size]
                    if e.tensor is not None and graph.reaches(e.tensor)
                ]
                tensors = [e.tensor for e, _ in todo if e.tensor is not None]  # all of them
                assert total is not None
                grads = torch.autograd.grad(total, tensors, retain_graph=True, allow_unused=True)
                for (e, ls), g in zip(todo, grads, strict=True):
                    layout = ls[0] if len(ls) == 1 else Layout("NCHW")
                    matters[id(e)] = g is not None and bool(layout.to_map(g).ne(0).any())
            return matters[id(entry)]

        fallback = None
        for i, (entry, layouts) in enumerate(pool):
            if not depends(i):
                continue
            if layouts[0].kind == "tokens" and self._in_attention(entry.name):
                fallback = fallback or (entry, layouts)  # q/k/v: prefer the attention input
                continue
            return entry, layouts
        return fallback or pool[0]

    def _in_attention(self, name: str) -> bool:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            if _is_attention(self.model.get_submodule(".".join(parts[:i])), parts[i - 1]):
                return True
        return False

    # -- a layer given with layer= -----------------------------------------------------------

    def layer_layout(self) -> Layout:
        """Return the layout of the layer given to :func:`search_layers`, after the forward pass.

        Raises:
            ValueError: its output cannot be read as a map, or is ambiguous.
        """
        assert self.record is not None
        assert self._layer is not None
        entry = self._layer_entry
        name = self._layer[0]
        assert entry is not None, "layer_layout() called for a layer that did not run"
        if self._known is not None:
            return self._known
        layouts = self.layouts(entry)
        if len(layouts) == 1:
            return layouts[0]
        if len(layouts) > 1:
            raise ValueError(self._ambiguous(entry, []))
        shape = entry.shape
        if len(shape) not in (3, 4) or shape[0] != self.n:
            raise ValueError(
                f"layer {name!r} outputs shape {shape}, not a spatial feature map "
                f"(N, K, h, w) with N = {self.n}; pick a convolutional layer, or pass reshape= "
                "to turn its output into one (for ViT tokens (N, 1 + h*w, D): "
                "reshape=lambda t: t[:, 1:].unflatten(1, (h, w)).permute(0, 3, 1, 2))"
            )
        if len(shape) == 4 and (entry.attention_like or entry.cell.axis == "last"):
            advice = (
                "pick a layer whose output is the token sequence (N, tokens, C) or a map, such "
                "as the input of the attention module, or leave layer= out to let one be chosen"
            )
        else:
            advice = "if it holds one, pass reshape= to turn it into (N, K, h, w): "
            advice += self._hints(entry)
        raise ValueError(
            f"layer {name!r} outputs shape {shape}, not a spatial feature map of the "
            f"{self._size_text()} input: {self._why_not(entry)}; {advice}"
        )


@contextlib.contextmanager
def search_layers(
    model: nn.Module,
    inputs: Tensor,
    layer: tuple[str, nn.Module] | None = None,
    *,
    graph_from_layer: bool = False,
    layout: Layout | None = None,
    texts: frozenset[int] = frozenset(),
) -> Iterator[LayerSearch]:
    """Record the layer outputs of the forward passes run inside the block.

    Args:
        model: The model.
        inputs: The ``(N, C, H, W)`` batch (its size decides which grids fit).
        layer: ``(name, module)`` of the layer to record (from :func:`find_layer`), or
            ``None`` to choose the default layer afterwards with :meth:`LayerSearch.choose`.
        graph_from_layer: With ``layer``, for a block entered without autograd: record the
            layer's output as a leaf that requires grad and switch autograd on from there, so
            that only the part of the network between the layer and the score is recorded
            (what a gradient with respect to the layer needs: the memory and time of the
            autograd graph before the layer are saved). At a module that runs several times
            every call starts it again; the last call's leaf is the record.
        layout: With ``layer``, its layout when already known (from :func:`recall`, or
            ``Layout("custom")`` for a ``reshape=`` of the user): only the layer is hooked,
            whatever its type, and :meth:`LayerSearch.layer_layout` returns ``layout``.
        texts: Sequence lengths of the model's other inputs (a question's tokens, a caption's):
            token sequences of such a length are read as a map only on a grid the image made,
            never on a grid of patches guessed from their count.

    Nothing is copied for the default layer: :meth:`LayerRecord.activation` checks afterwards
    that the chosen map was not modified in place later in the forward pass. Without autograd
    on, fewer outputs are held (there is no score dependence to check).
    """
    keep = _KEEP_WITH_GRAD if torch.is_grad_enabled() else _KEEP_WITHOUT_GRAD
    search = LayerSearch(
        model,
        inputs,
        layer,
        keep=keep,
        graph_from_layer=graph_from_layer,
        layout=layout,
        texts=texts,
    )
    if layer is not None and (layout is not None or is_channels_first(layer[1])):
        # a convolution (or a norm, pool, ...) says its layout itself
        watched = [layer]
    else:
        # every module but TorchScript ones (they run no hooks: a scripted stem of a Python
        # model is passed over)
        watched = [
            (n, m)
            for n, m in model.named_modules()
            if n and not isinstance(m, torch.jit.ScriptModule)
        ]
    with forward_hooks(watched, search._hook):
        yield search


# -- layers found before ---------------------------------------------------------------------


@dataclass(frozen=True)
class Known:
    """A layer and its layout, as a full search found them for a model and an input shape.

    Attributes:
        name: Dotted name of the layer.
        layout: How its output was read.
        shape: Its output shape (checked again when the knowledge is used).
    """

    name: str
    layout: Layout
    shape: tuple[int, ...]


class _Memo:
    """What full searches found for one model, valid while its modules stay the same."""

    __slots__ = ("fingerprint", "found")

    def __init__(self, fingerprint: tuple[tuple[Any, ...], ...]) -> None:
        self.fingerprint = fingerprint
        self.found: dict[tuple[Any, ...], Any] = {}  # a Known per layer key, ...


_MEMO: ByIdentity[nn.Module, _Memo] = ByIdentity()
_MEMO_LOCK = threading.Lock()
_MEMO_SIZE = 16  # layers x input shapes remembered per model; the oldest go first


def _fingerprint(
    model: nn.Module, modules: list[nn.Module] | None = None
) -> tuple[tuple[int, ...], tuple[type, ...], tuple[bool, ...]]:
    """Every module of ``model`` by identity, class and training mode, in order.

    A replaced module shows, and so does a switch to training mode (another path, maybe).
    ``modules``: :func:`~salience._checks.modules_of` the model, if the caller has it.
    """
    modules = modules or modules_of(model)
    return tuple(map(id, modules)), tuple(map(type, modules)), tuple(map(is_training, modules))


def _key(layer: str | None, inputs: Tensor) -> tuple[Any, ...]:
    return (layer, tuple(inputs.shape), inputs.dtype, inputs.device)


def recall(
    model: nn.Module,
    layer: str | None,
    inputs: Tensor,
    modules: list[nn.Module] | None = None,
) -> Known | None:
    """Return what a full search found for ``layer`` (``None``: the default layer).

    Only for the same input shape, dtype and device, and while the model holds the same
    modules (the same objects, of the same classes, in the same order, each in the same
    training or evaluation mode); else ``None``. ``modules``: the model's modules, walked by
    the caller (:func:`~salience._checks.modules_of`).
    """
    found: Known | None = _recalled(model, _key(layer, inputs), modules)
    return found


def remember(
    model: nn.Module,
    layer: str | None,
    inputs: Tensor,
    known: Known,
    modules: list[nn.Module] | None = None,
) -> None:
    """Keep what a full search found for ``layer`` (``None``: the default layer).

    ``modules``: as for :func:`recall` (walked at the start of the call that searched: a model
    that changes its modules while it runs is found changed by the next call).
    """
    _keep(model, _key(layer, inputs), known, modules)


def forget(model: nn.Module, layer: str | None, inputs: Tensor) -> None:
    """Drop what was remembered for ``layer`` (it no longer holds)."""
    _drop(model, _key(layer, inputs))


def _recalled(model: nn.Module, key: tuple[Any, ...], modules: list[nn.Module] | None) -> Any:
    """Return what was kept under ``key`` for ``model`` while its modules are the same, or ``None``.

    The memory of :func:`recall`, which other searches share (CAM's classifier) under keys of
    their own.
    """
    with _MEMO_LOCK:
        memo = _MEMO.get(model)
        if memo is None:
            return None
        if memo.fingerprint != _fingerprint(model, modules):
            del _MEMO[model]
            return None
        return memo.found.get(key)


def _keep(
    model: nn.Module, key: tuple[Any, ...], value: Any, modules: list[nn.Module] | None
) -> None:
    """Keep ``value`` under ``key`` for ``model`` (see :func:`_recalled`)."""
    fingerprint = _fingerprint(model, modules)
    with _MEMO_LOCK:
        memo = _MEMO.get(model)
        if memo is None or memo.fingerprint != fingerprint:
            memo = _MEMO[model] = _Memo(fingerprint)
        if len(memo.found) >= _MEMO_SIZE:
            del memo.found[next(iter(memo.found))]
        memo.found[key] = value


def _drop(model: nn.Module, key: tuple[Any, ...]) -> None:
    """Drop what was kept under ``key`` for ``model`` (it no longer holds)."""
    with _MEMO_LOCK:
        memo = _MEMO.get(model)
        if memo is not None:
            memo.found.pop(key, None)
