"""Sequential: stages run in order over one shared state."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from stageflow.engine.plan import Scope, StageEntry, build_entry
from stageflow.engine.runner import arun_sequence, run_sequence
from stageflow.errors import ConfigurationError
from stageflow.patterns.base import Pipeline, as_stage
from stageflow.state import RunInfo

__all__ = ["SequentialPipeline"]


class SequentialPipeline(Pipeline):
    """Run stages one after another; each reads what it needs from the state by name.

    Args:
        stages: ``dspy.Module`` instances, stageflow pipelines, :class:`Stage` wrappers or plain
            functions. They are held in the flat list ``self.stages``, so their DSPy paths are
            ``stages[0]``, ``stages[1].predict``, ...

    Examples:
        >>> import stageflow
        >>> p = stageflow.SequentialPipeline([
        ...     stageflow.stage(lambda text: {"words": text.split()}, writes=["words"]),
        ...     stageflow.stage(lambda words: {"count": len(words)}, writes=["count"]),
        ... ])
        >>> p(text="one two three").count
        3
    """

    def __init__(self, stages: Iterable[Any]) -> None:
        super().__init__()
        if isinstance(stages, str | bytes) or not isinstance(stages, Iterable):
            raise ConfigurationError(
                f"SequentialPipeline takes a list of stages, got {type(stages).__name__}.",
                code="bad_stages",
                hint="SequentialPipeline([stage_a, stage_b])",
            )
        self.stages = [as_stage(s, f"stages[{i}]") for i, s in enumerate(stages)]
        self._entries = self._build()

    def _build(self) -> tuple[StageEntry, ...]:
        return tuple(build_entry("stages", i, s) for i, s in enumerate(self.stages))

    def add_stage(self, stage: Any, position: int | None = None) -> SequentialPipeline:
        """Insert ``stage`` at ``position`` (default: the end); later stages shift down.

        Stage paths are list positions (``stages[i]``), so they are renumbered after an
        insertion, exactly as DSPy's ``named_predictors()`` will name them.
        """
        s = as_stage(stage, "add_stage")
        if position is None:
            self.stages.append(s)
        else:
            if not -len(self.stages) - 1 <= position <= len(self.stages):
                raise ConfigurationError(
                    f"add_stage: position {position} is out of range for {len(self.stages)} stages.",
                    code="bad_position",
                    hint=f"use 0..{len(self.stages)}, or position=None to append",
                )
            self.stages.insert(position, s)
        self._entries = self._build()
        self._structure_changed()
        return self

    def _analyze(self, scope: Scope, prefix: str) -> None:
        for entry in self._entries:
            scope.check(entry, prefix)

    def _run(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        run_sequence(self, self._entries, state, run, hooks, prefix)

    async def _arun(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        await arun_sequence(self, self._entries, state, run, hooks, prefix)
