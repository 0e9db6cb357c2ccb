"""``python -m stageflow``: the ``stageflow`` command."""

import sys

from stageflow.cli import main

sys.exit(main())
