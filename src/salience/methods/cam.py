r"""Class activation maps: CAM, Grad-CAM, Guided Grad-CAM, Grad-CAM++, LayerCAM.

Every method shares one kernel: per-channel (or per-position) weights ``w`` times the
activations ``A`` of a layer, summed over channels, rectified where the paper does it, and
resized to the input:

.. math:: L^c = \mathrm{ReLU}\Big(\sum_k w_k^c \odot A^k\Big), \qquad
          \texttt{values} = \mathrm{Up}_{\text{bilinear}}(L^c)

Only the weight function differs from method to method. Maps are raw: no min-max
normalization (that belongs in visualization); the ReLU is the one the papers define, and
``relu=False`` keeps the signed map. Score-CAM, whose weights are scores of masked inputs
rather than gradients, is in :mod:`salience.methods.score_cam`; it shares this kernel, and
what is said here of the layer and of several targets applies to it as well.

**The layer.** ``layer=`` takes a submodule or its dotted name. By default the last layer
output that reads as a spatial map is used (see :mod:`salience.layers` for the rules): a
convolutional map ``(N, C, h, w)``, a channels-last map ``(N, h, w, C)`` (Swin's final
``norm``), or a token sequence ``(N, s + h*w, C)`` whose ``s`` leading class/register tokens
are dropped and whose patch tokens are folded into the ``h x w`` grid (a ViT). Its name is
recorded in :attr:`Attribution.layer` and how it was read in ``extras["layout"]``
(``"NCHW"``, ``"NHWC"``, ``"tokens 1+14x14"``, or ``"custom"`` for a ``reshape=`` of yours):
``"layer4"`` for a torchvision ResNet (the stage, rather than its last ReLU, which returns the
same tensor), ``"features"`` for a VGG, ``"norm"`` (NHWC) for a Swin, ``"blocks.11.norm1"``
(tokens) for a ViT that classifies its class token: the final ``norm`` would have zero
gradients at every patch token. Attention tensors ``(N, heads, tokens, head_dim)`` are never
taken for maps. A module that runs several times per forward pass is explained at its
**last** call (the default layer: its last call computed from the image, not a reference
image's from ``forward_args``), and ``extras["layer_calls"]`` says how many calls there were,
``extras["layer_call"]`` which was explained. On
EfficientNet-Lite0 the default is therefore ``"_swish"``, the ReLU6 module shared by the stem
and the head, at its second call: the activated head features, exactly the map the classifier
pools (the choice CAM needs). The model output itself is never chosen, nor a class map the
output merely upsamples (nor the maps it upsamples the sum of, as LRASPP does), so a
segmentation network is explained at its last inner feature map. Where the layout cannot be
decided, the methods raise an error that names the candidate layers and shows the ``layer=``
and ``reshape=`` to pass.

**Several targets.** ``target`` may be an ``(N, K)`` tensor of class indices: ``values`` is
then ``(N, K, H, W)``, one map per target, from one forward pass and one batched backward pass
(``torch.autograd.grad(..., is_grads_batched=True)``); the maps equal ``K`` separate calls. A
single target gives ``values`` of shape ``(N, 1, H, W)``.

**Other layouts.** A layer given with ``layer=`` is read by the same rules (``layer="norm"``
on a Swin is read channels-last). ``reshape=`` overrides them: it turns the layer output into
``(N, K, h, w)``, e.g. for the tokens ``(N, 1 + h w, D)`` of a ViT: ``reshape=lambda t: t[:,
1:].unflatten(1, (h, w)).permute(0, 3, 1, 2)``. It is applied to the gradient as well, so it
must only select and rearrange elements; this is checked.

Nothing here changes the model: hooks live for one call (see :mod:`salience.layers`),
gradients are taken with ``torch.autograd.grad`` (parameter ``.grad`` untouched), inputs are
never modified, and train/eval flags are left as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._forward import Forward, ForwardArgs, model_scope
from ..attribution import Attribution
from ..hooks import forward_hooks
from ..layers import LayerLike, _drop, _keep, _recalled, find_layer
from ..layouts import Reshape
from ..rectifiers import Activations, resolve_activations
from ..registry import register
from ..targets import Score, TargetLike
from ._cam_capture import _Capture, _capture, _combine, _gradients, _result, _size
from .gradient import guided_backprop

__all__ = [
    "cam",
    "grad_cam",
    "grad_cam_plus_plus",
    "guided_grad_cam",
    "layer_cam",
]


# -- CAM -------------------------------------------------------------------------------------


@dataclass
class _LinearRecord:
    name: str = ""
    calls: int = 0
    inputs: Tensor | None = None
    output: Tensor | None = None
    version: int = 0
    module: nn.Linear | nn.Conv2d | None = field(default=None, repr=False)
    heads: list[_LinearRecord] = field(default_factory=list, repr=False)
    """The calls whose output could be logits, ``(N, K)`` or ``(N, K, 1, 1)``, in order."""


def _is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is ``nn.Linear`` or a ``1 x 1`` convolution (DLA's and DPN's head)."""
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.groups == 1
        and module.padding in ((0, 0), "valid")
    )


