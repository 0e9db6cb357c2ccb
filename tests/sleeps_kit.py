"""A sleeper for retry tests: records the delays a policy asks for, and never waits."""

from __future__ import annotations

__all__ = ["Sleeps"]


class Sleeps:
    """Records requested delays for both sync (``sleep``) and async (``asleep``) waits."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)

    async def asleep(self, seconds: float) -> None:
        self.delays.append(seconds)
