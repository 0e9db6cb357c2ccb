"""``python -m stageflow``: the ``stageflow`` command."""

from stageflow.cli import entry

entry()
