"""The argument parser of the ``salience`` command, and :func:`main`."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from ._common import DEFAULT_OUT, EXIT_INTERRUPTED, EXIT_TERMINATED, CLIError, UsageError, _err
from ._options import (
    COMPARE_METHODS,
    _colormap,
    _Formatter,
    _fraction,
    _image_options,
    _model_options,
    _non_negative_float,
    _non_negative_int,
    _panel_size,
    _positive_float,
    _positive_int,
    _wrap,
)
from .audit import cmd_audit
from .batch import cmd_batch
from .compare import cmd_compare
from .evaluate import add_evaluate_parser
from .explain import cmd_explain
from .features import cmd_features
from .methods import cmd_methods
from .report import cmd_report
from .visualize_class import cmd_visualize_class

EPILOG = """\
exit status:
  0   everything succeeded
  1   nothing succeeded, or a fatal error (e.g. the model file cannot be read)
  2   bad command line (unknown option, method or class name)
  3   partial failure: some images failed, the others were written; failures are listed
  130 interrupted; every file already written is complete (outputs are written atomically)
"""


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``salience`` command."""
    from .. import __version__

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
        "  salience audit sample:chelsea sample:coffee -m gradient,grad_cam\n"
        "  salience visualize-class goldfish\n"
        "  salience features photos/ --layer _blocks.5 --channel 42\n",
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
    p.add_argument("--alpha", type=_fraction, default=0.5, help="heatmap opacity of overlays")
    p.add_argument(
        "--cmap",
        type=_colormap,
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
    p.add_argument("--panel-size", type=_panel_size, default=2.2, help="panel size in inches")
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
            "those of 'salience compare'). 'salience audit' scores the maps."
        ),
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    p.add_argument("--top", type=_positive_int, default=5, help="classes in the prediction table")
    p.add_argument("--title", default="salience report", help="page title")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser(
        "audit",
        parents=[
            _image_options(
                "the HTML file to write",
                os.path.join(DEFAULT_OUT, "audit.html"),
                ", ".join(_audit_defaults()),
            ),
            model,
        ],
        help="which map to believe: faithfulness, sanity, invariance and stability of "
        "each method, as an HTML scorecard",
        description=_wrap(
            "Runs each method on the images and puts its maps through the checks of "
            "salience.metrics: deletion and insertion against a random map (Petsiuk et al. "
            "2018), cascading model randomization (Adebayo et al. 2018), the mean-shift twin "
            "(Kindermans et al. 2018) and max-sensitivity (Yeh et al. 2019). Prints the "
            "scorecard and writes one self-contained HTML page: the table with a reading of "
            "each number, the maps, the curves and the randomization figure."
        ),
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--check",
        action="append",
        metavar="C",
        help="a check to run (repeat or separate with commas): faithfulness, randomization, "
        "invariance, stability (default: all)",
    )
    p.add_argument(
        "--steps", type=_positive_int, default=50, help="points of the deletion/insertion curves"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random map and checks")
    p.add_argument("--title", default="salience audit", help="page title")
    p.set_defaults(handler=cmd_audit)

    p = sub.add_parser(
        "batch",
        parents=[
            _image_options(
                "the store directory (created, or resumed if it exists)",
                os.path.join(DEFAULT_OUT, "store"),
                "grad_cam",
            ),
            model,
        ],
        help="explain a whole folder or glob of images into an on-disk store (resumable)",
        description=_wrap(
            "IMAGE may be a directory (searched recursively), a glob such as "
            "'data/**/*.jpg' or files. Images are decoded in --workers processes and "
            "explained in batches; each map is written to <out>/maps/<method>/<key>.npz as "
            "soon as it is computed (atomically), with <out>/index.csv and failures.csv at the "
            "end. Rerun the same command to resume: stored maps are skipped. Read the store "
            "back with salience.batch.Store(<out>)."
        ),
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=8, help="images per batch of each method"
    )
    p.add_argument(
        "--workers",
        type=_non_negative_int,
        default=None,
        help="processes decoding and preprocessing images (0: none; default: min(4, cores), "
        "none on two cores or fewer, where they slow the run down); with --engine ray, "
        "actors (default: min(4, cores))",
    )
    p.add_argument(
        "--overlays", action="store_true", help="also write each map over its image as a PNG"
    )
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process and --workers loader processes; ray: Ray Data with "
        "--workers actors, each holding the model (pip install 'ray[data]')",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="with --engine ray, the cluster to join (default: start a local one)",
    )
    p.set_defaults(handler=cmd_batch)

    p = sub.add_parser(
        "visualize-class",
        parents=[model],
        help="the class model image: what the network takes for a class",
        description=_wrap(
            "Class model visualization (Simonyan et al. 2013, §2): gradient ascent on "
            "the class score minus an L2 penalty, from the zero image, with jitter, occasional "
            "blur and clipping. Writes <out>/class_model.<class>.png. With --layer and "
            "--channel, maximizes the mean activation of that channel instead (Olah et al. "
            "2017) and writes <out>/unit.<layer>.<channel>.png."
        ),
        formatter_class=_Formatter,
    )
    p.add_argument(
        "cls", metavar="CLASS", nargs="?", help="class index or name, e.g. 1 or goldfish"
    )
    p.add_argument(
        "--layer", metavar="NAME", help="maximize a channel of this layer (dotted module name)"
    )
    p.add_argument("--channel", type=int, metavar="C", help="the channel of --layer to maximize")
    p.add_argument(
        "--param",
        choices=("pixel", "fourier"),
        default="pixel",
        help="optimize pixels, or a decorrelated Fourier spectrum with Adam (Olah et al. 2017)",
    )
    p.add_argument("--steps", type=_positive_int, default=200, help="gradient-ascent steps")
    p.add_argument("--lr", type=_positive_float, default=0.05, help="step size, in input units")
    p.add_argument("--l2", type=_non_negative_float, default=1e-4, help="weight of the L2 penalty")
    p.add_argument(
        "--jitter", type=_non_negative_int, default=8, help="largest random shift, in pixels"
    )
    p.add_argument(
        "--blur-every", type=_non_negative_int, default=4, help="blur every N steps (0: never)"
    )
    p.add_argument("--blur-sigma", type=_positive_float, default=0.5, help="blur width, in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the jitter")
    p.add_argument("-o", "--out", default=DEFAULT_OUT, help="output directory")
    p.set_defaults(handler=cmd_visualize_class)

    p = sub.add_parser(
        "features",
        parents=[model],
        help="the image patches that excite a channel most, beside their reconstructions",
        description=_wrap(
            "Zeiler & Fergus (2013): scans the images of a folder, keeps the K whose "
            "strongest activation of the channel is largest, and draws each receptive-field "
            "patch beside its DeconvNet reconstruction, as one PNG. Unreadable files are "
            "reported and skipped. Prints the images, activations, positions and patches."
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("folder", metavar="DIR", help="a folder of images")
    p.add_argument("--layer", required=True, metavar="NAME", help="layer (dotted module name)")
    p.add_argument("--channel", required=True, type=int, metavar="C", help="channel of the layer")
    p.add_argument("-k", type=_positive_int, default=9, help="how many images to show")
    p.add_argument(
        "--out",
        metavar="FILE.png",
        help=f"the figure (default {DEFAULT_OUT}/features.<layer>.<C>.png)",
    )
    p.set_defaults(handler=cmd_features)

    p = sub.add_parser(
        "methods",
        help="list the registered methods with one-line descriptions",
        description=_wrap("The registry: every method the other commands accept."),
    )
    p.add_argument("--kind", choices=("pixel", "cam"), help="only methods of this kind")
    p.set_defaults(handler=cmd_methods)

    add_evaluate_parser(sub, EPILOG)
    return parser


def _audit_defaults() -> tuple[str, ...]:
    from ..metrics.audit import DEFAULT_METHODS

    return DEFAULT_METHODS


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
        with warnings.catch_warnings(), _terminate_as_interrupt():
            warnings.showwarning = _show_warning
            # The command reports an unmet IG tolerance itself, naming the image.
            warnings.filterwarnings("ignore", message="Integrated Gradients: the adaptive path")
            with _performance(args):
                return int(args.handler(args))
    except CLIError as exc:
        _err(f"salience {args.command}: error: {exc}")
        return exc.code
    except _Terminated:
        _err(f"\nsalience {args.command}: terminated (files already written are complete)")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        _err(f"\nsalience {args.command}: interrupted (files already written are complete)")
        return EXIT_INTERRUPTED


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command runs as Ctrl-C's interruption is."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Stop on SIGTERM as on Ctrl-C while a command runs: what it did is written up.

    Python's default for SIGTERM ends the process at once, so a batch run stopped by ``kill``,
    ``timeout`` or a scheduler's time limit left its store without the index and the failures
    of what it had done. Only in the main thread (where signals are handled); the handler in
    place before (a library's, such as Ray's after its first use in the process) is put back.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    if before is None:  # set outside Python: not one signal.signal can put back
        before = signal.SIG_DFL

    def stop(signum: int, frame: Any) -> None:
        raise _Terminated

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _performance(args: argparse.Namespace) -> contextlib.AbstractContextManager[object]:
    """Return the speed settings of ``--channels-last``, ``--compile`` and ``--compile-mode``."""
    channels_last = getattr(args, "channels_last", False)
    mode = getattr(args, "compile_mode", None)
    compile_ = mode if mode is not None else (True if getattr(args, "compile", False) else None)
    if not channels_last and compile_ is None:
        return contextlib.nullcontext()
    if getattr(args, "engine", "local") != "local":
        raise UsageError(
            "--channels-last and --compile apply to the local engine; Ray workers do not see them"
        )
    from .._performance import performance

    return performance(channels_last=channels_last or None, compile=compile_)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    """Print a library warning as one line, ``salience: warning: ...``, on stderr."""
    _err(f"salience: warning: {message}")
