"""The ``salience`` command: explain images, compare methods, write reports, draw class models.

Run ``salience --help`` or ``salience COMMAND --help``. Exit status: 0 when everything
succeeded, 1 when nothing did (or a fatal error such as an unreadable model), 2 for a bad
command line, 3 when some inputs failed and others succeeded, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "COMPARE_METHODS",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "EXIT_USAGE",
    "main",
]

EXIT_OK = 0
"""Everything succeeded."""
EXIT_FAILURE = 1
"""Nothing succeeded, or a fatal error (e.g. the model cannot be read)."""
EXIT_USAGE = 2
"""A bad command line: unknown option, method or class name."""
EXIT_PARTIAL = 3
"""Some inputs failed and others succeeded; the failures are listed at the end."""
EXIT_INTERRUPTED = 130
"""Interrupted (Ctrl-C); files already written are complete, none is partial."""

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_OUT = "salience-out"

COMPARE_METHODS = (
    "gradient",
    "guided_backprop",
    "grad_cam",
    "guided_grad_cam",
    "integrated_gradients",
    "lrp",
)
"""The figure of the literature, in order; those that are registered are drawn, and any other
registered method whose name starts with ``lrp`` joins at the end."""

METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # The adaptive path: refine until the completeness gap is within 1 % of the score change,
    # with a cap that keeps one image within ~10 s on a laptop CPU.
    "integrated_gradients": {"tolerance": 0.01, "steps": 16, "max_steps": 128},
}
"""Method options the command line uses unless ``-O`` overrides them."""

TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)

EPILOG = """\
exit status:
  0   everything succeeded
  1   nothing succeeded, or a fatal error (e.g. the model file cannot be read)
  2   bad command line (unknown option, method or class name)
  3   partial failure: some images failed, the others were written; failures are listed
  130 interrupted; every file already written is complete (outputs are written atomically)
