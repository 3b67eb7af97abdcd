"""`python -m bifocal ...` is `bifocal ...`."""

import sys

from bifocal.launcher.cli import main

sys.exit(main())
