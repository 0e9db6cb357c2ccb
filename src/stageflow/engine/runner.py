"""The one engine: calls stages (sync and async), merges their outputs, fires hooks.

Every pattern runs its stages through :func:`call_stage` / :func:`acall_stage` (or the
sequence helpers built on them) and every pipeline call goes through :func:`execute` /
:func:`aexecute`. Nothing else in stageflow calls a stage.

Hot path: with no hooks active, a stage costs one dict comprehension for its inputs, one
call, one loop over its outputs and one record; paths, hook payloads and timing details are
only built when a hook listens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

import dspy

from stageflow.engine.concurrency import aenter_leaf, enter_leaf, exit_leaf, leaf_slots
from stageflow.engine.hooks import _HOOKS, _PATH, notify
from stageflow.engine.plan import FUNCTION, StageEntry, join_path
from stageflow.errors import ContractError, StageError, StageflowError
from stageflow.state import Result, RunInfo, StageRecord

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


def _held(owner: Any, entry: StageEntry) -> Any:
    """The stage object as the pipeline holds it (a module, Stage wrapper or FunctionStage)."""
    obj = _getattr(owner, entry.attr)
    if entry.key is not None:
        obj = obj[entry.key]
    return obj


def _resolve(owner: Any, entry: StageEntry) -> Any:
    """What the engine calls: the held object, unwrapped along ``entry.chain``."""
    obj = _held(owner, entry)
    for name in entry.chain:
        obj = _getattr(obj, name)
    return obj


def _inputs(entry: StageEntry, state: dict[str, Any]) -> dict[str, Any]:
    if entry.pass_state:
        return dict(state)
    try:
        kw = {sf: state[st] for sf, st in entry.in_pairs}
    except KeyError as e:
        raise ContractError(
            f"Stage '{entry.path}' ({entry.label}) needs input '{e.args[0]}', which is not in the state "
            f"at run time. State fields: {sorted(state)}.",
            stage_path=entry.path,
            field=str(e.args[0]),
            code="missing_input",
            hint="an earlier stage with undeclared outputs did not produce it; declare outputs with "
            "Stage(<stage>, writes=[...])",
        ) from None
    for sf, st in entry.opt_pairs:
        if st in state:
            kw[sf] = state[st]
    return kw


def _is_record(out: Any) -> bool:
    return isinstance(out, Mapping | dspy.Example) or hasattr(out, "model_dump")


def _merge(entry: StageEntry, out: Any, state: dict[str, Any], run: RunInfo) -> None:
    if isinstance(out, Result) and not entry.out_rename:
        # A nested stageflow pipeline: its whole final state merges, its records join the trace.
        state.update(out._store)
        prefix = entry.path
        run.trace.extend(StageRecord(join_path(prefix, r.path), r.elapsed, r.ok) for r in out.run.trace)
        return
    pairs = entry.out_pairs
    if pairs is not None:
        if entry.single_output is not None and not _is_record(out):
            state[entry.single_output] = out
            return
        try:
            for sf, st in pairs:
                state[st] = out[sf]
        except (KeyError, TypeError, IndexError, AttributeError):
            _merge_slow(entry, out, state, pairs)
        return
    if not _is_record(out):
        raise StageError(
            f"Stage '{entry.path}' ({entry.label}) returned {type(out).__name__}, which has no named fields. "
            "Return a dict or dspy.Prediction, or declare the single output it produces.",
            stage_path=entry.path,
            code="bad_output",
            hint="Stage(<stage>, writes=['answer']) stores a single returned value as 'answer'",
        )
    rename = dict(entry.out_rename)
    for k, v in _items(out):
        state[rename.get(k, k)] = v


def _items(out: Any) -> list[tuple[str, Any]]:
    if isinstance(out, dspy.Example):
        return list(out._store.items())
    if isinstance(out, Mapping):
        return list(out.items())
    return [(k, getattr(out, k)) for k in type(out).model_fields]


def _merge_slow(
    entry: StageEntry, out: Any, state: dict[str, Any], pairs: tuple[tuple[str, str], ...]
) -> None:
    if not _is_record(out):
        raise StageError(
            f"Stage '{entry.path}' ({entry.label}) returned {type(out).__name__}; expected fields "
            f"{[sf for sf, _ in pairs]}.",
            stage_path=entry.path,
            code="bad_output",
            hint="return a dict or dspy.Prediction with those fields",
        )
    got = dict(_items(out))
    for sf, st in pairs:
        if sf not in got:
            raise ContractError(
                f"Stage '{entry.path}' ({entry.label}) declares output '{sf}' but did not return it. "
                f"It returned: {sorted(got)}.",
                stage_path=entry.path,
                field=sf,
                code="missing_output",
                hint=f"return '{sf}' from the stage, or fix its writes=[...] declaration",
            )
        state[st] = got[sf]


def _fail(entry: StageEntry, error: Exception) -> StageflowError:
    if isinstance(error, StageflowError):
        return error.with_path_prefix(entry.path)
    wrapped = StageError(
        f"Stage '{entry.path}' ({entry.label}) raised {type(error).__name__}: {error}",
        stage_path=entry.path,
        code="stage_failed",
    )
    wrapped.__cause__ = error
    return wrapped


def _invoke(entry: StageEntry, target: Any, kw: dict[str, Any]) -> Any:
    """Call the stage; a leaf takes a slot of every concurrency budget in force."""
    if entry.composite:
        return target(**kw)
    slots = leaf_slots()
    if not slots:
        return target(**kw)
    token = enter_leaf(slots)
    try:
        return target(**kw)
    finally:
        exit_leaf(slots, token)


def call_stage(
    owner: Any, entry: StageEntry, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str
) -> Any:
    """Run one stage of ``owner`` over ``state`` (sync) and merge its outputs into it."""
    target = _resolve(owner, entry)
    kw = _inputs(entry, state)
    if hooks:
        return _call_observed(owner, entry, target, kw, state, run, hooks, prefix)
    t0 = perf_counter()
    try:
        out = _invoke(entry, target, kw)
    except Exception as e:
        run.trace.append(StageRecord(entry.path, perf_counter() - t0, False))
        raise _fail(entry, e) from (e.__cause__ if isinstance(e, StageflowError) else e)
    run.trace.append(StageRecord(entry.path, perf_counter() - t0))
    run.stage_outputs[entry.path] = out
    _merge(entry, out, state, run)
    return out


def _call_observed(
    owner: Any,
    entry: StageEntry,
    target: Any,
    kw: dict[str, Any],
    state: dict[str, Any],
    run: RunInfo,
    hooks: tuple[Any, ...],
    prefix: str,
) -> Any:
    path = join_path(prefix, entry.path)
    stage = _held(owner, entry)
    notify(hooks, "before_stage", path=path, stage=stage, inputs=kw)
    token = _PATH.set(path)
    t0 = perf_counter()
    try:
        out = _invoke(entry, target, kw)
    except Exception as e:
        elapsed = perf_counter() - t0
        run.trace.append(StageRecord(entry.path, elapsed, False))
        notify(hooks, "on_stage_error", path=path, stage=stage, inputs=kw, error=e, elapsed=elapsed)
        raise _fail(entry, e) from (e.__cause__ if isinstance(e, StageflowError) else e)
    finally:
        _PATH.reset(token)
    elapsed = perf_counter() - t0
    run.trace.append(StageRecord(entry.path, elapsed))
    run.stage_outputs[entry.path] = out
    _merge(entry, out, state, run)
    notify(hooks, "after_stage", path=path, stage=stage, inputs=kw, outputs=out, elapsed=elapsed)
    return out


async def _invoke_async(entry: StageEntry, target: Any, kw: dict[str, Any]) -> Any:
    if entry.composite:
        return await _invoke_async_unlimited(entry, target, kw)
    slots = leaf_slots()
    if not slots:
        return await _invoke_async_unlimited(entry, target, kw)
    token = await aenter_leaf(slots)
    try:
        return await _invoke_async_unlimited(entry, target, kw)
    finally:
        exit_leaf(slots, token)


async def _invoke_async_unlimited(entry: StageEntry, target: Any, kw: dict[str, Any]) -> Any:
    if entry.kind == FUNCTION:
        out = _invoke(entry, target, kw)
        if entry.is_async_fn:
            out = await out
        return out
    if entry.has_aforward:
        return await target.acall(**kw)
    # A module without aforward (DSPy's BestOfN, Refine, custom ones): run it on a worker
    # thread; asyncio.to_thread copies the context, so dspy.context settings follow it.
    return await asyncio.to_thread(target, **kw)


async def acall_stage(
    owner: Any, entry: StageEntry, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str
) -> Any:
    """Async twin of :func:`call_stage`."""
    target = _resolve(owner, entry)
    kw = _inputs(entry, state)
    path = join_path(prefix, entry.path) if hooks else entry.path
    stage = _held(owner, entry) if hooks else None
    token = None
    if hooks:
        notify(hooks, "before_stage", path=path, stage=stage, inputs=kw)
        token = _PATH.set(path)
    t0 = perf_counter()
    try:
        out = await _invoke_async(entry, target, kw)
    except Exception as e:
        elapsed = perf_counter() - t0
        run.trace.append(StageRecord(entry.path, elapsed, False))
        if hooks:
            notify(hooks, "on_stage_error", path=path, stage=stage, inputs=kw, error=e, elapsed=elapsed)
        raise _fail(entry, e) from (e.__cause__ if isinstance(e, StageflowError) else e)
    finally:
        if token is not None:
            _PATH.reset(token)
    elapsed = perf_counter() - t0
    run.trace.append(StageRecord(entry.path, elapsed))
    run.stage_outputs[entry.path] = out
    _merge(entry, out, state, run)
    if hooks:
        notify(hooks, "after_stage", path=path, stage=stage, inputs=kw, outputs=out, elapsed=elapsed)
    return out


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


def _begin(
    pipeline: Pipeline, inputs: dict[str, Any]
) -> tuple[tuple[Any, ...], tuple[Any, ...], Any, str, float]:
    own = pipeline._run_hooks()
    hooks = _HOOKS.get() + own if own else _HOOKS.get()
    token = _HOOKS.set(hooks) if own else None
    prefix = _PATH.get() if hooks else ""
    if hooks:
        notify(hooks, "on_run_start", path=prefix, pipeline=pipeline, inputs=inputs)
    return own, hooks, token, prefix, perf_counter()


def _end(
    pipeline: Pipeline,
    hooks: tuple[Any, ...],
    token: Any,
    prefix: str,
    t0: float,
    state: dict[str, Any] | None,
    error: BaseException | None,
) -> None:
    if hooks:
        notify(
            hooks,
            "on_run_end",
            path=prefix,
            pipeline=pipeline,
            outputs=state,
            error=error,
            elapsed=perf_counter() - t0,
        )
    if token is not None:
        _HOOKS.reset(token)


def execute(pipeline: Pipeline, inputs: dict[str, Any], body: Body) -> Result:
    """Run one pipeline call: fresh state from ``inputs``, ``body`` runs the stages."""
    state = dict(inputs)
    run = RunInfo()
    own, hooks, token, prefix, t0 = _begin(pipeline, inputs)
    try:
        body(state, run, hooks, prefix)
    except BaseException as e:
        _end(pipeline, hooks, token, prefix, t0, None, e)
        raise
    _end(pipeline, hooks, token, prefix, t0, state, None)
    return pipeline._make_result(state, run, own)


async def aexecute(pipeline: Pipeline, inputs: dict[str, Any], body: ABody) -> Result:
    """Async twin of :func:`execute`."""
    state = dict(inputs)
    run = RunInfo()
    own, hooks, token, prefix, t0 = _begin(pipeline, inputs)
    try:
        await body(state, run, hooks, prefix)
    except BaseException as e:
        _end(pipeline, hooks, token, prefix, t0, None, e)
        raise
    _end(pipeline, hooks, token, prefix, t0, state, None)
    return pipeline._make_result(state, run, own)