@contextlib.contextmanager
def _record_linear(
    model: nn.Module, linears: list[tuple[str, nn.Module]] | None
) -> Iterator[_LinearRecord]:
    """Record the last call of ``linears`` (``None``: every linear) and those giving logits."""
    if linears is None:
        linears = [(n, m) for n, m in model.named_modules() if _is_linear(m)]
    record = _LinearRecord()

    def hook(name: str, module: nn.Module, args: Any, output: Any) -> None:
        record.name, record.calls = name, record.calls + 1
        record.module = module  # type: ignore[assignment]  # only linear layers are hooked
        record.inputs = args[0] if args and isinstance(args[0], Tensor) else None
        record.output = output if isinstance(output, Tensor) else None
        record.version = output._version if isinstance(output, Tensor) else 0
        out = record.output
        if out is not None and (out.ndim == 2 or (out.ndim == 4 and out.shape[2:] == (1, 1))):
            call = _LinearRecord(record.name, record.calls, record.inputs, out, record.version)
            call.module = record.module
            record.heads.append(call)

    with forward_hooks(linears, hook):
        yield record


def _head(linear: _LinearRecord, out: Any, n: int) -> _LinearRecord | None:
    """Return the last recorded call whose output is the model output ``out``, or ``None``.

    The last, not the last linear call: a projection the model runs after its classifier (an
    embedding it keeps on the side) does not hide it, as a remembered classifier would not.
    """
    if not isinstance(out, Tensor):
        return None
    for call in reversed(linear.heads):
        assert call.output is not None
        logits = call.output.reshape(n, -1)  # a 1 x 1 convolution's (N, classes, 1, 1)
        if (
            call.output._version == call.version
            and out.shape == logits.shape
            and torch.equal(out, logits)
        ):
            return call
    return None


def _given_fc(model: nn.Module, fc: LayerLike) -> list[tuple[str, nn.Module]]:
    name, module = find_layer(model, fc)
    if not _is_linear(module):
        raise TypeError(
            f"fc must be a linear layer (nn.Linear or a 1 x 1 nn.Conv2d); {name!r} is "
            f"{type(module).__name__}"
        )
    return [(name, module)]


def _remembered_fc(
    model: nn.Module, inputs: Tensor, modules: list[nn.Module] | None
) -> list[tuple[str, nn.Module]] | None:
    """Return the classifier a full search found for ``model`` and this input shape, or ``None``.

    Finding it hooks every linear layer and 1 x 1 convolution of the model (33 on
    EfficientNet-Lite0, each hook a Python call per forward pass: 5 % of a call at batch 1
    there); later calls hook the one found. Kept in the memory of the layer searches
    (:func:`salience.layers.recall`: while the model holds the same modules); a call that finds
    the classifier no longer fits (it did not run, or no longer gives the output) searches again.
    """
    name = _recalled(model, _classifier_key(inputs), modules)
    if name is None:
        return None
    try:
        return [(name, model.get_submodule(name))]
    except AttributeError:  # a name get_submodule does not resolve: search as at first
        return None


