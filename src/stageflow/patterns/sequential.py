"""Sequential: stages run in order over one shared state."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from stageflow.engine.inline import only_stages
from stageflow.engine.nested import plain_call
from stageflow.engine.plan import Scope, StageEntry, build_entry, held
from stageflow.engine.runner import acall_stage, aexecute, call_stage, execute
from stageflow.errors import ConfigurationError, ContractError
from stageflow.patterns.base import Pipeline, _replanned, as_stage
from stageflow.stages import describe
from stageflow.state import Result, RunInfo

__all__ = ["SequentialPipeline"]


class _Demand(tuple):  # type: ignore[type-arg]
    """The stages a demand-driven run calls, in order, with the predictors its check saw."""

    watched: tuple[Any, ...] = ()


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

    _stage_containers = ("stages",)

    def __init__(self, stages: Iterable[Any], *, strict: bool | None = None) -> None:
        super().__init__(strict=strict)
        if isinstance(stages, str | bytes) or not isinstance(stages, Iterable):
            raise ConfigurationError(
                f"SequentialPipeline takes a list of stages, got {type(stages).__name__}.",
                code="bad_stages",
                hint="SequentialPipeline([stage_a, stage_b])",
            )
        self.stages = [as_stage(s, f"stages[{i}]") for i, s in enumerate(stages)]
        self._entries = self._build()
        self._built()

    def _build(self) -> tuple[StageEntry, ...]:
        return tuple(build_entry("stages", i, s) for i, s in enumerate(self.stages))

    def _rebuild(self) -> None:
        # ``pipeline.stages.append(fn)`` (or an assignment) may hold a plain function: wrap it in place.
        for i, s in enumerate(self.stages):
            wrapped = as_stage(s, f"stages[{i}]")
            if wrapped is not s:
                list.__setitem__(self.stages, i, wrapped)
        self._entries = self._build()

    @property
    def stage_names(self) -> list[str]:
        """The tutorial's names of the stages, in order (``stage_0``, ``stage_1``...).

        ``result.stage_outputs``, ``result.trace`` and profiles accept them as keys too; stageflow's
        own key for a stage is its DSPy path (``stages[0]``), the name DSPy's optimizers use.
        """
        self._refresh()
        return [f"stage_{i}" for i in range(len(self._entries))]

    def add_stage(self, stage: Any, position: int | None = None) -> SequentialPipeline:
        """Insert ``stage`` at ``position`` (default: the end); later stages shift down.

        Stage paths are list positions (``stages[i]``), so they are renumbered after an
        insertion, exactly as DSPy's ``named_predictors()`` will name them.
        """
        s = as_stage(stage, "add_stage")
        if position is None:
            self.stages.append(s)
        else:
            if isinstance(position, bool) or not isinstance(position, int):
                raise ConfigurationError(
                    f"add_stage: position must be an int or None, got {position!r}.", code="bad_position"
                )
            if not -len(self.stages) - 1 <= position <= len(self.stages):
                raise ConfigurationError(
                    f"add_stage: position {position} is out of range for {len(self.stages)} stages.",
                    code="bad_position",
                    hint=f"use 0..{len(self.stages)}, or position=None to append",
                )
            self.stages.insert(position, s)
        self._refresh()
        return self

    # -- demand-driven runs -------------------------------------------------------------------
    def _demanded(self, outputs: Sequence[str], inputs: Iterable[str]) -> tuple[StageEntry, ...]:
        """The stages the requested fields depend on, in order (checked like a full run)."""
        if isinstance(outputs, str):
            outputs = [outputs]
        key = ("demand", frozenset(outputs), *self._check_key(frozenset(inputs)))
        cached = self._checked.get(key)
        if cached is not None:
            if not (cached.watched and _replanned(cached.watched)):
                return cached  # type: ignore[no-any-return]
            key = ("demand", frozenset(outputs), *self._check_key(frozenset(inputs)))  # (re-made)
        for entry in self._entries:  # (the choice reads ports: a replaced signature re-makes them first)
            if entry.signature is not None:
                self.stageflow_current(entry, "")
        needed = set(outputs)
        chosen: list[StageEntry] = []
        for entry in reversed(self._entries):
            # (a nested pipeline's live ports: it may have grown, or a predictor inside changed)
            ports = describe(held(self, entry)) if entry.composite and not entry.chain else entry.ports
            produced = ports.outputs
            if produced is None or ports.opaque or needed & set(produced):
                chosen.append(entry)
                needed -= set(produced or ())
                needed |= set(ports.required) | set(ports.optional)
        scope = Scope.start(sorted(set(inputs)), strict=True, owner=self, closed=self._closed())
        # (the check may re-make the plan: a predictor's signature replaced in place)
        plan = _Demand(scope.check(entry, "") for entry in reversed(chosen))
        plan.watched = tuple(scope.watched)
        missing = [f for f in outputs if f not in scope.available]
        if missing and not (scope.opaque and not scope.closed):
            raise ContractError(
                f"outputs={list(outputs)}: no stage produces {missing}, and they are not inputs. "
                f"This pipeline can produce: {sorted(self.check(inputs))}.",
                field=missing[0],
                code="unknown_output",
            )
        self._checked[key] = plan
        return plan

    @plain_call("outputs")
    def forward(self, *args: Any, outputs: Sequence[str] | None = None, **inputs: Any) -> Result:
        """Run the stages; with ``outputs=[...]``, only those the requested fields depend on."""
        if args:
            self._reject_positional(args)
        if outputs is None:  # stageflow_call, written out (every outermost call of a sequence)
            if not self._is_checked(frozenset(inputs)):
                self.check(inputs)
            return execute(self, inputs, self._run)
        self._refresh()
        plan = self._demanded(outputs, inputs)

        def body(state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
            run.extras["skipped_stages"] = [e.path for e in self._entries if e not in plan]
            self._run_entries(plan, state, run, hooks, prefix)

        return execute(self, inputs, body)

    @plain_call("outputs")
    async def aforward(self, *args: Any, outputs: Sequence[str] | None = None, **inputs: Any) -> Result:
        """Async twin of :meth:`forward`."""
        if outputs is None:
            return await super().aforward(*args, **inputs)
        if args:
            self._reject_positional(args)
        self._refresh()
        plan = self._demanded(outputs, inputs)

        async def body(state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
            run.extras["skipped_stages"] = [e.path for e in self._entries if e not in plan]
            await self._arun_entries(plan, state, run, hooks, prefix)

        return await aexecute(self, inputs, body)

    def _analyze(self, scope: Scope, prefix: str) -> None:
        for entry in self._entries:
            scope.check(entry, prefix)

    def _run(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        if type(self)._run_entries is not SequentialPipeline._run_entries:
            self._run_entries(self._entries, state, run, hooks, prefix)  # a subclass's own
            return
        for entry in self._entries:  # _run_entries, written out
            call_stage(self, entry, state, run, hooks, prefix)

    async def _arun(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        if type(self)._arun_entries is not SequentialPipeline._arun_entries:
            await self._arun_entries(self._entries, state, run, hooks, prefix)
            return
        for entry in self._entries:
            await acall_stage(self, entry, state, run, hooks, prefix)

    def _run_entries(
        self,
        entries: tuple[StageEntry, ...],
        state: dict[str, Any],
        run: RunInfo,
        hooks: tuple[Any, ...],
        prefix: str,
    ) -> None:
        """Run these stages in order (every run of this pipeline, demand-driven ones too, comes here)."""
        for entry in entries:  # run_sequence, written out
            call_stage(self, entry, state, run, hooks, prefix)

    async def _arun_entries(
        self,
        entries: tuple[StageEntry, ...],
        state: dict[str, Any],
        run: RunInfo,
        hooks: tuple[Any, ...],
        prefix: str,
    ) -> None:
        """Async twin of :meth:`_run_entries`."""
        for entry in entries:
            await acall_stage(self, entry, state, run, hooks, prefix)


only_stages(SequentialPipeline)  # (its run only calls its stages: see stageflow.engine.inline)
