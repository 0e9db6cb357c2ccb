"""A module of helpers for ``test_wrapper_paths_round2`` (its functions look a name up at run time)."""

from __future__ import annotations

RATE = 2


def rate() -> int:
    return int(globals()["RATE"])


class Pricer:
    def price(self, x: int) -> int:
        return x * int(globals()["RATE"])


PRICER = Pricer()
