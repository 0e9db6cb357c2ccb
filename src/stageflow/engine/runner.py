"""The one engine: calls stages (sync and async), merges their outputs, fires hooks.

Every pattern runs its stages through :func:`call_stage` / :func:`acall_stage` (or the
sequence helpers built on them) and every pipeline call goes through :func:`execute` /
:func:`aexecute`. Nothing else in stageflow calls a stage.

Hot path: with no hooks active, a stage costs one dict comprehension for its inputs, one
call, one loop over its outputs and one record; paths, hook payloads and timing details are
only built when a hook listens.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar, Token
from time import perf_counter
from types import CoroutineType
from typing import TYPE_CHECKING, Any, NamedTuple

from stageflow._callers import setting
from stageflow.budgets._state import GATES, SKIP
from stageflow.engine import concurrency
from stageflow.engine.boundary import (
    gather_inputs,
    merge_outputs,
    missing_at_run_time,
    note_run_failure,
    private_state,
    stage_failure,
)
from stageflow.engine.budget import _BUDGETS, _ROOT
from stageflow.engine.carry import adopt, release
from stageflow.engine.concurrency import (
    aenter_leaf,
    enter_leaf,
    exit_leaf,
    leaf_slots,
    on_background_loop,
    run_on_background_loop,
)
from stageflow.engine.config import CONFIG
from stageflow.engine.guarded import aguarded_call, guarded_call
from stageflow.engine.hooks import _GLOBAL, _HOOKS, _PATH, _engine_path, _EnginePath, notify
from stageflow.engine.inline import INTERRUPTED_RUN, InlineCall, carry_run
from stageflow.engine.inline import begin as begin_inline
from stageflow.engine.inline import failed as inline_failed
from stageflow.engine.inline import finish as finish_inline
from stageflow.engine.inline import set_up as set_up_inline
from stageflow.engine.lm_slots import ensure_installed as ensure_lm_caps
from stageflow.engine.module_call import acall_module, call_module, own_acall
from stageflow.engine.nested import acall_nested, call_nested, own_forward
from stageflow.engine.plan import FUNCTION, StageEntry, held, join_path, leaf_of, signature_replaced
from stageflow.engine.protocol import DEFAULT_POLICY, StageOwner
from stageflow.errors import ConfigurationError, StageflowError
from stageflow.lm.fast import acall_predictor, call_predictor, fast_adapter_for
from stageflow.policies.recovery import PolicyEvent, StagePolicy
from stageflow.policies.transient import is_kind
from stageflow.stages import ENGINE_CALLS, note_degraded
from stageflow.state import Result, RunInfo, StageRecord
from stageflow.usage import (
    _STAGE,
    _TABLE,
    StageUsage,
    calling_stage,
    close_run,
    current_table,
    open_run,
)

if TYPE_CHECKING:
    from stageflow.patterns.base import Pipeline

__all__ = [
    "acall_stage",
    "aexecute",
    "arun_sequence",
    "call_stage",
    "execute",
    "run_sequence",
]

Body = Callable[[dict[str, Any], RunInfo, tuple[Any, ...], str], None]
ABody = Callable[[dict[str, Any], RunInfo, tuple[Any, ...], str], Awaitable[None]]

_getattr = object.__getattribute__


_held = held


def _invoke(entry: StageEntry, target: Any, kw: dict[str, Any]) -> Any:
    """Call the stage (sync); a leaf takes a slot of every concurrency budget in force."""
    if entry.composite:
        return call_nested(target, kw)
    slots = leaf_slots()
    if not slots:
        if entry.is_async_fn or entry.predictor or entry.lazy:
            return _call_sync(entry, target, kw)
        return call_module(target, kw) if entry.module_call else target(**kw)
    ensure_lm_caps()
    token = enter_leaf(slots)
    try:
        return _call_sync(entry, target, kw)
    finally:
        exit_leaf(slots, token)


def _call_sync(entry: StageEntry, target: Any, kw: dict[str, Any]) -> Any:
    if entry.predictor and _FAST.get():
        return call_predictor(target, kw)
    if entry.is_async_fn:
        # An ``async def`` stage in a sync call runs on stageflow's background event loop.
        if on_background_loop():
            raise ConfigurationError(
                f"Stage '{entry.path}' is an async function called synchronously from stageflow's own "
                "event loop; call the pipeline with `await pipeline.acall(...)` instead.",
                stage_path=entry.path,
                code="async_in_sync",
            )
        return run_on_background_loop(target(**kw))
    if entry.lazy:
        return _forced(target(**kw))
    return call_module(target, kw) if entry.module_call else target(**kw)


def _forced(out: Any) -> Any:
    """A lazy stage's result, forced (its work is part of the stage's call)."""
    resolve = getattr(type(out), "stageflow_resolve", None)
    return out if resolve is None else resolve(out)


async def _aforced(out: Any) -> Any:
    """Async twin of :func:`_forced` (a result with no async resolution is forced on a thread)."""
    resolve = getattr(type(out), "stageflow_aresolve", None)
    if resolve is not None:
        return await resolve(out)
    return await concurrency.to_thread(_forced, out) if hasattr(type(out), "stageflow_resolve") else out


def _carry_run(entry: StageEntry, err: StageflowError, run: RunInfo) -> None:
    """A nested pipeline that failed: what it did (carried by the error) joins this run."""
    if entry.composite and err.run is not None and err.run is not run:
        run.absorb(entry.path, err.run)


def _is_example(value: Any) -> bool:
    """Whether ``value`` is a ``dspy.Example`` (a ``dspy.Prediction``), without importing DSPy."""
    dspy_example = sys.modules.get("dspy.primitives.example")
    return dspy_example is not None and isinstance(value, dspy_example.Example)


def _recovered(
    policy: StagePolicy | None,
    entry: StageEntry,
    original: Exception,
    err: StageflowError,
    kw: dict[str, Any],
    state: dict[str, Any],
    run: RunInfo,
    prefix: str,
) -> bool:
    """Apply ``skip_on`` / ``recover``; ``True`` when the run may go on without the stage."""
    if policy is None or not (policy.skip_on or policy.skip_if or policy.recover):
        return False
    path = join_path(prefix, entry.path)
    detail = {
        "index": entry.key,
        "inputs": kw,
        "state": dict(state),
        "error_type": type(original).__name__,
        "message": str(original),
    }
    # As in the tutorial: the recovery strategy first; a non-critical error is skipped only when
    # there is none or it did not recover (a strategy that raises fails the run).
    if policy.recover is not None:
        try:
            new_state = policy.recover(original, dict(state))
            if _is_example(new_state):  # a fallback module's dspy.Prediction: its fields
                new_state = dict(new_state.items())
            if new_state and not isinstance(new_state, Mapping):
                raise TypeError(
                    f"it returned {type(new_state).__name__} {new_state!r:.60}; a recovery strategy returns "
                    "the new state (a dict or a dspy.Prediction) or something falsy (None, {}) for "
                    "'not recovered'"
                )
        except Exception as e:
            detail["recovery_error"] = f"{type(e).__name__}: {e}"
            err.message += f" Its recovery strategy raised {type(e).__name__}: {e}"
            err.args = (err.message,)
            err.recovery_error = e
            new_state = None
        if new_state:  # as in the tutorial: a falsy result ({}, None) means "not recovered"
            # Merged into the state, as every stage's outputs are (a strategy may return only the
            # fields it fixed).
            state.update(new_state)
            run.events.append(
                PolicyEvent(path, "recovered", error=f"{type(original).__name__}: {original}", detail=detail)
            )
            note_degraded()  # (a cache around this call keeps none of it)
            return True
    if "recovery_error" not in detail and _skips(policy, original):
        run.events.append(
            PolicyEvent(path, "skipped", error=f"{type(original).__name__}: {original}", detail=detail)
        )
        note_degraded()
        return True
    run.events.append(
        PolicyEvent(path, "failed", error=f"{type(original).__name__}: {original}", detail=detail)
    )
    return False


def _skips(policy: StagePolicy, error: BaseException) -> bool:
    """Whether the policy lets the run go on without the failed stage (a non-critical error)."""
    if policy.skip_on and is_kind(error, policy.skip_on):
        return True
    return policy.skip_if is not None and bool(policy.skip_if(error))


class _Call(NamedTuple):
    """One stage call in progress: what the sync and async paths share before and after the call."""

    target: Any
    kw: dict[str, Any]
    policy: StagePolicy | None
    path: str
    stage: Any
    tokens: tuple[Any, Any]
    before: StageUsage | None
    t0: float


def _start(
    owner: Any,
    entry: StageEntry,
    state: dict[str, Any],
    run: RunInfo,
    hooks: tuple[Any, ...],
    prefix: str,
    method: str,
) -> _Call:
    target = leaf_of(owner, entry)
    kw = gather_inputs(entry, state, prefix, target, owner, run)
    policy = owner.stageflow_policy(entry)
    path = join_path(prefix, entry.path)
    stage = _held(owner, entry) if hooks else None
    before = None
    if hooks:
        table = current_table()
        before = table.get(entry.path) if table is not None else None
        notify(hooks, "before_stage", path=path, stage=stage, inputs=kw)
    path_token = _PATH.set(_engine_path(path, target, _TABLE.get()) if entry.composite else path)
    # LM work inside is attributed to this stage; a nested pipeline's own work is attributed inside
    # its own run (its stages set their paths), so it sets none unless a policy may count events.
    own = entry.composite and policy is None and _runs_itself(target, method)
    stage_token = _STAGE.set(entry.path) if not entry.composite or policy is not None or own else None
    tokens: tuple[Any, ...] = (path_token, stage_token)
    if entry.stage_leaf:  # (its outputs are checked on merge, by the engine: see ENGINE_CALLS)
        tokens = (path_token, stage_token, ENGINE_CALLS.set(target))
    return _new_call((target, kw, policy, path, stage, tokens, before, perf_counter()))


def _new_call(values: tuple[Any, ...]) -> _Call:
    return tuple.__new__(_Call, values)


def _close(call: _Call) -> None:
    path_token, stage_token = call.tokens[0], call.tokens[1]
    if len(call.tokens) == 3:
        ENGINE_CALLS.reset(call.tokens[2])
    if stage_token is not None:
        _STAGE.reset(stage_token)
    _PATH.reset(path_token)


def _stage_usage(
    call: _Call, entry: StageEntry, out: Any, failed: RunInfo | None = None
) -> dict[str, Any] | None:
    """What this one call of the stage used (for hooks). ``failed``: the run a nested pipeline that
    failed carried out with its error (what its stages used before it failed is its usage)."""
    if entry.composite and (isinstance(out, Result) or failed is not None):
        total = (failed if failed is not None else out.run).usage.total
        return None if total.is_empty() else total.to_dict()
    # (a nested pipeline with its own forward returns its own record: its LM work is this stage's)
    table = current_table()
    after = table.get(entry.path) if table is not None else None
    if after is None:
        return None
    if call.before is not None:
        after = after.minus(call.before)
    return None if after.is_empty() else after.to_dict()


def _failed_stage(
    call: _Call,
    owner: Any,
    entry: StageEntry,
    error: Exception,
    state: dict[str, Any],
    run: RunInfo,
    hooks: tuple[Any, ...],
    prefix: str,
) -> StageflowError | None:
    """Record a failed stage call; ``None`` when a policy lets the run go on, else the error to raise."""
    elapsed = perf_counter() - call.t0
    run._trace.append(StageRecord(entry.path, elapsed, False))
    err = stage_failure(entry, error, prefix)
    _carry_run(entry, err, run)
    if hooks:
        nested = err.run if entry.composite and err.run is not run else None
        _notify_error(hooks, call, err, elapsed, _stage_usage(call, entry, None, nested))
    if call.policy is not None and entry.composite:
        # A nested pipeline reports its stage's failure as a StageError: recovery and skipping see
        # what that stage raised, as they would with the stage in the outer pipeline itself.
        while getattr(error, "wraps_stage_exception", False) and isinstance(error.__cause__, Exception):
            error = error.__cause__
    if _recovered(call.policy, entry, error, err, call.kw, state, run, prefix):
        return None
    return err


def _kept_interrupted(entry: StageEntry, error: BaseException, run: RunInfo) -> RunInfo | None:
    """An interrupt that left the nested pipeline call of ``entry``: what that call did (its trace,
    outputs and LM usage so far) joins ``run``, as a failed one's does; returns its run."""
    nested = getattr(error, INTERRUPTED_RUN, None) if entry.composite else None
    if type(nested) is not RunInfo or nested is run:
        return None
    run.absorb(entry.path, nested)
    return nested


