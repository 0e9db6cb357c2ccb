"""Parallel: groups run in order; the stages inside a group run concurrently and are merged."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from stageflow.engine.boundary import FAILED_OUTPUTS, failed_outputs_of, private_state
from stageflow.engine.concurrency import FailurePolicy
from stageflow.engine.plan import Scope, StageEntry, build_entry, join_path
from stageflow.errors import ConfigurationError, ContractError, StageError
from stageflow.patterns._fanout import (
    Branch,
    BranchResult,
    absorb,
    arun_branches,
    check_fanout_options,
    fanout_options,
    raise_all_failed,
    run_branches,
    usage_kept,
)
from stageflow.patterns._fields import Produced, call_yours, returned_fields
from stageflow.patterns.base import Pipeline, as_stage
from stageflow.patterns.merger import (
    ResultMerger,
    clash_error,
    clash_hint,
    merges_its_own_way,
    produced_fields,
)
from stageflow.policies.recovery import PolicyEvent
from stageflow.state import RunInfo

__all__ = ["ParallelPipeline", "ResultMerger", "UndeclaredFailureWarning"]


def _describe(error: BaseException | None) -> str:
    return f"{type(error).__name__}: {error}"


class UndeclaredFailureWarning(UserWarning):
    """A parallel stage with undeclared outputs failed under ``on_error="collect"``/``"skip"``: the
    fields it would have written could not be dropped, so a later stage may read an earlier value."""


class ParallelPipeline(Pipeline):
    """Run groups of stages in order; the stages inside a group run concurrently.

    Args:
        parallel_groups: A list of groups, each a list of stages (a single stage counts as a group of
            one). Stages are held in the flat list ``self.stages`` (DSPy paths ``stages[i]``).
        merger: A :class:`ResultMerger` (default: ``content`` is joined with newlines, as in the
            tutorial; any other clash is an error when the pipeline is built).
        max_concurrency: Cap on stages running at once within a group.
        on_error: ``"collect"`` (default: a failed or timed-out stage is recorded in
            ``result.group_reports`` and as a ``stage_failed`` event, and the others are kept; the
            fields it declared are dropped from the state — never left at a value the caller passed
            or an earlier group wrote — and listed in ``result.failed_outputs``, so a later stage
            that needs one fails at its boundary with a :class:`ContractError` naming the failed
            stage, here or in an enclosing pipeline; if all stages of a group fail,
            :class:`PipelineError` carries each error), ``"skip"`` (same, recorded) or
            ``"fail_fast"``.
        timeout: Per-stage timeout in seconds.
        strict: Strict contracts (see :class:`~stageflow.Pipeline`).

    Each stage of a group works on a private copy of the state: a stage that changes a list it was
    given in place changes neither its siblings' copy nor the caller's.

    Result details: ``group_results`` (per group, the list of its stages' results in order, as in
    the tutorial; ``{"error": "Type: message"}`` for a failed stage), ``group_reports`` (per group,
    ``{stage path: {"status", "elapsed", "error"}}``), ``failed_outputs`` (when a stage failed:
    ``{field: the failed stage and its error}`` for the fields it did not write) and ``result``
    (the final state). The groups
    as given are ``pipeline.parallel_groups``.
    """

    _stageflow_content = (*Pipeline._stageflow_content, "_bounds")

    _stage_containers = ("stages",)

    def __init__(
        self,
        parallel_groups: Iterable[Any],
        merger: Any = None,
        *,
        max_concurrency: int | None = None,
        on_error: FailurePolicy = "collect",
        timeout: float | None = None,
        strict: bool | None = None,
    ) -> None:
        super().__init__(strict=strict)
        check_fanout_options(max_concurrency, on_error, timeout, "ParallelPipeline")
        if isinstance(parallel_groups, str | bytes) or not isinstance(parallel_groups, Iterable):
            raise ConfigurationError(
                f"ParallelPipeline takes a list of groups, got {type(parallel_groups).__name__}.",
                code="bad_stages",
            )
        own = merger is not None and (not isinstance(merger, ResultMerger) or merges_its_own_way(merger))
        if own and not callable(getattr(merger, "merge", None)):
            raise ConfigurationError(
                f"ParallelPipeline: merger must be a ResultMerger (or an object with a merge(results) "
                f"method), got {merger!r}.",
                field="merger",
                code="bad_option",
            )
        stages: list[Any] = []
        bounds: list[tuple[int, int]] = []
        for g, group in enumerate(parallel_groups):
            members = list(group) if isinstance(group, list | tuple) else [group]
            if not members:
                raise ConfigurationError(f"ParallelPipeline: group {g} is empty.", code="bad_stages")
            start = len(stages)
            stages.extend(as_stage(s, f"group {g}") for s in members)
            bounds.append((start, len(stages)))
        if not bounds:
            raise ConfigurationError(
                "ParallelPipeline needs at least one group of stages.", code="bad_stages"
            )
        self.stages = stages
        self.merger = ResultMerger() if merger is None else merger
        self.max_concurrency = max_concurrency
        self.on_error = on_error
        self.timeout = timeout
        self._bounds = tuple(bounds)
        self._rebuild()
        self._built()

    def _rebuild(self) -> None:
        if len(self.stages) != self._bounds[-1][1]:
            raise ConfigurationError(
                "ParallelPipeline: stages were added or removed after it was built; which group they belong "
                "to is not known.",
                code="structure_changed",
                hint="build a new ParallelPipeline with the groups you want (replacing a stage is fine)",
            )
        for i, s in enumerate(self.stages):
            wrapped = as_stage(s, f"stages[{i}]")
            if wrapped is not s:
                list.__setitem__(self.stages, i, wrapped)
        self._groups: tuple[tuple[StageEntry, ...], ...] = tuple(
            tuple(build_entry("stages", i, self.stages[i]) for i in range(a, b)) for a, b in self._bounds
        )
        self._reject_clashes()

    def _reject_clashes(self) -> None:
        """Two stages of one group declaring the same output with no merge rule for it: an error when
        the pipeline is built (a merge of your own resolves them its way)."""
        if merges_its_own_way(self.merger):
            return
        for g, group in enumerate(self._groups):
            writers: dict[str, str] = {}
            clashes: dict[str, list[str]] = {}
            for entry in group:
                for f in entry.ports.outputs or ():
                    if f in writers and self.merger.strategy_for(f) == "error":
                        clashes.setdefault(f, [writers[f]]).append(entry.path)
                    writers[f] = entry.path
            if clashes:
                who = "; ".join(
                    f"'{f}' by {', '.join(repr(p) for p in paths)}" for f, paths in clashes.items()
                )
                first = next(iter(clashes.values()))
                err = clash_error(list(clashes), f"Parallel group {g}: stages write the same fields:")
                err.message = f"Parallel group {g}: several stages write the same field: {who}."
                err.args = (err.message,)
                err.stage_path = first[-1]
                raise err

    def _analyze(self, scope: Scope, prefix: str) -> None:
        self._refresh()
        for group in self._groups:
            base = scope.copy()
            for entry in group:
                sub = base.copy()
                sub.check(entry, prefix)
                for f in sub.available:
                    if f not in scope.available:
                        scope.available[f] = sub.available[f]
                        scope.origin[f] = sub.origin.get(f, "")
                scope.opaque.extend(sub.opaque[len(base.opaque) :])

    def _branches(self, group: tuple[StageEntry, ...], state: dict[str, Any], run: RunInfo) -> list[Branch]:
        failed = run.extras.get(FAILED_OUTPUTS)
        if not failed:
            return [Branch(e, private_state(state)) for e in group]
        # A later stage that reads a field a failed stage was to write fails at its boundary, and
        # the error names that stage: each branch's run knows which fields are missing and why.
        return [
            Branch(e, private_state(state), RunInfo(extras={FAILED_OUTPUTS: dict(failed)})) for e in group
        ]

    @property
    def parallel_groups(self) -> list[list[Any]]:
        """The groups as given: a list of lists of stages (they are held in the flat ``self.stages``)."""
        return [list(self.stages[a:b]) for a, b in self._bounds]

    def _merge(
        self, g: int, state: dict[str, Any], run: RunInfo, results: Sequence[BranchResult], prefix: str
    ) -> None:
        absorb(run, results)
        # The tutorial's record: each stage's result in order ({'error': ...} for a failed one) ...
        records = [
            r.outcome.value
            if r.outcome.ok
            else {"error": f"{type(r.outcome.error).__name__}: {r.outcome.error}"}
            for r in results
        ]
        run.extras.setdefault("group_results", []).append(records)
        # ... and how each stage ended, by path.
        report = {
            r.branch.entry.path: {
                "status": r.outcome.status,
                "elapsed": r.outcome.elapsed,
                "error": r.outcome.error,
            }
            for r in results
        }
        run.extras.setdefault("group_reports", []).append(report)
        for r in results:
            if not r.outcome.ok and r.outcome.status in ("error", "timeout"):
                error = r.outcome.error
                run.events.append(
                    PolicyEvent(
                        join_path(prefix, r.branch.entry.path),
                        "stage_failed",
                        error=f"{type(error).__name__}: {error}",
                        detail={"group": g, "status": r.outcome.status},
                    )
                )
        ok = [r for r in results if r.outcome.ok]
        if not ok:
            raise_all_failed(f"ParallelPipeline: every stage of group {g} failed", results)
        if merges_its_own_way(self.merger):
            # The tutorial's call: merger.merge(results). A group of one runs alone, unmerged.
            if len(results) == 1:
                merged = dict(ok[0].produced or {})
            else:
                what = f"ParallelPipeline group {g}: {type(self.merger).__name__}.merge()"
                handed = [
                    Produced(**private_state(r.produced or {})) if r.outcome.ok else records[i]
                    for i, r in enumerate(results)
                ]
                merged = returned_fields(call_yours(self.merger.merge, handed, what, "merge_failed"), what)
            state.update(merged)
            self._unwritten(state, run, results, merged, prefix)
            return
        try:
            merged = self.merger.merge(
                [r.produced for r in ok], [join_path(prefix, r.branch.entry.path) for r in ok]
            )
        except ContractError as e:
            e.path_is_full = True  # the stages' names are full paths already
            if e.code == "merge_types":
                e.message = e.message.replace("Parallel stages", f"Parallel group {g}: stages", 1)
                e.args = (e.message,)
            if e.code == "output_clash" and e.field:  # name the stages and the group (only known here)
                fields = list(getattr(e, "fields", None) or [e.field])
                who = "; ".join(
                    f"'{f}' by "
                    + ", ".join(
                        repr(join_path(prefix, r.branch.entry.path))
                        for r in ok
                        if f in (produced_fields(r.produced) or {})
                    )
                    for f in fields
                )
                e.message = (
                    f"Parallel group {g}: several stages wrote the same field: {who} (their outputs are "
                    "undeclared, so this was found when the group ran)."
                )
                e.args = (e.message,)
                writers = [
                    join_path(prefix, r.branch.entry.path)
                    for r in ok
                    if e.field in (produced_fields(r.produced) or {})
                ]
                e.stage_path = writers[0] if writers else (prefix or None)
                e.hint = clash_hint(fields)
            raise
        state.update(merged)
        self._unwritten(state, run, results, merged, prefix)

    @staticmethod
    def _unwritten(
        state: dict[str, Any],
        run: RunInfo,
        results: Sequence[BranchResult],
        merged: dict[str, Any],
        prefix: str,
    ) -> None:
        """Drop the fields a failed stage was to write (and no sibling wrote) from the state.

        A value the caller passed (or an earlier group wrote) for such a field is stale: it must not
        reach a later stage as if the failed stage had produced it. The field is listed in
        ``result.failed_outputs`` with the stage that failed; a later stage that reads it fails at
        its boundary with a :class:`ContractError` naming that stage.
        """
        failed: dict[str, str] = run.extras.get(FAILED_OUTPUTS, {})
        for f in merged:
            failed.pop(f, None)  # written again by a later group
        for r in results:
            if r.outcome.ok:  # a nested pipeline's own failed stages: their fields are stale here too
                for record in failed_outputs_of(r.branch.run):
                    for f, why in record.items():
                        if f not in merged:
                            state.pop(f, None)
                            failed[f] = why
                continue
            if r.outcome.status not in ("error", "timeout"):
                continue
            entry, error = r.branch.entry, r.outcome.error
            if isinstance(error, StageError) and error.__cause__ is not None:
                error = error.__cause__  # the stage's own error (the StageError repeats the path)
            if entry.ports.outputs is None:
                # Which fields it would have written is unknown, so none can be dropped: the tutorial's
                # "a failed stage is left out of the merge" holds, and the risk is said out loud.
                where = join_path(prefix, entry.path)
                failed[f"<undeclared outputs of '{where}'>"] = (
                    f"'{where}' ({entry.label}), which failed: {type(error).__name__}: {error}; its outputs "
                    "are undeclared, so fields it would have written keep their earlier values"
                )
                warnings.warn(
                    f"Parallel stage '{where}' ({entry.label}) failed ({type(error).__name__}: {error}) and "
                    "its outputs are undeclared: fields it would have written keep the values they had "
                    "before the group, stale if a later stage reads them. Declare them with "
                    "Stage(<stage>, writes=[...]) so they are dropped and listed in result.failed_outputs.",
                    UndeclaredFailureWarning,
                    stacklevel=2,
                )
                continue
            for f in entry.ports.outputs or ():
                if f not in merged:
                    state.pop(f, None)
                    failed[f] = (
                        f"'{join_path(prefix, entry.path)}' ({entry.label}), which failed: "
                        f"{type(error).__name__}: {error}"
                    )
        if failed:
            run.extras[FAILED_OUTPUTS] = failed
        else:
            run.extras.pop(FAILED_OUTPUTS, None)

    def _run(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        for g, group in enumerate(self._groups):
            branches = self._branches(group, state, run)
            with usage_kept(run, branches):
                results = run_branches(self, branches, hooks, prefix, **fanout_options(self))
            self._merge(g, state, run, results, prefix)

    async def _arun(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        for g, group in enumerate(self._groups):
            branches = self._branches(group, state, run)
            with usage_kept(run, branches):
                results = await arun_branches(self, branches, hooks, prefix, **fanout_options(self))
            self._merge(g, state, run, results, prefix)