def _classifier_key(inputs: Tensor) -> tuple[Any, ...]:
    # (a tuple first: no layer key, whose first item is a name or None, can be equal)
    return (("cam", "classifier"), tuple(inputs.shape), inputs.dtype, inputs.device)


class _NotCam(ValueError):
    """The model is not GAP + linear at the classifier used (see :data:`_NOT_CAM`)."""


_NOT_CAM = (
    "cam (Zhou et al. 2016) applies only to networks whose logits are one linear layer "
    "applied to the global average of the last feature map, and {reason}. Use grad_cam: it "
    "needs no particular architecture, and on a GAP + linear network it equals CAM up to "
    "the constant factor 1/(h*w)"
)


@register("cam", kind="cam")
def cam(
    model: nn.Module,
    inputs: Tensor,
    target: TargetLike = None,
    *,
    layer: LayerLike | None = None,
    reshape: Reshape | None = None,
    fc: LayerLike | None = None,
    relu: bool = False,
    upsample: bool = True,
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
) -> Attribution:
    r"""Class activation mapping (Zhou et al. 2016), for global average pooling + linear heads.

    When the logits are :math:`y^c = \sum_k w_k^c \frac{1}{hw}\sum_{ij} A^k_{ij} + b^c`, the
    map of class :math:`c` is

    .. math:: M^c_{ij} = \sum_k w_k^c A^k_{ij},

    and its spatial mean plus the bias is the logit: :math:`\overline{M^c} + b^c = y^c`. The
    paper's map is signed (no ReLU); ``relu=True`` rectifies it.

    The pattern is checked on the actual forward pass, not guessed from module types: an
    ``nn.Linear`` that runs (or ``fc``) must produce the model output, and its input must be
    the spatial mean of ``layer``'s feature map. Any other architecture raises a ``ValueError``
    that says which condition failed and points to :func:`grad_cam`.

    Args:
        model: A classifier ending in global average pooling and a linear layer.
        inputs: ``(N, C, H, W)`` preprocessed images.
        target: Class indices: ``None`` (the prediction), an int, ``N`` ints or an ``(N, K)``
            tensor for ``K`` maps per sample. The weights are those of a class, so callable
            targets are not supported.
        layer: The pooled layer; by default the last spatial feature map.
        reshape: Turns the layer output into ``(N, K, h, w)`` (see :func:`grad_cam`), e.g. the
            patch tokens of a transformer whose head averages them.
        fc: The linear classifier; by default the last ``nn.Linear`` (or ``1 x 1``
            convolution on the pooled features, as in DLA and DPN) that runs and gives the
            model output (a projection run after it, kept on the side, does not hide it).
            The one found is
            remembered for the model and input shape (later calls hook it alone), and searched
            for again when it no longer runs or no longer gives the output.
        relu: Rectify the map (not part of CAM).
        upsample: Resize the map to the input size (bilinear); ``False`` keeps ``(h, w)``.
        forward_args: Extra arguments for the model after the image (see
            :func:`salience.gradient`).
        allow_tf32: Let CUDA use TF32 (faster, less exact); off by default.

    Returns:
        ``values`` of shape ``(N, 1, H, W)`` (``(N, K, H, W)`` for ``K`` targets);
        ``extras["weights"]``: the ``(N, T, K)`` class weights used; ``extras["fc"]``: the
        classifier's name.

    Raises:
        ValueError: the network is not GAP + linear, or bad arguments.
        TypeError: a callable target.

    References:
        Zhou, Khosla, Lapedriza, Oliva, Torralba. Learning Deep Features for Discriminative
        Localization. CVPR 2016, arXiv:1512.04150.
    """
    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as fwd:
        if callable(target) and not isinstance(target, Tensor):
            raise TypeError(
                "cam weighs channels with the classifier row of a class, so it needs class "
                "indices; for a callable target use grad_cam"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"cam needs an nn.Module model, got {type(model).__name__}")
        if fc is not None:
            try:
                return _cam(
                    fwd, inputs, target, layer, reshape, _given_fc(model, fc), relu, upsample
                )
            except _NotCam as error:
                raise ValueError(str(error)) from None
        remembered = _remembered_fc(model, inputs, fwd.modules)
        if remembered is not None:
            try:
                return _cam(fwd, inputs, target, layer, reshape, remembered, relu, upsample)
            except _NotCam:  # (a full search says what does not fit, if anything)
                _drop(model, _classifier_key(inputs))
        try:
            result = _cam(fwd, inputs, target, layer, reshape, None, relu, upsample)
        except _NotCam as error:
            raise ValueError(str(error)) from None  # (said as the ValueError it is)
        _keep(model, _classifier_key(inputs), result.extras["fc"], fwd.modules)
        return result


