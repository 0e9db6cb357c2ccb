"""What changed in the program's data while a batch ran, to explain a refused resume.

A journal refuses to resume when the program's fingerprint differs from the planned one, and that
fingerprint includes the data in the lists, dicts and sets the stages read: a setting changed in
place must not mix old and new results. A stage that appends to a plain list (a call log) or counts
in a plain dict changes that data itself, so resuming in the same process is refused too — stageflow
cannot tell such a log from a setting another thread edited while the batch ran. The data is looked
at when a run starts and when it ends, and a refusal then says which kind of container changed
during the last run and how to mark a stage's own data (:func:`stageflow.untracked`), which
fingerprints leave out.

In a new process the stages' containers start as they did when the batch was planned, so a resume
there is not refused for them.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from stageflow._fp_calls import Seen, changed_since, data_state, described
from stageflow.runtime.fingerprint import stage_objects

__all__ = ["changed_during_last_run", "run_ended", "run_started"]

#: journal path -> (the fingerprint it was planned with, what changed during the last run here)
_CHANGED: dict[str, tuple[str, list[str]]] = {}
_LOCK = threading.Lock()


def run_started(program: Any) -> Seen:
    """The data ``program``'s lists, dicts and sets hold as a run starts."""
    return data_state(program)


def run_ended(journal: Path, planned: str, program: Any, started: Seen) -> None:
    """Note which containers changed during the run (call inside the run's DSPy settings)."""
    changed = changed_since(started, data_state(program))
    kinds = sorted({_named(obj, program) for obj in changed.values()}) if changed else []
    with _LOCK:
        _CHANGED[_key(journal)] = (planned, kinds)


def changed_during_last_run(journal: Path, planned: str) -> list[str]:
    """The containers (``a list of 3 items``) that changed while the last run of ``journal``,
    planned with ``planned``, went in this process."""
    with _LOCK:
        last = _CHANGED.get(_key(journal))
    return last[1] if last is not None and last[0] == planned else []


def _named(container: Any, program: Any) -> str:
    """``the list 'calls' (3 items) of stage 'stages[0]'`` when a stage names it directly, else
    ``a list of 3 items``."""
    for path, stage in stage_objects(program) or [("", program)]:
        holder = getattr(stage, "module", stage)  # (a Stage: what it wraps)
        text = described(container, holder)
        if text.startswith("the "):
            return f"{text} of stage {path!r}" if path else text
    return described(container)


def _key(journal: Path) -> str:
    try:
        return str(Path(journal).resolve())
    except OSError:
        return str(journal)
