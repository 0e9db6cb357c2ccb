"""Parallel: groups run in order; the stages inside a group run concurrently and are merged."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from stageflow.engine.boundary import private_state
from stageflow.engine.concurrency import FailurePolicy
from stageflow.engine.plan import Scope, StageEntry, build_entry, join_path
from stageflow.errors import ConfigurationError, ContractError, PipelineError
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
from stageflow.policies.recovery import PolicyEvent
from stageflow.state import RunInfo

__all__ = ["ParallelPipeline", "ResultMerger"]

ClashStrategy = Literal["error", "list", "concatenate", "first"]


_STRATEGIES = ("error", "list", "concatenate", "first")


def _produced_fields(item: Any) -> dict[str, Any] | None:
    """The fields of one stage's result: a dict, a ``dspy.Prediction``, a pydantic model (``None`` for a
    failed one: the tutorial's ``{"error": ...}`` records)."""
    if isinstance(item, Mapping):
        if item.get("error") and len(item) == 1:
            return None
        return dict(item)
    store = getattr(item, "_store", None)
    if isinstance(store, dict):
        return dict(store)
    model_fields = getattr(type(item), "model_fields", None)
    if isinstance(model_fields, dict):
        return {k: getattr(item, k) for k in model_fields}
    return {"content": str(item)}


class ResultMerger:
    r"""Merge the outputs of one parallel group into the state.

    Fields written by one stage merge as they are. A field written by several stages of the same
    group (a clash) follows its entry in ``strategies``, else ``on_clash``:

    - ``"error"`` (default for other fields): rejected when the pipeline is built
      (:class:`ContractError`) — or, for stages whose outputs are only known at run time, when the
      group has run;
    - ``"concatenate"`` (default for ``content``, as in the tutorial): strings are joined with
      ``separator`` (a newline), lists are concatenated;
    - ``"list"``: the field becomes the list of values, in stage order;
    - ``"first"``: the first stage's value (in stage order) wins.

    Examples:
        >>> ResultMerger().merge([{"content": "a"}, {"content": "b", "extra": 1}])
        {'content': 'a\nb', 'extra': 1}
    """

    def __init__(
        self,
        on_clash: ClashStrategy = "error",
        separator: str = "\n",
        strategies: Mapping[str, str] | None = None,
    ) -> None:
        if on_clash not in _STRATEGIES:
            raise ConfigurationError(
                f"ResultMerger: on_clash must be one of {list(_STRATEGIES)}, got {on_clash!r}.",
                field="on_clash",
                code="bad_option",
            )
        given = {"content": "concatenate"} if strategies is None else dict(strategies)
        for name, how in given.items():
            if how not in _STRATEGIES:
                raise ConfigurationError(
                    f"ResultMerger: strategies[{name!r}] must be one of {list(_STRATEGIES)}, got {how!r}.",
                    field=str(name),
                    code="bad_option",
                )
        if not isinstance(separator, str):
            raise ConfigurationError(
                f"ResultMerger: separator must be a string, got {separator!r}.",
                field="separator",
                code="bad_option",
            )
        self.on_clash = on_clash
        self.separator = separator
        self.strategies = given

    def __repr__(self) -> str:
        return f"ResultMerger(on_clash={self.on_clash!r}, strategies={self.strategies!r})"

    def strategy_for(self, field: str) -> str:
        """How a clash on ``field`` is merged."""
        return self.strategies.get(field, self.on_clash)

    def merge(self, produced: Sequence[Any]) -> dict[str, Any]:
        """Combine the fields produced by the group's stages (in stage order).

        ``produced`` holds each stage's fields (dicts), or — called as in the tutorial — the stages'
        results (predictions, models; ``{"error": ...}`` entries are left out). Raises
        :class:`~stageflow.PipelineError` when every entry failed.
        """
        fields_list = [f for f in (_produced_fields(p) for p in produced) if f is not None]
        if produced and not fields_list:
            raise PipelineError("All parallel stages failed: nothing to merge.", code="all_failed")
        seen: dict[str, list[Any]] = {}
        for fields in fields_list:
            for k, v in fields.items():
                seen.setdefault(k, []).append(v)
        out: dict[str, Any] = {}
        for k, values in seen.items():
            how = self.strategy_for(k)
            if len(values) == 1:
                out[k] = values[0]
            elif how == "list":
                out[k] = list(values)
            elif how == "first":
                out[k] = values[0]
            elif how == "concatenate":
                if all(isinstance(v, list | tuple) for v in values):
                    out[k] = [x for v in values for x in v]
                else:
                    out[k] = self.separator.join(str(v) for v in values)
            else:
                raise ContractError(
                    f"Parallel stages both wrote '{k}'.",
                    field=k,
                    code="output_clash",
                    hint=f"ResultMerger(strategies={{'{k}': 'list'}}) (or 'concatenate', 'first'), or rename "
                    "an output with Stage(<stage>, outputs={...})",
                )
        return out


