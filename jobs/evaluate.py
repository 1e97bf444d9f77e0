"""Ray job entry point for evaluation: `ray job submit -- python jobs/evaluate.py --checkpoint URI --data URI --output URI`.

Same implementation and arguments as `dcfm evaluate` (it runs on the node the job's driver lands on).
"""

import sys

from dcfm.evaluate.cli import main

if __name__ == "__main__":
    sys.exit(main())