def _cam(
    fwd: Forward,
    inputs: Tensor,
    target: TargetLike,
    layer: LayerLike | None,
    reshape: Reshape | None,
    linears: list[tuple[str, nn.Module]] | None,
    relu: bool,
    upsample: bool,
) -> Attribution:
    """CAM with the classifier among ``linears`` (``None``: every linear; see :func:`_head`)."""
    with _record_linear(fwd.model, linears) as linear:
        cap = _capture(fwd, inputs, target, layer=layer, reshape=reshape, score="logit", grad=False)
    n = inputs.shape[0]
    activation = cap.activation
    if linear.calls == 0 or linear.module is None or linear.output is None:
        what = "no linear layer ran"
        if linears is not None:
            what = f"the fc layer {linears[0][0]!r} did not run"
        raise _NotCam(_NOT_CAM.format(reason=f"{what} in the forward pass"))
    out = cap.output
    head = _head(linear, out, n)
    if head is None:
        raise _NotCam(
            _NOT_CAM.format(
                reason=f"the model output is not the output of its last linear layer "
                f"{linear.name!r} (something is applied after it)"
            )
        )
    linear = head
    # (detached: a token layer is found with autograd on, and float() of a tensor in a graph
    # warns)
    features = None if linear.inputs is None else linear.inputs.detach().reshape(n, -1)
    pooled = activation.detach().mean(dim=(2, 3))
    if features is None or features.shape != pooled.shape:
        got = "nothing" if features is None else f"{tuple(features.shape[1:])} features"
        raise _NotCam(
            _NOT_CAM.format(
                reason=f"the input of {linear.name!r} ({got}) is not the global average of "
                f"layer {cap.layer!r} ({activation.shape[1]} channels)"
            )
        )
    scale = float(pooled.abs().amax()) + 1e-12
    if not torch.allclose(features, pooled, rtol=1e-4, atol=1e-5 * scale):
        gap = float((features - pooled).abs().amax())
        raise _NotCam(
            _NOT_CAM.format(
                reason=f"the input of {linear.name!r} differs from the spatial mean of layer "
                f"{cap.layer!r} by up to {gap:.3g} (is something between them, such as dropout "
                "in training mode or a non-linearity?)"
            )
        )
    classes = cap.resolved.classes
    assert classes is not None
    assert linear.module is not None
    rows = classes if cap.multi else classes.unsqueeze(1)  # (N, T)
    matrix = linear.module.weight.detach().flatten(1)  # (classes, K), a 1 x 1 conv's too
    weights = matrix[rows].to(activation.dtype)  # (N, T, K)
    values = _combine(weights[..., None, None], activation, relu=relu, size=_size(inputs, upsample))
    return _result("cam", cap, values, {"weights": weights, "fc": linear.name}, relu=relu)


# -- gradient-weighted CAMs ------------------------------------------------------------------


def _grad_capture(
    forward: Forward,
    inputs: Tensor,
    target: TargetLike,
    layer: LayerLike | None,
    reshape: Reshape | None,
    score: Score,
) -> _Capture:
    return _capture(forward, inputs, target, layer=layer, reshape=reshape, score=score, grad=True)