"""


class CLIError(Exception):
    """A failure to report on one line, with an exit status."""

    code = EXIT_FAILURE


class UsageError(CLIError):
    """A bad command line."""

    code = EXIT_USAGE


# -- output helpers --------------------------------------------------------------------------


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def slug(text: str) -> str:
    """Return a file-name-safe form of ``text``: letters, digits, ``-`` and ``_`` only."""
    cleaned = re.sub(r"[^0-9A-Za-z_-]+", "_", text).strip("_")
    return cleaned or "x"


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
    from .models import deprocess_image, preprocess_image, resize_center_crop

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

    from . import models

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
    from . import models

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
    if wanted in lowered:
        return lowered.index(wanted)
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


# -- methods and their options ---------------------------------------------------------------


def parse_methods(values: Sequence[str] | None, default: Sequence[str]) -> list[str]:
    """Parse ``--method`` values (repeatable, comma-separated; ``all`` for every method)."""
    from .registry import available_methods, get_method

    names: list[str] = []
    for value in values or []:
        for part in value.split(","):
            name = part.strip()
            if not name:
                continue
            if name == "all":
                names.extend(n for n in available_methods() if n not in names)
                continue
            try:
                get_method(name)
            except ValueError as exc:
                raise UsageError(_one_line(exc)) from None
            if name not in names:
                names.append(name)
    return names or list(default)


def _value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def method_options(
    items: Sequence[str] | None, methods: Sequence[str], layer: str | None
) -> dict[str, dict[str, Any]]:
    """Build ``{method: options}`` from the defaults, ``--layer`` and ``-O`` items.

    ``-O method.key=value`` sets an option of one method; ``-O key=value`` sets it for every
    requested method that has it.
    """
    from .registry import get_method

    specs = {m: get_method(m) for m in methods}
    options: dict[str, dict[str, Any]] = {m: dict(METHOD_DEFAULTS.get(m, {})) for m in methods}
    user: dict[str, dict[str, Any]] = {m: {} for m in methods}
    if layer is not None:
        takers = [m for m in methods if "layer" in specs[m].options]
        if not takers:
            raise UsageError("--layer applies to layer methods (the CAM family); none requested")
        for m in takers:
            user[m]["layer"] = layer
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"-O {item!r}: expected KEY=VALUE or METHOD.KEY=VALUE")
        key = key.strip()
        if "." in key:
            method, _, key = key.partition(".")
            if method not in specs:
                raise UsageError(
                    f"-O {item!r}: method {method!r} is not among the requested methods "
                    f"({', '.join(methods)})"
                )
            if key not in specs[method].options:
                raise UsageError(
                    f"-O {item!r}: {method} has no option {key!r}; its options are: "
                    f"{', '.join(specs[method].options) or 'none'}"
                )
            user[method][key] = _value(value)
        else:
            takers = [m for m in methods if key in specs[m].options]
            if not takers:
                raise UsageError(
                    f"-O {item!r}: none of the requested methods has an option {key!r}"
                )
            for m in takers:
                user[m][key] = _value(value)
    for m in methods:
        if "quadrature" in user[m] and "tolerance" not in user[m]:
            options[m].pop("tolerance", None)  # a fixed rule was asked for
        options[m].update(user[m])
    return options


def compare_methods() -> list[str]:
    """Return the registered methods of :data:`COMPARE_METHODS`, and registered LRP variants."""
    from .registry import available_methods

    registered = available_methods()
    names = [m for m in COMPARE_METHODS if m in registered]
    names += [m for m in registered if m.startswith("lrp") and m not in names]
    return names


# -- running over images ---------------------------------------------------------------------


@dataclass
class Run:
    """Bookkeeping of one command over many images: successes, failures, exit status."""

    command: str
    failures: list[str] = field(default_factory=list)
    written: int = 0
    images_ok: int = 0
    images_failed: int = 0

    def fail(self, message: str) -> None:
        self.failures.append(message)
        _err(f"salience {self.command}: error: {message}")

    def finish(self, total: int) -> int:
        if self.failures and total > 1:
            _err(f"salience {self.command}: {self.images_failed} of {total} images failed:")
            for message in self.failures:
                _err(f"  {message}")
        if not self.failures:
            return EXIT_OK
        return EXIT_PARTIAL if self.written else EXIT_FAILURE


def _input_path(text: str) -> tuple[str, Any]:
    """``(label, path or PIL image)``; ``sample:NAME`` is a bundled photo."""
    if text.startswith("sample:") and not os.path.exists(text):
        from . import models

        name = text.partition(":")[2]
        try:
            return text, models.sample_image(name)
        except ValueError as exc:
            raise CLIError(_one_line(exc)) from None
    return text, text


def _stems(images: Sequence[str]) -> list[str]:
    stems: list[str] = []
    for text in images:
        stem = slug(text.partition(":")[2]) if text.startswith("sample:") else Path(text).stem
        stem = slug(stem) if stem else "image"
        base, n = stem, 2
        while stem in stems:
            stem, n = f"{base}-{n}", n + 1
        stems.append(stem)
    return stems


def _open_image(text: str, args: argparse.Namespace) -> tuple[str, Any]:
    from ._io import load_image

    label, source = _input_path(text)
    if isinstance(source, str):
        return label, load_image(source, max_pixels=args.max_pixels or None)
    return label, source


@dataclass
class Prepared:
    """One image, ready to explain."""

    label: str
    image: Any  # the RGB PIL image
    inputs: Any  # (1, 3, H, W) on the device
    crop: Any  # the PIL image the model sees
    probabilities: Any  # (classes,)


def prepare(text: str, pipe: Pipeline, args: argparse.Namespace) -> Prepared:
    """Load, preprocess and classify one image (errors name the file)."""
    import torch

    from ._io import ImageError

    try:
        label, image = _open_image(text, args)
    except ImageError as exc:
        raise CLIError(str(exc)) from None
    try:
        x = pipe.preprocess(image)
        crop = pipe.crop(image)
        with torch.no_grad():
            probabilities = pipe.model(x).float().softmax(dim=1)[0].cpu()
    except Exception as exc:
        raise CLIError(f"{label}: the model failed on this image ({_one_line(exc)})") from None
    return Prepared(label, image, x, crop, probabilities)


def _check_completeness(label: str, method: str, result: Any, options: dict[str, Any]) -> None:
    """Warn on stderr when Integrated Gradients stopped short of its tolerance."""
    tolerance = options.get("tolerance")
    delta = result.extras.get("delta")
    base = result.extras.get("baseline_scores")
    if tolerance is None or delta is None or base is None:
        return
    change = float(result.scores.flatten()[0] - base.flatten()[0])
    gap = abs(float(delta.flatten()[0])) / max(abs(change), 1e-12)
    if gap > tolerance:
        steps = int(result.extras["steps"].flatten()[0])
        _err(
            f"salience: note: {label}: {method}: completeness gap {100 * gap:.1f}% of the score "
            f"change after {steps} steps (tolerance {100 * tolerance:g}%); raise "
            f"-O {method}.max_steps for a more exact map"
        )


def _summary(item: Prepared, pipe: Pipeline) -> str:
    p, c = item.probabilities.max(dim=0)
    return f"{item.label}: {pipe.name_of(int(c))} ({int(c)}) p={float(p):.3f}"


# -- commands --------------------------------------------------------------------------------


def cmd_methods(args: argparse.Namespace) -> int:
    """List the registered methods."""
    from .registry import available_methods, get_method

    methods = available_methods(args.kind)
    width = max((len(n) for n in methods), default=4)
    print(f"{'name':<{width}}  kind   description")
    for name, description in methods.items():
        print(f"{name:<{width}}  {get_method(name).kind:<5}  {description}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Say that ``salience evaluate`` is not available yet (no metrics in this version)."""
    _err(
        "salience evaluate: not available yet: faithfulness and sanity metrics are not part "
        "of this version of salience"
    )
    return EXIT_FAILURE


