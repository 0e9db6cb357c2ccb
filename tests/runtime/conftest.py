"""Shared helpers of the batch tests: a subprocess environment that finds this checkout and the
test components (``batchfake``), and the one Ray cluster all Ray tests share."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"


def subprocess_env() -> dict[str, str]:
    """The environment for a ``python -m stageflow`` child: this checkout's source and ``batchfake``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(HERE), env.get("PYTHONPATH", "")])
    env.pop("STAGEFLOW_LM", None)
    return env


def stageflow_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "stageflow", *args]


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """One local Ray cluster (2 CPUs) for every Ray test; shut down at the end of the session.

    Without Ray the test is skipped — except under CI (``CI`` set), where it fails.
    """
    if importlib.util.find_spec("ray") is None:
        if os.environ.get("CI"):
            pytest.fail("Ray is required under CI: pip install 'stageflow[ray]'")
        pytest.skip("Ray is not installed (pip install 'stageflow[ray]')")
    import logging

    import ray

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = subprocess_env()["PYTHONPATH"]  # the workers inherit it
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    yield ray
    ray.shutdown()


def journal_statuses(journal: Path) -> dict[str, str]:
    """Each record's status in a batch journal; empty while the journal is not created yet."""
    import sqlite3

    try:
        con = sqlite3.connect(journal)
        try:
            return dict(con.execute("SELECT key, status FROM records"))
        finally:
            con.close()
    except sqlite3.Error:
        return {}


def ctrl_c_when(journal: Path, ready: Callable[[dict[str, str]], bool], presses: int = 1) -> threading.Thread:
    """A started thread that presses Ctrl-C in this process ``presses`` times (0.2 s apart) once
    ``ready(statuses)`` holds for the journal's record statuses (or after 30 s); ``join`` it."""

    def watch() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not ready(journal_statuses(journal)):
            time.sleep(0.005)
        for press in range(presses):
            if press:
                time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=watch)
    thread.start()
    return thread
