"""Stage calls under policies: timeout, retry, repair and fallback (see ``stageflow.policies``).

Only entries with a policy come here; the plain fast path in :mod:`runner` is untouched.

A timed call first takes its concurrency slots (``stageflow.limits``, fan-out caps), then starts
its clock: waiting for a slot is not run time. A sync timed call runs on a spare thread
(:mod:`stageflow.engine.spare`), never on the shared pool its own fan-out may fill; an async one
sends its blocking parts there too (:func:`~stageflow.engine.pool.spare_threads`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import dspy

from stageflow.engine import concurrency, spare
from stageflow.engine.boundary import private_state
from stageflow.engine.concurrency import aenter_leaf, enter_leaf, exit_leaf, leaf_slots
from stageflow.engine.inline import interrupted_run
from stageflow.engine.plan import StageEntry, held, join_path
from stageflow.engine.pool import abandon, spare_threads
from stageflow.engine.stopping import abandonable
from stageflow.engine.streaming import lending, loop_token
from stageflow.errors import BudgetExceeded, ContractError, StageError, StageflowError, StageTimeoutError
from stageflow.policies.cache import is_collecting_traces, make_key, output_problem
from stageflow.policies.recovery import Fallback, PolicyEvent, StagePolicy, TimeoutPolicy, retry_after
from stageflow.stages import (
    Stage,
    end_watch,
    enter_applied,
    leave_applied,
    missing_output_error,
    note_degraded,
    watch_attempt,
    watch_degraded,
)
from stageflow.state import Result, RunInfo
from stageflow.usage import note_policy_event

__all__ = ["aguarded_call", "guarded_call"]


_MISS = object()


def _cache_only(policy: StagePolicy) -> bool:
    """No retry, repair, timeout or fallback: a miss is one plain call."""
    return (
        policy.retry is None and policy.repair is None and policy.timeout is None and policy.fallback is None
    )


def _from_cache(
    policy: StagePolicy, entry: StageEntry, path: str, target: Any, kw: dict[str, Any], run: RunInfo
) -> tuple[Any, Callable[[Any], None] | None]:
    """``(a fresh copy of the cached output, None)`` on a hit; ``(_MISS, store)`` on a miss, where
    ``store(out)`` keeps a private copy of the call's output (the caller does not call it when a
    policy replaced a failure during the call: see ``stageflow.stages.note_degraded``);
    ``(_MISS, None)`` without a cache, while traces are collected, or for an input that cannot be
    keyed exactly (the cache has warned once)."""
    cache = policy.cache
    if cache is None or is_collecting_traces():
        return _MISS, None
    keys = make_key(path, target, kw, cache, f"'{path}' ({entry.label})")
    if keys is None:
        return _MISS, None
    if cache.persistent is None:
        found, value = cache.lookup(keys.memory, keys.durable)
    else:  # an entry from the file must be an output this stage could have returned
        found, value = cache.lookup(
            keys.memory, keys.durable, _declared_fit(entry), f"'{path}' ({entry.label})"
        )
    if found:
        run.events.append(PolicyEvent(path, "cache_hit"))
        note_policy_event("cache_hit")
        return value, None

    def store(out: Any) -> None:
        if keys.after_call():
            cache.store(keys.memory, keys.durable, out, path)

    return _MISS, store


def _declared_fit(entry: StageEntry) -> Callable[[Any], str | None]:
    """What a persistent cache entry must be for this stage (see :func:`output_problem`)."""
    fields = None if entry.out_pairs is None else [sf for sf, _ in entry.out_pairs]
    return functools.partial(output_problem, fields=fields, single=entry.single_output is not None)


def _check_declared(entry: StageEntry, out: Any, path: str) -> Any:
    """Under a repair policy, a missing declared output is a contract failure inside the attempt
    loop (so it can be repaired), not after it."""
    pairs = entry.out_pairs
    if pairs is None or (entry.single_output is not None and not isinstance(out, dict | dspy.Example)):
        return out
    have = out._store if isinstance(out, dspy.Example) else out if isinstance(out, dict) else None
    if have is None:
        return out
    missing = [sf for sf, _ in pairs if sf not in have]
    if missing:
        err = missing_output_error(f"Stage '{path}' ({entry.label})", missing[0], have, path)
        err.path_is_full = True
        raise err
    return out


def _storable(out: Any, policy: StagePolicy, entry: StageEntry) -> bool:
    """Whether a cache may keep ``out``: not when it reports an error in its error field (a
    ``StandardStage``'s ``error``), which is a failure even where nothing raised it (on its own)."""
    field = policy.error_field or (entry.policy.error_field if entry.policy is not None else None)
    return field is None or not reported_error(out, field)


def reported_error(out: Any, field: str) -> Any:
    """The value of a stage result's error field (``None`` when it has none)."""
    if isinstance(out, dspy.Example):
        return out._store.get(field)
    if isinstance(out, dict):
        return out.get(field)
    if hasattr(out, "model_dump"):
        return getattr(out, field, None)
    return None


def _check_reported(policy: StagePolicy, out: Any, path: str, entry: StageEntry) -> Any:
    """A result whose error field is set is a failure (recovery, logging and fallbacks apply)."""
    if policy.error_field is None:
        return out
    error = reported_error(out, policy.error_field)
    if error:
        message = (
            f"Stage '{path}' ({entry.label}) reported an error in its '{policy.error_field}' field: {error}"
        )
        err: StageError | ContractError
        if getattr(out, "_error_code", None) == "invalid_output":  # its output broke its schema: repairable
            err = ContractError(message, stage_path=path, field=policy.error_field, code="invalid_output")
        else:
            err = StageError(message, stage_path=path, field=policy.error_field, code="stage_reported_error")
        err.path_is_full = True
        raise err
    return out


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _repair_adapter(feedback: str) -> Any:
    """The active adapter, with the last user message followed by the validation error."""
    base = dspy.settings.adapter or dspy.ChatAdapter()

    class RepairAdapter(type(base)):  # type: ignore[misc]
        def format(self, signature: Any, demos: Any, inputs: Any) -> Any:
            messages = super().format(signature, demos, inputs)
            messages[-1]["content"] += (
                f"\n\nYour previous answer could not be used: {feedback}\n"
                "Answer again, following the required output format exactly."
            )
            return messages

    adapter = RepairAdapter.__new__(RepairAdapter)
    adapter.__dict__.update(base.__dict__)
    return adapter


def _varied(target: Any, kw: dict[str, Any], attempt: int) -> dict[str, Any]:
    """Later attempts of a predictor get a new ``rollout_id`` (a fresh sample, same object)."""
    if attempt > 1 and isinstance(target, dspy.Predict | dspy.ChainOfThought):
        config = dict(kw.get("config") or {})
        config["rollout_id"] = attempt
        return {**kw, "config": config}
    return kw


def _timeout_error(path: str, seconds: float, label: str) -> StageTimeoutError:
    err = StageTimeoutError(
        f"Stage '{path}' ({label}) took longer than its timeout of {seconds}s.",
        stage_path=path,
        hint="raise TimeoutPolicy(seconds=...), or add a RetryPolicy/Fallback for slow calls",
    )
    err.path_is_full = True
    return err


def _fallback_failed(entry: StageEntry, path: str, original: Exception, failed: Exception) -> StageError:
    """The error for a fallback that could not replace a failure: it names both errors, and the
    caller raises it ``from`` the original one."""

    def brief(error: Exception) -> str:  # without the error's own "Fix:" line
        return f"{type(error).__name__}: {error.message if isinstance(error, StageflowError) else error}"

    err = StageError(
        f"Stage '{path}' ({entry.label}) failed with {brief(original)}; its fallback could not "
        f"replace the result: {brief(failed)}",
        stage_path=path,
        code="fallback_failed",
        hint="make the fallback return every output the stage declares"
        if isinstance(failed, ContractError)
        else "fix the fallback stage (it raised too), or the stage itself",
    )
    err.path_is_full = True
    return err


def _fallback_target(owner: Any, entry: StageEntry) -> Any:
    return held(owner, entry).fallback_stage


def _renaming(owner: Any, entry: StageEntry) -> Stage | None:
    """The :class:`Stage` the engine calls as a module (a subclass of yours, a ``Stage`` around a
    ``Stage``) when it renames fields: its call takes and gives the renamed names, while its
    fallback, like any ``Stage``'s, takes and gives the stage's own."""
    stage = held(owner, entry)
    if entry.chain or not isinstance(stage, Stage) or not (stage.input_map or stage.output_map):
        return None
    return stage


def _fallback_inputs(stage: Stage | None, kw: dict[str, Any]) -> dict[str, Any]:
    if stage is None or not stage.input_map:
        return kw
    inverse = {v: k for k, v in stage.input_map.items()}
    return {inverse.get(k, k): v for k, v in kw.items()}


def _fallback(owner: Any, entry: StageEntry, kw: dict[str, Any], fallback: Fallback) -> Any:
    """The output that replaces a failed call: the fallback's default or its stage's output."""
    stage = _renaming(owner, entry)
    if fallback.default is not None:
        out: Any = private_state(
            dict(fallback.default)
        )  # (a call's own copy: no call sees another's changes)
    else:
        out = _fallback_target(owner, entry)(**_fallback_inputs(stage, kw))
    return out if stage is None else stage._rename_outputs(out)


def guarded_call(
    owner: Any,
    entry: StageEntry,
    target: Any,
    kw: dict[str, Any],
    policy: StagePolicy,
    run: RunInfo,
    prefix: str,
    invoke: Callable[[StageEntry, Any, dict[str, Any]], Any],
) -> Any:
    """Call a stage (sync) under ``policy``; raises the last error once every policy is spent."""
    # (a Stage subclass of yours, called as a module: its own forward knows they are applied)
    token = enter_applied(target) if isinstance(target, Stage) else None
    try:
        path = join_path(prefix, entry.path)
        if policy.budget is not None:  # the stage's own LM budget holds for the call, retries included
            opened = _stage_budget(policy, path)
            try:
                return _guarded(owner, entry, target, kw, policy, run, path, invoke)
            finally:
                _exit_budget(opened)
        return _guarded(owner, entry, target, kw, policy, run, path, invoke)
    finally:
        if token is not None:
            leave_applied(token)


def _stage_budget(policy: StagePolicy, path: str) -> Any:
    from stageflow.budgets.scope import enter_budget

    assert policy.budget is not None  # callers check
    return enter_budget(policy.budget, f"the budget of stage '{path}'")


def _exit_budget(opened: Any) -> None:
    from stageflow.budgets.scope import exit_budget

    exit_budget(opened)


def _guarded(
    owner: Any,
    entry: StageEntry,
    target: Any,
    kw: dict[str, Any],
    policy: StagePolicy,
    run: RunInfo,
    path: str,
    invoke: Callable[[StageEntry, Any, dict[str, Any]], Any],
) -> Any:
    cached, store = _from_cache(policy, entry, path, target, kw, run)
    if cached is not _MISS:
        return cached
    # (a failure replaced here or in a stage inside — fallback, recovery, skip: nothing is cached)
    watch = None if store is None else watch_degraded()
    try:
        if _cache_only(policy):
            out = _check_reported(policy, invoke(entry, target, kw), path, entry)
        else:
            out = _attempts(owner, entry, target, kw, policy, run, path, invoke)
    finally:
        if watch is not None:
            end_watch(*watch)
    if store is not None and watch is not None and not watch[0] and _storable(out, policy, entry):
        store(out)
    return out


class _Attempts:
    """The attempt bookkeeping shared by the sync and async loops: what to do after an error."""

    def __init__(self, policy: StagePolicy, run: RunInfo, path: str, entry: StageEntry) -> None:
        self.policy, self.run, self.path, self.entry = policy, run, path, entry
        self.attempt = 0
        self.repairs = 0
        self.feedback: str | None = None
        self.started = policy.retry.clock() if policy.retry is not None else 0.0
        self.failed_runs: list[RunInfo] = []  # a nested pipeline's failed attempts (see used)

    def used(self, out: Any, error: BaseException | None = None) -> Any:
        """A nested pipeline's attempts that failed made LM calls too: their usage joins the run of
        the attempt that answered (``out``, a result), the run of the error given up with
        (``error``), or, after a fallback, this run under the stage's path. Returns ``out``."""
        runs, self.failed_runs = self.failed_runs, []
        if not runs:
            return out
        into = out.run if isinstance(out, Result) else getattr(error, "run", None)
        for nested in runs:
            if isinstance(into, RunInfo) and into is not nested:
                into.absorb_usage(nested)
            else:  # (a fallback's output: the stage's own row, which its observers are told)
                self.run.usage.charge(self.entry.path, nested.usage.total)
        return out

    def next_kw(self, target: Any, kw: dict[str, Any]) -> dict[str, Any]:
        self.attempt += 1
        return _varied(target, kw, self.attempt)

    def after_error(self, e: Exception) -> float | None:
        """Seconds to wait before retrying (0 for a repair), or ``None`` to give up."""
        retry, repair = self.policy.retry, self.policy.repair
        if isinstance(e, BudgetExceeded):
            return None  # a spent budget stays spent: no retry or repair (whatever retry_on says)
        tries = self.attempt - self.repairs
        if retry is not None and tries < retry.max_attempts and retry.should_retry(e):
            delay = retry.delay(tries, e)
            if retry.max_elapsed is not None and retry.clock() + delay - self.started > retry.max_elapsed:
                return None  # the wait would end past the time budget: give up now, never wait it out
            hinted = retry_after(e)
            detail = {} if hinted is None else {"retry_after": hinted}  # what the server asked for
            self.run.events.append(PolicyEvent(self.path, "retry", self.attempt, _describe(e), delay, detail))
            note_policy_event("retry")
            return delay
        if repair is not None and self.repairs < repair.max_repairs and repair.should_repair(e):
            self.repairs += 1
            self.feedback = str(e)[:500]
            self.run.events.append(PolicyEvent(self.path, "repair", self.attempt, _describe(e)))
            note_policy_event("repair")
            return 0.0
        return None

    def retrying(self, error: Exception, delay: float | None) -> float | None:
        """:meth:`after_error`'s verdict, keeping the run of a nested pipeline's failed attempt when it
        is retried or replaced (see :meth:`used`)."""
        nested = getattr(error, "run", None) if self.entry.composite else None
        if (
            isinstance(nested, RunInfo)
            and nested is not self.run
            and (delay is not None or self.policy.fallback)
        ):
            self.failed_runs.append(nested)
        return delay

    def give_up(self, error: Exception) -> Any:
        """Record the failure; return the fallback to use (``None``: re-raise)."""
        if isinstance(error, StageTimeoutError):
            self.run.events.append(PolicyEvent(self.path, "timeout", self.attempt, _describe(error)))
        if self.policy.fallback is not None:
            self.run.events.append(PolicyEvent(self.path, "fallback", self.attempt, _describe(error)))
        return self.policy.fallback

    def adapter_context(self) -> Any:
        if self.feedback is None:
            return contextlib.nullcontext()
        return dspy.context(adapter=_repair_adapter(self.feedback))


def _attempts(
    owner: Any,
    entry: StageEntry,
    target: Any,
    kw: dict[str, Any],
    policy: StagePolicy,
    run: RunInfo,
    path: str,
    invoke: Callable[[StageEntry, Any, dict[str, Any]], Any],
) -> Any:
    state = _Attempts(policy, run, path, entry)
    while True:
        call_kw = state.next_kw(target, kw)
        watch = watch_attempt()  # (a failed attempt's replaced failures do not make the output's)
        try:
            with state.adapter_context():
                out = _with_timeout(entry, target, call_kw, policy.timeout, path, invoke)
            out = _check_reported(policy, out, path, entry)
            out = _check_declared(entry, out, path) if policy.repair is not None else out
            if watch is not None:
                end_watch(*watch)
            return state.used(out)
        except BaseException as e:
            if watch is not None:
                end_watch(*watch, used=False)
            if not isinstance(e, Exception):
                raise
            delay = state.retrying(e, state.after_error(e))
            if delay is None:
                fallback = state.give_up(e)
                if fallback is None:
                    state.used(None, e)
                    raise
                try:
                    out = _check_declared(entry, _fallback(owner, entry, kw, fallback), path)
                    note_degraded()
                    return state.used(out)
                except Exception as failed:
                    raise _fallback_failed(entry, path, e, failed) from e
            if delay and policy.retry is not None:
                policy.retry.sleep(delay)


def _with_timeout(
    entry: StageEntry,
    target: Any,
    kw: dict[str, Any],
    timeout: TimeoutPolicy | None,
    path: str,
    invoke: Callable[[StageEntry, Any, dict[str, Any]], Any],
) -> Any:
    if timeout is None:
        return invoke(entry, target, kw)
    ctx = contextvars.copy_context()
    slots = () if entry.composite else leaf_slots()
    if slots:
        ctx.run(enter_leaf, slots)  # wait for the concurrency slots here, before the clock starts

    token = loop_token()  # under dspy.streamify: the spare thread may send chunks to its stream

    def call() -> Any:
        try:
            with lending(token):
                return ctx.run(invoke, entry, target, kw)  # the slots are held: invoke takes none
        finally:
            for budget in reversed(slots):  # freed when the call ends, even after it was abandoned
                budget.release()

    with abandonable(ctx) as signal:  # (abandoned at the timeout, it stops what it started)
        return spare.call_within(
            call,
            timeout.seconds,
            on_abandon=lambda: abandon(signal, "its timeout passed"),
            timeout_error=lambda: _timeout_error(path, timeout.seconds, entry.label),
        )


async def aguarded_call(
    owner: Any,
    entry: StageEntry,
    target: Any,
    kw: dict[str, Any],
    policy: StagePolicy,
    run: RunInfo,
    prefix: str,
    invoke: Callable[[StageEntry, Any, dict[str, Any]], Awaitable[Any]],
) -> Any:
    """Async twin of :func:`guarded_call` (timeouts cancel the call)."""
    token = enter_applied(target) if isinstance(target, Stage) else None
    try:
        path = join_path(prefix, entry.path)
        if policy.budget is not None:
            opened = _stage_budget(policy, path)
            try:
                return await _aguarded(owner, entry, target, kw, policy, run, path, invoke)
            finally:
                _exit_budget(opened)
        return await _aguarded(owner, entry, target, kw, policy, run, path, invoke)
    finally:
        if token is not None:
            leave_applied(token)


async def _aguarded(
    owner: Any,
    entry: StageEntry,
    target: Any,
    kw: dict[str, Any],
    policy: StagePolicy,
    run: RunInfo,
    path: str,
    invoke: Callable[[StageEntry, Any, dict[str, Any]], Awaitable[Any]],
) -> Any:
    cached, store = _from_cache(policy, entry, path, target, kw, run)
    if cached is not _MISS:
        return cached
    watch = None if store is None else watch_degraded()
    try:
        if _cache_only(policy):
            out = _check_reported(policy, await invoke(entry, target, kw), path, entry)
        else:
            out = await _aattempts(owner, entry, target, kw, policy, run, path, invoke)
    finally:
        if watch is not None:
            end_watch(*watch)
    if store is not None and watch is not None and not watch[0] and _storable(out, policy, entry):
        store(out)
    return out


async def _aattempts(
    owner: Any,
    entry: StageEntry,
    target: Any,
    kw: dict[str, Any],
    policy: StagePolicy,
    run: RunInfo,
    path: str,
    invoke: Callable[[StageEntry, Any, dict[str, Any]], Awaitable[Any]],
) -> Any:
    state = _Attempts(policy, run, path, entry)
    while True:
        call_kw = state.next_kw(target, kw)
        watch = watch_attempt()  # (a failed attempt's replaced failures do not make the output's)
        try:
            with state.adapter_context():
                out = await _awith_timeout(entry, target, call_kw, policy.timeout, path, invoke)
            out = _check_reported(policy, out, path, entry)
            out = _check_declared(entry, out, path) if policy.repair is not None else out
            if watch is not None:
                end_watch(*watch)
            return state.used(out)
        except BaseException as e:
            if watch is not None:
                end_watch(*watch, used=False)
            if not isinstance(e, Exception):
                raise
            delay = state.retrying(e, state.after_error(e))
            if delay is None:
                fallback = state.give_up(e)
                if fallback is None:
                    state.used(None, e)
                    raise
                try:
                    out = _check_declared(entry, await _afallback(owner, entry, kw, fallback), path)
                    note_degraded()
                    return state.used(out)
                except Exception as failed:
                    raise _fallback_failed(entry, path, e, failed) from e
            if delay and policy.retry is not None:
                await (policy.retry.asleep or asyncio.sleep)(delay)


async def _afallback(owner: Any, entry: StageEntry, kw: dict[str, Any], fallback: Fallback) -> Any:
    stage = _renaming(owner, entry)
    if fallback.default is not None:
        out: Any = private_state(
            dict(fallback.default)
        )  # (a call's own copy: no call sees another's changes)
    else:
        fb = _fallback_target(owner, entry)
        call = _fallback_inputs(stage, kw)
        out = await fb.acall(**call) if hasattr(fb, "aforward") else await concurrency.to_thread(fb, **call)
    return out if stage is None else stage._rename_outputs(out)


async def _awith_timeout(
    entry: StageEntry,
    target: Any,
    kw: dict[str, Any],
    timeout: TimeoutPolicy | None,
    path: str,
    invoke: Callable[[StageEntry, Any, dict[str, Any]], Awaitable[Any]],
) -> Any:
    if timeout is None:
        return await invoke(entry, target, kw)
    slots = () if entry.composite else leaf_slots()
    token = await aenter_leaf(slots) if slots else None  # waiting for a slot is not run time
    clock = asyncio.timeout(timeout.seconds)
    try:
        with spare_threads():  # a blocking part neither waits for nor keeps a shared-pool worker
            async with clock:
                return await invoke(entry, target, kw)
    except TimeoutError as e:
        if clock.expired():
            err = _timeout_error(path, timeout.seconds, entry.label)
            if entry.composite:  # (what the nested pipeline did before it was stopped stays counted)
                err.run = interrupted_run(e)
            try:
                raise err from None
            finally:
                del err  # (its traceback keeps this frame: no cycle through it)
        raise  # the stage itself raised a TimeoutError
    finally:
        if token is not None:
            exit_leaf(slots, token)
