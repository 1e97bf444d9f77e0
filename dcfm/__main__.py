"""`python -m dcfm ...` is the `dcfm` console script."""

import sys

from dcfm.cli import main

sys.exit(main())
