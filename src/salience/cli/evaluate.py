"""``salience evaluate``: a placeholder until attribution metrics ship."""

from __future__ import annotations

import argparse

from ._common import EXIT_FAILURE, _err


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Say that ``salience evaluate`` is not available yet (no metrics in this version)."""
    _err(
        "salience evaluate: not available yet: faithfulness and sanity metrics are not part "
        "of this version of salience"
    )
    return EXIT_FAILURE
