"""Iterative: repeat stages until a stopping condition says stop (always with a limit)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from stageflow.engine.plan import Scope, StageEntry, build_entry, join_path
from stageflow.engine.runner import arun_sequence, run_sequence
from stageflow.errors import ConfigurationError, ContractError, LoopLimitError, StageError
from stageflow.patterns.base import Pipeline, as_stage
from stageflow.patterns.branching import BranchingPipeline, normalize_branch
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

    def __bool__(self) -> bool:
        return self.stop


def _number(state: Mapping[str, Any], name: str) -> float:
    value = state[name]
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if math.isnan(number):
        raise ContractError(
            f"QualityBasedStopping needs a number in '{name}', got {value!r}.",
            field=name,
            code="bad_score",
            hint=f"make a loop stage write a float to '{name}'",
        )
    return number


class QualityBasedStopping:
    """Stop when ``quality_score`` reaches a threshold, or when ``improvement`` has stalled.

    As in the architecture tutorial: stop as soon as ``state['quality_score'] >= quality_threshold``;
    otherwise, when the state has an ``improvement`` below ``min_improvement`` (0.01) for ``patience``
    consecutive iterations (an ``improvement`` at or above it resets the count). Either field may
    be absent. Called by :class:`IterativePipeline` with the run's own iteration history, the
    decision keeps no state, so nothing carries over from one call to the next and one instance
    can serve concurrent calls. (Called by hand as ``condition(state, iteration)``, it counts
    stalls itself and restarts the count at iteration 0.)

    Args:
        quality_threshold: Stop as soon as the score reaches it.
        patience: Consecutive stalled iterations that stop the loop (an int >= 1).
        min_improvement: An ``improvement`` below this is a stall.
        score_field: The field holding the score (default ``quality_score``).
        improvement_field: The field holding the improvement (default ``improvement``).

    Examples:
        >>> stop = QualityBasedStopping(quality_threshold=0.9, patience=2)
        >>> bool(stop({"quality_score": 0.95}, 0))
        True
        >>> history = [{"improvement": 0.005}, {"improvement": 0.001}]
        >>> stop(history[-1], 1, history)
        StopDecision(stop=True, reason='plateau')
    """

    def __init__(
        self,
        quality_threshold: float = 0.9,
        patience: int = 2,
        min_improvement: float = 0.01,
        score_field: str = "quality_score",
        improvement_field: str = "improvement",
    ) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ConfigurationError(
                f"QualityBasedStopping: patience must be an int >= 1, got {patience!r}.",
                field="patience",
                code="bad_option",
            )
        for name, value in (("quality_threshold", quality_threshold), ("min_improvement", min_improvement)):
            if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
                raise ConfigurationError(
                    f"QualityBasedStopping: {name} must be a number, got {value!r}.",
                    field=name,
                    code="bad_option",
                )
        self.quality_threshold = float(quality_threshold)
        self.patience = patience
        self.min_improvement = float(min_improvement)
        self.score_field = score_field
        self.improvement_field = improvement_field
        self.patience_counter = 0  # used only when called by hand, without the history

    def _stalled(self, state: Mapping[str, Any]) -> bool | None:
        if self.improvement_field not in state:
            return None
        return _number(state, self.improvement_field) < self.min_improvement

    def __call__(
        self,
        state: Mapping[str, Any],
        iteration: int = 0,
        history: Sequence[Mapping[str, Any]] | None = None,
    ) -> StopDecision:
        if self.score_field in state and _number(state, self.score_field) >= self.quality_threshold:
            return StopDecision(True, "quality_threshold")
        stalled = self._stalled(state)
        if history is not None:
            count = 0
            for snapshot in history:
                s = self._stalled(snapshot)
                if s is not None:
                    count = count + 1 if s else 0
        else:
            if iteration == 0:
                self.patience_counter = 0
            if stalled is not None:
                self.patience_counter = self.patience_counter + 1 if stalled else 0
            count = self.patience_counter
        if stalled and count >= self.patience:
            return StopDecision(True, "plateau")
        return StopDecision(False)

    def __repr__(self) -> str:
        return f"QualityBasedStopping(quality_threshold={self.quality_threshold}, patience={self.patience})"


Condition = Callable[..., Any]


def _call_form(fn: Condition) -> tuple[int, bool]:
    """How to call a condition: ``(positional arguments to pass, pass history= by keyword)``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return 2, False
    by_keyword = any(p.name == "history" and p.kind is not p.VAR_POSITIONAL for p in params)
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and not (by_keyword and p.name == "history")
    ]
    if any(p.kind is p.VAR_POSITIONAL for p in params) or len(positional) == 2:
        return 2, by_keyword
    if len(positional) >= 3:
        return 3, False
    return 1, by_keyword