def _progress(total: int, args: argparse.Namespace, label: str = "") -> Any:
    from ._io import Progress

    return Progress(total, label, enabled=False if args.quiet else None)


def cmd_explain(args: argparse.Namespace) -> int:
    """``salience explain``: maps as PNG overlays and ``.npy`` arrays, one line per image."""
    from . import viz
    from ._io import save_npy, save_png
    from .report import explain_many

    methods = parse_methods(args.method, ["grad_cam"])
    options = method_options(args.option, methods, args.layer)
    pipe = load_pipeline(args)
    specs = parse_targets(args.target, pipe)
    out = Path(args.out)
    per_image = len(methods) * sum(s.top or 1 for s in specs)
    run = Run("explain")
    stems = _stems(args.images)
    with _progress(len(args.images) * per_image, args, "explain") as bar:
        for text, stem in zip(args.images, stems, strict=True):
            try:
                item = prepare(text, pipe, args)
            except CLIError as exc:
                run.images_failed += 1
                run.fail(str(exc))
                bar.update(per_image)
                continue
            classes = resolve_classes(specs, item.probabilities)
            errors = 0
            wrote = 0
            for c in classes:
                bar.set_label(f"{item.label} -> {pipe.name_of(c)}")
                results = explain_many(
                    pipe.model,
                    item.inputs,
                    methods,
                    c,
                    options=options,
                    on_done=lambda _m: bar.update(),
                )
                for method, result in results.items():
                    if isinstance(result, Exception):
                        errors += 1
                        run.fail(f"{item.label}: {method}: {_one_line(result)}")
                        continue
                    _check_completeness(item.label, method, result, options[method])
                    name = f"{stem}.{method}.{pipe.file_label(c)}"
                    try:
                        picture = viz.render(
                            result,
                            item.crop,
                            style=args.style,
                            cmap=args.cmap,
                            alpha=args.alpha,
                            percentile=args.percentile,
                        )
                        save_png(picture, out / f"{name}.png")
                        values = result.values[0].detach().float().cpu().numpy()
                        save_npy(values, out / f"{name}.npy")
                    except OSError as exc:
                        errors += 1
                        run.fail(f"{out / name}: cannot write ({exc.strerror or exc})")
                        continue
                    except Exception as exc:
                        errors += 1
                        run.fail(f"{item.label}: {method}: cannot draw ({_one_line(exc)})")
                        continue
                    wrote += 1
            run.written += wrote
            if errors:
                run.images_failed += 1
            else:
                run.images_ok += 1
            bar.close()
            print(f"{_summary(item, pipe)}; {wrote} map{'s' * (wrote != 1)} in {out}/", flush=True)
    return run.finish(len(args.images))


