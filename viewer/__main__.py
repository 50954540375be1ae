"""``python -m viewer`` = ``segdepth view``."""

import sys

from viewer.app import main

sys.exit(main())
