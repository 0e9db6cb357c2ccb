"""A nested pipeline run in line: what calling it as a stage does, without the layers in between.

A pipeline nested in another is called, on each call of the outer one, through several layers:
the engine's stage call, :func:`~stageflow.engine.nested.call_nested` (DSPy's ``Module.__call__``
bookkeeping), the pipeline's ``stageflow_call`` (its contract check), :func:`~stageflow.engine.
runner.execute` (its run, hooks, defaults, usage table) and the stage call again (its record and
the merge of its result). For the common case those layers decide nothing: no hook listens, no
policy wraps the stage, the pipeline is a pattern's own class (nothing overridden that the layers
would call), already checked for these inputs. :func:`begin` recognises that case before it does
anything and starts a fresh state and run; the twin stage calls of the engine run the pipeline's
body between :func:`begin` and :func:`finish` (or :func:`failed`).

The rest of what the layers set up — the context variables for the pipeline's path and usage table,
and DSPy's settings override that puts it on ``caller_modules`` — only code run inside it reads: its
stages, a nested pipeline of another pattern, a budget gate. For a pipeline whose run only calls its
stages (:func:`only_stages`: ``SequentialPipeline``), :func:`set_up` does it when the first such
stage is about to run, for that run and every enclosing one not set up yet (one settings override
whose ``caller_modules`` lists them all). So a chain of pipelines nested in one another sets its
context up once, where the work is, and each level undoes only what it set.

Anything else — a hook, a policy, defaults, a budget, a subclass that overrides a step, DSPy
callbacks, a pipeline not checked yet for these input names — takes the layered path, which gives
the same results with every step spelled out.

Which pipeline classes qualify is decided once per class (:func:`eligible`) and forgotten whenever
an attribute of a pipeline class is set or deleted (:func:`forget_classes`, called by the pipeline
metaclass), so patching a method later is seen on the next call.
"""

from __future__ import annotations

import contextlib
from time import perf_counter
from typing import Any, NamedTuple

from stageflow._callers import KNOWN_ENTRY_POINTS as _KNOWN
from stageflow._callers import is_dspys_entry as _is_dspys
from stageflow.engine.boundary import FAILED_OUTPUTS, failed_outputs_of
from stageflow.engine.config import CONFIG
from stageflow.engine.hooks import _GLOBAL, _HOOKS, _PATH
from stageflow.engine.nested import _settings, own_forward, push_callers, pushable
from stageflow.engine.plan import StageEntry, signature_moved
from stageflow.engine.protocol import DEFAULT_POLICY
from stageflow.errors import StageflowError
from stageflow.state import Result, RunInfo, _Joined
from stageflow.usage import _TABLE, UsageTable

_new = object.__new__

__all__ = [
    "INLINE_MEMOS",
    "INTERRUPTED_RUN",
    "carry_run",
    "interrupted_run",
    "InlineCall",
    "begin",
    "eligible",
    "failed",
    "finish",
    "forget_classes",
    "forget_pipeline",
    "only_stages",
    "set_up",
    "standard",
]

#: Where an interrupt (``asyncio.CancelledError``, ``KeyboardInterrupt``) that left a nested pipeline
#: call carries that call's run, for the stage that made the call (an error of stageflow's carries it
#: as ``error.run``; see ``runner._kept_interrupted``).
INTERRUPTED_RUN = "_stageflow_interrupted_run"


def carry_run(error: BaseException, run: RunInfo, nested: bool = True) -> None:
    """The run of a pipeline call that raised ``error`` travels with it: an error of stageflow's
    carries it as ``error.run`` (with its ``events``); an interrupt leaving a ``nested`` call carries
    it for the stage that made the call (:func:`interrupted_run`, ``runner._kept_interrupted``)."""
    if isinstance(error, StageflowError):
        error.events = run.events  # what policies did before the failure
        error.run = run  # the stages that ran, their outputs and details (the outermost call's, in the end)
    elif nested:
        with contextlib.suppress(AttributeError, TypeError):
            setattr(error, INTERRUPTED_RUN, run)


