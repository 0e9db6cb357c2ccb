"""A nested pipeline run in line: what calling it as a stage does, without the layers in between.

A pipeline nested in another is called, on each call of the outer one, through several layers:
the engine's stage call, :func:`~stageflow.engine.nested.call_nested` (DSPy's ``Module.__call__``
bookkeeping), the pipeline's ``stageflow_call`` (its contract check), :func:`~stageflow.engine.
runner.execute` (its run, hooks, defaults, usage table) and the stage call again (its record and
the merge of its result). For the common case those layers decide nothing: no hook listens, no
policy wraps the stage, the pipeline is a pattern's own class (nothing overridden that the layers
would call), already checked for these inputs. :func:`begin` recognises that case before it does
anything, then sets up in one go exactly what the layers would have set up (the stage's path, the
pipeline on DSPy's ``caller_modules``, a fresh state, run and usage table); the twin stage calls of
the engine run the pipeline's body between :func:`begin` and :func:`finish` (or :func:`failed`).
Anything else — a hook, a policy, defaults, a budget, a subclass that overrides a step, DSPy
callbacks, a pipeline not checked yet for these input names — takes the layered path, which gives
the same results with every step spelled out.

Which pipeline classes qualify is decided once per class (:func:`eligible`) and forgotten whenever
an attribute of a pipeline class is set or deleted (:func:`forget_classes`, called by the pipeline
metaclass), so patching a method later is seen on the next call.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any, NamedTuple

from stageflow.engine.boundary import FAILED_OUTPUTS, failed_outputs_of, port_inputs
from stageflow.engine.config import CONFIG
from stageflow.engine.hooks import _GLOBAL, _HOOKS, _PATH
from stageflow.engine.nested import _push, _settings
from stageflow.engine.plan import StageEntry
from stageflow.engine.protocol import DEFAULT_POLICY
from stageflow.errors import StageflowError
from stageflow.state import Result, RunInfo, StageRecord, _Joined
from stageflow.usage import _TABLE, UsageTable

__all__ = ["InlineCall", "begin", "eligible", "failed", "finish", "forget_classes", "standard"]

_getattr = object.__getattribute__

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
    for name in ("stageflow_ports", "stageflow_defaults", "_is_checked", "_patched_forward"):
        _STANDARD[name] = base.__dict__[name]
    global _VERSION
    _VERSION = structure_version


def forget_classes() -> None:
    """Forget which classes qualify (an attribute of a pipeline class changed)."""
    for plain in _PLAIN.values():
        plain.clear()


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
        "stageflow_hooks",
        "stageflow_ports",
        "stageflow_defaults",
        "_is_checked",
        entry,
    ]
    if name == "acall":  # (an async call of a class without its own aforward reads it on the way)
        steps.append("_patched_forward")
    ok = bool(_STANDARD) and all(getattr(cls, step, None) is _STANDARD[step] for step in steps)
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
    path_token: Any
    dspy_token: Any
    table_token: Any
    t0: float


def begin(owner: Any, entry: StageEntry, state: dict[str, Any], prefix: str, name: str) -> InlineCall | None:
    """Start the nested pipeline of ``entry`` in line, or ``None`` (nothing done) when the layered
    path must call it. ``prefix`` is the full path of ``owner``; ``name`` is DSPy's entry point the
    layered path would take (``__call__`` or ``acall``). The caller has checked that no hook
    listens and no budget gate is open."""
    target = _getattr(owner, entry.attr)
    if entry.key is not None:
        target = target[entry.key]
    cls = type(target)
    options = _PLAIN[name].get(cls, _UNKNOWN)
    if options is _UNKNOWN:
        options = _options(cls, name)
    if options is None or entry.chain or entry.policy is not None or not entry.merge_all:
        return None
    if "forward" in _getattr(target, "__dict__") or target._default_policy is not None:
        return None
    # The contract check and the ports are cached for the current structure: asked as the layered
    # path asks them, they would only confirm it.
    version = _VERSION[0]
    ports = target._ports
    if ports is None or target._ports_version != version or target._seen_structure != version:
        return None
    if target.lm_budget is not None or DEFAULT_POLICY.get() is not None or _HOOKS.get() or _GLOBAL[0]:
        return None
    if _TABLE.get() is None:
        return None
    kw = port_inputs(ports, state)
    if not options.isdisjoint(kw):
        return None
    strict = target.strict
    if strict is None:
        strict = CONFIG.strict
    attrs = _getattr(target, "__dict__")
    if not _checked(attrs, target._checked, kw, ports, version, strict):
        return None
    dspy_token = _push(target, name)
    if dspy_token is None:
        return None
    full = f"{prefix}.{entry.path}" if prefix else entry.path
    run = RunInfo()
    run._usage = table = UsageTable()
    table.events = run.events
    table.prefix = full
    return tuple.__new__(
        InlineCall, (target, kw, run, full, _PATH.set(full), dspy_token, _TABLE.set(table), perf_counter())
    )


#: Where a pipeline remembers that its call with every required input (and no optional one) is
#: checked: ``(its checks dict, structure version, strictness)``. Check results are only ever added
#: to that dict (a new dict replaces it), so the memo holds while all three are unchanged.
_MEMO = "_stageflow_checked_all"


def _checked(
    attrs: dict[str, Any], checked: dict[Any, Any], kw: dict[str, Any], ports: Any, version: int, strict: bool
) -> bool:
    """Whether the contract check for a call with ``kw``'s names is done (what ``_is_checked`` asks)."""
    memo = attrs.get(_MEMO)
    every = not ports.optional and len(kw) == len(ports.required)
    if every and memo is not None and memo[0] is checked and memo[1] == version and memo[2] == strict:
        return True
    if (None, frozenset(kw), version, strict) not in checked:
        return False
    if every:
        attrs[_MEMO] = (checked, version, strict)
    return True


def _leave(call: InlineCall) -> None:
    _TABLE.reset(call.table_token)
    _settings.thread_local_overrides.reset(call.dspy_token)
    _PATH.reset(call.path_token)


def failed(call: InlineCall, error: BaseException) -> None:
    """The nested body raised ``error``: undo :func:`begin`; the run so far travels with the error
    (as a failed pipeline call records it)."""
    _leave(call)
    if isinstance(error, StageflowError):
        error.events = call.run.events
        error.run = call.run
    call.target.stageflow_failed(call.run, (), error)


def finish(call: InlineCall, entry: StageEntry, state: dict[str, Any], run: RunInfo) -> Result:
    """The nested body finished: undo :func:`begin`, record the stage in ``run`` and merge the
    nested pipeline's final state into ``state`` (what the stage call does with its result)."""
    _TABLE.reset(call.table_token)
    _settings.thread_local_overrides.reset(call.dspy_token)
    _PATH.reset(call.path_token)
    inner = call.run
    final = call.state
    out = Result.of(final, inner)
    run._trace.append(tuple.__new__(StageRecord, (entry.path, perf_counter() - call.t0, True)))
    run._outputs[entry.path] = out
    run.absorb(entry.path, inner)
    skip = entry.merge_skip
    if skip:
        for k, v in final.items():
            if k not in skip:
                state[k] = v
    else:
        state.update(final)
    if not _failed_below(inner):
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
        memo = bool(run.extras.get(FAILED_OUTPUTS))
        if not memo and run._details:
            for k, v in run._details.items():
                if _failed_below(k[1]) if type(k) is _Joined else bool(v and v.get(FAILED_OUTPUTS)):
                    memo = True
                    break
        run._failed = memo
    return memo
