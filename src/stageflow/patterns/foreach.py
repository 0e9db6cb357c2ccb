"""ForEach: run a stage once per element of a list field, concurrently, results in input order."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from stageflow.engine.concurrency import FailurePolicy
from stageflow.engine.plan import Scope, StageEntry, build_entry
from stageflow.errors import ConfigurationError, ContractError, PipelineError
from stageflow.patterns._fanout import (
    Branch,
    BranchResult,
    absorb,
    arun_branches,
    check_fanout_options,
    fanout_options,
    run_branches,
)
from stageflow.patterns.base import Pipeline, as_stage
from stageflow.state import RunInfo

__all__ = ["ForEach"]


def _singular(name: str) -> str:
    if name.endswith("ies"):
        return name[:-3] + "y"
    if name.endswith("s") and not name.endswith("ss"):
        return name[:-1]
    return f"{name}_item"


class ForEach(Pipeline):
    """Map a stage over a list: ``decompose → ForEach(retrieve_and_extract) → synthesize``.

    Args:
        stage: The stage to run per element (any stage; held as ``self.stage``).
        over: The list field to iterate.
        item: The field each run receives its element as (default: ``over`` made singular,
            ``sub_questions`` → ``sub_question``). Other inputs of the stage come from the state.
        collect: Where results go: a field name when the stage has one output (``"facts"``), or
            ``{stage_output: list_field}``. Default: each output ``x`` into ``x + "s"``.
        max_concurrency: Cap on elements running at once (under any cap already in force).
        on_error: ``"collect"`` (default: a failed element leaves ``None`` in its slot and is listed in
            ``result.item_errors``), ``"skip"`` (failed elements are dropped from the lists) or
            ``"fail_fast"`` (the first failure raises).
        timeout: Per-element timeout in seconds.

    ``result.item_results`` lists every element's status, in input order.
    """

    def __init__(
        self,
        stage: Any,
        over: str,
        item: str | None = None,
        collect: str | Mapping[str, str] | None = None,
        *,
        max_concurrency: int | None = None,
        on_error: FailurePolicy = "collect",
        timeout: float | None = None,
    ) -> None:
        super().__init__()
        check_fanout_options(max_concurrency, on_error, timeout, "ForEach")
        if not isinstance(over, str) or not over:
            raise ConfigurationError("ForEach needs over='<list field>'.", field="over", code="bad_option")
        self.stage = as_stage(stage, "ForEach stage")
        self.over = over
        self.item = item or _singular(over)
        self.max_concurrency = max_concurrency
        self.on_error = on_error
        self.timeout = timeout
        self._entry = build_entry("stage", None, self.stage)
        self._item_entries: list[StageEntry] = []
        outputs = self._entry.ports.outputs
        if outputs is None:
            raise ConfigurationError(
                f"ForEach: the stage ({self._entry.label}) does not declare its outputs, so there is "
                "nothing to collect.",
                stage_path="stage",
                code="undeclared_outputs",
                hint="declare them: ForEach(Stage(x, writes=['fact']), ...)",
            )
        if isinstance(collect, str):
            if len(outputs) != 1:
                raise ConfigurationError(
                    f"ForEach: collect={collect!r} names one list field, but the stage has outputs "
                    f"{list(outputs)}.",
                    field="collect",
                    code="bad_option",
                    hint=f"map each output: collect={{{', '.join(repr(o) + ': ...' for o in outputs)}}}",
                )
            collect = {outputs[0]: collect}
        elif collect is None:
            collect = {o: f"{o}s" if not o.endswith("s") else f"{o}_list" for o in outputs}
        unknown = [k for k in collect if k not in outputs]
        if unknown:
            raise ConfigurationError(
                f"ForEach: collect names {unknown}, which the stage does not output "
                f"(outputs: {list(outputs)}).",
                field="collect",
                code="bad_option",
            )
        self.collect = dict(collect)

    def _item_entries_for(self, n: int) -> list[StageEntry]:
        """One entry per item position (``stage[i]``), made once and reused by every call.

        A longer list replaces the old one in a single assignment, so concurrent calls never see
        a half-built list.
        """
        entries = self._item_entries
        if len(entries) < n:
            entries = entries + [replace(self._entry, path=f"stage[{i}]") for i in range(len(entries), n)]
            self._item_entries = entries
        return entries

    def _analyze(self, scope: Scope, prefix: str) -> None:
        scope.need(
            self.over,
            prefix or "ForEach",
            lambda: ContractError(
                f"ForEach iterates over '{self.over}', which is not available there. Available: "
                f"{sorted(scope.available)}.",
                stage_path=prefix or None,
                field=self.over,
                code="missing_input",
                hint=f"produce the list '{self.over}' in an earlier stage, or pass it as an input",
            ),
        )
        inner = scope.copy()
        inner.available[self.item] = None
        inner.origin[self.item] = f"ForEach item of '{self.over}'"
        inner.check(self._entry, prefix)
        for src, dst in self.collect.items():
            scope.available[dst] = list[inner.available.get(src) or Any]  # type: ignore[misc]
            scope.origin[dst] = f"{prefix + '.' if prefix else ''}stage"

    def _branches(self, state: dict[str, Any]) -> list[Branch]:
        items = state.get(self.over)
        if not isinstance(items, list | tuple):
            raise ContractError(
                f"ForEach expected a list in '{self.over}', got {type(items).__name__}: {items!r:.80}.",
                field=self.over,
                code="not_a_list",
                hint=f"make the upstream stage output a list ('{self.over}: list[str]' in its signature)",
            )
        needed = {st for _, st in (*self._entry.in_pairs, *self._entry.opt_pairs)}
        shared = {k: v for k, v in state.items() if k in needed and k != self.item}
        entries = self._item_entries_for(len(items))
        return [Branch(entries[i], {**shared, self.item: x}) for i, x in enumerate(items)]

    def _collect(self, state: dict[str, Any], run: RunInfo, results: list[BranchResult]) -> None:
        absorb(run, results)
        lists: dict[str, list[Any]] = {dst: [] for dst in self.collect.values()}
        errors: list[dict[str, Any]] = []
        for r in results:
            if not r.outcome.ok:
                errors.append(
                    {"index": r.outcome.index, "status": r.outcome.status, "error": r.outcome.error}
                )
                if self.on_error == "skip":
                    continue
            for src, dst in self.collect.items():
                lists[dst].append(r.branch.state.get(src) if r.outcome.ok else None)
        if results and len(errors) == len(results):
            err = PipelineError(
                f"ForEach: all {len(results)} elements of '{self.over}' failed; first error: "
                f"{type(errors[0]['error']).__name__}: {errors[0]['error']}",
                field=self.over,
                code="all_failed",
                errors=[e["error"] for e in errors],
            )
            raise err from errors[0]["error"]
        state.update(lists)
        run.extras["item_results"] = [
            {
                "index": r.outcome.index,
                "status": r.outcome.status,
                "elapsed": r.outcome.elapsed,
                "error": r.outcome.error,
            }
            for r in results
        ]
        run.extras["item_errors"] = errors

    def _run(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        results = run_branches(
            self,
            self._branches(state),
            hooks,
            prefix,
            **fanout_options(self),
            produced=False,
        )
        self._collect(state, run, results)

    async def _arun(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        results = await arun_branches(
            self,
            self._branches(state),
            hooks,
            prefix,
            **fanout_options(self),
            produced=False,
        )
        self._collect(state, run, results)