def _interrupted(
    call: _Call, entry: StageEntry, error: BaseException, hooks: tuple[Any, ...], run: RunInfo
) -> None:
    """A stage call stopped from outside (its task cancelled: a fail-fast fan-out, an ensemble's
    quorum, a timeout; or an interrupt): observers hear that it ended, with ``cancelled=True``, so
    no profile or trace shows a stage that started and never ended, and with the LM work it did
    before (answered and billed) — a nested pipeline's too, which joins this run."""
    nested = _kept_interrupted(entry, error, run)
    if hooks:
        usage = _stage_usage(call, entry, None, nested)
        _notify_error(hooks, call, error, perf_counter() - call.t0, usage, cancelled=True)


def _notify_error(
    hooks: tuple[Any, ...], call: _Call, error: BaseException, elapsed: float, usage: Any, **extra: Any
) -> None:
    notify(
        hooks,
        "on_stage_error",
        path=call.path,
        stage=call.stage,
        inputs=call.kw,
        error=error,
        elapsed=elapsed,
        usage=usage,
        **extra,
    )


def _finished_stage(
    call: _Call,
    entry: StageEntry,
    out: Any,
    state: dict[str, Any],
    run: RunInfo,
    hooks: tuple[Any, ...],
    prefix: str,
) -> Any:
    elapsed = perf_counter() - call.t0
    run._trace.append(tuple.__new__(StageRecord, (entry.path, elapsed, True)))
    run._outputs[entry.path] = out
    merge_outputs(entry, out, state, run, prefix)
    if hooks:
        notify(
            hooks,
            "after_stage",
            path=call.path,
            stage=call.stage,
            inputs=call.kw,
            outputs=out,
            elapsed=elapsed,
            usage=_stage_usage(call, entry, out),
        )
    return out