def interrupted_run(error: BaseException) -> RunInfo | None:
    """The run of the nested pipeline call an interrupt left, carried by ``error`` or by what it was
    raised from (a timeout raised for a cancelled call), or ``None``."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        found = getattr(e, INTERRUPTED_RUN, None)
        if type(found) is RunInfo:
            return found
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


#: The base pipeline's own methods, which a class must not override to be run in line.
_STANDARD: dict[str, Any] = {}
#: The structure version (a one-item list) the contract checks are keyed by.
_VERSION: list[int] = [-1]
#: Per pipeline class, for sync calls (``__call__``) and async ones (``acall``): the options of its
#: ``forward`` / ``aforward`` (see ``plain_call``) when it may run in line, else ``None``. One lookup
#: answers both, so a concurrent :func:`forget_classes` cannot split them.
_PLAIN: dict[str, dict[type, frozenset[str] | None]] = {"__call__": {}, "acall": {}}
_UNKNOWN = frozenset({"(not decided)"})


def standard(base: type, structure_version: list[int]) -> None:
    """Record the base pipeline class whose methods the in-line run replaces (``Pipeline``) and the
    structure version its contract checks are keyed by."""
    for name in ("stageflow_call", "stageflow_acall", "stageflow_result", "stageflow_hooks"):
        _STANDARD[name] = base.__dict__.get(name, getattr(base, name))
    for name in (
        "stageflow_ports",
        "stageflow_defaults",
        "_is_checked",
        "_patched_forward",
        "stageflow_failed",
    ):
        _STANDARD[name] = base.__dict__[name]
    global _VERSION
    _VERSION = structure_version


#: Per DSPy entry point, the steps of a pipeline class whose run does nothing but call its stages
#: with the engine's stage call (``SequentialPipeline``'s): such a nested run sets up its context
#: only when one of its stages needs it (see :func:`set_up`).
_ONLY_STAGES: dict[str, tuple[tuple[str, Any], ...]] = {}


def only_stages(cls: type) -> None:
    """Record that ``cls``'s ``_run`` / ``_arun`` (with its ``_run_entries`` / ``_arun_entries``) do
    nothing but call its stages (its plan, ``_entries``) through the engine's stage call, in order."""
    for name, steps in (("__call__", ("_run", "_run_entries")), ("acall", ("_arun", "_arun_entries"))):
        _ONLY_STAGES[name] = tuple((step, cls.__dict__[step]) for step in steps)


def forget_classes() -> None:
    """Forget which classes qualify (an attribute of a pipeline class changed)."""
    for plain in _PLAIN.values():
        plain.clear()
    _GENERATION[0] = object()


def eligible(cls: type, name: str) -> bool:
    """Whether instances of ``cls`` may run in line when called through DSPy's ``name``
    (``__call__`` or ``acall``): the steps the layered path would call are the base pipeline's own,
    and its ``forward`` / ``aforward`` is marked as doing exactly ``stageflow_call`` /
    ``stageflow_acall`` (``plain_call``)."""
    return _options(cls, name) is not None


def _options(cls: type, name: str) -> frozenset[str] | None:
    options = _PLAIN[name].get(cls, _UNKNOWN)
    if options is not _UNKNOWN:
        return options
    entry, method = ("stageflow_call", "forward") if name == "__call__" else ("stageflow_acall", "aforward")
    steps = [
        "stageflow_result",
        "stageflow_failed",  # (the layered path calls it inside the pipeline's context: see failed)
        "stageflow_hooks",
        "stageflow_ports",
        "stageflow_defaults",
        "_is_checked",
        entry,
    ]
    if name == "acall":  # (an async call of a class without its own aforward reads it on the way)
        steps.append("_patched_forward")
    ok = bool(_STANDARD) and all(getattr(cls, step, None) is _STANDARD[step] for step in steps)
    if ok and name == "acall" and own_forward(cls) is not None:
        ok = False  # (its own forward, which acall runs instead of the pattern's plan)
    # DSPy's own entry point (not a subclass's, nor instrumentation's): a nested level of a chain
    # relies on it, the first level checks it again on every call (pushable), and DSPy's method
    # patched later changes it for every class at once.
    fn = getattr(cls, name, None)
    if ok and _KNOWN.get(name) is not fn and not _is_dspys(fn, name):
        ok = False
    options = getattr(getattr(cls, method, None), "_stageflow_options", None) if ok else None
    _PLAIN[name][cls] = options
    return options


