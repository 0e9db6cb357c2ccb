"""What every stageflow pipeline shares: it is a ``dspy.Module`` that runs through the engine.

A pattern subclass describes *what* runs:

- ``_analyze(scope, prefix)`` walks its stages through the contract :class:`Scope` along every
  possible path;
- ``_run(state, run, hooks, prefix)`` / ``_arun(...)`` run its stages with the engine's
  :func:`call_stage` / :func:`acall_stage`.

The base class does the rest: the contract check before any work (cached per set of input
names), the pipeline's own ports when it is nested as a stage, the result type, and the hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import dspy

from stageflow.engine.config import CONFIG
from stageflow.engine.inline import INLINE_MEMOS, forget_classes, forget_pipeline, standard
from stageflow.engine.nested import bind_forward, own_forward, plain_call, wrap_forward
from stageflow.engine.plan import (
    Scope,
    StageEntry,
    build_entry,
    held,
    join_path,
    leaf_of,
    signature_fields,
    signature_of,
    signature_replaced,
)
from stageflow.engine.pool import to_thread
from stageflow.engine.protocol import DEFAULT_POLICY, StageOwner
from stageflow.engine.runner import aexecute, execute
from stageflow.errors import ConfigurationError, ContractError
from stageflow.patterns._containers import _STRUCTURE_VERSION, StageDict, StageList
from stageflow.patterns._cycles import contains_itself, refuse_cycle
from stageflow.stages import RESERVED_FIELD_NAMES, DeferredField, FunctionStage, Ports
from stageflow.state import Result, RunInfo

if TYPE_CHECKING:
    import os

    from stageflow.policies.cache import CachePolicy
    from stageflow.policies.recovery import Fallback, RepairPolicy, RetryPolicy, TimeoutPolicy

__all__ = ["CheckResult", "Pipeline", "as_stage"]


def _replanned(watched: tuple[tuple[Any, StageEntry, str], ...]) -> bool:
    """Re-make the plans of the pipelines whose predictors got a signature with other fields since
    this check (``pred.signature = pred.signature.prepend(...)``); whether any did."""
    moved = False
    for owner, entry, path in watched:
        if (
            signature_replaced(owner, entry)
            and owner.stageflow_current(entry, path[: -len(entry.path)].rstrip(".")) is not entry
        ):
            moved = True
    return moved


def _entries_in(value: Any) -> Any:
    return value if isinstance(value, tuple | list) else (value,)


# The pipelines whose structure is being walked in this context, outermost first.
_VISITING: ContextVar[tuple[Any, ...]] = ContextVar("stageflow_visiting", default=())


@contextlib.contextmanager
def _visiting(pipeline: Any) -> Iterator[None]:
    """Walk ``pipeline``'s structure; a pipeline met again inside its own walk contains itself."""
    stack = _VISITING.get()
    if any(p is pipeline for p in stack):
        start = next(i for i, p in enumerate(stack) if p is pipeline)
        cycle = " → ".join(type(p).__name__ for p in (*stack[start:], pipeline))
        raise contains_itself(pipeline, cycle)
    token = _VISITING.set((*stack, pipeline))
    try:
        yield
    finally:
        _VISITING.reset(token)


class CheckResult(tuple):  # type: ignore[type-arg]
    """The fields a pipeline's result will have (a sorted tuple), plus what is checked at run time.

    Attributes:
        deferred: :class:`~stageflow.stages.DeferredField` entries: reads that only stages with
            undeclared outputs may satisfy; each is checked just before the reading stage runs.
    """

    deferred: tuple[DeferredField, ...] = ()
    #: The predictors the check saw (``Scope.watched``).
    watched: tuple[Any, ...] = ()

    @property
    def warnings(self) -> list[str]:
        """One readable line per deferred read."""
        return [d.message() for d in self.deferred]


def as_stage(obj: Any, where: str = "stage") -> Any:
    """Accept a ``dspy.Module`` as is, wrap a plain callable in a :class:`FunctionStage`."""
    if isinstance(obj, type):
        raise ConfigurationError(
            f"{where}: got the class {obj.__name__}, not an instance.",
            code="not_a_stage",
            hint=f"pass an instance, e.g. {obj.__name__}(...)",
        )
    if isinstance(obj, dspy.Module):
        return obj
    if callable(obj):
        return FunctionStage(obj)
    raise ConfigurationError(
        f"{where}: {obj!r} is not a stage. Expected a dspy.Module (Predict, ChainOfThought, a custom "
        "module, a stageflow pipeline) or a function.",
        code="not_a_stage",
        hint="a signature string needs a predictor around it: dspy.Predict('question -> answer')",
    )