def _describe(error: BaseException | None) -> str:
    return f"{type(error).__name__}: {error}"


class ParallelPipeline(Pipeline):
    """Run groups of stages in order; the stages inside a group run concurrently.

    Args:
        parallel_groups: A list of groups, each a list of stages (a single stage counts as a group of
            one). Stages are held in the flat list ``self.stages`` (DSPy paths ``stages[i]``).
        merger: A :class:`ResultMerger` (default: ``content`` is joined with newlines, as in the
            tutorial; any other clash is an error when the pipeline is built).
        max_concurrency: Cap on stages running at once within a group.
        on_error: ``"collect"`` (default: a failed or timed-out stage is recorded in
            ``result.group_reports`` and as a ``stage_failed`` event, and the others are kept; a later
            stage that needs the failed stage's output then fails at its boundary; if all stages of
            a group fail, :class:`PipelineError` carries each error), ``"skip"`` (same, recorded) or
            ``"fail_fast"``.
        timeout: Per-stage timeout in seconds.
        strict: Strict contracts (see :class:`~stageflow.Pipeline`).

    Each stage of a group works on a private copy of the state: a stage that changes a list it was
    given in place changes neither its siblings' copy nor the caller's.

    Result details: ``group_results`` (per group, the list of its stages' results in order, as in
    the tutorial; ``{"error": "Type: message"}`` for a failed stage), ``group_reports`` (per group,
    ``{stage path: {"status", "elapsed", "error"}}``) and ``result`` (the final state). The groups
    as given are ``pipeline.parallel_groups``.
    """

    _stage_containers = ("stages",)

    def __init__(
        self,
        parallel_groups: Iterable[Any],
        merger: ResultMerger | None = None,
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
        if merger is not None and not isinstance(merger, ResultMerger):
            raise ConfigurationError(
                f"ParallelPipeline: merger must be a ResultMerger, got {merger!r}.",
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
        self.merger = merger or ResultMerger()
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
        the pipeline is built."""
        for g, group in enumerate(self._groups):
            writers: dict[str, str] = {}
            for entry in group:
                for f in entry.ports.outputs or ():
                    if f in writers and self.merger.strategy_for(f) == "error":
                        raise ContractError(
                            f"Parallel group {g}: stages '{writers[f]}' and '{entry.path}' both write '{f}'.",
                            stage_path=entry.path,
                            field=f,
                            code="output_clash",
                            hint=f"pass merger=ResultMerger(strategies={{'{f}': 'list'}}) (or 'concatenate', "
                            "'first'), or rename one output with Stage(<stage>, outputs={...})",
                        )
                    writers[f] = entry.path

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

    def _branches(self, group: tuple[StageEntry, ...], state: dict[str, Any]) -> list[Branch]:
        return [Branch(e, private_state(state)) for e in group]

    @property
    def parallel_groups(self) -> list[list[Any]]:
        """The groups as given: a list of lists of stages (they are held in the flat ``self.stages``)."""
        return [list(self.stages[a:b]) for a, b in self._bounds]

    def _merge(
        self, g: int, state: dict[str, Any], run: RunInfo, results: list[BranchResult], prefix: str
    ) -> None:
        absorb(run, results)
        # The tutorial's record: each stage's result in order ({'error': ...} for a failed one) ...
        run.extras.setdefault("group_results", []).append(
            [
                r.outcome.value
                if r.outcome.ok
                else {"error": f"{type(r.outcome.error).__name__}: {r.outcome.error}"}
                for r in results
            ]
        )
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
        try:
            merged = self.merger.merge([r.produced for r in ok])
        except ContractError as e:
            if e.code == "output_clash" and e.field:  # name the stages and the group (only known here)
                writers = [
                    join_path(prefix, r.branch.entry.path)
                    for r in ok
                    if e.field in (_produced_fields(r.produced) or {})
                ]
                e.message = (
                    f"Parallel group {g}: stages {', '.join(repr(w) for w in writers)} both wrote "
                    f"'{e.field}' (their outputs are undeclared, so this was found when the group ran)."
                )
                e.args = (e.message,)
                e.stage_path = writers[0] if writers else (prefix or None)
                e.hint = (
                    f"pass merger=ResultMerger(strategies={{'{e.field}': 'list'}}) (or 'concatenate', "
                    "'first'), or declare or rename the outputs with "
                    "Stage(<stage>, writes=[...], outputs={...})"
                )
            raise
        state.update(merged)

    def _run(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        for g, group in enumerate(self._groups):
            results = run_branches(
                self,
                self._branches(group, state),
                hooks,
                prefix,
                **fanout_options(self),
            )
            self._merge(g, state, run, results, prefix)

    async def _arun(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        for g, group in enumerate(self._groups):
            results = await arun_branches(
                self,
                self._branches(group, state),
                hooks,
                prefix,
                **fanout_options(self),
            )
            self._merge(g, state, run, results, prefix)
