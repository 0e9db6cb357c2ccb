"""ForEach: run a stage once per element of a list field, concurrently, results in input order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from stageflow.engine.boundary import private_copy, private_state
from stageflow.engine.concurrency import FailurePolicy
from stageflow.engine.plan import Scope, StageEntry, build_entry, join_path
from stageflow.engine.streaming import listening
from stageflow.errors import ConfigurationError, ContractError, PipelineError
from stageflow.patterns._fanout import (
    Branches,
    BranchResult,
    FlatResults,
    absorb,
    arun_branches,
    check_fanout_options,
    fanout_options,
    flat_results,
    run_branches,
    usage_kept,
)
from stageflow.patterns.base import Pipeline, as_stage
from stageflow.policies.recovery import PolicyEvent
from stageflow.stages import Ports
from stageflow.state import RunInfo

__all__ = ["ForEach"]


def _first_singular(name: str) -> str:
    """The default item field when the stage reads none of the other candidates (the rule of 0.1:
    ``queries`` → ``query``, ``facts`` → ``fact``, ``address`` → ``address_item``)."""
    if name.endswith("ies"):
        return name[:-3] + "y"
    if name.endswith("s") and not name.endswith("ss"):
        return name[:-1]
    return f"{name}_item"


def _singulars(name: str) -> tuple[str, ...]:
    """What ``ForEach(over=name)`` may give each element as, by default: :func:`_first_singular`
    first, then the other English singulars of ``name`` (``-es``, ``-ies`` that keep their ``e``),
    then ``<name>_item``.

    >>> _singulars("boxes"), _singulars("caches")
    (('boxe', 'box', 'boxes_item'), ('cache', 'cach', 'caches_item'))
    >>> _singulars("movies"), _singulars("news")
    (('movy', 'movie', 'movies_item'), ('new', 'news_item'))
    """
    out = [_first_singular(name)]
    if name.endswith("es") and not name.endswith("ies"):
        out.append(name[:-2])  # boxes → box, addresses → address, matches → match
        if name.endswith("zzes"):
            out.append(name[:-3])  # quizzes → quiz
    if name.endswith("ies"):
        out.append(name[:-1])  # movies → movie
    out.append(f"{name}_item")
    return tuple(dict.fromkeys(out))


def _default_item(over: str, ports: Ports) -> str:
    """The default item field of ``ForEach(over=over)`` whose stage has ``ports``: the first of
    :func:`_singulars` the stage reads (``boxes`` → ``box`` for a stage reading ``box``, ``caches``
    → ``cache`` for one reading ``cache``), else the first of them.

    >>> from stageflow.stages import Ports
    >>> pairs = [("boxes", "box"), ("caches", "cache"), ("news", "news_item")]
    >>> [_default_item(over, Ports(required=(reads,))) for over, reads in pairs]
    ['box', 'cache', 'news_item']
    >>> _default_item("sub_questions", Ports(required=("question",)))  # (reads none: the first)
    'sub_question'
    """
    candidates = _singulars(over)
    reads = set(ports.required) | set(ports.optional)
    return next((c for c in candidates if c in reads), candidates[0])


class ForEach(Pipeline):
    """Map a stage over a list: ``decompose → ForEach(retrieve_and_extract) → synthesize``.

    Args:
        stage: The stage to run per element (any stage; held as ``self.stage``).
        over: The list field to iterate.
        item: The field each run receives its element as (default: ``over`` made singular, the
            singular the stage reads when there are several: ``sub_questions`` → ``sub_question``,
            ``boxes`` → ``box``, ``caches`` → ``cache``). Other inputs of the stage come from the state.
        collect: What to collect from each run, and where: ``{stage_output: list_field}``; or one field
            name: the output of that name is collected into a list of the same name — or, when the
            stage declares exactly one output, the list that output goes into (``"facts"``).
            Default: each declared output ``x`` into ``x + "s"``. A stage with undeclared outputs
            (a custom module returning ``dspy.Prediction(...)``, or a pipeline holding one) needs
            ``collect=`` to say which field; each element's run is checked for it.
        max_concurrency: Cap on leaf calls running at once under this ``ForEach`` (under any cap
            already in force): its elements when they are leaves, the leaves inside them when they
            are pipelines or fan-outs themselves.
        on_error: ``"fail_fast"`` (default: the first failed element fails the ForEach, the others are
            cancelled — a failure is never hidden from the stages after it), ``"collect"`` (a failed
            element leaves ``None`` in its slot; every failure is listed in ``result.item_errors``,
            in ``result.details[<path>]`` from an enclosing pipeline, and as an ``item_failed`` event
            in ``result.run.events``), or ``"skip"`` (failed elements are dropped from the lists,
            and recorded the same way).
        timeout: Per-element timeout in seconds.
        strict: Strict contracts (see :class:`~stageflow.Pipeline`).

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
        on_error: FailurePolicy = "fail_fast",
        timeout: float | None = None,
        strict: bool | None = None,
    ) -> None:
        super().__init__(strict=strict)
        check_fanout_options(max_concurrency, on_error, timeout, "ForEach")
        if not isinstance(over, str) or not over.isidentifier():
            raise ConfigurationError(
                f"ForEach needs over='<list field>', got {over!r}.", field="over", code="bad_option"
            )
        if item is not None and (not isinstance(item, str) or not item.isidentifier()):
            raise ConfigurationError(
                f"ForEach: item must be a field name, got {item!r}.", field="item", code="bad_option"
            )
        self.stage = as_stage(stage, "ForEach stage")
        self.over = over
        self.max_concurrency = max_concurrency
        self.on_error = on_error
        self.timeout = timeout
        self._entry = build_entry("stage", None, self.stage)
        self.item = item or _default_item(over, self._entry.ports)
        self._item_defaulted = item is None
        self._item_entries: list[StageEntry] = []
        ports = self._entry.ports
        # A nested pipeline with undeclared inner stages may output more than it declares: its
        # outputs are open, and a collected field is checked per element at run time.
        self.collect = self._collect_map(collect, ports.outputs, ports.outputs is None or bool(ports.opaque))
        self._collect_arg = collect  # (None: the stage's outputs decide; either way see _rebuild)

    def _rebuild(self) -> None:
        # (the signature of its stage's predictor was replaced with other fields: see
        # Pipeline.stageflow_replanned)
        self._entry = build_entry("stage", None, self.stage)
        self._item_entries = []
        if "_collect_arg" in self.__dict__:  # what it was told to collect, against the new outputs
            ports = self._entry.ports
            open_outputs = ports.outputs is None or bool(ports.opaque)
            self.collect = self._collect_map(self._collect_arg, ports.outputs, open_outputs)

    def _collect_map(
        self, collect: Any, outputs: tuple[str, ...] | None, open_outputs: bool
    ) -> dict[str, str]:
        label = self._entry.label
        if collect is None:
            if not outputs and open_outputs:
                raise ConfigurationError(
                    f"ForEach: the stage ({label}) does not declare its outputs, so ForEach cannot tell "
                    "which field to collect.",
                    stage_path="stage",
                    field="collect",
                    code="undeclared_outputs",
                    hint="name it: ForEach(stage, over=..., collect='fact') (or collect={'fact': 'facts'}), "
                    "or declare the stage's outputs: Stage(x, writes=['fact'])",
                )
            return {o: f"{o}s" if not o.endswith("s") else f"{o}_list" for o in outputs or ()}
        if isinstance(collect, str):
            if not open_outputs and outputs is not None and len(outputs) == 1 and collect not in outputs:
                return {outputs[0]: self._field(collect)}
            if not open_outputs and outputs is not None and collect not in outputs:
                raise ConfigurationError(
                    f"ForEach: collect={collect!r} is not one of the stage's outputs {list(outputs)}.",
                    field="collect",
                    code="bad_option",
                    hint=f"map each output: collect={{{', '.join(repr(o) + ': ...' for o in outputs)}}}",
                )
            return {self._field(collect): collect}
        if not isinstance(collect, Mapping) or not collect:
            raise ConfigurationError(
                f"ForEach: collect must be a field name or a non-empty mapping {{output: list_field}}, "
                f"got {collect!r}.",
                field="collect",
                code="bad_option",
            )
        mapping = {self._field(k): self._field(v) for k, v in collect.items()}
        unknown = [k for k in mapping if not open_outputs and outputs is not None and k not in outputs]
        if unknown:
            raise ConfigurationError(
                f"ForEach: collect names {unknown}, which the stage does not output "
                f"(outputs: {list(outputs or ())}).",
                field="collect",
                code="bad_option",
            )
        return mapping

    @staticmethod
    def _field(name: Any) -> str:
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigurationError(
                f"ForEach: collect names {name!r}, which is not a field name.",
                field="collect",
                code="bad_option",
            )
        return name

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
        inner.origin[self.item] = f"ForEach over {self.over}"
        before = set(scope.missing)
        try:
            inner.check(self._entry, prefix)
        except ContractError as e:
            if e.code == "missing_input" and e.field and e.field != self.item:
                e.hint = f"{self._item_hint(e.field)}; or {e.hint}" if e.hint else self._item_hint(e.field)
            raise
        for f in set(scope.missing) - before:
            scope.hints.setdefault(f, self._item_hint(f))
        self._check_item_read(prefix)
        for src, dst in self.collect.items():
            scope.available[dst] = list[inner.available.get(src) or Any]  # type: ignore[misc]
            scope.origin[dst] = f"{prefix + '.' if prefix else ''}stage"

    def _check_item_read(self, prefix: str) -> None:
        """A stage that does not read the element at all (its inputs all optional, none named as
        ``item=``) would run each element without it: refused, naming the inputs it does read."""
        entry = self._entry
        if entry.pass_state or entry.composite:
            return  # (it gets the whole state; a nested pipeline's reads are checked inside it)
        # (a stage with named inputs and **kwargs gets its named inputs only: it is checked too)
        reads = [state for _, state in (*entry.in_pairs, *entry.opt_pairs)]
        if self.item in reads:
            return
        fix = (
            f"name the element as the stage reads it: ForEach(..., item='{reads[0]}')"
            if reads
            else "give the stage an input for the element"
        )
        raise ContractError(
            f"ForEach gives each element of '{self.over}' to its stage as {self._item_named()}, which "
            f"the stage ({entry.label}) does not read; it reads {reads}. Each element would run without it.",
            stage_path=prefix or None,
            field=self.item,
            code="item_not_read",
            hint=fix,
        )

    def _item_hint(self, f: str) -> str:
        return (
            f"ForEach gives each element of '{self.over}' to its stage as {self._item_named()}; if "
            f"'{f}' is the element, name it so: ForEach(..., item='{f}')"
        )

    def _item_named(self) -> str:
        """The element's field, quoted; for the default, the names the stage could have read."""
        if not getattr(self, "_item_defaulted", False):
            return f"'{self.item}'"
        others = [f"'{c}'" for c in _singulars(self.over) if c != self.item]
        return f"'{self.item}' (the default; a stage reading {' or '.join(others)} would get it so)"

    def _branches(self, state: dict[str, Any]) -> Branches:
        items = state.get(self.over)
        if not isinstance(items, list | tuple):
            err = ContractError(
                f"ForEach expected a list in '{self.over}' for its stage ({self._entry.label}), got "
                f"{type(items).__name__}: {items!r:.80}.",
                field=self.over,
                code="not_a_list",
                hint=f"make the upstream stage output a list ('{self.over}: list[str]' in its signature)",
            )
            err.given = items  # type: ignore[attr-defined]  # (the caller's value, or a stage's? see note_run_failure)
            raise err
        needed = {st for _, st in (*self._entry.in_pairs, *self._entry.opt_pairs)}
        shared = {k: v for k, v in state.items() if k in needed and k != self.item}
        entries = self._item_entries_for(len(items))
        # Each item runs on private copies: an item cannot change another's inputs or the caller's.
        name = self.item
        if not shared:
            states = [{name: private_copy(x)} for x in items]
        else:
            states = [{**private_state(shared), name: private_copy(x)} for x in items]
        return Branches(entries[: len(items)], states)

    def _collect(
        self, state: dict[str, Any], run: RunInfo, results: Sequence[BranchResult], prefix: str
    ) -> None:
        # Flat lists, not an object per element: a wide ForEach makes nothing per element here that
        # the garbage collector would have to walk (see stageflow.engine.bare).
        flat = flat_results(results)
        absorb(run, flat)
        states, done = flat.states, flat.outcomes
        status, errors, elapsed = done.status, done.errors, done.elapsed
        collect = self.collect
        sources = collect.keys()
        all_ok = True
        for i, st in enumerate(states):
            if status[i] != "ok":
                all_ok = False
            elif not sources <= st.keys():
                self._missing_item(i, flat, prefix)
                all_ok = False
        failures: list[dict[str, Any]] = []
        if all_ok:  # (the common case, as one comprehension per collected field)
            state.update({dst: [st[src] for st in states] for src, dst in collect.items()})
            run.extras["item_results"] = [
                {"index": i, "status": "ok", "elapsed": t, "error": None} for i, t in enumerate(elapsed)
            ]
            run.extras["item_errors"] = failures
            return
        lists: dict[str, list[Any]] = {dst: [] for dst in collect.values()}
        for i, st in enumerate(states):
            if status[i] != "ok":
                error = errors[i]
                failures.append({"index": i, "status": status[i], "error": error})
                run.events.append(
                    PolicyEvent(
                        join_path(prefix, flat.entries[i].path),
                        "item_failed",
                        error=f"{type(error).__name__}: {error}",
                        detail={"index": i, "status": status[i], "on_error": self.on_error},
                    )
                )
                if self.on_error == "skip":
                    continue
                for dst in collect.values():
                    lists[dst].append(None)
                continue
            for src, dst in collect.items():
                lists[dst].append(st[src])
        if states and len(failures) == len(states):
            err = PipelineError(
                f"ForEach: all {len(states)} elements of '{self.over}' failed; first error: "
                f"{type(failures[0]['error']).__name__}: {failures[0]['error']}",
                field=self.over,
                code="all_failed",
                errors=[e["error"] for e in failures],
            )
            raise err from failures[0]["error"]
        state.update(lists)
        run.extras["item_results"] = [
            {"index": i, "status": status[i], "elapsed": elapsed[i], "error": errors[i]}
            for i in range(len(states))
        ]
        run.extras["item_errors"] = failures

    def _missing_item(self, i: int, flat: FlatResults, prefix: str) -> None:
        """An element whose run did not produce a collected field failed (never a silent ``None``)."""
        st = flat.states[i]
        missing = [src for src in self.collect if src not in st]
        path = join_path(prefix, flat.entries[i].path)
        returned = sorted(k for k in st if k not in (self.item,))
        error = ContractError(
            f"ForEach element {i} ('{path}') did not produce '{missing[0]}', which "
            f"collect={self.collect} collects. It produced: {returned}.",
            stage_path=path,
            field=missing[0],
            code="missing_output",
            hint=_collect_hint(missing[0], returned),
        )
        error.path_is_full = True
        if self.on_error == "fail_fast":
            raise error
        flat.outcomes.status[i], flat.outcomes.errors[i] = "error", error

    def _options(self) -> dict[str, Any]:
        options = fanout_options(self)
        if listening():  # dspy.streamify listeners: one item at a time keeps each stream whole
            options["max_concurrency"] = 1
        return options

    def _run(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        branches = self._branches(state)
        with usage_kept(run, branches):
            results = run_branches(self, branches, hooks, prefix, **self._options(), produced=False)
        self._collect(state, run, results, prefix)

    async def _arun(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        branches = self._branches(state)
        with usage_kept(run, branches):
            results = await arun_branches(self, branches, hooks, prefix, **self._options(), produced=False)
        self._collect(state, run, results, prefix)


def _collect_hint(wanted: str, returned: list[str]) -> str:
    """The fix for an element that lacks a collected field: collect what it returned under that name."""
    if len(returned) == 1:
        return (
            f"collect {returned[0]!r} into {wanted!r}: collect={{{returned[0]!r}: {wanted!r}}} "
            "(collect='name' collects a field of that name, or the single declared output of the stage)"
        )
    if returned:
        pick = f"collect={{'<field>': {wanted!r}}}"
        return f"collect one of {returned} into {wanted!r}: {pick}, or return {wanted!r}"
    return f"return {wanted!r} from the stage"