def _figure_title(item: Prepared, pipe: Pipeline, c: int) -> str:
    p, top = item.probabilities.max(dim=0)
    top_i = int(top)
    text = f"{item.label} · predicted: {pipe.name_of(top_i)} (p = {float(p):.2f})"
    if c != top_i:
        text += f" · explained: {pipe.name_of(c)} (p = {float(item.probabilities[c]):.2f})"
    return text


def cmd_compare(args: argparse.Namespace) -> int:
    """``salience compare``: the image and each method's map side by side, as one PNG."""
    from . import viz
    from ._io import save_png
    from .report import display_name, explain_many

    methods = parse_methods(args.method, compare_methods())
    options = method_options(args.option, methods, args.layer)
    pipe = load_pipeline(args)
    specs = parse_targets(args.target, pipe)
    out = Path(args.out)
    run = Run("compare")
    per_image = len(methods) * sum(s.top or 1 for s in specs)
    with _progress(len(args.images) * per_image, args, "compare") as bar:
        for text, stem in zip(args.images, _stems(args.images), strict=True):
            try:
                item = prepare(text, pipe, args)
            except CLIError as exc:
                run.images_failed += 1
                run.fail(str(exc))
                bar.update(per_image)
                continue
            failed = False
            names = []
            for c in resolve_classes(specs, item.probabilities):
                bar.set_label(f"{item.label} -> {pipe.name_of(c)}")
                results = explain_many(
                    pipe.model,
                    item.inputs,
                    methods,
                    c,
                    options=options,
                    on_done=lambda _m: bar.update(),
                )
                panels, titles = [item.crop], ["input"]
                for method, result in results.items():
                    if isinstance(result, Exception):
                        failed = True
                        run.fail(f"{item.label}: {method}: {_one_line(result)}")
                        continue
                    _check_completeness(item.label, method, result, options[method])
                    panels.append(viz.render(result, item.crop, percentile=args.percentile))
                    titles.append(display_name(method))
                if len(panels) == 1:
                    continue
                figure = viz.grid(
                    panels,
                    titles,
                    ncols=args.columns,
                    title=_figure_title(item, pipe, c),
                    panel_size=args.panel_size,
                    dpi=args.dpi,
                )
                path = out / f"{stem}.compare.{pipe.file_label(c)}.png"
                try:
                    save_png(figure, path)
                except OSError as exc:
                    failed = True
                    run.fail(f"{path}: cannot write ({exc.strerror or exc})")
                    continue
                run.written += 1
                names.append(str(path))
            bar.close()
            if failed:
                run.images_failed += 1
            else:
                run.images_ok += 1
            print(f"{_summary(item, pipe)}; wrote {', '.join(names) or 'nothing'}", flush=True)
    return run.finish(len(args.images))