@register("grad_cam", kind="cam")
def grad_cam(
    model: nn.Module,
    inputs: Tensor,
    target: TargetLike = None,
    *,
    layer: LayerLike | None = None,
    reshape: Reshape | None = None,
    relu: bool = True,
    upsample: bool = True,
    counterfactual: bool = False,
    score: Score = "logit",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
) -> Attribution:
    r"""Grad-CAM (Selvaraju et al. 2017): activations weighted by their mean gradient.

    .. math:: \alpha_k^c = \frac{1}{hw}\sum_{ij}\frac{\partial y^c}{\partial A^k_{ij}},\qquad
              L^c = \mathrm{ReLU}\Big(\sum_k \alpha_k^c A^k\Big)

    :math:`y^c` is the score before the softmax (``score="logit"``, the paper's choice). On a
    network ending in global average pooling and a linear layer,
    :math:`\alpha_k^c = w_k^c / (hw)`, so Grad-CAM is CAM divided by :math:`hw` (§3.1).

    ``counterfactual=True`` gives the paper's counterfactual explanation (§3.3): the weights
    of the negated gradient, :math:`\alpha_k^c = \frac{1}{hw}\sum_{ij} -\partial y^c / \partial
    A^k_{ij}`, which highlights the regions whose removal would make the network more
    confident in class :math:`c`.

    Args:
        model: Any differentiable network with a spatial layer (or ``reshape``).
        inputs: ``(N, C, H, W)`` preprocessed images.
        target: What to explain (see :mod:`salience.targets`); an ``(N, K)`` integer tensor
            gives ``K`` maps per sample from one forward and one batched backward pass.
        layer: A submodule or its dotted name; by default the last spatial feature map (see
            the module documentation). A module called several times is taken at its last
            call.
        reshape: Turns the layer output into ``(N, K, h, w)`` (transformers); must only
            select and rearrange elements.
        relu: Apply the paper's ReLU; ``False`` keeps the signed map.
        upsample: Resize to the input size (bilinear); ``False`` keeps the layer resolution.
        counterfactual: Explain with the negated gradients (§3.3).
        score: ``"logit"``, ``"probability"`` or ``"log_probability"`` of a class target.
        forward_args: Extra arguments for the model after the image (see
            :func:`salience.gradient`).
        allow_tf32: Let CUDA use TF32 (faster, less exact); off by default.

    Returns:
        ``values`` of shape ``(N, 1, H, W)`` (``(N, K, H, W)`` for ``K`` targets), with the
        layer name in :attr:`Attribution.layer`; ``extras["weights"]``: ``alpha``,
        ``(N, T, K)``.

    References:
        Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra. Grad-CAM: Visual Explanations from
        Deep Networks via Gradient-based Localization. ICCV 2017, arXiv:1610.02391.
    """
    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as fwd:
        cap = _grad_capture(fwd, inputs, target, layer, reshape, score)
        grads = _gradients(cap, sign=-1.0 if counterfactual else 1.0)
        weights = grads.mean(dim=(3, 4), keepdim=True)
        values = _combine(weights, cap.activation, relu=relu, size=_size(inputs, upsample))
        extras = {"weights": weights[..., 0, 0], "counterfactual": counterfactual}
        return _result("grad_cam", cap, values, extras, relu=relu)


