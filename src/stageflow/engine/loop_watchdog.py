"""A watchdog for stageflow's background event loop: code of yours that blocks it is named.

Every sync fan-out of LM stages in the process, and every sync call of an ``async def`` stage, runs
on that one loop. Code that blocks it — ``time.sleep`` or a sync HTTP request inside an ``async
def`` engine or stage — holds all of them up, and nothing would say why. The watchdog thread keeps
one heartbeat asked of the loop (the next as soon as the last ran) and looks every
:data:`CHECK_EVERY` seconds; when one has waited more than :data:`BLOCKED_AFTER` seconds it logs a
warning (logger ``"stageflow"``) naming the code the loop is stuck in — your innermost frame, and
the library frame it waits in — provided the loop has been running that one step all along (a loop
busy with many short steps is not blocked). One warning per code location; the loop is never
touched otherwise.
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
import sysconfig
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
#: Code that is not yours: the standard library, installed packages, stageflow itself.
_LIBRARIES = (
    *{sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")},
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
)


def _where(frame: FrameType) -> str:
    code = frame.f_code
    return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}()"


def _innermost(frame: FrameType | None) -> FrameType | None:
    """The innermost frame of ``frame``'s stack outside asyncio and ``threading``."""
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame = frame.f_back
    return frame


def blocking_site(frame: FrameType | None) -> str | None:
    """Where the loop thread whose innermost frame is ``frame`` is stuck: ``"file:line in
    function()"`` of your innermost frame (outside the standard library, installed packages and
    stageflow), with the library's frame it waits in after it; the innermost frame outside asyncio
    when none of yours is on the stack; ``None`` for no frame."""
    inner = _innermost(frame)
    if inner is None:
        return None
    yours: FrameType | None = inner
    while yours is not None and yours.f_code.co_filename.startswith(_LIBRARIES):
        yours = yours.f_back
    if yours is None:
        return _where(inner)
    if yours is inner:
        return _where(yours)
    return f"{_where(yours)} (waiting in {_where(inner)})"


def _task_frame(frame: FrameType | None) -> FrameType | None:
    """The frame of the callback or task step the loop runs now: the outermost of the frames below
    asyncio's (one object for as long as that step runs)."""
    frame = _innermost(frame)
    while frame is not None and frame.f_back is not None:
        if frame.f_back.f_code.co_filename.startswith(_ASYNCIO_DIR):
            break
        frame = frame.f_back
    return frame


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
    sent = since = time.monotonic()
    held: FrameType | None = None  # (the step the loop ran at the last look, while a beat waits)
    while not loop.is_closed():
        if beat.is_set():  # (the last heartbeat ran: ask for the next one)
            beat.clear()
            held = None
            try:
                loop.call_soon_threadsafe(beat.set)
            except RuntimeError:  # closed meanwhile
                return
            sent = time.monotonic()
        else:
            frame = sys._current_frames().get(loop_thread.ident or -1)
            top, now = _task_frame(frame), time.monotonic()
            if top is None or top is not held:  # (another step: a busy loop, not a blocked one)
                held, since = top, now
            elif now - sent > BLOCKED_AFTER and now - since >= BLOCKED_AFTER - CHECK_EVERY:
                site = blocking_site(frame)
                if site is not None and site not in warned:
                    warned.add(site)
                    logger.warning(
                        "stageflow: its event loop has been blocked for more than %ss by %s, which "
                        "every sync fan-out of LM stages and every sync call of an async stage in this "
                        "process waits for. Code in an `async def` must not block (time.sleep, a sync "
                        "HTTP client): await asyncio.sleep / an async client, or make it a plain `def`.",
                        BLOCKED_AFTER,
                        site,
                    )
                held = frame = top = None
                beat.wait()  # (until the loop is back)
                continue
            frame = None
        time.sleep(CHECK_EVERY)
