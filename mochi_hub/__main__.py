"""``python -m mochi_hub`` (and ``accelerate launch -m mochi_hub``)."""

import sys

from mochi_hub.cli import main

sys.exit(main())