@register("grad_cam_plus_plus", kind="cam")
def grad_cam_plus_plus(
    model: nn.Module,
    inputs: Tensor,
    target: TargetLike = None,
    *,
    layer: LayerLike | None = None,
    reshape: Reshape | None = None,
    relu: bool = True,
    upsample: bool = True,
    score: Score = "logit",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
) -> Attribution:
    r"""Grad-CAM++ (Chattopadhyay et al. 2018): positive gradients, weighted per position.

    With :math:`Y^c = \exp(S^c)` and :math:`g = \partial S^c / \partial A^k_{ij}`, the
    higher derivatives of Eq. 19 reduce to powers of :math:`g` (Eqs. 17-19):

    .. math:: \alpha^{kc}_{ij} = \frac{g_{ij}^2}{2 g_{ij}^2 + \sum_{ab} A^k_{ab}\, g_{ij}^3},
              \qquad w^c_k = \sum_{ij} \alpha^{kc}_{ij}\, \mathrm{ReLU}(g_{ij}),
              \qquad L^c = \mathrm{ReLU}\Big(\sum_k w^c_k A^k\Big)

    with :math:`\alpha = 0` where :math:`g = 0` or the denominator vanishes. Eq. 19 also
    multiplies every weight of a sample by :math:`\exp(S^c)`; that positive factor is left out
    (as pytorch-grad-cam and torchcam do), because it would overflow float32 for scores above
    88 and changes nothing but the scale. pytorch-grad-cam adds ``1e-6`` to the denominator;
    here the formula is exact. torchcam's variant sums :math:`A^k_{ab} g_{ab}^3` over positions,
    which is not Eq. 19.

    Args:
        model: Any differentiable network with a spatial layer (or ``reshape``).
        inputs: ``(N, C, H, W)`` preprocessed images.
        target: What to explain; ``(N, K)`` for ``K`` maps per sample.
        layer: See :func:`grad_cam`.
        reshape: See :func:`grad_cam`.
        relu: Apply the paper's ReLU to the map.
        upsample: Resize to the input size (bilinear).
        score: The score :math:`S^c` (the paper uses the logit).
        forward_args: Extra arguments for the model after the image (see
            :func:`salience.gradient`).
        allow_tf32: Let CUDA use TF32 (faster, less exact); off by default.

    Returns:
        ``values`` ``(N, 1, H, W)`` or ``(N, K, H, W)``; ``extras["weights"]``: ``(N, T, K)``.

    References:
        Chattopadhyay, Sarkar, Howlader, Balasubramanian. Grad-CAM++: Improved Visual
        Explanations for Deep Convolutional Networks. WACV 2018, arXiv:1710.11063.
    """
    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as fwd:
        cap = _grad_capture(fwd, inputs, target, layer, reshape, score)
        g = _gradients(cap)
        g2 = g * g
        total = cap.activation.detach().sum(dim=(2, 3))[:, None, :, None, None]
        denominator = 2 * g2 + total * g2 * g
        valid = (g != 0) & (denominator != 0)
        alpha = torch.where(valid, g2 / torch.where(valid, denominator, 1.0), 0.0)
        weights = (alpha * g.clamp(min=0)).sum(dim=(3, 4), keepdim=True)
        values = _combine(weights, cap.activation, relu=relu, size=_size(inputs, upsample))
        why = (
            f"(no channel of layer {cap.layer!r} has a positive gradient of the score: "
            "Grad-CAM++ weighs channels by their positive gradients only; an earlier layer= "
            "may show evidence)"
        )
        extras = {"weights": weights[..., 0, 0]}
        return _result("grad_cam_plus_plus", cap, values, extras, relu=relu, why=why)


@register("layer_cam", kind="cam")
def layer_cam(
    model: nn.Module,
    inputs: Tensor,
    target: TargetLike = None,
    *,
    layer: LayerLike | None = None,
    reshape: Reshape | None = None,
    relu: bool = True,
    upsample: bool = True,
    score: Score = "logit",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
) -> Attribution:
    r"""LayerCAM (Jiang et al. 2021): every position weighted by its own positive gradient.

    .. math:: L^c_{ij} = \mathrm{ReLU}\Big(\sum_k \mathrm{ReLU}\Big(
              \frac{\partial y^c}{\partial A^k_{ij}}\Big) A^k_{ij}\Big)

    Unlike Grad-CAM, the weights are not averaged over positions, so shallow layers give
    fine-grained maps.

    Args:
        model: Any differentiable network with a spatial layer (or ``reshape``).
        inputs: ``(N, C, H, W)`` preprocessed images.
        target: What to explain; ``(N, K)`` for ``K`` maps per sample.
        layer: See :func:`grad_cam`.
        reshape: See :func:`grad_cam`.
        relu: Apply the paper's final ReLU (a no-op for non-negative activations).
        upsample: Resize to the input size (bilinear).
        score: The score :math:`y^c` (the paper uses the logit).
        forward_args: Extra arguments for the model after the image (see
            :func:`salience.gradient`).
        allow_tf32: Let CUDA use TF32 (faster, less exact); off by default.

    Returns:
        ``values`` ``(N, 1, H, W)`` or ``(N, K, H, W)``.

    References:
        Jiang, Zhang, Hou, Cheng, Wei. LayerCAM: Exploring Hierarchical Class Activation Maps
        for Localization. IEEE Transactions on Image Processing 30, 2021.
    """
    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as fwd:
        cap = _grad_capture(fwd, inputs, target, layer, reshape, score)
        weights = _gradients(cap).clamp(min=0)
        values = _combine(weights, cap.activation, relu=relu, size=_size(inputs, upsample))
        why = (
            f"(no channel of layer {cap.layer!r} has a positive gradient of the score where "
            "it is active: Layer-CAM keeps only positive gradients; an earlier layer= may show "
            "evidence)"
        )
        return _result("layer_cam", cap, values, relu=relu, why=why)