def call_stage(
    owner: Any, entry: StageEntry, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str
) -> Any:
    """Run one stage of ``owner`` over ``state`` (sync) and merge its outputs into it.

    ``prefix`` is the full path of ``owner`` from the outermost running pipeline. Returns the
    stage's raw output (``None`` when a policy skipped or recovered a failed stage).

    The path no hook observes is written out here, for leaves and nested pipelines alike (the
    async twin :func:`acall_stage` mirrors it line by line); an observed call goes through the
    bookkeeping shared with the async twin (:func:`_start`, :func:`_failed_stage`, ...).
    """
    if entry.signature is not None and signature_replaced(owner, entry):  # (a predictor's, in place)
        entry = owner.stageflow_current(entry, "")
    if GATES[0]:  # a budget with a degradation is open somewhere: it may skip or re-route this stage
        from stageflow.budgets.scope import lm_swapped, stage_gate

        if run._pending is not None:  # (a gate may record events; the stage needs its context)
            set_up_inline(run)
        gate = stage_gate(join_path(prefix, entry.path), run.events)
        if gate is SKIP:
            return None
        if gate is not None:
            with lm_swapped(gate):
                return _call_observed(owner, entry, state, run, hooks, prefix)
    if hooks:
        if run._pending is not None:
            set_up_inline(run)
        return _call_observed(owner, entry, state, run, hooks, prefix)
    if entry.composite:
        nested = begin_inline(owner, entry, state, run, prefix, "__call__")
        if nested is not None:  # a nested pipeline that can run in line (see stageflow.engine.inline)
            try:
                inner_entries = nested[6]
                if inner_entries is None:
                    nested[0]._run(nested[1], nested[2], (), nested[3])  # (target, state, run, prefix)
                else:  # (all its run does: see InlineCall.entries)
                    target, inner_state, inner, inner_prefix = nested[0], nested[1], nested[2], nested[3]
                    for inner_entry in inner_entries:
                        call_stage(target, inner_entry, inner_state, inner, (), inner_prefix)
            except Exception as e:
                _inline_raised(owner, entry, nested, e, state, run, prefix)
                return None
            except BaseException as e:
                inline_failed(nested, e)
                _kept_interrupted(entry, e, run)
                raise
            return finish_inline(nested, entry, state, run)
    if run._pending is not None:  # this stage runs in an in-line nested run: it needs its context
        set_up_inline(run)
    target, kw, policy = _prepared(owner, entry, state, run, prefix)
    # (the common leaf's context is only its path: set here, as _entered would, without its frame)
    token, path_token = (
        (_STAGE.set(entry.path), None)
        if policy is None and entry.bare_leaf
        else _entered(entry, policy, prefix, target, "forward")
    )
    t0 = perf_counter()
    try:
        if policy is not None:
            out = guarded_call(owner, entry, target, kw, policy, run, prefix, _invoke)
        elif entry.composite:
            out = call_nested(target, kw)
        elif entry.plain_call and _BUDGETS.get() is None and _ROOT[0] is None:
            # (no concurrency budget in force: nothing to take a slot of)
            out = call_module(target, kw) if entry.module_call else target(**kw)
        else:
            out = _invoke(entry, target, kw)
    except Exception as e:
        _left(token, path_token)
        _raised(owner, entry, e, (target, kw, policy, t0), state, run, hooks, prefix)
        return None
    except BaseException as e:
        _left(token, path_token)
        _exit_at(e, entry, prefix)
        _kept_interrupted(entry, e, run)
        raise
    return _succeeded(entry, out, t0, state, run, prefix, token, path_token)


