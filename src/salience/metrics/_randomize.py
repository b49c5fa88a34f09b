"""Which layers a parameter-randomization check randomizes, and how it randomizes them.

The layer discovery and re-initialization behind :func:`salience.metrics.parameter_randomization`
(the procedure is described in :mod:`salience.metrics.sanity`, steps 2 and 3): *units* are the
modules with parameters of their own, ordered by when their forward call returns; they are
grouped into layers and re-initialized on a copy of the model, each from its own seeded stream.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .._checks import check_inputs
from .._forward import ForwardArgs, model_scope
from ..hooks import forward_hooks

LayerSpec = str | Sequence[str]

_NORMS = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)

# --------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class _Unit:
    name: str
    module: nn.Module
    rank: int  # when its forward call returned, 0 first


def _units(model: nn.Module, run: Callable[[], Any]) -> tuple[list[_Unit], list[str]]:
    """Modules with own parameters, in the order their forward returns; and those never run.

    A parametrized module's parameters (``torch.nn.utils.parametrize``: weight norm, spectral
    norm) are its own: the parametrization modules that hold them are no units of their own.
    """
    owners = [
        (name, m)
        for name, m in model.named_modules()
        if ".parametrizations." not in f".{name}."
        and (any(True for _ in m.parameters(recurse=False)) or parametrize.is_parametrized(m))
    ]
    order: dict[str, int] = {}

    def hook(name: str, module: nn.Module, args: Any, output: Any) -> None:
        order.setdefault(name, len(order))

    with forward_hooks(owners, hook):
        run()
    units = [_Unit(n, m, order[n]) for n, m in owners if n in order]
    units.sort(key=lambda u: u.rank)
    unused = [n for n, _ in owners if n not in order]
    return units, unused


def _block_key(name: str) -> str:
    """Return a unit's default layer: its name up to and including the first numeric part."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def _default_groups(units: Sequence[_Unit]) -> list[tuple[str, list[_Unit]]]:
    groups: list[tuple[str, list[_Unit]]] = []
    for unit in units:
        key = _block_key(unit.name) if unit.name else "(root)"
        if groups and groups[-1][0] == key:
            groups[-1][1].append(unit)
        elif groups and isinstance(unit.module, _NORMS) and key == unit.name:
            groups[-1][1].append(unit)  # a norm joins the layer it normalizes
        else:
            groups.append((key, [unit]))
    return groups


def _named_groups(
    model: nn.Module, units: Sequence[_Unit], layers: Sequence[LayerSpec]
) -> list[tuple[str, list[_Unit]]]:
    names = dict(model.named_modules())
    groups: list[tuple[str, list[_Unit]]] = []
    for spec in layers:
        members = [spec] if isinstance(spec, str) else list(spec)
        if not members:
            raise ValueError("layers: an empty group of module names")
        chosen: list[_Unit] = []
        for member in members:
            if not isinstance(member, str):
                raise TypeError(f"layers: module names must be strings, got {member!r}")
            if member not in names:
                close = difflib.get_close_matches(member, list(names), n=3)
                hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
                raise ValueError(f"layers: the model has no module named {member!r}{hint}")
            prefix = member + "." if member else ""
            found = [u for u in units if u.name == member or u.name.startswith(prefix)]
            if not found:
                raise ValueError(
                    f"layers: module {member!r} has no parameters that the forward pass uses: "
                    "there is nothing to randomize in it"
                )
            chosen += [u for u in found if u not in chosen]
        chosen.sort(key=lambda u: u.rank)
        label = members[0] if len(members) == 1 else "+".join(members)
        groups.append((label or "(root)", chosen))
    return groups


def randomization_layers(
    model: nn.Module,
    inputs: Tensor,
    layers: Sequence[LayerSpec] | Literal["blocks", "units"] = "blocks",
    *,
    forward_args: ForwardArgs = None,
) -> list[tuple[str, list[str]]]:
    """Return the layers :func:`parameter_randomization` randomizes, from the input to the top.

    A forward pass on ``inputs`` orders the modules with parameters of their own (*units*) by
    when their forward call returns. ``layers`` groups them:

    - ``"blocks"`` (default): units under the same numbered block share a layer. A unit's
      layer is its name up to its first numeric part (``_blocks.12._bn1`` -> ``_blocks.12``,
      ``features.3`` -> ``features.3``, ``layer2.1.conv1`` -> ``layer2.1``; without one, the
      name itself), and a normalization layer (BatchNorm, LayerNorm, GroupNorm) that would be
      a layer of its own joins the layer before it (``_conv_stem`` + ``_bn0``);
    - ``"units"``: every unit is a layer;
    - a sequence of module names (or of sequences of names, one layer each): each layer holds
      the units inside the named modules.

    Args:
        model: The model.
        inputs: ``(N, C, H, W)`` inputs for the forward pass.
        layers: The grouping.
        forward_args: Extra arguments of the model.

    Returns:
        ``[(layer, [unit names])]`` in forward order (the input side first).

    Raises:
        ValueError: an unknown module name, a module without parameters, a model without
            parameters.
    """
    check_inputs(inputs)
    units = _discover(model, inputs, forward_args, allow_tf32=False)[0]
    return [(label, [u.name for u in group]) for label, group in _group(model, units, layers)]