def cmd_report(args: argparse.Namespace) -> int:
    """``salience report``: one self-contained HTML page."""
    from .report import ImageReport, Prediction, explain_many, method_report, to_html, write_html

    methods = parse_methods(args.method, compare_methods())
    options = method_options(args.option, methods, args.layer)
    pipe = load_pipeline(args)
    specs = parse_targets(args.target, pipe)
    run = Run("report")
    sections: list[ImageReport] = []
    per_image = len(methods) * sum(s.top or 1 for s in specs)
    with _progress(len(args.images) * per_image, args, "report") as bar:
        for text in args.images:
            try:
                item = prepare(text, pipe, args)
            except CLIError as exc:
                run.images_failed += 1
                run.fail(str(exc))
                sections.append(ImageReport(title=text, image=None, error=str(exc)))
                bar.update(per_image)
                continue
            probs = item.probabilities
            top = probs.topk(min(args.top, pipe.num_classes))
            predictions = [
                Prediction(int(i), pipe.name_of(int(i)), float(p))
                for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            ]
            failed = False
            for c in resolve_classes(specs, probs):
                bar.set_label(f"{item.label} -> {pipe.name_of(c)}")
                results = explain_many(
                    pipe.model,
                    item.inputs,
                    methods,
                    c,
                    options=options,
                    on_done=lambda _m: bar.update(),
                )
                entries = []
                for method, result in results.items():
                    entry = method_report(method, result, item.crop, percentile=args.percentile)
                    if entry.error is not None:
                        failed = True
                        run.fail(f"{item.label}: {method}: {entry.error}")
                    entries.append(entry)
                sections.append(
                    ImageReport(
                        title=item.label,
                        image=item.crop,
                        predictions=predictions,
                        target=Prediction(c, pipe.name_of(c), float(probs[c])),
                        methods=entries,
                    )
                )
            if failed:
                run.images_failed += 1
            else:
                run.images_ok += 1
            bar.close()
            print(_summary(item, pipe), flush=True)
    if any(section.error is None for section in sections):
        page = to_html(
            sections,
            title=args.title,
            metadata={"model": pipe.name, "device": str(pipe.device)},
        )
        try:
            path = write_html(args.out, page)
        except OSError as exc:
            raise CLIError(f"{args.out}: cannot write ({exc.strerror or exc})") from None
        run.written += 1
        print(f"wrote {path}", flush=True)
    return run.finish(len(args.images))


def cmd_visualize_class(args: argparse.Namespace) -> int:
    """``salience visualize-class``: the class model image (Simonyan et al. 2013)."""
    from PIL import Image

    from ._io import save_png
    from .featvis import class_model

    pipe = load_pipeline(args)
    index = lookup_class(args.cls, pipe)
    image = class_model(
        pipe.model,
        index,
        steps=args.steps,
        lr=args.lr,
        l2=args.l2,
        jitter=args.jitter,
        blur_every=args.blur_every,
        blur_sigma=args.blur_sigma,
        size=pipe.input_size,
        seed=args.seed,
        progress=False if args.quiet else None,
    )
    import torch

    with torch.no_grad():
        probabilities = pipe.model(image).float().softmax(dim=1)[0]
    picture = Image.fromarray(pipe.to_image(image[0]))
    path = Path(args.out) / f"class_model.{pipe.file_label(index)}.png"
    try:
        save_png(picture, path)
    except OSError as exc:
        raise CLIError(f"{path}: cannot write ({exc.strerror or exc})") from None
    print(
        f"{pipe.name_of(index)} ({index}): p={float(probabilities[index]):.3f} on the class "
        f"model image; wrote {path}",
        flush=True,
    )
    return EXIT_OK


# -- the parser ------------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the layout of descriptions and epilogs; show defaults that say something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or "default" in text
            or action.default in (None, False, argparse.SUPPRESS)
        ):
            return text
        return text + " (default: %(default)s)"


def _wrap(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), width=88)