class InlineCall(NamedTuple):
    """A nested pipeline running in line: what :func:`finish` / :func:`failed` undo and record."""

    target: Any
    #: Its inputs, which are its state (as a pipeline call copies its inputs into a fresh state).
    state: dict[str, Any]
    run: RunInfo
    prefix: str
    #: The run of the pipeline it is a stage of.
    outer: RunInfo
    t0: float
    #: The stages its run calls, in order, when that is all its run does (:func:`only_stages`): the
    #: engine then calls them itself, without the pipeline's ``_run`` / ``_arun`` in between.
    entries: tuple[StageEntry, ...] | None


#: Where a pipeline keeps what :func:`begin` found out about running it in line, for calls through
#: ``__call__`` and ``acall``: a :class:`_Ticket`, dropped whenever an attribute of the pipeline is
#: set or deleted (:func:`forget_pipeline`, called by the pipeline itself).
_TICKETS = {"__call__": "_stageflow_inline_call", "acall": "_stageflow_inline_acall"}
#: The names of those memos (a pipeline's bookkeeping, left out of its fingerprint).
INLINE_MEMOS = frozenset(_TICKETS.values())
#: Changes whenever :func:`forget_classes` runs: a ticket issued before is void. An object, not a
#: count, so a ticket copied with its pipeline (``copy.deepcopy``, pickling) is void too.
_GENERATION: list[object] = [object()]


class _Ticket(NamedTuple):
    """What holds for running a pipeline in line while its attributes, its class and the structure
    stay as they were: its class qualifies, nothing on it opts out (an own ``forward``, a default
    policy, a budget; its DSPy callbacks are looked at on every call), its ports are current and
    have no optional inputs and none of its ``forward``'s options, and its contract check for all
    of its inputs is done."""

    generation: object
    version: int
    #: ``stageflow.configure(strict=...)`` when the check was found (``None``: the pipeline's own
    #: ``strict`` decided, and only an attribute change can change it).
    config_strict: bool | None
    required: tuple[str, ...]
    #: Its run only calls its stages (:func:`only_stages`): the context is set up when one needs it.
    lazy: bool
    #: Its ports' predictors to look at on each call (``Ports.watched``; new ports drop the ticket).
    watched: tuple[Any, ...]


#: Counts :func:`forget_pipeline` calls: a ticket issued while an attribute of some pipeline changed
#: is not kept (the change may have come between what :func:`_issue` read and its ticket).
_CHANGES = [0]
#: What a pipeline does, looked up on it: one of them set on the instance (an ``aforward``, a
#: ``stageflow_result`` patched by ``mock.patch.object``...) must be called, so it runs layered.
_PROTOCOL = frozenset(
    {
        "forward",
        "aforward",
        "__call__",
        "acall",
        "stageflow_call",
        "stageflow_acall",
        "stageflow_result",
        "stageflow_failed",
        "stageflow_hooks",
        "stageflow_ports",
        "stageflow_defaults",
        "stageflow_policy",
        "_is_checked",
        "_patched_forward",
        "_refresh",
        "_run",
        "_arun",
        "_run_entries",
        "_arun_entries",
    }
)


def forget_pipeline(attrs: dict[str, Any]) -> None:
    """Drop the tickets kept in a pipeline's ``__dict__`` (one of its attributes changed)."""
    _CHANGES[0] += 1
    for key in INLINE_MEMOS:
        attrs.pop(key, None)


def _issue(target: Any, attrs: dict[str, Any], name: str) -> _Ticket | None:
    """A ticket for ``target`` called through ``name``, or ``None`` when one cannot be issued now."""
    changes = _CHANGES[0]
    options = _options(type(target), name)
    if options is None or not _PROTOCOL.isdisjoint(attrs) or target._default_policy is not None:
        return None
    version = _VERSION[0]
    ports = target._ports
    if ports is None or target._ports_version != version or target._seen_structure != version:
        return None
    if target.lm_budget is not None or ports.optional or not options.isdisjoint(ports.required):
        return None
    own = target.strict
    strict = CONFIG.strict if own is None else own
    if (None, frozenset(ports.required), version, strict) not in target._checked:
        return None
    config_strict = strict if own is None else None
    steps = _ONLY_STAGES.get(name, ())
    lazy = bool(steps) and all(getattr(type(target), step) is fn for step, fn in steps)
    ticket = tuple.__new__(
        _Ticket, (_GENERATION[0], version, config_strict, ports.required, lazy, ports.watched)
    )
    attrs[_TICKETS[name]] = ticket
    if _CHANGES[0] != changes:  # an attribute changed meanwhile: use it this once, keep it not
        attrs.pop(_TICKETS[name], None)
    return ticket