def _discover(
    model: nn.Module, inputs: Tensor, forward_args: ForwardArgs, allow_tf32: bool
) -> tuple[list[_Unit], Tensor | Any]:
    if not isinstance(model, nn.Module):
        raise TypeError(
            "the sanity check randomizes the parameters of an nn.Module; got "
            f"{type(model).__name__}"
        )
    out: list[Any] = []
    with model_scope(model, inputs, forward_args=forward_args, allow_tf32=allow_tf32) as fwd:

        def run() -> None:
            with torch.no_grad():
                out.append(fwd(inputs.detach().clone()))

        units, _ = _units(model, run)
    if not units:
        raise ValueError(
            "the model has no parameters that its forward pass uses: there is nothing to randomize"
        )
    return units, out[0]


def _group(
    model: nn.Module,
    units: Sequence[_Unit],
    layers: Sequence[LayerSpec] | Literal["blocks", "units"],
) -> list[tuple[str, list[_Unit]]]:
    if isinstance(layers, str):
        if layers == "blocks":
            return _default_groups(units)
        if layers == "units":
            return [(u.name or "(root)", [u]) for u in units]
        raise ValueError(f"layers={layers!r}: expected 'blocks', 'units' or a list of module names")
    if not isinstance(layers, Sequence) or not layers:
        raise ValueError("layers must be 'blocks', 'units' or a non-empty list of module names")
    return _named_groups(model, units, layers)


# --------------------------------------------------------------------------- randomization


def _unit_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7919 + 12345) % (2**63 - 1)


def _hidden(module: nn.Module) -> list[nn.Parameter]:
    """Return the parameters a module computes its weight from, which resets miss.

    It re-initializes the computed ``weight`` instead, recomputed on the next forward pass: the
    originals of a parametrization, ``weight_orig`` of the legacy ``spectral_norm`` and
    ``weight_g`` / ``weight_v`` of the legacy ``weight_norm``.
    """
    found: list[nn.Parameter] = []
    if parametrize.is_parametrized(module):
        found.extend(_parametrizations(module).parameters())
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, SpectralNorm):
            found.append(getattr(module, f"{hook.name}_orig"))
        elif isinstance(hook, WeightNorm):
            found.extend([getattr(module, f"{hook.name}_g"), getattr(module, f"{hook.name}_v")])
    return found


def _parametrizations(module: nn.Module) -> nn.Module:
    parametrizations = module.parametrizations
    assert isinstance(parametrizations, nn.ModuleDict)
    return parametrizations


def _randomize(unit: _Unit, seed: int) -> None:
    """Re-initialize the unit's own parameters: ``reset_parameters()``, else a Gaussian.

    Parameters a weight is computed from (:func:`_hidden`) get the Gaussian in any case.
    """
    module = unit.module
    reset = getattr(module, "reset_parameters", None)
    hidden = _hidden(module)
    own = [*module.parameters(recurse=False), *hidden]
    devices = sorted({p.device.index or 0 for p in own if p.device.type == "cuda"})
    with torch.no_grad():
        if callable(reset):
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                reset()
            own = hidden
        generator = torch.Generator().manual_seed(seed)
        for p in own:
            values = p.detach().double()
            scale = values.std() if values.numel() > 1 else values.abs().reshape(())
            if not bool(torch.isfinite(scale)) or float(scale) == 0.0:
                scale = values.pow(2).mean().sqrt()
            draw = torch.randn(p.shape, generator=generator, dtype=torch.float64) * float(scale)
            p.copy_(draw.to(p.device, p.dtype))


def _snapshot(unit: _Unit) -> list[tuple[Tensor, Tensor]]:
    module = unit.module
    parametrized = parametrize.is_parametrized(module)
    inner = _parametrizations(module).buffers() if parametrized else []
    tensors = [*module.parameters(recurse=False), *_hidden(module)] + [
        b for b in [*module.buffers(recurse=False), *inner] if b is not None
    ]
    return [(t, t.detach().clone()) for t in tensors]


def _restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for tensor, value in saved:
            tensor.copy_(value)
