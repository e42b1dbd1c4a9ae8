"""``python -m bridge`` is ``webhook-bridge``."""

import sys

from .cli import main

sys.exit(main())
