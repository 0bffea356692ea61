"""``python -m mtrremu``: the ``mtrremu`` command."""

import sys

from mtrremu.cli import main

sys.exit(main())