def _floats3(text: str) -> tuple[float, float, float]:
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers, got {text!r}")
    return values  # type: ignore[return-value]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _model_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="NAME|PATH",
        help="the model: 'efficientnet_lite0' (pretrained, bundled); a TorchScript archive or "
        "torch.save file; or torchvision:NAME / timm:NAME when those packages are installed",
    )
    group.add_argument(
        "--architecture",
        metavar="NAME",
        help="architecture to load a state-dict file into (e.g. efficientnet_lite0)",
    )
    group.add_argument(
        "--trust-model",
        action="store_true",
        help="allow unpickling a whole model saved with torch.save(model): this can run "
        "arbitrary code, so only for files you trust",
    )
    group.add_argument(
        "--device",
        default="cpu",
        help="where to run: cpu, cuda, cuda:1, mps",
    )
    group.add_argument(
        "--labels",
        metavar="FILE",
        help="class names of a custom model: one per line, or a JSON list (default: the "
        "model's own names, ImageNet names for 1000 classes, else 'class <i>')",
    )
    pipe = parent.add_argument_group(
        "input pipeline of custom models",
        _wrap(
            "models without their own preprocessing get: resize the shorter side, "
            "center-crop, normalize with mean/std (pixels in [0, 1])"
        ),
    )
    pipe.add_argument(
        "--input-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="crop size (default: 224, or the torchvision/timm model's own)",
    )
    pipe.add_argument(
        "--resize",
        type=_positive_int,
        metavar="N",
        help="shorter side before cropping (default: input size × 256/224)",
    )
    pipe.add_argument(
        "--mean",
        type=_floats3,
        metavar="R,G,B",
        help="per-channel mean (default: ImageNet's 0.485,0.456,0.406)",
    )
    pipe.add_argument(
        "--std",
        type=_floats3,
        metavar="R,G,B",
        help="per-channel std (default: ImageNet's 0.229,0.224,0.225)",
    )
    other = parent.add_argument_group("general")
    other.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parent


def _image_options(
    out_help: str, out_default: str, methods_default: str
) -> argparse.ArgumentParser:
    from ._io import DEFAULT_MAX_PIXELS

    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files (any format Pillow reads; grayscale, RGBA and 16-bit images are "
        "converted to RGB), or sample:chelsea / sample:coffee for a bundled photo",
    )
    group = parent.add_argument_group("explanation")
    group.add_argument(
        "-m",
        "--method",
        action="append",
        metavar="M",
        help="a registered method (see 'salience methods'); repeat or separate with commas; "
        f"'all' for every method (default: {methods_default})",
    )
    group.add_argument(
        "-t",
        "--target",
        action="append",
        metavar="top1|topK|CLASS",
        help="what to explain: top1 (the predicted class), topK (each of the K most likely "
        "classes), or a class index or name such as 281 or tabby; repeatable (default: top1)",
    )
    group.add_argument(
        "--layer",
        metavar="NAME",
        help="layer of the CAM methods, a dotted module name (default: the last spatial "
        "feature map)",
    )
    group.add_argument(
        "-O",
        "--option",
        action="append",
        metavar="[METHOD.]KEY=VALUE",
        help="a method option, e.g. -O integrated_gradients.steps=64 or -O samples=20 (for "
        "every requested method that has it). Integrated Gradients defaults here to the "
        "adaptive path: tolerance=0.01, steps=16, max_steps=128; -O "
        "integrated_gradients.tolerance=none gives the fixed rule",
    )
    group.add_argument(
        "--percentile",
        type=float,
        default=99.0,
        help="display scale: this percentile of |map| is the end of the color scale",
    )
    group.add_argument("-o", "--out", default=out_default, help=out_help)
    group.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="refuse images with more pixels (decompression-bomb guard); 0 for no limit",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``salience`` command."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="salience",
        description=_wrap(
            "Saliency maps for PyTorch image classifiers. The default model is the "
            "bundled pretrained EfficientNet-Lite0 (ImageNet); nothing is downloaded."
        ),
        epilog=EPILOG + "\nexamples:\n"
        "  salience compare sample:chelsea\n"
        "  salience explain cat.jpg dog.png -m grad_cam -m integrated_gradients -t top3\n"
        "  salience report cat.jpg --out report.html\n"
        "  salience visualize-class goldfish\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"salience {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    model = _model_options()

    p = sub.add_parser(
        "explain",
        parents=[_image_options("output directory", DEFAULT_OUT, "grad_cam"), model],
        help="write saliency maps of images (PNG overlays and raw .npy arrays)",
        description=_wrap(
            "For each image, method and class: <out>/<image-stem>.<method>.<class>"
            ".png (the map drawn over the image the model sees) and .npy (the raw map, float32, "
            "shape (C, H, W): C=3 for pixel methods, 1 for CAMs), where <class> is "
            "'<index>-<name>'. Prints one line per image: the predicted class and probability."
        ),
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--style",
        choices=("overlay", "heatmap", "rgb", "auto"),
        default="overlay",
        help="how to draw the PNG: overlay on the image, heatmap alone, rgb (guided-backprop "
        "rendering, 3-channel maps only), or auto (as in each method's paper)",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity of overlays")
    p.add_argument(
        "--cmap",
        default=None,
        help="matplotlib colormap (default: RdBu_r for signed maps, jet otherwise)",
    )
    p.set_defaults(handler=cmd_explain)

    p = sub.add_parser(
        "compare",
        parents=[_image_options("output directory", DEFAULT_OUT, "see below"), model],
        help="the image and the maps of several methods side by side, as one PNG",
        description=_wrap(
            "Draws the figure of the literature for each image: the input, then "
            f"{', '.join(COMPARE_METHODS)} (those registered; -m picks others), each drawn as "
            "in its paper, titled, with the predicted class. Writes "
            "<out>/<image-stem>.compare.<class>.png."
        ),
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--columns",
        type=_positive_int,
        default=None,
        help="panels per row (default: one row of up to 8)",
    )
    p.add_argument("--panel-size", type=float, default=2.2, help="panel size in inches")
    p.add_argument("--dpi", type=_positive_int, default=100, help="pixels per inch")
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser(
        "report",
        parents=[
            _image_options(
                "the HTML file to write",
                os.path.join(DEFAULT_OUT, "report.html"),
                "those of 'salience compare'",
            ),
            model,
        ],
        help="a self-contained HTML report: top-5 prediction and every method's map",
        description=_wrap(
            "Writes one HTML page (images embedded, nothing else loaded) with, for "
            "each image, the top-K prediction and the map of every requested method (default: "
            "those of 'salience compare'). Faithfulness and sanity scores are not available yet."
        ),
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    p.add_argument("--top", type=_positive_int, default=5, help="classes in the prediction table")
    p.add_argument("--title", default="salience report", help="page title")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser(
        "visualize-class",
        parents=[model],
        help="the class model image: what the network takes for a class",
        description=_wrap(
            "Class model visualization (Simonyan et al. 2013, §2): gradient ascent on "
            "the class score minus an L2 penalty, from the zero image, with jitter, occasional "
            "blur and clipping. Writes <out>/class_model.<class>.png."
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("cls", metavar="CLASS", help="class index or name, e.g. 1 or goldfish")
    p.add_argument("--steps", type=_positive_int, default=200, help="gradient-ascent steps")
    p.add_argument("--lr", type=float, default=0.05, help="step size, in input units")
    p.add_argument("--l2", type=float, default=1e-4, help="weight of the L2 penalty")
    p.add_argument("--jitter", type=int, default=8, help="largest random shift, in pixels")
    p.add_argument("--blur-every", type=int, default=4, help="blur every N steps (0: never)")
    p.add_argument("--blur-sigma", type=float, default=0.5, help="blur width, in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the jitter")
    p.add_argument("-o", "--out", default=DEFAULT_OUT, help="output directory")
    p.set_defaults(handler=cmd_visualize_class)

    p = sub.add_parser(
        "methods",
        help="list the registered methods with one-line descriptions",
        description=_wrap("The registry: every method the other commands accept."),
    )
    p.add_argument("--kind", choices=("pixel", "cam"), help="only methods of this kind")
    p.set_defaults(handler=cmd_methods)

    p = sub.add_parser(
        "evaluate",
        help="faithfulness and sanity metrics (not available yet)",
        description=_wrap(
            "Not available yet: salience does not ship attribution metrics in this "
            "version. This command exits with status 1."
        ),
    )
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``salience`` command line; returns the exit status.

    Args:
        argv: The arguments (default ``sys.argv[1:]``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "input_size"):
        args.input_size_set = args.input_size
        args.input_size = args.input_size or 224
    try:
        return int(args.handler(args))
    except CLIError as exc:
        _err(f"salience {args.command}: error: {exc}")
        return exc.code
    except KeyboardInterrupt:
        _err(f"\nsalience {args.command}: interrupted (files already written are complete)")
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
