"""``python -m salience.cli``: the same as the ``salience`` command."""

import sys

from .parser import main

sys.exit(main())
