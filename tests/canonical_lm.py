"""A DSPy 3.4 canonical-engine LM for tests: it answers a fixed text and keeps every request
(``from canonical_lm import CanonicalLM``, as ``sleeps_kit`` is imported)."""

from __future__ import annotations

from typing import Any

import dspy
from dspy.lm15 import Message, Response, Usage

__all__ = ["CanonicalLM"]


class _Engine:
    def __init__(self, lm: Any) -> None:
        self.lm = lm

    def complete(self, request: Any) -> Response:
        return self.lm.answer(request)


class _AsyncEngine(_Engine):
    async def complete(self, request: Any) -> Response:  # type: ignore[override]
        return self.lm.answer(request)


class CanonicalLM(dspy.LM):  # type: ignore[misc]
    """Answers ``text`` (7 input and 3 output tokens) through sync and async engines; ``requests``
    holds what it was sent."""

    def __init__(self, text: str, **kwargs: Any) -> None:
        self.requests: list[Any] = []
        self.text = text
        super().__init__("test/canonical", engine=_Engine(self), async_engine=_AsyncEngine(self), **kwargs)

    def answer(self, request: Any) -> Response:
        self.requests.append(request)
        return Response(
            id=None,
            model=self.model,
            message=Message.assistant(self.text),
            finish_reason="stop",
            usage=Usage(input_tokens=7, output_tokens=3, total_tokens=10),
        )