def begin(
    owner: Any, entry: StageEntry, state: dict[str, Any], outer: RunInfo, prefix: str, name: str
) -> InlineCall | None:
    """Start the nested pipeline of ``entry`` in line, or ``None`` (nothing done) when the layered
    path must call it. ``outer`` is the run of ``owner`` and ``prefix`` its full path; ``name`` is
    DSPy's entry point the layered path would take (``__call__`` or ``acall``). The caller has
    checked that no hook listens and no budget gate is open."""
    if entry.chain or entry.policy is not None or not entry.merge_all:
        return None
    # (owner and target are pipelines, whose classes restore Python's own attribute lookup: plain
    # getattr is the same lookup as object.__getattribute__, at a third of its cost)
    target = getattr(owner, entry.attr)
    if entry.key is not None:
        target = target[entry.key]
    attrs = target.__dict__
    ticket = attrs.get(_TICKETS[name])
    if (
        ticket is None
        or ticket[0] is not _GENERATION[0]
        or ticket[1] != _VERSION[0]
        or (ticket[2] is not None and ticket[2] != CONFIG.strict)
    ):
        ticket = _issue(target, attrs, name)
        if ticket is None:
            return None
    # (Unless the outer run is an in-line one that has run no stage yet: its own begin found the
    # same context a moment ago, so the first level of a nested chain checks for all of them.)
    if (outer._pending is None or outer._trace) and (
        DEFAULT_POLICY.get() is not None or _HOOKS.get() or _GLOBAL[0] or _TABLE.get() is None
    ):
        return None
    if attrs.get("callbacks") or "forward" in attrs or attrs.get("lm_budget") is not None:
        # (a callbacks list may grow in place; a forward or budget written into __dict__ directly,
        # without setting the attribute, would not drop the ticket: the two that change results)
        return None
    if ticket[5] and _moved(ticket[5]):
        return None  # (a predictor inside got other fields: the layered path re-makes the plan)
    kw = {}
    try:
        for f in ticket[3]:
            kw[f] = state[f]
    except KeyError:
        return None  # (the layered path names what is missing)
    # DSPy's side, what _push checks: its own entry point, and settings that let the engine push the
    # pipeline onto caller_modules itself (checked once per chain of in-line runs; a class whose
    # entry point is not DSPy's own does not qualify, see _options).
    if outer._pending is None and outer._tokens is None:
        if not pushable(target, name):
            return None  # (the outer run is not an in-line one: the first level of a chain)
    else:  # (callbacks may be added in place mid-run: DSPy's own call reports this module to them;
        # nested.callbacks_on, written out: once per level of a nested chain)
        o = _settings.thread_local_overrides.get()
        if o["callbacks"] if "callbacks" in o else _settings.main_thread_config.get("callbacks"):
            return None
    run = _new(RunInfo)  # RunInfo.blank(None), written out (once per level of a nested chain)
    run._outputs = {}
    run._trace = []
    run.extras = {}
    run.events = []
    run._details = {}
    run._lazy_trace = -1
    run._lazy_outputs = run._lazy_details = False
    run._usage = run._failed = run._tokens = None
    full = f"{prefix}.{entry.path}" if prefix else entry.path
    entries = target._entries if ticket[4] else None
    run._pending = call = tuple.__new__(InlineCall, (target, kw, run, full, outer, perf_counter(), entries))
    if entries is None:
        set_up(run)
    return call


def _moved(watched: tuple[tuple[Any, StageEntry, str], ...]) -> bool:
    """Whether a predictor the pipeline's ports were computed with now has a signature with other
    fields (replaced in place, maybe by an earlier stage of this very call)."""
    return any(signature_moved(owner, entry) for owner, entry, _ in watched)


