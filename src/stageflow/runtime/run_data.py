"""What a batch's own stages changed while it ran, so resuming in the same process is not refused
for it.

A journal refuses to resume when the program's fingerprint differs from the planned one, and that
fingerprint includes the data in the lists, dicts and sets the stages read (a setting changed in
place must not mix old and new results). But a stage that appends to a list of its own (a call log)
changes that data itself while the batch runs. So the data is looked at when the run starts and
when it ends: a container that changed in between is one the stages write (see
:mod:`stageflow._fp_calls`), and the program's fingerprint at the end of the run, without those
containers' data, is remembered for the journal. Resuming in the same process then compares the
program with that: a setting changed *between* the runs is still a change.

In a new process the stages' containers start as they did at planning time, so nothing of this is
needed there.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from stageflow._fp_calls import Seen, changed_since, data_state
from stageflow.fingerprinting import note_written
from stageflow.runtime.fingerprint import program_fingerprint

__all__ = ["ended_here", "run_started", "run_ended"]

#: journal path -> (the fingerprint it was planned with, the program's at the end of the last run here)
_ENDS: dict[str, tuple[str, str]] = {}
_LOCK = threading.Lock()


def run_started(program: Any) -> Seen:
    """The data ``program``'s lists, dicts and sets hold as a run starts."""
    return data_state(program)


def run_ended(journal: Path, planned: str, program: Any, started: Seen) -> None:
    """Note what the run's stages changed themselves, and the program's fingerprint without it
    (call inside the run's DSPy settings, like :func:`program_fingerprint`)."""
    own = changed_since(started, data_state(program))
    if own:
        note_written(own)
    end = program_fingerprint(program)
    with _LOCK:
        _ENDS[_key(journal)] = (planned, end)


def ended_here(journal: Path, planned: str, now: str) -> bool:
    """Whether the last run of ``journal`` in this process, planned with ``planned``, ended with the
    program fingerprinted ``now`` (so only the stages' own writes separate it from the plan)."""
    with _LOCK:
        return _ENDS.get(_key(journal)) == (planned, now)


def _key(journal: Path) -> str:
    try:
        return str(Path(journal).resolve())
    except OSError:
        return str(journal)
