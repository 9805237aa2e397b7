"""``python -m mirror``: the same as the ``mirror`` command."""

import sys

from mirror.cli import main

sys.exit(main())
