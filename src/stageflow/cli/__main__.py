"""``python -m stageflow.cli``."""

import sys

from stageflow.cli import main

sys.exit(main())
