"""Error handling: per-stage recovery, non-critical errors by type, and an error log."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from stageflow.errors import ConfigurationError, LowConfidenceError, PipelineError, StageflowError
from stageflow.patterns.sequential import SequentialPipeline
from stageflow.policies.recovery import StagePolicy, causes
from stageflow.state import Result, RunInfo

__all__ = ["ErrorHandlingPipeline"]

Recovery = Callable[[BaseException, dict[str, Any]], Any]

_LOGGED = ("skipped", "recovered", "failed")


def _log(run: RunInfo) -> list[dict[str, Any]]:
    return [
        {
            "stage_index": e.detail.get("index"),
            "stage_path": e.stage,
            "error_type": e.detail.get("error_type"),
            "message": e.detail.get("message"),
            "inputs": e.detail.get("inputs"),
            "action": e.kind,
        }
        for e in run.events
        if e.kind in _LOGGED
    ]


class ErrorHandlingPipeline(SequentialPipeline):
    """A sequential pipeline that recovers from stage failures where it can.

    Args:
        stages: As for :class:`SequentialPipeline`.
        recovery_strategies: ``{stage_index: recover}``; ``recover(error, state)`` returns a new
            state (the run goes on with it) or ``None`` (the failure stands). Applied after the
            stage's own retry/fallback policies are spent.
        non_critical: Exception types that skip the stage instead of failing the run: by default
            timeouts (``TimeoutError``, incl. ``StageTimeoutError``) and :class:`LowConfidenceError`.
            Decided by type, never by the message text.

    ``result.error_log`` lists each failure with ``stage_index``, ``stage_path``, ``error_type``,
    ``message``, ``inputs`` and ``action`` (``skipped`` or ``recovered``). An unrecovered failure
    raises :class:`PipelineError` naming the stage index and path, with the original exception as
    ``__cause__`` and the log so far in ``error.errors``.
    """

    def __init__(
        self,
        stages: Iterable[Any],
        recovery_strategies: Mapping[int, Recovery] | None = None,
        *,
        non_critical: Sequence[type[BaseException]] = (TimeoutError, LowConfidenceError),
    ) -> None:
        super().__init__(stages)
        self.recovery_strategies = dict(recovery_strategies or {})
        self.non_critical = tuple(non_critical)
        for key, fn in self.recovery_strategies.items():
            if not isinstance(key, int) or not -len(self.stages) <= key < len(self.stages):
                raise ConfigurationError(
                    f"recovery_strategies key {key!r} is not a stage index (0..{len(self.stages) - 1}).",
                    field=str(key),
                    code="bad_option",
                )
            if not callable(fn):
                raise ConfigurationError(
                    f"recovery strategy for stage {key} is not callable.", field=str(key), code="bad_option"
                )
        self._entries = self._build()

    def _build(self) -> tuple[Any, ...]:
        entries = super()._build()
        strategies = {k % len(entries): v for k, v in getattr(self, "recovery_strategies", {}).items()}
        out = []
        for i, entry in enumerate(entries):
            extra = StagePolicy(recover=strategies.get(i), skip_on=getattr(self, "non_critical", ()))
            own = entry.policy
            out.append(replace(entry, policy=extra if own is None else own.merged_over(extra)))
        return tuple(out)

    def stageflow_result(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...] = ()) -> Result:
        run.extras["error_log"] = _log(run)
        return Result(state, run)

    def _raise_unrecovered(self, error: StageflowError, run: RunInfo) -> None:
        log = _log(run)
        failed = next((e for e in reversed(log) if e["action"] == "failed"), None)
        index = failed["stage_index"] if failed else None
        path = failed["stage_path"] if failed else error.stage_path
        original = next((e for e in causes(error) if not isinstance(e, StageflowError)), error)
        err = PipelineError(
            f"ErrorHandlingPipeline: stage {index} ('{path}') failed and was not recovered: "
            f"{type(original).__name__}: {original}",
            stage_path=path,
            code="unrecovered",
            errors=log,
            hint="add a recovery strategy for that stage index, a Fallback, or a RetryPolicy",
        )
        err.path_is_full = True  # the log's paths are already full paths
        raise err from original

    def _run(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        try:
            super()._run(state, run, hooks, prefix)
        except StageflowError as e:
            self._raise_unrecovered(e, run)

    async def _arun(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        try:
            await super()._arun(state, run, hooks, prefix)
        except StageflowError as e:
            self._raise_unrecovered(e, run)
