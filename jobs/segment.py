"""Ray job entry point for segmentation: `ray job submit -- python jobs/segment.py INPUT... --output ... --checkpoint ...`.

Same implementation and arguments as `dcfm segment`.
"""

import sys

from dcfm.segment.cli import main

if __name__ == "__main__":
    sys.exit(main())