def _succeeded(
    entry: StageEntry,
    out: Any,
    t0: float,
    state: dict[str, Any],
    run: RunInfo,
    prefix: str,
    token: Any,
    path_token: Any,
) -> Any:
    """A stage call that returned (sync and async): its context left (the common leaf's path reset
    in line, as :func:`_left` would), its record kept and its outputs merged."""
    if path_token is None and type(token) is Token:
        _STAGE.reset(token)
    else:
        _left(token, path_token)
    run._trace.append(tuple.__new__(StageRecord, (entry.path, perf_counter() - t0, True)))
    run._outputs[entry.path] = out
    merge_outputs(entry, out, state, run, prefix)
    return out


def _exit_at(error: BaseException, entry: StageEntry, prefix: str) -> None:
    """A ``sys.exit()`` inside a stage passes through the engine unchanged, named by the innermost
    stage it left (``error.stage_path``), so a batch's error row says where it happened."""
    if type(error) is SystemExit and getattr(error, "stage_path", None) is None and not entry.composite:
        error.stage_path = join_path(prefix, entry.path)  # type: ignore[attr-defined]


def _prepared(
    owner: Any, entry: StageEntry, state: dict[str, Any], run: RunInfo, prefix: str
) -> tuple[Any, dict[str, Any], StagePolicy | None]:
    """The stage object, its inputs and its policy (``leaf_of`` and ``gather_inputs``, written out
    for the common case); shared by :func:`call_stage` and :func:`acall_stage`."""
    target = getattr(owner, entry.attr)  # (a pipeline: Python's own lookup, see stageflow.engine.inline)
    if entry.key is not None:
        target = target[entry.key]
    for name in entry.chain:
        target = _getattr(target, name)
    if entry.plain_inputs:
        kw = {}
        try:
            for sf, st in entry.in_pairs:
                kw[sf] = state[st]
        except KeyError as e:
            raise missing_at_run_time(entry, str(e.args[0]), state, prefix, owner, run) from None
    else:
        kw = gather_inputs(entry, state, prefix, target, owner, run)
    # The owner merges pipeline defaults into a stage's policy; with none in force it is the stage's own.
    policy = entry.policy if DEFAULT_POLICY.get() is None else owner.stageflow_policy(entry)
    return target, kw, policy


