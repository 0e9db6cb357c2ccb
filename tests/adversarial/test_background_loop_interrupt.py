"""KeyboardInterrupt or SystemExit raised by an ``async def`` stage in a sync call reaches the caller.

Reproducer (issue 12 verification): a sync call of a ForEach over an ``async def`` stage runs its
elements on stageflow's background event loop; an element raising ``KeyboardInterrupt`` stopped that
loop's thread ("Exception in thread stageflow-loop"), and the caller waited forever. The loop now
goes on, the caller gets the exception, and later calls work.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import stageflow


def _each(error: type[BaseException], **options: Any) -> stageflow.ForEach:
    async def element(x: int) -> dict[str, int]:
        await asyncio.sleep(0)
        if x == 3:
            raise error("from element 3")
        return {"y": x}

    return stageflow.ForEach(
        stageflow.stage(element, writes=["y"]),
        over="xs",
        item="x",
        collect="ys",
        on_error="collect",
        **options,
    )


def _in_thread(fn: Any) -> dict[str, Any]:
    """Run ``fn`` on a thread; what it returned or raised (a hang fails the test instead of pytest)."""
    seen: dict[str, Any] = {}

    def run() -> None:
        try:
            seen["value"] = fn()
        except BaseException as e:
            seen["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "the call never returned"
    return seen


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("general", [False, True], ids=["bare", "general"])
def test_the_caller_gets_the_interrupt_and_the_loop_lives_on(
    error: type[BaseException], general: bool
) -> None:
    each = _each(error, **({"timeout": 60.0} if general else {}))
    seen = _in_thread(lambda: each(xs=list(range(5))))
    assert isinstance(seen.get("error"), error)
    later = _in_thread(lambda: _each(ValueError)(xs=[0, 1]).ys)  # the background loop still serves
    assert later == {"value": [0, 1]}
