"""Errors a fan-out keeps (``on_error="collect"`` / ``"skip"``) without the reference cycles their
tracebacks make.

A kept error's traceback holds the frames it passed through, and each of those frames holds the
frame that called it (``f_back``). Among them are the engine's own frames around the branch: the
awaited branch (its outcome, and through its closure every outcome of the fan-out) and the stage
call. So the error reaches the list that keeps it: a cycle, which keeps the error, every branch's
state and what the LM answered until a full collection finds it (``benchmarks/cycles.py``: ~35
objects per failed branch of an awaited fan-out; ``asyncio.gather(return_exceptions=True)``: none).

:func:`forget_engine_locals` clears the locals of the engine's finished frames in a kept error's
tracebacks (its cause's and context's too): what they refer to is released, the cycle is gone, and
the tracebacks print as before (file, line, function and source of every frame). The frames of
your code keep their locals for a post-mortem debugger; only the engine's frames (those of
``stageflow.engine`` and ``stageflow.patterns``) lose theirs.

Example:
    >>> import asyncio
    >>> from stageflow.engine.fanout import afan_out
    >>> async def boom():
    ...     raise ValueError("no")
    >>> outcome = asyncio.run(afan_out([boom]))[0]
    >>> outcome.status, str(outcome.error)
    ('error', 'no')
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import Any

__all__ = ["forget_engine_locals"]

_ENGINE = tuple(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), part) + os.sep
    for part in ("engine", "patterns")
)


def forget_engine_locals(errors: Iterable[BaseException | None]) -> None:
    """Clear the locals of the engine's finished frames in the tracebacks of ``errors`` (see the
    module docstring). Frames still running are left as they are."""
    seen: set[int] = set()
    stack: list[Any] = list(errors)
    while stack:
        error = stack.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_code.co_filename.startswith(_ENGINE):
                with contextlib.suppress(RuntimeError):  # (still running: left as it is)
                    frame.clear()
            tb = tb.tb_next
        stack.append(error.__cause__)
        stack.append(error.__context__)