def _entered(
    entry: StageEntry, policy: StagePolicy | None, prefix: str, target: Any, method: str
) -> tuple[Any, Any]:
    """Set the stage's context: LM work inside is attributed to this stage (a nested pipeline's
    stages set their own paths, unless its own ``forward`` runs instead of them), and a nested
    pipeline's calls are prefixed with its full path."""
    composite = entry.composite
    own = composite and policy is None and _runs_itself(target, method)
    token = _STAGE.set(entry.path) if not composite or policy is not None or own else None
    path_token = (
        _PATH.set(_engine_path(join_path(prefix, entry.path), target, _TABLE.get())) if composite else None
    )
    if entry.stage_leaf:  # (its outputs are checked on merge, by the engine: see ENGINE_CALLS)
        return (token, ENGINE_CALLS.set(target)), path_token
    return token, path_token


def _runs_itself(pipeline: Any, method: str) -> bool:
    """Whether a nested pipeline's own ``forward`` / ``aforward`` (``method``; set on it, or a
    subclass's) runs instead of its pattern's plan: it calls its modules itself, like a custom
    module, so its LM work is its stage's."""
    attrs = _getattr(pipeline, "__dict__")
    if "forward" in attrs or "aforward" in attrs:
        return True
    cls = type(pipeline)
    if getattr(getattr(cls, method, None), "_stageflow_options", None) is None:
        return True  # (a pattern's own forward / aforward is marked plain_call)
    return method == "aforward" and own_forward(cls) is not None  # (acall runs an own forward)


def _left(token: Any, path_token: Any) -> None:
    if type(token) is tuple:
        ENGINE_CALLS.reset(token[1])
        token = token[0]
    if token is not None:
        _STAGE.reset(token)
    if path_token is not None:
        _PATH.reset(path_token)


def _raised(
    owner: Any,
    entry: StageEntry,
    e: Exception,
    called: tuple[Any, dict[str, Any], StagePolicy | None, float],
    state: dict[str, Any],
    run: RunInfo,
    hooks: tuple[Any, ...],
    prefix: str,
) -> None:
    """A stage call that raised: returns when a policy recovered or skipped it, else raises the
    stage's error."""
    target, kw, policy, t0 = called
    call = _new_call((target, kw, policy, entry.path, None, (None, None), None, t0))
    err = _failed_stage(call, owner, entry, e, state, run, hooks, prefix)
    if err is not None:
        cause = e.__cause__ if isinstance(e, StageflowError) else e
        try:
            raise err from cause
        finally:
            # (the error's traceback keeps this frame: a local of it that leads back to the error
            # would keep the error, the run and its state in a reference cycle)
            del err, e, cause


def _inline_raised(
    owner: Any,
    entry: StageEntry,
    nested: InlineCall,
    e: Exception,
    state: dict[str, Any],
    run: RunInfo,
    prefix: str,
) -> None:
    """A nested pipeline run in line raised: as :func:`_raised` after a failed pipeline call."""
    inline_failed(nested, e)
    if run._pending is not None:  # (recording the failure may read the context)
        set_up_inline(run)
    try:
        _raised(owner, entry, e, (nested.target, nested.state, None, nested.t0), state, run, (), prefix)
    finally:
        del e, nested  # (as in _raised: the error's traceback keeps this frame)


def _call_observed(
    owner: Any, entry: StageEntry, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str
) -> Any:
    call = _start(owner, entry, state, run, hooks, prefix, "forward")
    try:
        if call.policy is None:
            out = _invoke(entry, call.target, call.kw)
        else:
            out = guarded_call(owner, entry, call.target, call.kw, call.policy, run, prefix, _invoke)
    except Exception as e:
        _close(call)
        err = _failed_stage(call, owner, entry, e, state, run, hooks, prefix)
        if err is None:
            return None
        try:
            raise err from (e.__cause__ if isinstance(e, StageflowError) else e)
        finally:
            del err  # (as in _raised)
    except BaseException as e:
        _close(call)
        _interrupted(call, entry, e, hooks, run)
        raise
    _close(call)
    return _finished_stage(call, entry, out, state, run, hooks, prefix)


