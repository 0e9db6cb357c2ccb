"""Bare tasks: a wide fan-out of an ``async def`` function stage, one task per call and little else.

A fan-out branch normally runs as a task that awaits the engine's stage call
(:func:`~stageflow.engine.runner.acall_stage`), which awaits the stage's coroutine, and each branch
gets a :class:`~stageflow.state.RunInfo` of its own. For the widest fan-outs — a ``ForEach`` over
thousands of elements — what each branch keeps alive while it waits decides the run time: every
live container is promoted through the garbage collector's generations, and past a few thousand
branches the promotions trigger full collections, each of which walks every object of the process.

When nothing needs the engine's wrapping around the await — the branches are plain ``async def``
function stages, and there are no hooks, no policy, no budget or concurrency cap that a call could
wait on, no timeout and no early stop — :func:`abare_fan_out` makes the stage's own coroutine the
task. It takes the same steps :func:`~stageflow.engine.runner.acall_stage` takes, in the same order:
inputs gathered before the call, the stage's path set in the task's context (LM work inside is
attributed to it), and the trace record, output merge or failure in the task's done callback. The
branches share one ``RunInfo``; its records are put back in input order once every branch is done.
What a branch keeps alive while it waits is then what ``asyncio.gather`` keeps, plus its context.

One difference can be seen from inside the stages: an element that stops the others before its
first ``await`` — a failure with ``fail_fast``, or a ``KeyboardInterrupt``, ``SystemExit`` or
``CancelledError`` under any policy — does so only once its task has finished, so the elements after
it have made their first step by then (they are cancelled at their first ``await``, as on the
general path any element that started is). Results and the error raised are the same.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence
from contextvars import copy_context
from time import perf_counter
from typing import Any

from stageflow.budgets._state import GATES
from stageflow.engine.boundary import merge_outputs
from stageflow.engine.budget import budget_chain
from stageflow.engine.fanout import BranchOutcome, _check_policy
from stageflow.engine.plan import FUNCTION, StageEntry
from stageflow.engine.protocol import DEFAULT_POLICY
from stageflow.engine.runner import _exit_at, _prepared, _raised
from stageflow.stages import note_degraded
from stageflow.state import Result, RunInfo, StageRecord
from stageflow.usage import _STAGE

__all__ = ["Outcomes", "abare_fan_out", "bare_ready", "events_in_input_order", "in_input_order"]


def bare_ready(
    entries: Sequence[StageEntry], hooks: tuple[Any, ...], max_concurrency: int | None, is_async: bool
) -> bool:
    """Whether every branch is a function stage that needs nothing around its call (see above).

    ``entries`` are the branches' stage entries, all ``async def`` functions when ``is_async`` (they
    can run as bare tasks), all plain functions otherwise (their threads can share one run);
    ``max_concurrency`` is the fan-out's own cap: one at or above the number of branches can never
    make a call wait (and a function stage's inner calls never take a slot its own call holds).
    """
    if hooks or GATES[0] or not entries or DEFAULT_POLICY.get() is not None or budget_chain():
        return False
    if max_concurrency is not None and max_concurrency < len(entries):
        return False
    return all(
        e.kind == FUNCTION and e.is_async_fn is is_async and e.plain_inputs and e.policy is None
        for e in entries
    )


async def abare_fan_out(
    owner: Any,
    entries: Sequence[StageEntry],
    states: Sequence[dict[str, Any]],
    run: RunInfo,
    prefix: str,
    on_error: str,
) -> Outcomes:
    """Run ``entries[i]`` over ``states[i]`` as bare tasks; what each did, in input order.

    Every branch records into ``run``. Failure policies are :func:`~stageflow.engine.fanout.afan_out`'s:
    ``fail_fast`` cancels the other branches and raises the first error (a branch that never started
    stays ``"skipped"``); a ``CancelledError`` a branch raised by itself, or a ``KeyboardInterrupt``,
    stops the others and is re-raised.
    """
    _check_policy(on_error)
    n = len(entries)
    if n == 0:
        return Outcomes([], [], [], [])
    # What each branch did, kept in flat lists until the end: no object per branch stays alive
    # while the branches wait (an outcome object is made for each once all are done).
    status = ["skipped"] * n
    values: list[Any] = [None] * n
    errors: list[BaseException | None] = [None] * n
    elapsed = [0.0] * n
    starts = [0.0] * n
    loop = asyncio.get_running_loop()
    here = copy_context()
    finished = loop.create_future()
    tasks: list[asyncio.Task[Any] | None] = [None] * n
    index: dict[asyncio.Task[Any], int] = {}
    stop_error: list[BaseException] = []  # fail_fast's first error, or an interrupt to re-raise
    unstarted: set[int] = set()  # cancelled by a stop before their first step: they stay "skipped"
    left = [n]

    def settle() -> None:
        left[0] -= 1
        if left[0] == 0 and not finished.done():
            finished.set_result(None)

    def stop(error: BaseException) -> None:
        if stop_error:
            return
        stop_error.append(error)
        for k, t in enumerate(tasks):
            if t is not None and not t.done():
                if inspect.getcoroutinestate(t.get_coro()) == inspect.CORO_CREATED:  # type: ignore[arg-type]
                    unstarted.add(k)
                t.cancel()

    def failed(i: int, error: BaseException) -> None:
        errors[i], status[i], elapsed[i] = error, "error", perf_counter() - starts[i]
        if on_error == "fail_fast":
            stop(error)

    records: list[Any] = [None] * n  # a succeeded branch's trace record and output, by position
    outputs: list[Any] = [None] * n

    def done(task: asyncio.Task[Any]) -> None:
        i = index.pop(task)
        try:
            value = task.result()
        except BaseException as e:  # (looked at below; the common case costs one call)
            # (re-raised here, the branch's error took this frame into its traceback: this frame
            # reaches the fan-out's lists, which keep the error, a reference cycle per failure)
            e.__traceback__ = e.__traceback__.tb_next if e.__traceback__ is not None else None
            del e
            finished_badly(i, task)
        else:
            # What _succeeded does: for the common dict, kept by position (put in the run in input
            # order at the end); anything else may add records of its own as it merges (a pipeline's
            # result joins its run), so its record goes in first, as on the general path.
            entry = entries[i]
            took = perf_counter() - starts[i]
            record = tuple.__new__(StageRecord, (entry.path, took, True))
            if type(value) is dict:
                records[i], outputs[i] = record, value
            else:
                run._trace.append(record)
                run._outputs[entry.path] = value
            try:
                merge_outputs(entry, value, states[i], run, prefix)
            except Exception as e:  # outputs that cannot merge: the branch failed
                failed(i, _off_the_callback(e))
            else:
                values[i], status[i], elapsed[i] = value, "ok", took
        settle()

    def finished_badly(i: int, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            if i not in unstarted:
                status[i], elapsed[i] = "cancelled", perf_counter() - starts[i]
                if task.cancelling() == 0 and not stop_error:
                    # Nobody cancelled it: the stage raised CancelledError itself (e.g. leaked from an
                    # inner task). Never a branch failure: stop the others and re-raise it.
                    try:
                        task.result()
                    except asyncio.CancelledError as e:
                        errors[i] = e
                        stop(e)
            return
        error = task.exception()
        if isinstance(error, Exception):
            failed(i, _stage_error(owner, entries[i], error, starts[i], states[i], run, prefix))
        elif error is not None:  # KeyboardInterrupt, SystemExit: never a branch failure
            _exit_at(error, entries[i], prefix)  # (a SystemExit names the stage it left)
            errors[i], status[i], elapsed[i] = error, "cancelled", perf_counter() - starts[i]
            stop(error)

    create = loop.create_task
    held: tuple[Any, ...] = (None, None, None, None)  # (attr, key, chain, the stage object)
    for i in range(n):
        if stop_error:  # fail_fast and an earlier branch failed before its call: the rest never start
            settle()
            continue
        entry, state = entries[i], states[i]
        starts[i] = t0 = perf_counter()
        # _prepared, for the inputs bare_ready allows (exactly in_pairs; no policy); the stage object
        # is looked up once for the branches that share it (a ForEach's elements all do).
        kw = {}
        try:
            if entry.attr is not held[0] or entry.key != held[1] or entry.chain is not held[2]:
                target, _, _ = _prepared(owner, entry, state, run, prefix)
                held = (entry.attr, entry.key, entry.chain, target)
            target = held[3]
            for sf, st in entry.in_pairs:
                kw[sf] = state[st]
        except Exception as first:  # a missing input: the branch fails before its call, as in acall_stage
            problem: Exception = first
            try:
                _prepared(owner, entry, state, run, prefix)  # (raises it, naming the stage and field)
            except Exception as e:
                problem = e
            failed(i, problem)
            settle()
            continue
        context = here.copy()
        context.run(_STAGE.set, entry.path)  # the task's own context: nothing to reset afterwards
        try:
            task = create(target(**kw), context=context)
        except Exception as e:  # arguments the function does not take: a failed call
            failed(i, _stage_error(owner, entry, e, t0, state, run, prefix))
            settle()
            continue
        tasks[i] = task
        index[task] = i
        task.add_done_callback(done, context=here)
    try:
        await finished
    except asyncio.CancelledError:
        # The caller was cancelled: cancel every element and, as asyncio.gather does, resume the
        # caller only once each has finished its own cancellation handling.
        running = [t for t in tasks if t is not None and not t.done()]
        for t in running:
            t.cancel()
        if running:
            await asyncio.wait(running)
        raise
    _put_in_order(run, entries, records, outputs)
    events_in_input_order(run, values)
    if stop_error:
        raise stop_error[0]
    if "error" in status or "timeout" in status:
        note_degraded()  # (an output without failed branches is not cached: see note_failed_branches)
    return Outcomes(status, values, errors, elapsed)


class Outcomes:
    """What each branch of a fan-out did, as flat lists indexed by branch position (the fields of
    :class:`~stageflow.engine.fanout.BranchOutcome`; :meth:`listed` makes those objects)."""

    __slots__ = ("elapsed", "errors", "status", "values")

    def __init__(
        self, status: list[str], values: list[Any], errors: list[BaseException | None], elapsed: list[float]
    ) -> None:
        self.status, self.values, self.errors, self.elapsed = status, values, errors, elapsed

    def __len__(self) -> int:
        return len(self.status)

    def listed(self) -> list[BranchOutcome]:
        s, v, e, t = self.status, self.values, self.errors, self.elapsed
        return [BranchOutcome(i, s[i] == "ok", v[i], e[i], t[i], s[i]) for i in range(len(s))]

    @classmethod
    def of(cls, outcomes: Sequence[BranchOutcome]) -> Outcomes:
        return cls(
            [o.status for o in outcomes],
            [o.value for o in outcomes],
            [o.error for o in outcomes],
            [o.elapsed for o in outcomes],
        )


def _stage_error(
    owner: Any,
    entry: StageEntry,
    error: Exception,
    t0: float,
    state: dict[str, Any],
    run: RunInfo,
    prefix: str,
) -> Exception:
    """Record a stage call that raised, as the engine records it; the error that fails the branch
    (with no policy in force, the engine always raises one)."""
    try:
        _raised(owner, entry, error, (None, {}, None, t0), state, run, (), prefix)
    except Exception as e:
        # The engine's frames here (the loop's callback) reach the fan-out's lists that keep the
        # error: a reference cycle per failure. So they come off its traceback: all of it for an
        # error the engine made (the stage's own is its cause's), only theirs for the stage's own
        # error passed on as it is (a StageflowError of yours: its frames stay).
        if e is not error:
            return e.with_traceback(None)
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code in _OUR_CODE:
            tb = tb.tb_next
        return e.with_traceback(tb)
    raise AssertionError("unreachable: a stage with no policy cannot recover")  # pragma: no cover


def _off_the_callback(error: Exception) -> Exception:
    """``error``, raised in the done callback while a branch's outputs were merged, without the
    tracebacks (its own and its context's) that hold the callback's frames: the callback reaches
    the fan-out's lists that keep the error, a reference cycle per failure. The merge is the
    engine's code; the message says what was wrong with the outputs."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__context__
    return error


#: The frames :func:`_stage_error` puts at the head of an error it passes on as it is.
_OUR_CODE = frozenset({_stage_error.__code__, _raised.__code__})


def _put_in_order(
    run: RunInfo, entries: Sequence[StageEntry], records: list[Any], outputs: list[Any]
) -> None:
    """Put the succeeded branches' records and outputs (by position) into ``run``, in input order
    among the failed branches' records already there."""
    trace = run._trace
    earlier = bool(trace) or bool(run._outputs)  # (failed branches', or those of non-dict outputs)
    trace.extend(r for r in records if r is not None)
    run._outputs.update((r[0], outputs[i]) for i, r in enumerate(records) if r is not None)
    if earlier:
        in_input_order(run, entries)


def events_in_input_order(run: RunInfo, values: Sequence[Any]) -> None:
    """Branches that shared ``run`` and returned a pipeline's result joined its events as they
    finished: put them in input order (``values``: what each branch returned), when they are all
    the events there are."""
    found = run.events
    if len(found) < 2:
        return
    ordered = [e for v in values if isinstance(v, Result) for e in v._run.events]
    if len(ordered) == len(found) and {id(e) for e in ordered} == {id(e) for e in found}:
        found[:] = ordered


def in_input_order(run: RunInfo, entries: Sequence[StageEntry]) -> None:
    """Branches that shared ``run`` recorded as they finished: put its trace, outputs and details in
    input order. A stage that returned a pipeline's result joined that run: its records follow the
    stage's own."""
    position = {e.path: i for i, e in enumerate(entries)}

    def place(k: Any) -> int:  # a path, or a trace record or joined run (whose first item is its path)
        return position.get(k if isinstance(k, str) else k[0], -1)

    run._trace.sort(key=place)
    outputs = run._outputs
    if outputs and not run._lazy_outputs:  # (only the stages' own outputs: in the order of entries)
        ordered = {e.path: outputs[e.path] for e in entries if e.path in outputs}
        outputs.clear()
        outputs.update(ordered)
    for records in (outputs if run._lazy_outputs else None, run._details):
        if records:
            items = sorted(records.items(), key=lambda item: place(item[0]))
            records.clear()
            records.update(items)
