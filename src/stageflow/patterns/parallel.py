"""Parallel: groups run in order; the stages inside a group run concurrently and are merged."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

from stageflow.engine.boundary import private_state
from stageflow.engine.concurrency import FailurePolicy
from stageflow.engine.plan import Scope, StageEntry, build_entry
from stageflow.errors import ConfigurationError, ContractError
from stageflow.patterns._fanout import (
    Branch,
    BranchResult,
    absorb,
    arun_branches,
    check_fanout_options,
    fanout_options,
    raise_all_failed,
    run_branches,
)
from stageflow.patterns.base import Pipeline, as_stage
from stageflow.state import RunInfo

__all__ = ["ParallelPipeline", "ResultMerger"]

ClashStrategy = Literal["error", "list", "concatenate"]


class ResultMerger:
    """Merge the outputs of one parallel group into the state.

    Fields written by one stage merge as they are. A field written by several stages of the same
    group (a clash) follows ``on_clash``:

    - ``"error"`` (default): rejected when the pipeline is built (:class:`ContractError`);
    - ``"list"``: the field becomes the list of values, in stage order;
    - ``"concatenate"``: strings are joined with ``separator``, lists are concatenated.
    """

    def __init__(self, on_clash: ClashStrategy = "error", separator: str = "\n") -> None:
        if on_clash not in ("error", "list", "concatenate"):
            raise ConfigurationError(
                f"ResultMerger: on_clash must be 'error', 'list' or 'concatenate', got {on_clash!r}.",
                field="on_clash",
                code="bad_option",
            )
        self.on_clash = on_clash
        self.separator = separator

    def __repr__(self) -> str:
        return f"ResultMerger(on_clash={self.on_clash!r})"

    def merge(self, produced: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Combine the fields produced by the group's stages (in stage order)."""
        seen: dict[str, list[Any]] = {}
        for fields in produced:
            for k, v in fields.items():
                seen.setdefault(k, []).append(v)
        out: dict[str, Any] = {}
        for k, values in seen.items():
            if len(values) == 1:
                out[k] = values[0]
            elif self.on_clash == "list":
                out[k] = list(values)
            elif self.on_clash == "concatenate":
                if all(isinstance(v, list | tuple) for v in values):
                    out[k] = [x for v in values for x in v]
                else:
                    out[k] = self.separator.join(str(v) for v in values)
            else:
                raise ContractError(
                    f"Parallel stages both wrote '{k}'.",
                    field=k,
                    code="output_clash",
                    hint="ResultMerger(on_clash='list') or 'concatenate', or rename an output",
                )
        return out


class ParallelPipeline(Pipeline):
    """Run groups of stages in order; the stages inside a group run concurrently.

    Args:
        parallel_groups: A list of groups, each a list of stages (a single stage counts as a group of
            one). Stages are held in the flat list ``self.stages`` (DSPy paths ``stages[i]``).
        merger: A :class:`ResultMerger` (default: clashes are an error).
        max_concurrency: Cap on stages running at once within a group.
        on_error: ``"collect"`` (default: a failed or timed-out stage is recorded in
            ``result.group_results`` and the others are kept; if all stages of a group fail,
            :class:`PipelineError` carries each error), ``"skip"`` (same, recorded) or
            ``"fail_fast"``.
        timeout: Per-stage timeout in seconds.
    """

    def __init__(
        self,
        parallel_groups: Iterable[Any],
        merger: ResultMerger | None = None,
        *,
        max_concurrency: int | None = None,
        on_error: FailurePolicy = "collect",
        timeout: float | None = None,
    ) -> None:
        super().__init__()
        check_fanout_options(max_concurrency, on_error, timeout, "ParallelPipeline")
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
        self.merger = merger or ResultMerger()
        self.max_concurrency = max_concurrency
        self.on_error = on_error
        self.timeout = timeout
        self._groups: tuple[tuple[StageEntry, ...], ...] = tuple(
            tuple(build_entry("stages", i, stages[i]) for i in range(a, b)) for a, b in bounds
        )
        if self.merger.on_clash == "error":
            self._reject_clashes()

    def _reject_clashes(self) -> None:
        """Two stages of one group declaring the same output: an error when the pipeline is built."""
        for g, group in enumerate(self._groups):
            writers: dict[str, str] = {}
            for entry in group:
                for f in entry.ports.outputs or ():
                    if f in writers:
                        raise ContractError(
                            f"Parallel group {g}: stages '{writers[f]}' and '{entry.path}' both write '{f}'.",
                            stage_path=entry.path,
                            field=f,
                            code="output_clash",
                            hint="pass merger=ResultMerger(on_clash='list') or 'concatenate', or rename one "
                            "output with Stage(<stage>, outputs={...})",
                        )
                    writers[f] = entry.path

    def _analyze(self, scope: Scope, prefix: str) -> None:
        for g, group in enumerate(self._groups):
            base = scope.copy()
            writers: dict[str, str] = {}
            for entry in group:
                sub = base.copy()
                sub.check(entry, prefix)
                for f in entry.ports.outputs or ():
                    if f in writers and self.merger.on_clash == "error":
                        raise ContractError(
                            f"Parallel group {g}: stages '{writers[f]}' and '{entry.path}' both write '{f}'.",
                            stage_path=entry.path,
                            field=f,
                            code="output_clash",
                            hint="pass merger=ResultMerger(on_clash='list') or 'concatenate', or rename one "
                            "output with Stage(<stage>, outputs={...})",
                        )
                    writers[f] = entry.path
                for f in sub.available:
                    if f not in scope.available:
                        scope.available[f] = sub.available[f]
                        scope.origin[f] = sub.origin.get(f, "")
                scope.opaque.extend(sub.opaque[len(base.opaque) :])

    def _branches(self, group: tuple[StageEntry, ...], state: dict[str, Any]) -> list[Branch]:
        return [Branch(e, private_state(state)) for e in group]

    def _merge(self, g: int, state: dict[str, Any], run: RunInfo, results: list[BranchResult]) -> None:
        absorb(run, results)
        report = {
            r.branch.entry.path: {
                "status": r.outcome.status,
                "elapsed": r.outcome.elapsed,
                "error": r.outcome.error,
            }
            for r in results
        }
        run.extras.setdefault("group_results", []).append(report)
        ok = [r for r in results if r.outcome.ok]
        if not ok:
            raise_all_failed(f"ParallelPipeline: every stage of group {g} failed", results)
        state.update(self.merger.merge([r.produced for r in ok]))

    def _run(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        for g, group in enumerate(self._groups):
            results = run_branches(
                self,
                self._branches(group, state),
                hooks,
                prefix,
                **fanout_options(self),
            )
            self._merge(g, state, run, results)

    async def _arun(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        for g, group in enumerate(self._groups):
            results = await arun_branches(
                self,
                self._branches(group, state),
                hooks,
                prefix,
                **fanout_options(self),
            )
            self._merge(g, state, run, results)