def set_up(run: RunInfo) -> None:
    """Set up the context of the in-line run ``run`` (its stages are about to run code that reads
    it): its path, its usage table, and DSPy's ``caller_modules`` with it and every enclosing
    in-line run whose context is not set up (a chain of nested pipelines sets it up once, where a
    stage needs it, not once per level)."""
    call = run._pending
    run._pending = None
    targets = [call.target]
    outer = call.outer
    while outer._pending is not None:
        targets.append(outer._pending.target)
        outer = outer._pending.outer
    targets.reverse()
    table = run._usage
    if table is None:
        table = run._usage = UsageTable()
    table.events = run.events
    table.prefix = call.prefix
    run._tokens = (_PATH.set(call.prefix), push_callers(targets), _TABLE.set(table))


def _leave(call: InlineCall) -> None:
    run = call.run
    tokens = run._tokens
    if tokens is None:
        run._pending = None
        return
    run._tokens = None
    _TABLE.reset(tokens[2])
    _settings.thread_local_overrides.reset(tokens[1])
    _PATH.reset(tokens[0])


def failed(call: InlineCall, error: BaseException) -> None:
    """The nested body raised ``error``: undo :func:`begin`; the run so far travels with the error
    (as a failed pipeline call records it)."""
    _leave(call)
    carry_run(error, call.run)
    call.target.stageflow_failed(call.run, (), error)


def finish(call: InlineCall, entry: StageEntry, state: dict[str, Any], run: RunInfo) -> Result:
    """The nested body finished: undo :func:`begin`, record the stage in ``run`` and merge the
    nested pipeline's final state into ``state`` (what the stage call does with its result).

    Runs once per level of a chain of nested pipelines, so what ``Result.of`` and
    ``RunInfo.absorb`` do is written out here."""
    inner = call[2]
    tokens = inner._tokens
    if tokens is None:
        inner._pending = None
    else:
        inner._tokens = None
        _TABLE.reset(tokens[2])
        _settings.thread_local_overrides.reset(tokens[1])
        _PATH.reset(tokens[0])
    final = call[1]
    out = _new(Result)  # Result.of(final, inner)
    d = out.__dict__
    d["_store"] = final
    d["_completions"] = d["_lm_usage"] = None
    d["_run"] = inner
    path = entry.path
    outputs = run._outputs
    outputs[path] = out
    # run.absorb(path, inner) after the stage's own record, for a non-empty path; the joined run
    # stands for that record too (its third item), which the trace gets when it is read.
    joined = tuple.__new__(_Joined, (path, inner, perf_counter() - call[5]))
    trace = run._trace
    if run._lazy_trace < 0:
        run._lazy_trace = len(trace)
    trace.append(joined)
    outputs[joined] = None  # (keeps the place of the nested outputs among the keys)
    run._details[joined] = None
    run._lazy_outputs = run._lazy_details = True
    if inner.events:
        run.events.extend(inner.events)
    used = inner._usage
    if used is not None and used._by_path:
        run.usage.absorb(path, used)
    skip = entry.merge_skip
    if skip:
        for k, v in final.items():
            if k not in skip:
                state[k] = v
    else:
        state.update(final)
    failed = inner._failed
    if failed is None:  # _failed_below(inner), one call less per level of a chain
        extras, details = inner.extras, inner._details
        failed = bool(extras and extras.get(FAILED_OUTPUTS)) or bool(details and _any_failed(details))
        inner._failed = failed
    if not failed:
        return out
    # A failed inner stage (at any depth) was to write these: the old values are stale.
    for failed_fields in failed_outputs_of(inner):
        for k in failed_fields:
            if k not in final:
                state.pop(k, None)
    return out


def _failed_below(run: RunInfo) -> bool:
    """Whether a finished run, or a run nested in it at any depth, has failed outputs (what
    :func:`~stageflow.engine.boundary.failed_outputs_of` would find), without expanding its joined
    records; remembered on the run, so a chain of nested runs is looked at once per level."""
    memo = run._failed
    if memo is None:
        extras, details = run.extras, run._details
        memo = bool(extras and extras.get(FAILED_OUTPUTS)) or bool(details and _any_failed(details))
        run._failed = memo
    return memo


def _any_failed(details: dict[Any, Any]) -> bool:
    """Whether a run's details (joined runs among them) hold failed outputs at any depth."""
    for k, v in details.items():
        if type(k) is _Joined:
            below = k[1]._failed  # (a chain's runs were looked at as each finished)
            if below is None:
                below = _failed_below(k[1])
        else:
            below = bool(v and v.get(FAILED_OUTPUTS))
        if below:
            return True
    return False