@register("guided_grad_cam")
def guided_grad_cam(
    model: nn.Module,
    inputs: Tensor,
    target: TargetLike = None,
    *,
    layer: LayerLike | None = None,
    reshape: Reshape | None = None,
    score: Score = "logit",
    activations: Activations = "rectifiers",
    forward_args: ForwardArgs = None,
    allow_tf32: bool = False,
) -> Attribution:
    r"""Guided Grad-CAM (Selvaraju et al. 2017): guided backprop times the upsampled Grad-CAM.

    .. math:: G^c = \mathrm{GuidedBackprop}^c(x) \odot \mathrm{Up}_{\text{bilinear}}
              \big(L^c_{\text{Grad-CAM}}\big)

    ``values`` has the shape of the inputs; :meth:`Attribution.saliency` takes the max over
    channels of the absolute value, as for guided backprop. It takes two forward passes: the
    guided rule must not touch the gradient that Grad-CAM averages. Captum's
    ``GuidedGradCam`` upsamples with ``"nearest"`` by default; here, as in the paper's figures,
    bilinear. ``extras["grad_cam"]`` holds the ``(N, 1, H, W)`` Grad-CAM factor.

    Args:
        model: Any differentiable network with a spatial layer (or ``reshape``).
        inputs: ``(N, C, H, W)`` preprocessed images.
        target: What to explain: one target per sample (``(N, K)`` targets are not
            supported here; call once per target column).
        layer: See :func:`grad_cam`.
        reshape: See :func:`grad_cam`.
        score: See :func:`grad_cam`.
        activations: Where the guided rule applies; see :func:`salience.guided_backprop`.
        forward_args: Extra arguments for the model after the image (see
            :func:`salience.gradient`).
        allow_tf32: Let CUDA use TF32 (faster, less exact); off by default.

    Returns:
        ``values`` of the shape of ``inputs``, with the Grad-CAM layer in
        :attr:`Attribution.layer`; ``extras["rectifiers"]`` and
        ``extras["activations_modified"]`` as in :func:`salience.guided_backprop`.

    Raises:
        ValueError: an ``(N, K)`` target, the errors of :func:`grad_cam`, or those of
            :func:`salience.guided_backprop` (a model without rectifiers).

    References:
        Selvaraju et al. Grad-CAM, ICCV 2017, arXiv:1610.02391 (§3.2); Springenberg et al.
        Striving for Simplicity, arXiv:1412.6806 (guided backpropagation).
    """
    if isinstance(target, Tensor) and target.ndim == 2:
        raise ValueError(
            "guided_grad_cam explains one target per sample; for an (N, K) target call it "
            "once per column, target=target[:, k]"
        )
    resolve_activations(activations)  # a bad option fails before any forward pass
    options: dict[str, Any] = {"forward_args": forward_args, "allow_tf32": allow_tf32}
    gc = grad_cam(model, inputs, target, layer=layer, reshape=reshape, score=score, **options)
    gb_target = gc.target if gc.target is not None else target
    gb = guided_backprop(model, inputs, gb_target, score=score, activations=activations, **options)
    return Attribution(
        values=gb.values * gc.values,
        target=gc.target,
        scores=gc.scores,
        method="guided_grad_cam",
        output=gc.output,
        extras={
            "layer_calls": gc.extras["layer_calls"],
            "layout": gc.extras["layout"],
            "grad_cam": gc.values,
            "rectifiers": gb.extras["rectifiers"],
            "activations_modified": gb.extras["activations_modified"],
        },
        reduction="abs_max",
        layer=gc.layer,
    )
