"""A watchdog for stageflow's background event loop: code of yours that blocks it is named.

Every sync fan-out of LM stages in the process, and every sync call of an ``async def`` stage, runs
on that one loop. Code that blocks it — ``time.sleep`` or a sync HTTP request inside an ``async
def`` engine or stage — holds all of them up, and nothing would say why. The watchdog thread keeps
one heartbeat asked of the loop (the next as soon as the last ran) and looks every
:data:`CHECK_EVERY` seconds; when one has waited more than :data:`BLOCKED_AFTER` seconds it logs a
warning (logger ``"stageflow"``) naming the code the loop is running: the innermost Python frame of
its thread outside asyncio. One warning per code location; the loop is never touched otherwise.
(An idle loop wakes for one heartbeat every :data:`CHECK_EVERY` seconds.)

Example:
    >>> import asyncio
    >>> from stageflow.engine.loop_watchdog import blocking_site
    >>> blocking_site(None) is None  # (no frame: nothing to name)
    True
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from types import FrameType

__all__ = ["BLOCKED_AFTER", "CHECK_EVERY", "blocking_site", "watch"]

logger = logging.getLogger("stageflow")

#: Seconds without a heartbeat after which the loop counts as blocked.
BLOCKED_AFTER = 1.0
#: Seconds between the watchdog's looks (a heartbeat is asked for as soon as the last one ran).
CHECK_EVERY = 0.1

_ASYNCIO_DIR = os.path.dirname(asyncio.__file__)
_SKIPPED = (_ASYNCIO_DIR, os.path.dirname(threading.__file__) + os.sep + "threading.py")


def blocking_site(frame: FrameType | None) -> str | None:
    """``"file:line in function"`` of the innermost frame of ``frame``'s stack outside asyncio (and
    ``threading``), or ``None``."""
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame = frame.f_back
    if frame is None:
        return None
    code = frame.f_code
    return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}()"


def watch(loop: asyncio.AbstractEventLoop, loop_thread: threading.Thread) -> threading.Thread:
    """Start the watchdog of ``loop``, which ``loop_thread`` runs (a daemon thread; it ends when
    the loop is closed)."""
    thread = threading.Thread(
        target=_watch, args=(loop, loop_thread), name="stageflow-loop-watchdog", daemon=True
    )
    thread.start()
    return thread


def _watch(loop: asyncio.AbstractEventLoop, loop_thread: threading.Thread) -> None:
    warned: set[str] = set()
    beat = threading.Event()
    beat.set()
    sent = time.monotonic()
    while not loop.is_closed():
        if beat.is_set():  # (the last heartbeat ran: ask for the next one)
            beat.clear()
            try:
                loop.call_soon_threadsafe(beat.set)
            except RuntimeError:  # closed meanwhile
                return
            sent = time.monotonic()
        elif time.monotonic() - sent > BLOCKED_AFTER:
            site = blocking_site(sys._current_frames().get(loop_thread.ident or -1))
            if site is not None and site not in warned:
                warned.add(site)
                logger.warning(
                    "stageflow: its event loop has been blocked for more than %ss by %s, which every "
                    "sync fan-out of LM stages and every sync call of an async stage in this process "
                    "waits for. Code in an `async def` must not block (time.sleep, a sync HTTP "
                    "client): await asyncio.sleep / an async client, or make it a plain `def`.",
                    BLOCKED_AFTER,
                    site,
                )
            beat.wait()  # (until the loop is back)
            continue
        time.sleep(CHECK_EVERY)
