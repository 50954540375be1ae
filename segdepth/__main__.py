import sys

from segdepth.cli import main

sys.exit(main())
