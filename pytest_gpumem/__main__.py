"""``python -m pytest_gpumem``: the ``gpumem`` command."""

import sys

from .cli import main

sys.exit(main())