async def _invoke_async(entry: StageEntry, target: Any, kw: dict[str, Any]) -> Any:
    if entry.composite:
        return await acall_nested(target, kw)
    slots = leaf_slots()
    if not slots:
        return await _call_async(entry, target, kw)
    ensure_lm_caps()
    token = await aenter_leaf(slots)
    try:
        return await _call_async(entry, target, kw)
    finally:
        exit_leaf(slots, token)


async def _call_async(entry: StageEntry, target: Any, kw: dict[str, Any]) -> Any:
    if entry.predictor and _FAST.get():
        return await acall_predictor(target, kw)
    if entry.kind == FUNCTION:
        if entry.blocking:
            out = await concurrency.to_thread(target, **kw)
            if type(out) is CoroutineType:  # (an async function behind a plain wrapper)
                out = await out
            return out
        out = target(**kw)
        if entry.is_async_fn or type(out) is CoroutineType:
            out = await out
        return out
    if entry.lazy:  # (its deferred work runs as the stage's async call: see LazyResult.avalue)
        out = await (target.acall(**kw) if entry.has_aforward else concurrency.to_thread(target, **kw))
        return await _aforced(out)
    if entry.has_aforward:
        return await (acall_module(target, kw) if entry.module_call else target.acall(**kw))
    if own_acall(target):  # (an acall of yours, on the class or the instance: what awaiting it runs)
        return await target.acall(**kw)
    # A module without aforward (DSPy's BestOfN, Refine, custom ones): run it on a worker
    # thread of the shared pool, in a copy of the context (dspy.context settings follow it).
    return await concurrency.to_thread(target, **kw)


async def acall_stage(
    owner: Any, entry: StageEntry, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str
) -> Any:
    """Async twin of :func:`call_stage` (the same path line by line; the same shared bookkeeping)."""
    if entry.signature is not None and signature_replaced(owner, entry):  # (a predictor's, in place)
        entry = owner.stageflow_current(entry, "")
    if GATES[0]:
        from stageflow.budgets.scope import lm_swapped, stage_gate

        if run._pending is not None:  # (a gate may record events; the stage needs its context)
            set_up_inline(run)
        gate = stage_gate(join_path(prefix, entry.path), run.events)
        if gate is SKIP:
            return None
        if gate is not None:
            with lm_swapped(gate):
                return await _acall_observed(owner, entry, state, run, hooks, prefix)
    if hooks:
        if run._pending is not None:
            set_up_inline(run)
        return await _acall_observed(owner, entry, state, run, hooks, prefix)
    if entry.composite:
        nested = begin_inline(owner, entry, state, run, prefix, "acall")
        if nested is not None:
            try:
                inner_entries = nested[6]
                if inner_entries is None:
                    await nested[0]._arun(nested[1], nested[2], (), nested[3])  # (target, state, run, prefix)
                else:  # (all its run does: see InlineCall.entries)
                    target, inner_state, inner, inner_prefix = nested[0], nested[1], nested[2], nested[3]
                    for inner_entry in inner_entries:
                        await acall_stage(target, inner_entry, inner_state, inner, (), inner_prefix)
            except Exception as e:
                _inline_raised(owner, entry, nested, e, state, run, prefix)
                return None
            except BaseException as e:
                inline_failed(nested, e)
                _kept_interrupted(entry, e, run)
                raise
            return finish_inline(nested, entry, state, run)
    if run._pending is not None:  # this stage runs in an in-line nested run: it needs its context
        set_up_inline(run)
    target, kw, policy = _prepared(owner, entry, state, run, prefix)
    token, path_token = (
        (_STAGE.set(entry.path), None)
        if policy is None and entry.bare_leaf
        else _entered(entry, policy, prefix, target, "aforward")
    )
    t0 = perf_counter()
    try:
        if policy is not None:
            out = await aguarded_call(owner, entry, target, kw, policy, run, prefix, _invoke_async)
        elif entry.composite:
            out = await acall_nested(target, kw)
        elif (entry.direct_acall or entry.is_async_fn) and _BUDGETS.get() is None and _ROOT[0] is None:
            # the common cases (a module with aforward, an async def stage), without extra frames
            out = await (
                (acall_module(target, kw) if entry.module_call else target.acall(**kw))
                if entry.direct_acall
                else target(**kw)
            )
        else:
            out = await _invoke_async(entry, target, kw)
    except Exception as e:
        _left(token, path_token)
        _raised(owner, entry, e, (target, kw, policy, t0), state, run, hooks, prefix)
        return None
    except BaseException as e:
        _left(token, path_token)
        _exit_at(e, entry, prefix)
        _kept_interrupted(entry, e, run)
        raise
    return _succeeded(entry, out, t0, state, run, prefix, token, path_token)


