"""Ray job entry point for training: `ray job submit -- python jobs/train.py --data URI --output URI [options]`.

Same implementation and arguments as `dcfm train`.
"""

import sys

from dcfm.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
