"""``salience methods``: list the registered methods."""

from __future__ import annotations

import argparse

from ._common import EXIT_OK


def cmd_methods(args: argparse.Namespace) -> int:
    """List the registered methods."""
    from ..registry import available_methods, get_method

    methods = available_methods(args.kind)
    width = max((len(n) for n in methods), default=4)
    print(f"{'name':<{width}}  kind   description")
    for name, description in methods.items():
        print(f"{name:<{width}}  {get_method(name).kind:<5}  {description}")
    return EXIT_OK
