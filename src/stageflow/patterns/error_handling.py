"""Error handling: per-stage recovery, non-critical errors by type, and an error log."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from stageflow.engine.plan import StageEntry
from stageflow.errors import ConfigurationError, LowConfidenceError, PipelineError, StageflowError
from stageflow.patterns.sequential import SequentialPipeline
from stageflow.policies.recovery import StagePolicy, causes
from stageflow.policies.transient import is_kind
from stageflow.state import Result, RunInfo

__all__ = ["ErrorHandlingPipeline"]

Recovery = Callable[[BaseException, dict[str, Any]], Any]

_LOGGED = ("skipped", "recovered", "failed")


def _log(run: RunInfo, names: Mapping[Any, str] | None = None) -> list[dict[str, Any]]:
    names = names or {}
    return [
        {
            "stage_index": e.detail.get("index"),
            "stage_name": names.get(e.detail.get("index"), f"stage_{e.detail.get('index')}"),
            "stage_path": e.stage,
            "error": e.detail.get("message"),
            "error_type": e.detail.get("error_type"),
            "message": e.detail.get("message"),
            "input_state": e.detail.get("state"),
            "inputs": e.detail.get("inputs"),
            "action": e.kind,
            **({"recovery_error": e.detail["recovery_error"]} if "recovery_error" in e.detail else {}),
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
            stage's own retry/fallback policies are spent. The strategies follow their stages when
            stages are inserted (``add_stage``) or removed.
        non_critical: Exception types that skip the stage instead of failing the run: by default
            timeouts and :class:`LowConfidenceError`. ``TimeoutError`` here stands for every timeout
            (:func:`~stageflow.policies.is_timeout`: ``StageTimeoutError``, DSPy's
            ``LMTimeoutError``, the timeouts of LiteLLM, OpenAI, httpx, requests..., an HTTP 408 or
            504). Decided by type, never by the message text.
        error_field: A result field that reports a failure when it is truthy (default ``error``: a
            :class:`~stageflow.StandardStage` that caught an exception returns ``error="..."``). Such
            a result is handled like a raised error. ``None`` turns this off.
        strict: Strict contracts (see :class:`~stageflow.Pipeline`).

    ``result.error_log`` lists each failure with ``stage_index``, ``stage_name`` (the stage's
    ``name`` attribute, else ``stage_<i>``), ``error``, ``input_state`` (the tutorial's keys),
    ``stage_path``, ``error_type``, ``action`` (``skipped``, ``recovered`` or ``failed``); a
    recovery strategy's result is merged into the state (it may hold only the fields it fixed), and a
    falsy result means "not recovered", as in the tutorial; ``pipeline.error_log`` is the log of the
    last finished call. An unrecovered failure raises :class:`PipelineError` naming the stage index
    and path, with the original exception as ``__cause__`` and the log so far in ``error.errors`` —
    the same error whether or not the call asked for ``outputs=[...]``.
    """

    def __init__(
        self,
        stages: Iterable[Any],
        recovery_strategies: Mapping[int, Recovery] | None = None,
        *,
        non_critical: Sequence[type[BaseException]] = (TimeoutError, LowConfidenceError),
        error_field: str | None = "error",
        strict: bool | None = None,
    ) -> None:
        if recovery_strategies is not None and not isinstance(recovery_strategies, Mapping):
            raise ConfigurationError(
                f"recovery_strategies must be a dict {{stage_index: function}}, got {recovery_strategies!r}.",
                field="recovery_strategies",
                code="bad_option",
            )
        self.non_critical = tuple(non_critical)
        self.error_field = error_field
        self._owners: dict[int, Any] = {}
        self._last_log: list[dict[str, Any]] = []
        super().__init__(stages, strict=strict)
        strategies = dict(recovery_strategies or {})
        for key, fn in strategies.items():
            if (
                isinstance(key, bool)
                or not isinstance(key, int)
                or not -len(self.stages) <= key < len(self.stages)
            ):
                raise ConfigurationError(
                    f"recovery_strategies key {key!r} is not a stage index (0..{len(self.stages) - 1}).",
                    field=str(key),
                    code="bad_option",
                )
            if not callable(fn):
                raise ConfigurationError(
                    f"recovery strategy for stage {key} is not callable.", field=str(key), code="bad_option"
                )
        # Each strategy is tied to its stage object, so it follows the stage when others are
        # inserted or removed (deep copies keep the tie: the copy's map points at the copied stages).
        self._owners = {id(self.stages[k]): (self.stages[k], fn) for k, fn in strategies.items()}
        self.recovery_strategies = {k % len(self.stages): fn for k, fn in strategies.items()}
        self._entries = self._build()

    def _should_continue_on_error(self, error: BaseException) -> bool:
        """Whether the run goes on without a stage that failed with ``error`` (and was not recovered).

        By default: ``error``, or an error it was raised from, is one of ``non_critical``. Override
        it in a subclass (as the tutorial's pipeline has it) to decide another way; the override is
        called with the stage's own exception.
        """
        return is_kind(error, tuple(self.non_critical))

    def _decides_itself(self) -> bool:
        return type(self)._should_continue_on_error is not ErrorHandlingPipeline._should_continue_on_error

    def _build(self) -> tuple[StageEntry, ...]:
        entries = super()._build()
        owners = getattr(self, "_owners", {})
        if owners:
            positions = {id(s): i for i, s in enumerate(self.stages)}
            self.recovery_strategies = {
                positions[id(stage)]: fn for stage, fn in owners.values() if id(stage) in positions
            }
        strategies = getattr(self, "recovery_strategies", {})
        out = []
        for i, entry in enumerate(entries):
            extra = StagePolicy(
                recover=strategies.get(i),
                skip_on=getattr(self, "non_critical", ()),
                skip_if=self._should_continue_on_error if self._decides_itself() else None,
                error_field=getattr(self, "error_field", None),
            )
            own = entry.policy
            out.append(replace(entry, policy=extra if own is None else own.merged_over(extra)))
        return tuple(out)

    def __deepcopy__(self, memo: dict[int, Any]) -> ErrorHandlingPipeline:
        import copy

        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k == "_owners":
                continue
            object.__setattr__(new, k, copy.deepcopy(v, memo))
        # Re-tie each strategy to the copy of its stage.
        object.__setattr__(
            new,
            "_owners",
            {id(copy.deepcopy(s, memo)): (copy.deepcopy(s, memo), fn) for s, fn in self._owners.values()},
        )
        return new

    @property
    def error_log(self) -> list[dict[str, Any]]:
        """The error log of the last finished call (each call's own is ``result.error_log``)."""
        return list(self._last_log)

    def _stage_names(self) -> dict[int, str]:
        """The tutorial's ``getattr(stage, 'name', f'stage_{i}')`` for each stage index."""
        names: dict[int, str] = {}
        for i, s in enumerate(self.stages):
            name = getattr(s, "name", None)
            names[i] = name if isinstance(name, str) and name else f"stage_{i}"
        return names

    def stageflow_result(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...] = ()) -> Result:
        log = _log(run, self._stage_names())
        run.extras["error_log"] = log
        self._last_log = log  # one reference swap: safe under concurrent calls
        return Result(state, run)

    def _raise_unrecovered(self, error: StageflowError, run: RunInfo) -> None:
        log = _log(run, self._stage_names())
        self._last_log = log
        failed = next((e for e in reversed(log) if e["action"] == "failed"), None)
        if failed is None:
            # Not a stage failure this pipeline handled: a contract broken at a stage's boundary
            # (a deferred input that never appeared: the stage did not run), a configuration error.
            # It leaves as it is, with its own stage path, field, what is available and the fix.
            raise error
        index = failed["stage_index"]
        path = failed["stage_path"]
        original = next((e for e in causes(error) if not isinstance(e, StageflowError)), error)
        recovery = (
            f" Its recovery strategy raised {failed['recovery_error']}." if "recovery_error" in failed else ""
        )
        err = PipelineError(
            f"ErrorHandlingPipeline: stage {index} ('{path}') failed and was not recovered: "
            f"{type(original).__name__}: {original}.{recovery}",
            stage_path=path,
            code="unrecovered",
            errors=log,
            hint="fix the recovery strategy for that stage index"
            if recovery
            else "add a recovery strategy for that stage index, a Fallback, or a RetryPolicy",
        )
        err.path_is_full = True  # the log's paths are already full paths
        cause = error.recovery_error or original
        try:
            raise err from cause
        finally:
            del err, error, original, cause  # (no reference cycle through this frame)

    def _run_entries(
        self,
        entries: tuple[StageEntry, ...],
        state: dict[str, Any],
        run: RunInfo,
        hooks: tuple[Any, ...],
        prefix: str,
    ) -> None:
        try:
            super()._run_entries(entries, state, run, hooks, prefix)
        except StageflowError as e:
            self._raise_unrecovered(e, run)

    async def _arun_entries(
        self,
        entries: tuple[StageEntry, ...],
        state: dict[str, Any],
        run: RunInfo,
        hooks: tuple[Any, ...],
        prefix: str,
    ) -> None:
        try:
            await super()._arun_entries(entries, state, run, hooks, prefix)
        except StageflowError as e:
            self._raise_unrecovered(e, run)