async def _acall_observed(
    owner: Any, entry: StageEntry, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str
) -> Any:
    call = _start(owner, entry, state, run, hooks, prefix, "aforward")
    try:
        if call.policy is None:
            if entry.composite:
                out = await acall_nested(call.target, call.kw)
            elif entry.direct_acall and not leaf_slots():
                out = await (
                    acall_module(call.target, call.kw) if entry.module_call else call.target.acall(**call.kw)
                )
            else:
                out = await _invoke_async(entry, call.target, call.kw)
        else:
            out = await aguarded_call(
                owner, entry, call.target, call.kw, call.policy, run, prefix, _invoke_async
            )
    except Exception as e:
        _close(call)
        err = _failed_stage(call, owner, entry, e, state, run, hooks, prefix)
        if err is None:
            return None
        try:
            raise err from (e.__cause__ if isinstance(e, StageflowError) else e)
        finally:
            del err  # (as in _raised)
    except BaseException as e:
        _close(call)
        _interrupted(call, entry, e, hooks, run)
        raise
    _close(call)
    return _finished_stage(call, entry, out, state, run, hooks, prefix)


def run_sequence(
    owner: Any,
    entries: tuple[StageEntry, ...],
    state: dict[str, Any],
    run: RunInfo,
    hooks: tuple[Any, ...],
    prefix: str,
) -> None:
    """Run ``entries`` in order over one state."""
    for entry in entries:
        call_stage(owner, entry, state, run, hooks, prefix)


async def arun_sequence(
    owner: Any,
    entries: tuple[StageEntry, ...],
    state: dict[str, Any],
    run: RunInfo,
    hooks: tuple[Any, ...],
    prefix: str,
) -> None:
    """Async twin of :func:`run_sequence`."""
    for entry in entries:
        await acall_stage(owner, entry, state, run, hooks, prefix)


class _Scope(NamedTuple):
    """What one pipeline call set up around its body (hooks, inherited defaults, timing)."""

    own: tuple[Any, ...]
    hooks: tuple[Any, ...]
    hooks_token: Any
    defaults_token: Any
    prefix: str
    t0: float


# A pipeline class that does not override it activates no hooks of its own: not asked on each call.
_NO_OWN_HOOKS = StageOwner.stageflow_hooks


# What a call with no hooks and no defaults sets up: nothing (see _begin).
_PLAIN = tuple.__new__(_Scope, ((), (), None, None, "", 0.0))


def _begin(pipeline: Pipeline, inputs: dict[str, Any], prefix: str) -> _Scope:
    own = () if type(pipeline).stageflow_hooks is _NO_OWN_HOOKS else pipeline.stageflow_hooks()
    context = _HOOKS.get()
    installed = _GLOBAL[0]
    defaults = pipeline.stageflow_defaults()
    if not (own or context or installed or defaults is not None):
        return _PLAIN  # the common case: nothing to notify, set or undo
    scoped = context + own if own else context
    hooks_token = _HOOKS.set(scoped) if own else None
    hooks = installed + scoped if installed else scoped
    defaults_token = DEFAULT_POLICY.set(defaults) if defaults is not None else None
    if hooks:
        notify(hooks, "on_run_start", path=prefix, pipeline=pipeline, inputs=inputs)
    return tuple.__new__(_Scope, (own, hooks, hooks_token, defaults_token, prefix, perf_counter()))


def _end(
    pipeline: Pipeline, scope: _Scope, state: dict[str, Any] | None, error: BaseException | None
) -> None:
    if scope is _PLAIN:
        return
    if scope.hooks:
        notify(
            scope.hooks,
            "on_run_end",
            path=scope.prefix,
            pipeline=pipeline,
            outputs=state,
            error=error,
            elapsed=perf_counter() - scope.t0,
        )
    if scope.defaults_token is not None:
        DEFAULT_POLICY.reset(scope.defaults_token)
    if scope.hooks_token is not None:
        _HOOKS.reset(scope.hooks_token)


def _failed(
    pipeline: Pipeline,
    scope: _Scope,
    run: RunInfo,
    error: BaseException,
    given: tuple[tuple[str, Any], ...] | None,
) -> None:
    """A pipeline call that raised: the run so far travels with the error; observers hear of it.
    ``given``: the outermost call's inputs as its stages saw them (``None`` in a nested call)."""
    carry_run(error, run, nested=given is None)
    if given is not None and isinstance(error, StageflowError):
        note_run_failure(error, given)
    _end(pipeline, scope, None, error)
    pipeline.stageflow_failed(run, scope.own, error)


# Whether predictors in the running call take the fast path (decided by the outermost call).
_FAST: ContextVar[bool] = ContextVar("stageflow_fast_path", default=False)


