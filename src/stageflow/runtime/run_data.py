"""What a batch's own stages changed while it ran, so resuming in the same process is not refused
for it.

A journal refuses to resume when the program's fingerprint differs from the planned one, and that
fingerprint includes the data in the lists, dicts and sets the stages read (a setting changed in
place must not mix old and new results). But a stage that appends to a list of its own (a call log)
or counts in a dict changes that data itself while the batch runs. So the data is looked at when a
run starts and when it ends: the containers that changed in between (the innermost ones, when they
nest) are the stages' own, for this journal, and the program's fingerprint at the end of the run
without their data is remembered. Resuming in the same process compares the program, without those
containers' data, with that — provided those containers are as the run left them: a setting changed
*between* the runs is still a change (also in a dict a stage counts in), and so is a log that grew
between them (the stage was called outside the batch: the resume is refused, loudly).

In a new process the stages' containers start as they did when the batch was planned, so nothing of
this is needed there.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from stageflow._fp_calls import Seen, changed_since, data_state, token_of
from stageflow.fingerprinting import content_hash

__all__ = ["ended_here", "own_changed_between", "run_ended", "run_started"]

#: journal path -> (the fingerprint it was planned with, the stages' own containers (id -> (container,
#: its token at the end of the last run here)), the program's fingerprint without their data then)
_ENDS: dict[str, tuple[str, dict[int, tuple[Any, Any]], str]] = {}
_LOCK = threading.Lock()


def run_started(program: Any) -> Seen:
    """The data ``program``'s lists, dicts and sets hold as a run starts."""
    return data_state(program)


def run_ended(journal: Path, planned: str, program: Any, started: Seen) -> None:
    """Note the containers the run's stages changed and the program's fingerprint without them
    (call inside the run's DSPy settings)."""
    key = _key(journal)
    with _LOCK:
        last = _ENDS.get(key)
    own = {k: obj for k, (obj, _) in last[1].items()} if last is not None and last[0] == planned else {}
    own.update(changed_since(started, data_state(program)))
    end = content_hash(program, own)
    own_then = {k: (obj, token_of(obj)) for k, obj in own.items()}
    with _LOCK:
        _ENDS[key] = (planned, own_then, end)


def ended_here(journal: Path, planned: str, program: Any) -> bool:
    """Whether the last run of ``journal`` in this process, planned with ``planned``, ended with the
    program as it is now, but for the data of the containers its stages changed themselves (call
    inside the run's DSPy settings)."""
    with _LOCK:
        last = _ENDS.get(_key(journal))
    if last is None or last[0] != planned:
        return False
    if any(token_of(obj) != then for obj, then in last[1].values()):
        return False  # (one of them changed between the runs: from outside, maybe a setting in it)
    return content_hash(program, last[1]) == last[2]


def own_changed_between(journal: Path, planned: str) -> bool:
    """Whether data the stages changed themselves in the last run of ``journal`` here (a log, a
    counter) has changed since that run ended (the stage was called outside the batch, or the data
    was edited)."""
    with _LOCK:
        last = _ENDS.get(_key(journal))
    if last is None or last[0] != planned:
        return False
    return any(token_of(obj) != then for obj, then in last[1].values())


def _key(journal: Path) -> str:
    try:
        return str(Path(journal).resolve())
    except OSError:
        return str(journal)
