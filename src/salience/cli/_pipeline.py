"""Loading ``--model`` with its input pipeline, and resolving class names and ``--target``."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._common import TORCHVISION_MEAN, TORCHVISION_STD, CLIError, UsageError, _one_line, slug

# -- model and input pipeline ----------------------------------------------------------------


@dataclass
class Pipeline:
    """A model with everything the commands need around it."""

    model: Any
    name: str
    device: Any
    preprocess: Callable[[Any], Any]
    crop: Callable[[Any], Any]
    to_image: Callable[[Any], Any]
    class_names: list[str] | None
    num_classes: int
    imagenet: bool = False
    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def name_of(self, index: int) -> str:
        """Display name of class ``index``."""
        if self.class_names is not None and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return f"class {index}"

    def file_label(self, index: int) -> str:
        """Return the ``<class>`` part of output file names: ``285-Egyptian_cat``, or ``3``."""
        if self.class_names is None:
            return str(index)
        return f"{index}-{slug(self.name_of(index))}"


def _device(text: str) -> Any:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device {text!r}: {_one_line(exc)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device {text}: CUDA is not available here (no GPU, or a CPU build of torch "
            f"{torch.__version__}); use --device cpu"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {text}: MPS is not available here; use --device cpu")
    return device


def _read_labels(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CLIError(f"{path}: cannot read the labels file ({exc.strerror or exc})") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CLIError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict):
            try:
                data = [data[k] for k in sorted(data, key=int)]
            except (ValueError, TypeError):
                raise CLIError(f"{path}: a JSON object of labels needs index keys") from None
        if not isinstance(data, list):
            raise CLIError(f"{path}: expected a JSON list of class names")
        return [str(item[0] if isinstance(item, list) and item else item) for item in data]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _generic_pipeline(
    args: argparse.Namespace, device: Any, mean: Sequence[float], std: Sequence[float]
) -> tuple[Callable[[Any], Any], Callable[[Any], Any], Callable[[Any], Any]]:
    from ..models import deprocess_image, preprocess_image, resize_center_crop

    size = args.input_size
    resize = max(args.resize or round(size * 256 / 224), size)
    mean, std = tuple(mean), tuple(std)

    def preprocess(image: Any) -> Any:
        return preprocess_image(image, size=size, resize=resize, mean=mean, std=std).to(device)

    def crop(image: Any) -> Any:
        return resize_center_crop(image, size=size, resize=resize)

    def to_image(tensor: Any) -> Any:
        return deprocess_image(tensor, mean=mean, std=std)

    return preprocess, crop, to_image


def _load_hub_model(spec: str, device: Any) -> tuple[Any, list[str] | None, dict[str, Any]]:
    """``torchvision:NAME`` or ``timm:NAME``: optional packages, imported only here."""
    source, _, name = spec.partition(":")
    if source == "torchvision":
        try:
            import torchvision  # type: ignore[import-not-found]
        except ImportError:
            raise CLIError(
                f"--model {spec}: torchvision is not installed (pip install torchvision)"
            ) from None
        import torch

        try:
            weights = torchvision.models.get_model_weights(name).DEFAULT
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            if not cached.is_file():  # salience never downloads at run time
                raise CLIError(
                    f"--model {spec}: its weights are not in the local cache ({cached}); "
                    "salience never downloads. Fetch them once yourself, e.g. with "
                    f"torchvision.models.get_model({name!r}, weights='DEFAULT')"
                )
            model = torchvision.models.get_model(name, weights=weights)
        except CLIError:
            raise
        except Exception as exc:
            raise CLIError(
                f"--model {spec}: cannot load torchvision model {name!r} with its default "
                f"weights ({_one_line(exc)})"
            ) from None
        transforms = weights.transforms()
        crop = getattr(transforms, "crop_size", [224])
        resize = getattr(transforms, "resize_size", [256])
        info = {
            "input_size": int(crop[0]),
            "resize": int(resize[0]),
            "mean": tuple(getattr(transforms, "mean", TORCHVISION_MEAN)),
            "std": tuple(getattr(transforms, "std", TORCHVISION_STD)),
        }
        names = list(weights.meta.get("categories") or []) or None
        return model, names, info
    # salience never downloads at run time: timm may only read its local Hugging Face cache.
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import timm  # type: ignore[import-not-found]
    except ImportError:
        raise CLIError(f"--model {spec}: timm is not installed (pip install timm)") from None
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as exc:
        raise CLIError(
            f"--model {spec}: cannot load timm model {name!r} ({_one_line(exc)})"
        ) from None
    config = timm.data.resolve_data_config({}, model=model)
    size = int(config.get("input_size", (3, 224, 224))[-1])
    crop_pct = float(config.get("crop_pct", 0.875) or 0.875)
    info = {
        "input_size": size,
        "resize": int(size / crop_pct),
        "mean": tuple(config.get("mean", TORCHVISION_MEAN)),
        "std": tuple(config.get("std", TORCHVISION_STD)),
    }
    return model, None, info


def load_pipeline(args: argparse.Namespace) -> Pipeline:
    """Load ``--model`` with its input pipeline and class names, on ``--device``."""
    import torch

    from .. import models

    device = _device(args.device)
    spec = args.model
    names: list[str] | None = None
    hub: dict[str, Any] = {}
    if spec.startswith(("torchvision:", "timm:")):
        model, names, hub = _load_hub_model(spec, device)
        model.eval()
    else:
        try:
            model = models.load(spec, trust=args.trust_model, architecture=args.architecture)
        except (ValueError, FileNotFoundError, ImportError) as exc:
            raise CLIError(_one_line(exc)) from None
        except Exception as exc:
            raise CLIError(f"{spec}: cannot load the model ({_one_line(exc)})") from None
    try:
        model = model.to(device)
    except Exception as exc:
        raise CLIError(f"{spec}: cannot move the model to {device} ({_one_line(exc)})") from None

    own = all(callable(getattr(model, a, None)) for a in ("preprocess", "crop", "to_image"))
    if own and not hub:
        preprocess, crop, to_image = model.preprocess, model.crop, model.to_image
        size = tuple(getattr(model, "input_size", (224, 224)))
        mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    else:
        if hub:
            args.input_size = args.input_size_set or hub["input_size"]
            args.resize = args.resize or hub["resize"]
        mean = tuple(args.mean or hub.get("mean", TORCHVISION_MEAN))
        std = tuple(args.std or hub.get("std", TORCHVISION_STD))
        preprocess, crop, to_image = _generic_pipeline(args, device, mean, std)
        size = (args.input_size, args.input_size)

    probe = torch.zeros((1, 3, *size), device=device)
    try:
        with torch.no_grad():
            output = model(probe)
    except Exception as exc:
        raise CLIError(
            f"{spec}: the model fails on a {tuple(probe.shape)} input ({_one_line(exc)})"
        ) from None
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise CLIError(f"{spec}: the model must return (N, classes) logits, got {shape}")
    count = int(output.shape[1])

    imagenet = False
    if args.labels:
        names = _read_labels(args.labels)
    elif names is None:
        own_names = getattr(model, "class_names", None)
        if isinstance(own_names, Sequence) and not isinstance(own_names, str):
            names = [str(n) for n in own_names]
        elif count == models.imagenet.NUM_CLASSES:
            names = models.class_names()
    if names is not None and len(names) != count:
        raise CLIError(
            f"{args.labels or spec}: {len(names)} class names for a model with {count} outputs"
        )
    if names is not None and count == models.imagenet.NUM_CLASSES:
        imagenet = names == models.class_names()
    return Pipeline(
        model=model,
        name=spec,
        device=device,
        preprocess=preprocess,
        crop=crop,
        to_image=to_image,
        class_names=names,
        num_classes=count,
        imagenet=imagenet,
        input_size=(int(size[0]), int(size[1])),
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
    )


# -- classes and targets ---------------------------------------------------------------------


def lookup_class(text: str, pipe: Pipeline) -> int:
    """Resolve a class name or index against the model's classes; suggest close names."""
    from .. import models

    raw = " ".join(str(text).split())
    if re.fullmatch(r"[+-]?\d+", raw):
        index = int(raw)
        if not 0 <= index < pipe.num_classes:
            raise UsageError(
                f"class index {index} is out of range: the model has {pipe.num_classes} "
                f"classes (0-{pipe.num_classes - 1})"
            )
        return index
    if pipe.imagenet:
        for candidate in (raw, raw.replace("_", " ")):
            try:
                return models.class_index(candidate)
            except ValueError as exc:
                error = exc
        raise UsageError(_one_line(error)) from None
    if pipe.class_names is None:
        raise UsageError(
            f"unknown class {text!r}: the model has no class names (pass --labels FILE), so "
            "give a class index"
        )
    wanted = raw.replace("_", " ").lower()
    lowered = [n.lower() for n in pipe.class_names]
    matches = [i for i, name in enumerate(lowered) if name == wanted]
    if len(matches) > 1:
        listed = ", ".join(f"{i} ({pipe.class_names[i]!r})" for i in matches)
        raise UsageError(f"class name {text!r} is ambiguous: it names classes {listed}")
    if matches:
        return matches[0]
    close = difflib.get_close_matches(wanted, lowered, n=5, cutoff=0.6)
    hint = (
        "; did you mean "
        + ", ".join(f"{pipe.class_names[lowered.index(c)]!r}" for c in close)
        + "?"
        if close
        else "; give a class index or a name from the labels"
    )
    raise UsageError(f"unknown class name {text!r}{hint}")


@dataclass(frozen=True)
class TargetSpec:
    """``top`` (the ``k`` best classes) or one class index."""

    top: int = 0
    index: int | None = None


def parse_targets(values: Sequence[str] | None, pipe: Pipeline) -> list[TargetSpec]:
    """Parse ``--target`` values: ``top1``, ``top5``, a class index or a class name."""
    specs = []
    for value in values or ["top1"]:
        text = value.strip()
        match = re.fullmatch(r"top-?(\d+)", text, flags=re.IGNORECASE)
        if match:
            k = int(match.group(1))
            if not 1 <= k <= pipe.num_classes:
                raise UsageError(f"--target {text}: k must be in 1..{pipe.num_classes}")
            specs.append(TargetSpec(top=k))
        else:
            specs.append(TargetSpec(index=lookup_class(text, pipe)))
    return specs


def resolve_classes(specs: Sequence[TargetSpec], probabilities: Any) -> list[int]:
    """Return the classes to explain for one image, in order, without repeats."""
    classes: list[int] = []
    for spec in specs:
        picked = (
            probabilities.topk(spec.top).indices.tolist() if spec.top else [int(spec.index or 0)]
        )
        classes.extend(c for c in picked if c not in classes)
    return classes
