"""The ``salience`` command: explain, compare, report, audit, evaluate, batch runs, features.

Run ``salience --help`` or ``salience COMMAND --help``. Exit status: 0 when everything
succeeded, 1 when nothing did (or a fatal error such as an unreadable model), 2 for a bad
command line, 3 when some inputs failed and others succeeded, 130 when interrupted.

One module per command (:mod:`.explain`, :mod:`.compare`, :mod:`.report`, :mod:`.audit`,
:mod:`.evaluate`, :mod:`.batch`, :mod:`.features`, :mod:`.visualize_class`, :mod:`.methods`),
the parser and :func:`main` in
:mod:`.parser`, and the pieces they share in :mod:`._common` (exit statuses, errors),
:mod:`._pipeline` (model loading, classes and targets), :mod:`._options` (method options,
option groups) and :mod:`._run` (running over images).
"""

from __future__ import annotations

from ._common import (
    DEFAULT_MODEL,
    DEFAULT_OUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_TERMINATED,
    EXIT_USAGE,
    TORCHVISION_MEAN,
    TORCHVISION_STD,
    CLIError,
    UsageError,
    slug,
)
from ._options import (
    COMPARE_METHODS,
    METHOD_DEFAULTS,
    compare_methods,
    method_options,
    parse_methods,
)
from ._pipeline import (
    Pipeline,
    TargetSpec,
    load_pipeline,
    lookup_class,
    parse_targets,
    resolve_classes,
)
from ._run import Prepared, Run, prepare
from .compare import cmd_compare
from .evaluate import cmd_evaluate
from .explain import cmd_explain
from .methods import cmd_methods
from .parser import EPILOG, build_parser, main
from .report import cmd_report
from .visualize_class import cmd_visualize_class

__all__ = [
    "COMPARE_METHODS",
    "DEFAULT_MODEL",
    "DEFAULT_OUT",
    "EPILOG",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "METHOD_DEFAULTS",
    "TORCHVISION_MEAN",
    "TORCHVISION_STD",
    "CLIError",
    "Pipeline",
    "Prepared",
    "Run",
    "TargetSpec",
    "UsageError",
    "build_parser",
    "cmd_compare",
    "cmd_evaluate",
    "cmd_explain",
    "cmd_methods",
    "cmd_report",
    "cmd_visualize_class",
    "compare_methods",
    "load_pipeline",
    "lookup_class",
    "main",
    "method_options",
    "parse_methods",
    "parse_targets",
    "prepare",
    "resolve_classes",
    "slug",
]