class IterativePipeline(Pipeline):
    """Run ``processing_stages`` in order, repeatedly, until ``stopping_condition`` says stop.

    Args:
        processing_stages: The stages of one iteration (the same objects run every iteration, so
            DSPy optimizers see every call). Held in the flat list ``self.stages`` (DSPy paths
            ``stages[i]``; ``processing_stages`` is an alias).
        stopping_condition: Called after each iteration as ``condition(state, iteration)`` (the
            tutorial's form; ``iteration`` counts from 0), or ``condition(state)``, or
            ``condition(state, iteration, history)`` / with a ``history`` keyword to get the list of
            state snapshots so far (the current one last). Returns a bool or a :class:`StopDecision`.
            An optional ``reads`` attribute names fields it needs (checked before the run).
            ``None`` is allowed with ``exit_branch``.
        max_iterations: The limit (a positive int; loops always have one).
        on_limit: ``"return"`` (default) returns with ``converged=False``; ``"raise"`` raises
            :class:`LoopLimitError`.
        exit_branch: The name of a branch of a :class:`BranchingPipeline` among the loop's stages:
            the loop stops after an iteration that took it, and the fields only that branch produces
            are available after the loop (checked before the run when the loop can end no other way
            — no stopping condition and ``on_limit="raise"`` — and at run time otherwise).
        strict: Strict contracts (see :class:`~stageflow.Pipeline`).

    Result details: ``converged`` (the loop stopped by itself), ``stop_reason``, ``iterations`` (one
    ``{"iteration", "state", "should_stop", "reason"}`` per iteration, as in the tutorial),
    ``num_iterations`` and ``final_state``.
    """

    _stage_containers = ("stages",)

    def __init__(
        self,
        processing_stages: Iterable[Any],
        stopping_condition: Condition | None = None,
        max_iterations: int = 5,
        *,
        on_limit: Literal["return", "raise"] = "return",
        exit_branch: str | None = None,
        strict: bool | None = None,
    ) -> None:
        super().__init__(strict=strict)
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
        if stopping_condition is None and exit_branch is None:
            raise ConfigurationError(
                "IterativePipeline needs a stopping_condition (or an exit_branch).",
                field="stopping_condition",
                code="bad_option",
                hint="use QualityBasedStopping(...) or a function (state, iteration) -> bool",
            )
        if stopping_condition is not None and not callable(stopping_condition):
            raise ConfigurationError(
                f"stopping_condition must be callable, got {stopping_condition!r}.",
                field="stopping_condition",
                code="bad_option",
                hint="use QualityBasedStopping(...) or a function (state, iteration) -> bool",
            )
        if isinstance(processing_stages, str | bytes) or not isinstance(processing_stages, Iterable):
            raise ConfigurationError(
                f"IterativePipeline takes a list of stages, got {type(processing_stages).__name__}.",
                code="bad_stages",
            )
        self.stages = [as_stage(s, f"stages[{i}]") for i, s in enumerate(processing_stages)]
        if not self.stages:
            raise ConfigurationError(
                "IterativePipeline needs at least one processing stage.", code="bad_stages"
            )
        self.stopping_condition = stopping_condition
        self.max_iterations = max_iterations
        self.on_limit = on_limit
        self.exit_branch = normalize_branch(exit_branch) if exit_branch is not None else None
        self._call_form = _call_form(stopping_condition) if stopping_condition is not None else (0, False)
        self._rebuild()
        self._built()

    def _rebuild(self) -> None:
        for i, s in enumerate(self.stages):
            wrapped = as_stage(s, f"stages[{i}]")
            if wrapped is not s:
                list.__setitem__(self.stages, i, wrapped)
        if not self.stages:
            raise ConfigurationError(
                "IterativePipeline needs at least one processing stage.", code="bad_stages"
            )
        self._entries: tuple[StageEntry, ...] = tuple(
            build_entry("stages", i, s) for i, s in enumerate(self.stages)
        )
        self._exit_entry = self._find_exit() if self.exit_branch is not None else None

    def _find_exit(self) -> StageEntry:
        for entry, s in zip(self._entries, self.stages, strict=True):
            if isinstance(s, BranchingPipeline) and self.exit_branch in s.branches:
                return entry
        raise ConfigurationError(
            f"IterativePipeline: exit_branch={self.exit_branch!r} is not a branch of a BranchingPipeline "
            "among the loop's stages.",
            field="exit_branch",
            code="bad_option",
            hint="make one of the loop's stages a BranchingPipeline with that branch",
        )

    @property
    def processing_stages(self) -> list[Any]:
        """The loop's stages (the tutorial's name for ``self.stages``)."""
        return self.stages

    def _analyze(self, scope: Scope, prefix: str) -> None:
        self._refresh()
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
        if self._exit_entry is not None:
            self._exit_fields(scope, prefix)

    def _exit_fields(self, scope: Scope, prefix: str) -> None:
        """Fields only the exit branch produces are there after the loop (for sure, or checked then)."""
        assert self._exit_entry is not None
        branch_path = join_path(join_path(prefix, self._exit_entry.path), f"branches['{self.exit_branch}']")
        certain = self.stopping_condition is None and self.on_limit == "raise"
        found = False
        for f, (have, _lack) in list(scope.partial.items()):
            if branch_path in have and f not in scope.available:
                found = True
                if certain:
                    scope.available[f] = None
                    scope.origin[f] = branch_path
        if found and not certain:
            scope.opaque.append(branch_path)

    def _decide(self, state: dict[str, Any], history: list[dict[str, Any]], run: RunInfo) -> StopDecision:
        if self._exit_entry is not None:
            details = run.details.get(self._exit_entry.path) or {}
            decision = details.get("route_decision")
            if decision is not None and decision.chosen == self.exit_branch:
                return StopDecision(True, "exit_branch")
        cond = self.stopping_condition
        if cond is None:
            return StopDecision(False)
        n, history_kw = self._call_form
        iteration = len(history) - 1
        for f in getattr(cond, "reads", ()):
            if f not in state:
                raise ContractError(
                    f"The stopping condition {cond!r} reads '{f}', which is not in the state after iteration "
                    f"{iteration}. State fields: {sorted(state)}.",
                    stage_path="stopping_condition",
                    field=f,
                    code="missing_input",
                    hint=f"make a loop stage write '{f}', or declare the writer's outputs with "
                    f"Stage(<stage>, writes=['{f}'])",
                )
        args: tuple[Any, ...] = (state, iteration, history)[:n]
        try:
            verdict = cond(*args, history=history) if history_kw else cond(*args)
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
        decision = self._decide(state, history, run)
        record = run.extras.setdefault("iterations", [])
        record.append(
            {
                "iteration": len(history) - 1,
                "state": history[-1],
                "should_stop": decision.stop,
                "reason": decision.reason,
            }
        )
        if decision.stop:
            self._finish(run, len(history), True, decision.reason or "condition")
            return True
        if len(history) >= self.max_iterations:
            if self.on_limit == "raise":
                raise LoopLimitError(
                    f"IterativePipeline stopped after max_iterations={self.max_iterations} without its "
                    f"stopping condition ({self.stopping_condition!r}) firing.",
                    code="loop_limit",
                    hint="raise max_iterations, relax the condition, or pass on_limit='return'",
                )
            self._finish(run, len(history), False, "max_iterations")
            return True
        return False

    @staticmethod
    def _finish(run: RunInfo, n: int, converged: bool, reason: str) -> None:
        run.extras.update(converged=converged, stop_reason=reason, num_iterations=n)

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
