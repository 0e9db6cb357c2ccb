"""The batch progress bar: records done, failed, rate and ETA, on a terminal only."""

from __future__ import annotations

import importlib
import sys
from typing import Any, TextIO

from stageflow.runtime.runner import Counters

__all__ = ["ProgressBar"]


class ProgressBar:
    """A tqdm bar on ``stream`` when it is a terminal and ``enabled``; silent otherwise.

    Args:
        total: Records in the batch.
        initial: Records finished before this run (the bar starts there; the rate counts this run).
        failed_before: Failed records kept from earlier runs (shown with this run's failures).
    """

    def __init__(
        self, total: int, initial: int, failed_before: int, enabled: bool, stream: TextIO | None = None
    ) -> None:
        stream = stream if stream is not None else sys.stderr
        self._bar: Any = None
        self._initial = initial
        self._failed_before = failed_before
        self._shown = (-1, -1)
        if enabled and hasattr(stream, "isatty") and stream.isatty():
            tqdm = importlib.import_module("tqdm").tqdm  # installed with DSPy; untyped

            self._bar = tqdm(
                total=total,
                initial=initial,
                file=stream,
                unit="rec",
                dynamic_ncols=True,
                smoothing=0.1,
                desc="batch",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix} "
                "[{elapsed}<{remaining}, {rate_fmt}]",
            )
            self._bar.set_postfix_str("0 failed", refresh=False)

    def update(self, counters: Counters) -> None:
        """Show the counters (called from the main thread)."""
        bar = self._bar
        if bar is None:
            return
        done, failed = counters.ran, counters.failed
        if (done, failed) == self._shown:
            return
        self._shown = (done, failed)
        bar.set_postfix_str(f"{failed + self._failed_before} failed", refresh=False)
        bar.update(self._initial + done - bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
