"""``python -m mirror``: the same as the ``mirror`` command."""

import sys

from mirror.launch import main

sys.exit(main())
