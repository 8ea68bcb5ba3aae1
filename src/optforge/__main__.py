"""``python -m optforge``: the ``optforge`` command."""

import sys

from .cli import main

sys.exit(main())
