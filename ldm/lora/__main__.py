"""``python -m ldm.lora``: see :mod:`ldm.lora.cli`."""

import sys

from ldm.lora.cli import main

sys.exit(main())
