"""Fixtures shared by the fast path's LM-call tests."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions sent to a worker thread through ``asyncio.to_thread`` (what
    DSPy's async LM call hands off, and what stageflow's fast path runs in line instead)."""
    sent: list[str] = []
    original = asyncio.to_thread

    async def counting(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        sent.append(getattr(func, "__name__", repr(func)))
        return await original(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting)
    return sent