def _open(pipeline: Pipeline, run: RunInfo, prefix: str) -> tuple[Any, ...]:
    """The outermost call connects DSPy's LM accounting to the run's usage table and, with the fast
    path on, gives its predictors the fast twin of the active adapter (one override of DSPy's
    settings for both); a nested call only points the accounting at its own table (see
    :mod:`stageflow.usage`). A pipeline with a run budget opens it. Returns what :func:`_close_run`
    undoes."""
    table = run.usage
    table.events = run.events  # what happens inside LM calls (waits, degradations) joins the run
    table.prefix = prefix
    spec = pipeline.lm_budget
    budget = None if spec is None else _enter_budget(spec, _run_scope(pipeline, prefix))
    if _TABLE.get() is not None:
        return (_TABLE.set(table), None, budget)
    # stageflow's usage accounting counts each LM call from its result, where DSPy's execute returns
    # it (see stageflow.usage and stageflow.budgets.intercept); after the first call, one check.
    ensure_lm_caps()
    own = pipeline.fast_path
    fast = CONFIG.fast_path if own is None else bool(own)
    adapter = fast_adapter_for(_active_adapter()) if fast else None
    return (_FAST.set(fast), open_run(table, adapter), budget)


def _enter_budget(spec: Any, scope: str) -> Any:
    from stageflow.budgets.scope import enter_budget

    return enter_budget(spec, scope)


def _run_scope(pipeline: Pipeline, prefix: str) -> str:
    where = f" at '{prefix}'" if prefix else ""
    return f"the run budget of {type(pipeline).__name__}{where}"


def _close_run(opened: tuple[Any, ...]) -> None:
    token, outer, budget = opened
    if outer is None:
        _TABLE.reset(token)
    else:
        close_run(outer)
        _FAST.reset(token)
    if budget is not None:
        from stageflow.budgets.scope import exit_budget

        exit_budget(budget)


def _active_adapter() -> Any:
    """``dspy.settings.adapter``, read the way DSPy's settings object reads it."""
    return setting("adapter")


def _entering(pipeline: Pipeline) -> tuple[Any, str, tuple[Any, ...] | None]:
    """What a pipeline call starts from: the carried context it adopts (called from a DSPy worker
    thread), its path, and the stage whose own code called it (not the engine), whose usage its
    usage is too."""
    carried = adopt() if _TABLE.get() is None else None
    prefix = _PATH.get()
    if type(prefix) is _EnginePath:
        engine = prefix.target is pipeline and prefix.table is _TABLE.get()  # (see _EnginePath)
        caller = None if engine else calling_stage()
        return carried, str(prefix), caller  # (records keep the path, not the pipeline it marks)
    caller = calling_stage()
    if caller is not None and caller[2]:  # (in a thread of dspy.Parallel that a stage started)
        prefix = caller[2]
    return carried, prefix, caller


def _closing(opened: tuple[Any, ...], caller: tuple[Any, ...] | None, run: RunInfo) -> None:
    _close_run(opened)
    if caller is not None:
        caller[0].add_usage(caller[1], run.usage.total)


def execute(pipeline: Pipeline, inputs: dict[str, Any], body: Body) -> Result:
    """Run one pipeline call: fresh state from ``inputs``, ``body`` runs the stages."""
    carried, prefix, caller = _entering(pipeline)
    # The outermost call works on private copies: stages cannot change the caller's lists and dicts.
    # (A nested pipeline shares its values with the state of the pipeline around it, like any stage.)
    state = dict(inputs) if prefix else private_state(inputs)
    given = None if prefix else tuple(state.items())  # (what the caller gave, as the stages see it)
    run = RunInfo()
    scope = _begin(pipeline, inputs, prefix)
    opened = _open(pipeline, run, prefix)
    try:
        body(state, run, scope.hooks, prefix)
    except BaseException as e:
        _closing(opened, caller, run)
        try:
            _failed(pipeline, scope, run, e, given)
        finally:
            release(carried)
        raise
    _closing(opened, caller, run)
    if scope is not _PLAIN:
        _end(pipeline, scope, state, None)
    if carried is not None:
        release(carried)
    return pipeline.stageflow_result(state, run, scope.own)


async def aexecute(pipeline: Pipeline, inputs: dict[str, Any], body: ABody) -> Result:
    """Async twin of :func:`execute`."""
    carried, prefix, caller = _entering(pipeline)
    # The outermost call works on private copies: stages cannot change the caller's lists and dicts.
    # (A nested pipeline shares its values with the state of the pipeline around it, like any stage.)
    state = dict(inputs) if prefix else private_state(inputs)
    given = None if prefix else tuple(state.items())
    run = RunInfo()
    scope = _begin(pipeline, inputs, prefix)
    opened = _open(pipeline, run, prefix)
    try:
        await body(state, run, scope.hooks, prefix)
    except BaseException as e:
        _closing(opened, caller, run)
        try:
            _failed(pipeline, scope, run, e, given)
        finally:
            release(carried)
        raise
    _closing(opened, caller, run)
    if scope is not _PLAIN:
        _end(pipeline, scope, state, None)
    if carried is not None:
        release(carried)
    return pipeline.stageflow_result(state, run, scope.own)
