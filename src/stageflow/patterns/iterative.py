"""Iterative: repeat stages until a stopping condition says stop (always with a limit)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from stageflow.engine.plan import Scope, StageEntry, build_entry, join_path
from stageflow.engine.runner import arun_sequence, run_sequence
from stageflow.errors import ConfigurationError, ContractError, LoopLimitError, StageError
from stageflow.patterns.base import Pipeline, as_stage
from stageflow.state import RunInfo

__all__ = ["IterativePipeline", "QualityBasedStopping", "StopDecision"]


@dataclass(frozen=True)
class StopDecision:
    """A stopping condition's answer.

    Attributes:
        stop: Whether to stop after this iteration.
        reason: Why (``"quality_threshold"``, ``"plateau"``, ...), shown as ``result.stop_reason``.
    """

    stop: bool
    reason: str = ""


class QualityBasedStopping:
    """Stop when ``quality_score`` reaches a threshold, or when it stops improving.

    The decision is a pure function of the run's own iteration history, so nothing carries over
    from one pipeline call to the next (and one instance can serve concurrent calls).

    Args:
        quality_threshold: Stop as soon as ``quality_score >= quality_threshold``.
        patience: Stop after this many consecutive iterations whose improvement is at most
            ``min_improvement``. The improvement is the state's ``improvement`` field when a stage
            writes one, otherwise the change in ``quality_score`` since the previous iteration.
        min_improvement: What counts as no improvement.
        score_field: The field holding the score (default ``quality_score``).
    """

    def __init__(
        self,
        quality_threshold: float = 0.9,
        patience: int = 2,
        min_improvement: float = 0.0,
        score_field: str = "quality_score",
    ) -> None:
        if not isinstance(patience, int) or patience < 1:
            raise ConfigurationError(
                f"QualityBasedStopping: patience must be an int >= 1, got {patience!r}.",
                field="patience",
                code="bad_option",
            )
        self.quality_threshold = float(quality_threshold)
        self.patience = patience
        self.min_improvement = float(min_improvement)
        self.score_field = score_field
        self.reads = (score_field,)

    def _score(self, state: Mapping[str, Any]) -> float:
        value = state.get(self.score_field)
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ContractError(
                f"QualityBasedStopping needs a number in '{self.score_field}', got {value!r}.",
                field=self.score_field,
                code="bad_score",
                hint=f"make a loop stage write a float to '{self.score_field}'",
            ) from None

    def __call__(self, state: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> StopDecision:
        if self._score(state) >= self.quality_threshold:
            return StopDecision(True, "quality_threshold")
        if len(history) < self.patience:
            return StopDecision(False)
        stalled = 0
        for i in range(len(history) - 1, -1, -1):
            snap = history[i]
            if "improvement" in snap:
                gain = float(snap["improvement"])
            elif i > 0:
                gain = self._score(snap) - self._score(history[i - 1])
            else:
                break
            if gain > self.min_improvement:
                break
            stalled += 1  # noqa: SIM113 - counts a run of stalled iterations, not positions
            if stalled >= self.patience:
                return StopDecision(True, "plateau")
        return StopDecision(False)

    def __repr__(self) -> str:
        return f"QualityBasedStopping(quality_threshold={self.quality_threshold}, patience={self.patience})"


Condition = Callable[..., Any]


def _arity(fn: Condition) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return 2 if len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params) else 1


class IterativePipeline(Pipeline):
    """Run ``processing_stages`` in order, repeatedly, until ``stopping_condition`` says stop.

    Args:
        processing_stages: The stages of one iteration (the same objects run every iteration, so
            DSPy optimizers see every call).
        stopping_condition: ``condition(state)`` or ``condition(state, history)`` returning a bool
            or a :class:`StopDecision`; checked after each iteration. An optional ``reads``
            attribute names the fields it needs (checked before the run).
        max_iterations: The limit (a positive int; loops always have one).
        on_limit: ``"return"`` (default) returns with ``converged=False``; ``"raise"`` raises
            :class:`LoopLimitError`.

    Result details: ``converged`` (the condition stopped the loop), ``stop_reason``,
    ``iterations`` (a snapshot of the state after each iteration) and ``num_iterations``.
    """

    def __init__(
        self,
        processing_stages: Iterable[Any],
        stopping_condition: Condition,
        max_iterations: int = 5,
        *,
        on_limit: Literal["return", "raise"] = "return",
    ) -> None:
        super().__init__()
        if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
            raise ConfigurationError(
                f"IterativePipeline: max_iterations must be a positive int, got {max_iterations!r}. "
                "Loops always have a limit.",
                field="max_iterations",
                code="bad_option",
                hint="pass max_iterations=10 (or another bound) and a stopping_condition",
            )
        if on_limit not in ("return", "raise"):
            raise ConfigurationError(
                f"on_limit must be 'return' or 'raise', got {on_limit!r}.",
                field="on_limit",
                code="bad_option",
            )
        if not callable(stopping_condition):
            raise ConfigurationError(
                f"stopping_condition must be callable, got {stopping_condition!r}.",
                field="stopping_condition",
                code="bad_option",
                hint="use QualityBasedStopping(...) or a function (state, history) -> bool",
            )
        self.stages = [as_stage(s, f"stages[{i}]") for i, s in enumerate(processing_stages)]
        if not self.stages:
            raise ConfigurationError(
                "IterativePipeline needs at least one processing stage.", code="bad_stages"
            )
        self.stopping_condition = stopping_condition
        self.max_iterations = max_iterations
        self.on_limit = on_limit
        self._condition_arity = _arity(stopping_condition)
        self._entries: tuple[StageEntry, ...] = tuple(
            build_entry("stages", i, s) for i, s in enumerate(self.stages)
        )

    def _analyze(self, scope: Scope, prefix: str) -> None:
        # Requirements only grow easier after the first iteration (the state keeps every field),
        # so checking one iteration checks them all.
        for entry in self._entries:
            scope.check(entry, prefix)
        for f in getattr(self.stopping_condition, "reads", ()):
            scope.need(
                f,
                join_path(prefix, "stopping_condition"),
                lambda f=f: ContractError(
                    f"The stopping condition {self.stopping_condition!r} reads '{f}', but no loop stage "
                    "writes it and it is not an input. "
                    f"Available after one iteration: {sorted(scope.available)}.",
                    stage_path="stopping_condition",
                    field=f,
                    code="missing_input",
                    hint=f"make a loop stage write '{f}' (e.g. a scoring stage), or pass it as an input",
                ),
            )

    def _decide(self, state: dict[str, Any], history: list[dict[str, Any]]) -> StopDecision:
        cond = self.stopping_condition
        try:
            verdict = cond(state, history) if self._condition_arity == 2 else cond(state)
        except Exception as e:
            if isinstance(e, ContractError):
                raise
            raise StageError(
                f"The stopping condition {cond!r} raised {type(e).__name__}: {e}",
                stage_path="stopping_condition",
            ) from e
        if isinstance(verdict, StopDecision):
            return verdict
        return StopDecision(bool(verdict), "condition" if verdict else "")

    def _after_iteration(self, state: dict[str, Any], history: list[dict[str, Any]], run: RunInfo) -> bool:
        history.append(dict(state))
        decision = self._decide(state, history)
        if decision.stop:
            self._finish(run, history, True, decision.reason or "condition")
            return True
        if len(history) >= self.max_iterations:
            if self.on_limit == "raise":
                raise LoopLimitError(
                    f"IterativePipeline stopped after max_iterations={self.max_iterations} without its "
                    f"stopping condition ({self.stopping_condition!r}) firing.",
                    code="loop_limit",
                    hint="raise max_iterations, relax the condition, or pass on_limit='return'",
                )
            self._finish(run, history, False, "max_iterations")
            return True
        return False

    @staticmethod
    def _finish(run: RunInfo, history: list[dict[str, Any]], converged: bool, reason: str) -> None:
        run.extras.update(
            converged=converged, stop_reason=reason, iterations=history, num_iterations=len(history)
        )

    def _run(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        history: list[dict[str, Any]] = []
        while True:
            run_sequence(self, self._entries, state, run, hooks, prefix)
            if self._after_iteration(state, history, run):
                return

    async def _arun(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        history: list[dict[str, Any]] = []
        while True:
            await arun_sequence(self, self._entries, state, run, hooks, prefix)
            if self._after_iteration(state, history, run):
                return