class _PipelineMeta(type(dspy.Module)):  # type: ignore[misc]
    """DSPy's module metaclass, telling the engine when a pipeline class changes: which classes a
    nested call may run in line (:mod:`stageflow.engine.inline`) is decided once per class."""

    def __setattr__(cls, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        forget_classes()

    def __delattr__(cls, name: str) -> None:
        super().__delattr__(name)
        forget_classes()


class Pipeline(StageOwner, dspy.Module, metaclass=_PipelineMeta):  # type: ignore[misc]
    """Base class of every stageflow architecture (see module docstring).

    Args:
        strict: Strict contracts for this pipeline's checks: a field that only a stage with
            undeclared outputs may produce is refused before the run (``True``), or checked at run
            time at the boundary of the stage that reads it (``False``). ``None`` (default) follows
            ``stageflow.configure(strict=...)`` (off unless set).
    """

    _default_policy: Any = None
    #: Strict contracts for this pipeline's checks (see ``__init__``); deleting it on an instance
    #: goes back to ``None``, which follows ``stageflow.configure(strict=...)``.
    strict: bool | None = None
    #: Whether predictors in this pipeline's runs take stageflow's fast path (:mod:`stageflow.lm.fast`):
    #: ``None`` follows ``stageflow.configure(fast_path=...)`` (on by default); set it to ``False`` to
    #: call them exactly as DSPy does. The outermost pipeline of a call decides for the whole tree.
    fast_path: bool | None = None
    #: The budget each call of this pipeline runs under (set it with :meth:`set_budget`).
    lm_budget: Any = None
    #: Attributes holding this pattern's stages (tracked containers; see :mod:`._containers`).
    _stage_containers: tuple[str, ...] = ()

    #: What the engine keeps on a pipeline for its own use (plan, ports, checks done, memos of
    #: :mod:`stageflow.engine.inline`): not what the pipeline is, so fingerprints leave them out.
    _stageflow_bookkeeping = frozenset(
        {
            "_built_versions",
            "_checked",
            "_entries",
            "_merged_policies",
            "_ports",
            "_ports_version",
            "_seen_structure",
            *INLINE_MEMOS,
        }
    )

    #: Private attributes that decide what the pipeline does: fingerprints (cache keys) take them in.
    _stageflow_content: tuple[str, ...] = ("_default_policy",)

    # Python's own attribute lookup instead of dspy.Module's Python-level __getattribute__ (which
    # only warns about reading ``forward`` directly; stageflow.engine.nested keeps that warning).
    __getattribute__ = object.__getattribute__

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        wrap_forward(cls)

    def __init__(self, *, strict: bool | None = None) -> None:
        super().__init__()
        if strict is not None and not isinstance(strict, bool):
            raise ConfigurationError(
                f"{type(self).__name__}: strict must be True, False or None, got {strict!r}.",
                field="strict",
                code="bad_option",
            )
        self.strict = strict
        self._checked: dict[Any, Any] = {}
        self._ports: Ports | None = None
        self._ports_version = -1
        self._merged_policies: dict[Any, Any] = {}
        self._built_versions: tuple[int, ...] = ()
        self._seen_structure = -1

    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self)._stage_containers:
            # Hold stages in tracked containers; replacing a whole container later changes the plan.
            if isinstance(value, dict) and not isinstance(value, StageDict):
                value = StageDict(value)
            elif isinstance(value, list | tuple) and not isinstance(value, StageList):
                value = StageList(value)
            if name in self.__dict__ and isinstance(value, StageList | StageDict):
                value.version = self.__dict__[name].version + 1
                _STRUCTURE_VERSION[0] += 1
        super().__setattr__(name, value)
        forget_pipeline(self.__dict__)  # (after the change: a memo made meanwhile is dropped too)

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        forget_pipeline(self.__dict__)

    def __getstate__(self) -> dict[str, Any]:
        # What __setstate__ redoes anyway is not sent: the contract checks (which hold the stages
        # they saw) and ports, and the in-line memos.
        state: dict[str, Any] = super().__getstate__()
        for name in ("_checked", "_ports", *INLINE_MEMOS):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A pickled or copied pipeline: what the engine found out about it belongs to the process and
        # structure it came from (its versions may happen to equal this process's), so it is redone.
        super().__setstate__(state)
        forget_pipeline(self.__dict__)
        self.__dict__.update(_checked={}, _ports=None, _ports_version=-1, _seen_structure=-1)

    # -- structure kept in step with the stage containers ----------------------------------------
    def _container_versions(self) -> tuple[int, ...]:
        return tuple(self.__dict__[n].version for n in type(self)._stage_containers if n in self.__dict__)

    def _built(self) -> None:
        """Record that the plan matches the containers now (patterns call it after building)."""
        self._built_versions = self._container_versions()
        self._seen_structure = _STRUCTURE_VERSION[0]

    def _refresh(self) -> None:
        """Rebuild the plan if a stage container was changed since it was built (cheap otherwise)."""
        if self._seen_structure == _STRUCTURE_VERSION[0]:
            return
        if self._container_versions() != self._built_versions:
            with _visiting(self):
                refuse_cycle(self)  # through wrappers too (Stage, CachedStage, LazyStage)
                self._rebuild()
            self._structure_changed()
            self._built_versions = self._container_versions()
        self._seen_structure = _STRUCTURE_VERSION[0]

    def _rebuild(self) -> None:
        """Rebuild the plan from the stage containers (patterns with containers override it)."""
        raise ConfigurationError(
            f"{type(self).__name__}: its stages were changed after it was built, which this pattern does "
            "not support.",
            code="structure_changed",
            hint=f"build a new {type(self).__name__} with the stages you want",
        )

    # -- implemented by patterns -------------------------------------------------------------
    def _analyze(self, scope: Scope, prefix: str) -> None:
        raise NotImplementedError

    def _run(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        raise NotImplementedError

    async def _arun(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        raise NotImplementedError

    # -- the engine protocol (see stageflow.engine.protocol) ---------------------------------------
    def stageflow_result(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...] = ()) -> Result:
        """Build the result; ``hooks`` are the ones :meth:`stageflow_hooks` gave this call."""
        return Result(state, run)

    def stageflow_defaults(self) -> Any:
        """The default policies set with :meth:`set_defaults` (``None`` when none are)."""
        return self._default_policy

    def stageflow_policy(self, entry: StageEntry) -> Any:
        """The policy of one leaf stage: its own, merged over the defaults in force (this pipeline's
        own defaults, else those of the nearest enclosing pipeline that set some)."""
        defaults = self._default_policy or DEFAULT_POLICY.get()
        if defaults is None or entry.composite:
            return entry.policy
        if entry.policy is None:
            return defaults
        key = (entry.path, id(defaults))
        merged = self._merged_policies.get(key)
        if merged is None or merged[1] is not defaults:
            merged = self._merged_policies[key] = (entry.policy.merged_over(defaults), defaults)
        return merged[0]

    def stageflow_failed(self, run: RunInfo, hooks: tuple[Any, ...], error: BaseException) -> None:
        """A call raised ``error`` after doing what ``run`` records (observing conveniences keep it)."""

    def stageflow_deferred(self, stage_path: str, field: str) -> tuple[str, ...]:
        """The stages with undeclared outputs that a read checked at run time was expected from."""
        found: list[str] = []
        for result in list(self._checked.values()):
            for d in getattr(result, "deferred", ()):
                if d.stage == stage_path and d.field == field:
                    found.extend(c for c in d.candidates if c not in found)
        return tuple(found)

    def stageflow_replanned(self, entry: StageEntry, prefix: str) -> StageEntry:
        """Re-make the plan after the signature of the predictor of ``entry`` was replaced in place
        with other fields; returns that stage's entry in the new plan. The next call checks the
        contracts again. A :class:`Stage` around the predictor computed its contract (renames,
        declarations) from the old fields: that is a :class:`ConfigurationError`."""
        obj = held(self, entry)
        if entry.chain:
            leaf = leaf_of(self, entry)
            current = signature_of(leaf)  # (None: no predictor there any more)
            was = signature_fields(entry.signature)
            now = signature_fields(current) if current is not None else ((), ())
            raise ConfigurationError(
                f"Stage at '{join_path(prefix, entry.path)}': the signature of its "
                f"{type(leaf).__name__} was replaced with other fields, field types or optional inputs "
                f"(inputs {list(was[0])} -> {list(now[0])}, outputs {list(was[1])} -> {list(now[1])}) after "
                "the Stage around it computed its contract from the old ones.",
                stage_path=join_path(prefix, entry.path),
                field="signature",
                code="structure_changed",
                hint="build a new Stage(predictor, ...) and put it where the old one was "
                "(pipeline.stages[i] = Stage(...))",
            )
        if type(self)._rebuild is not Pipeline._rebuild:
            if any(p is self for p in _VISITING.get()):  # (found while its own ports are computed)
                self._rebuild()
            else:
                with _visiting(self):
                    self._rebuild()
            self._built_versions = self._container_versions()
        self._structure_changed()
        self._seen_structure = _STRUCTURE_VERSION[0]
        attrs = self.__dict__
        for name, value in list(attrs.items()):  # the new plan's entry (with the policies it merged)
            places = value.items() if isinstance(value, dict) else enumerate(_entries_in(value))
            for place, found in places:
                if type(found) is not StageEntry or found.attr != entry.attr or found.key != entry.key:
                    continue
                if signature_replaced(self, found):
                    # An entry the pattern keeps outside its stage containers (a router, a default
                    # stage: _rebuild leaves them): made again here, and kept in its place.
                    found = build_entry(found.attr, found.key, obj)
                    if isinstance(value, dict | list):
                        value[place] = found
                    elif value is not None and type(value) is StageEntry:
                        attrs[name] = found
                return replace(found, path=entry.path)  # (a ForEach item's path is its own)
        return replace(build_entry(entry.attr, entry.key, obj), path=entry.path)

    def _structure_changed(self) -> None:
        """Forget cached contract checks and ports (call after adding or replacing stages)."""
        self._checked = {}
        self._ports = None
        self._merged_policies = {}
        _STRUCTURE_VERSION[0] += 1

    # -- policies ----------------------------------------------------------------------------
    def set_defaults(
        self,
        *,
        retry: RetryPolicy | int | None = None,
        timeout: TimeoutPolicy | float | None = None,
        repair: RepairPolicy | int | bool | None = None,
        fallback: Fallback | Mapping[str, Any] | None = None,
        cache: CachePolicy | bool | int | str | os.PathLike[str] | None = None,
    ) -> Pipeline:
        """Policies for every leaf stage that does not set its own of that kind: this pipeline's
        stages and those of pipelines nested in it (unless a nested pipeline sets its own defaults).

        Takes the same values as :class:`Stage` (``retry=RetryPolicy(...)`` or an attempt count,
        ``timeout=`` seconds or a ``TimeoutPolicy``, ``repair=True``, ``fallback={...}`` or
        ``Fallback(default=...)``, ``cache=True``). Returns the pipeline, so calls can be chained.
        """
        from stageflow.policies.recovery import Fallback, make_policy

        if isinstance(fallback, Mapping):  # (as Stage(x, fallback={...}) takes it)
            fallback = Fallback(default=fallback)
        if fallback is not None and not (isinstance(fallback, Fallback) and fallback.default is not None):
            raise ConfigurationError(
                "set_defaults(fallback=...) takes a default output mapping ({...}, or "
                "Fallback(default={...})); a fallback stage belongs to one stage: "
                "Stage(x, fallback=other_stage).",
                field="fallback",
                code="bad_option",
            )
        policy = make_policy(retry=retry, timeout=timeout, repair=repair, fallback=fallback, cache=cache)
        self._default_policy = None if policy.is_empty() else policy
        self._merged_policies = {}
        return self

    def set_budget(self, budget: Any = None, /, **limits: Any) -> Pipeline:
        """Run every call of this pipeline under a fresh LM budget (``None`` removes it).

        Takes a :class:`~stageflow.LMBudget` or its fields (``max_calls=``, ``max_tokens=``,
        ``max_cost=``, ``max_seconds=``, ``degrade=``...). Each call gets its own account, nested in
        the budgets around it (``with stageflow.budget(...)``, an enclosing pipeline's); an LM call the
        budget cannot afford raises :class:`~stageflow.BudgetExceeded` naming the stage. Returns the
        pipeline, so calls can be chained.

        Examples:
            >>> import dspy, stageflow
            >>> p = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
            >>> p.set_budget(max_calls=5).lm_budget.max_calls
            5
        """
        from stageflow.budgets.spec import as_budget

        self.lm_budget = as_budget(budget, f"{type(self).__name__}.set_budget", limits)
        return self

    # -- contracts ---------------------------------------------------------------------------
    def _closed(self) -> bool:
        """Strict contracts for this pipeline's checks: its own ``strict``, else ``configure(strict=...)``."""
        if self.strict is not None:
            return self.strict
        return CONFIG.strict

    def _check_key(self, names: frozenset[str]) -> tuple[Any, ...]:
        self._refresh()
        return (names, _STRUCTURE_VERSION[0], self._closed())

    def check(self, inputs: Iterable[str] = ()) -> CheckResult:
        """Check the contracts for a call with these input names, without running anything.

        Returns the fields the result will have on every path (a tuple), with ``.deferred``: the
        reads that only stages with undeclared outputs may satisfy, checked at run time instead
        (``.warnings`` says each in a line). Raises :class:`ContractError` naming the stage path and
        field when a stage's input cannot be available on some path — or, with strict contracts
        (``strict=True`` or ``stageflow.configure(strict=True)``), may be missing.

        Examples:
            >>> import dspy, stageflow
            >>> p = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
            >>> p.check(["question"])
            ('answer', 'question')
        """
        return self._check(frozenset(inputs), None, self._analyze)

    def _check(self, names: frozenset[str], tag: Any, analyze: Any) -> CheckResult:
        """Run ``analyze(scope, "")`` for these input names once (cached per names, structure and
        strictness); ``tag`` tells apart the checks of one pipeline's several entry points."""
        key = (tag, *self._check_key(names))
        cached = self._checked.get(key)
        if cached is not None:
            if not (cached.watched and _replanned(cached.watched)):
                return cached  # type: ignore[no-any-return]
            key = (tag, *self._check_key(names))  # (a predictor got other fields: the plan was re-made)
        bad = sorted(names & RESERVED_FIELD_NAMES)
        if bad:
            raise ContractError(
                f"Input field '{bad[0]}' (given by the caller, or written by an earlier stage of an "
                f"enclosing pipeline) collides with a dspy.Prediction attribute, so result.{bad[0]} "
                "would not return it.",
                field=bad[0],
                code="reserved_field",
                hint=f"rename it where it is made: the caller's {bad[0]}_value=..., or the writing stage's "
                f"output (Stage(<stage>, outputs={{'{bad[0]}': '{bad[0]}_value'}}))",
            )
        scope = Scope.start(sorted(names), strict=True, owner=self, closed=key[-1])
        analyze(scope, "")
        out = CheckResult(sorted(f for f in scope.available if scope.origin.get(f) != "deferred"))
        out.deferred = tuple(scope.deferred)
        out.watched = tuple(scope.watched)
        self._checked[key] = out
        return out

    def _is_checked(self, names: frozenset[str], tag: Any = None) -> bool:
        version = _STRUCTURE_VERSION[0]
        if self._seen_structure != version:
            self._refresh()
            version = _STRUCTURE_VERSION[0]
        strict = self.strict
        checked = self._checked.get((tag, names, version, CONFIG.strict if strict is None else strict))
        if checked is None:
            return False
        watched = getattr(checked, "watched", ())
        return not (watched and _replanned(watched))

    def stageflow_ports(self) -> Ports:
        """This pipeline's inputs and outputs when it is used as a stage of another one."""
        ports = self._ports
        # Asked on every call of an enclosing pipeline: nothing changed since, unless a predictor inside
        # got a signature with other fields (then its plan is re-made, and so are these ports).
        if (
            ports is not None
            and self._ports_version == self._seen_structure == _STRUCTURE_VERSION[0]
            and not (ports.watched and _replanned(ports.watched))
        ):
            return ports
        self._refresh()
        if self._ports is None or self._ports_version != _STRUCTURE_VERSION[0]:
            scope = Scope.start((), strict=False, owner=self)
            with _visiting(self):
                self._analyze(scope, "")
            self._ports_version = _STRUCTURE_VERSION[0]
            self._ports = Ports(
                required=tuple(scope.missing),
                optional=tuple(f for f in scope.optional if f not in scope.missing),
                outputs=tuple(f for f in scope.available if scope.origin.get(f) != "deferred"),
                types={
                    **{f: t for f, t in scope.wants.items() if f in scope.missing or f in scope.optional},
                    **scope.available,
                },
                required_by=dict(scope.missing),
                partial=dict(scope.partial),
                opaque=tuple(scope.opaque),
                deferred=tuple(scope.deferred),
                hints={f: h for f, h in scope.hints.items() if f in scope.missing},
                watched=tuple(scope.watched),
                # (a stage inside takes the whole state: so does the pipeline, from its caller)
                accepts_any=bool(scope.takes_state),
            )
        return self._ports

    # -- calling ---------------------------------------------------------------------------------
    def _reject_positional(self, args: tuple[Any, ...]) -> None:
        if args:
            needed = list(self.stageflow_ports().required)
            example = ", ".join(f"{n}=..." for n in needed) or "field=..."
            raise ConfigurationError(
                f"{type(self).__name__} takes keyword arguments only; got {len(args)} positional.",
                code="positional_args",
                hint=f"call it as pipeline({example})",
            )

    @plain_call()
    def forward(self, *args: Any, **inputs: Any) -> Result:
        """Run the pipeline on ``inputs`` (the initial state); returns a :class:`Result`."""
        if args:
            self._reject_positional(args)
        if not self._is_checked(frozenset(inputs)):  # stageflow_call, written out (the outermost call)
            self.check(inputs)
        return execute(self, inputs, self._run)

    @plain_call()
    async def aforward(self, *args: Any, **inputs: Any) -> Result:
        """Async twin of :meth:`forward` (call it as ``await pipeline.acall(...)``)."""
        patched = self._patched_forward()
        if patched is not None:
            return await to_thread(patched, *args, **inputs)  # type: ignore[no-any-return]
        if args:
            self._reject_positional(args)
        return await self.stageflow_acall(inputs)

    def stageflow_call(self, inputs: dict[str, Any]) -> Result:
        """``forward(**inputs)``: check the contracts (once per set of input names), run the call.

        The engine calls a nested pipeline through it when the pipeline's ``forward`` is its
        pattern's own (see :func:`~stageflow.engine.nested.plain_call`).
        """
        if not self._is_checked(frozenset(inputs)):
            self.check(inputs)
        return execute(self, inputs, self._run)

    async def stageflow_acall(self, inputs: dict[str, Any]) -> Result:
        """Async twin of :meth:`stageflow_call`."""
        if not self._is_checked(frozenset(inputs)):
            self.check(inputs)
        return await aexecute(self, inputs, self._arun)

    def _patched_forward(self) -> Any:
        """A ``forward`` set on this instance (the tutorial's custom multi-hop logic; DSPy's GEPA does
        the same), or defined by a subclass without an ``aforward`` of its own: ``acall`` must run it
        too, on a worker thread, instead of the pattern's own plan."""
        patched = self.__dict__.get("forward")
        if patched is not None:
            return patched
        fn = own_forward(type(self))
        return None if fn is None else bind_forward(fn, self, type(self))

    def named_parameters(self) -> list[tuple[str, Any]]:
        """DSPy's walk over the predictors (optimizers, ``save``), refused when the pipeline contains
        itself: DSPy's own walk would recurse without end."""
        refuse_cycle(self)
        return super().named_parameters()  # type: ignore[no-any-return]

    # -- pictures ----------------------------------------------------------------------------
    def to_mermaid(self) -> str:
        """This pipeline's structure as a Mermaid flowchart (see :mod:`stageflow.observe.graph`)."""
        from stageflow.observe.graph import to_mermaid

        return to_mermaid(self)

    def to_dot(self) -> str:
        """This pipeline's structure as Graphviz DOT (see :mod:`stageflow.observe.graph`)."""
        from stageflow.observe.graph import to_dot

        return to_dot(self)


wrap_forward(Pipeline)
standard(Pipeline, _STRUCTURE_VERSION)
