"""Method options (``--method``, ``-O``, ``--layer``) and the option groups commands share."""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ._common import DEFAULT_MODEL, UsageError, _one_line

N = TypeVar("N", int, float)

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


# -- methods and their options ---------------------------------------------------------------


def parse_methods(values: Sequence[str] | None, default: Sequence[str]) -> list[str]:
    """Parse ``--method`` values (repeatable, comma-separated; ``all`` for every method)."""
    from ..registry import available_methods, get_method

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
    if values and not names:  # -m "" or -m , (a variable that expanded to nothing?)
        raise UsageError("-m names no method; give one or more, or 'all'")
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
    items: Sequence[str] | None,
    methods: Sequence[str],
    layer: str | None,
    *,
    defaults: bool = True,
) -> dict[str, dict[str, Any]]:
    """Build ``{method: options}`` from the defaults, ``--layer`` and ``-O`` items.

    ``-O method.key=value`` sets an option of one method; ``-O key=value`` sets it for every
    requested method that has it. ``defaults=False`` leaves out :data:`METHOD_DEFAULTS`
    (a command with defaults of its own, such as ``audit``).
    """
    from ..registry import get_method

    specs = {m: get_method(m) for m in methods}
    options: dict[str, dict[str, Any]] = {
        m: dict(METHOD_DEFAULTS.get(m, {})) if defaults else {} for m in methods
    }
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
        for key in specs[m].switches.intersection(user[m]):
            if not isinstance(user[m][key], bool):
                raise UsageError(f"-O {m}.{key}: a switch, true or false; got {user[m][key]!r}")
        if "quadrature" in user[m] and "tolerance" not in user[m]:
            options[m].pop("tolerance", None)  # a fixed rule was asked for
        options[m].update(user[m])
    return options


def compare_methods() -> list[str]:
    """Return the registered methods of :data:`COMPARE_METHODS`, and registered LRP variants."""
    from ..registry import available_methods

    registered = available_methods()
    names = [m for m in COMPARE_METHODS if m in registered]
    names += [m for m in registered if m.startswith("lrp") and m not in names]
    return names


# -- argparse pieces -------------------------------------------------------------------------


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


def _bounded(
    convert: Callable[[str], N], low: N, *, strict: bool, what: str, high: N | None = None
) -> Callable[[str], N]:
    """Make an argparse type: ``convert(text)`` from ``low`` (above if ``strict``) to ``high``."""

    def parse(text: str) -> N:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value > low if strict else value >= low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")  # NaN too
        return value

    return parse


_positive_int = _bounded(int, 1, strict=False, what="a positive integer")
_non_negative_int = _bounded(int, 0, strict=False, what="an integer >= 0")
_positive_float = _bounded(float, 0.0, strict=True, what="a positive number")
_non_negative_float = _bounded(float, 0.0, strict=False, what="a number >= 0")
_fraction = _bounded(float, 0.0, strict=False, high=1.0, what="a number from 0 to 1")
_percentile = _bounded(float, 0.0, strict=True, high=100.0, what="a number above 0, at most 100")
_panel_size = _bounded(float, 0.0, strict=True, high=20.0, what="inches above 0, at most 20")


def _positive_floats3(text: str) -> tuple[float, float, float]:
    values = _floats3(text)
    if not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected three positive numbers, got {text!r}")
    return values


def _colormap(text: str) -> str:
    import matplotlib

    if text not in matplotlib.colormaps:
        close = difflib.get_close_matches(text, list(matplotlib.colormaps), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise argparse.ArgumentTypeError(f"unknown colormap {text!r}{hint}")
    return text


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
        type=_positive_floats3,
        metavar="R,G,B",
        help="per-channel std (default: ImageNet's 0.229,0.224,0.225)",
    )
    speed = parent.add_argument_group(
        "speed", _wrap("maps equal those without these to float tolerance (salience.performance)")
    )
    speed.add_argument(
        "--channels-last",
        action="store_true",
        help="give the model channels-last inputs (faster convolutions on tensor-core GPUs "
        "and CPUs with oneDNN)",
    )
    speed.add_argument(
        "--compile",
        action="store_true",
        help="run the model through torch.compile (inductor); pays off over many images. "
        "Methods that change the backward pass (guided backprop, CAMs, LRP, DeepLIFT) run "
        "the model uncompiled",
    )
    speed.add_argument(
        "--compile-mode",
        metavar="MODE",
        help="torch.compile mode, implies --compile: reduce-overhead (CUDA graphs, small "
        "batches), max-autotune",
    )
    other = parent.add_argument_group("general")
    other.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parent


def _image_options(
    out_help: str, out_default: str, methods_default: str
) -> argparse.ArgumentParser:
    from .._io import DEFAULT_MAX_PIXELS

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
        type=_percentile,
        default=99.0,
        help="display scale: this percentile of |map| is the end of the color scale",
    )
    group.add_argument("-o", "--out", default=out_default, help=out_help)
    group.add_argument(
        "--max-pixels",
        type=_non_negative_int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="refuse images with more pixels (decompression-bomb guard); 0 for no limit",
    )
    return parent
