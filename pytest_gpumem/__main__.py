"""``python -m pytest_gpumem``: the ``gpumem`` command."""

import sys

from pytest_gpumem.cli import main

sys.exit(main())
