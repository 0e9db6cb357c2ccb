"""A stage result computed on first access, exactly once, from sync or async code.

A :class:`LazyResult` holds a stage call not made yet. The first reader runs it — ``value()`` from
sync code, ``await avalue()`` from async code — and every reader that comes meanwhile, on any thread
or task, waits for that run instead of starting another. Who runs it is decided under a lock by a
claim: the reader that finds no run in progress installs a future of its own and runs the stage;
the others wait on that future (a sync reader blocks, an async one awaits it shielded, so cancelling
one reader stops no one else). The run's outcome is kept: its value, or the error the stage raised.
An interrupt is not an outcome — Ctrl-C, an exit, a cancelled forcer, a forcer whose fan-out gave
up — so the claim is given back and the next reader runs the stage.

A read that would wait for itself raises ``RuntimeError`` instead of hanging: one from inside the
run (the stage, or any thread or task it started, reading its own result), and a sync read on the
event loop an ``avalue()`` run is using.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from types import TracebackType
from typing import Any

import dspy

from stageflow.stages import ENGINE_CALLS, _is_async_callable, _to_result

__all__ = ["LazyResult"]

_UNSET = object()

#: The lazy results whose run is in progress in this flow of work (their ids), set in the run's own
#: context: the threads and tasks it starts carry it, so a read of the result from there is seen.
_RESOLVING: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "stageflow_lazy_resolving", default=frozenset()
)


class LazyResult:
    """A stage result computed on first access (thread- and task-safe; the stage runs exactly once).

    Attribute and item access are delegated to the real result. ``done`` tells whether it ran;
    ``value()`` forces it, and ``await avalue()`` forces it from async code: the stage's async call
    runs on the event loop (a module's ``aforward``, an ``async def`` function), and a sync one on a
    worker thread. The call runs in the context of the moment the stage was called, so
    ``dspy.context(lm=...)`` settings active then apply. Whoever comes while it runs waits for that
    run, on any thread or task. An interrupt (Ctrl-C, a cancelled forcer) is not its result: the
    next access runs the stage.

    Examples:
        >>> import asyncio, stageflow
        >>> async def double(x: int) -> dict[str, int]:
        ...     return {"y": 2 * x}
        >>> pending = stageflow.LazyStage(stageflow.stage(double, writes=["y"]))(x=21)
        >>> asyncio.run(pending.avalue())["y"], pending.done
        (42, True)
    """

    __slots__ = (
        "_args",
        "_ctx",
        "_error",
        "_lock",
        "_owner",
        "_running",
        "_single",
        "_stage",
        "_tb",
        "_value",
    )

    def __init__(self, stage: Any, kwargs: dict[str, Any], single: str | None = None) -> None:
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_single", single)
        object.__setattr__(self, "_args", kwargs)
        object.__setattr__(self, "_ctx", contextvars.copy_context())
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_value", _UNSET)
        object.__setattr__(self, "_error", None)
        object.__setattr__(self, "_tb", None)  # (the error's traceback as the stage raised it)
        #: While a reader runs the stage: its future, set when the run ends; (thread id, is async).
        object.__setattr__(self, "_running", None)
        object.__setattr__(self, "_owner", None)

    @property
    def done(self) -> bool:
        """Whether the stage has run."""
        return self._value is not _UNSET or self._error is not None

    def get_result(self) -> Any:
        """Force evaluation and return the result (the tutorial's name for :meth:`value`)."""
        return self.value()

    @property
    def predictions(self) -> dict[str, Any]:
        """The result's fields as a dict (forces evaluation)."""
        value = self.value()
        store = getattr(value, "_store", None)
        if isinstance(store, dict):
            return dict(store)
        if isinstance(value, dict):
            return dict(value)
        if hasattr(value, "model_dump"):
            return dict(value.model_dump())
        raise AttributeError(f"the result ({type(value).__name__}) has no named fields")

    def stageflow_resolve(self) -> Any:
        """What the engine merges when a pipeline holds the lazy stage: the forced result (a function
        stage's single declared output, returned bare, under its name; a lazy result the stage
        returned, forced in turn)."""
        value = self.value(by_engine=True)
        while type(value) is LazyResult:
            value = value.value(by_engine=True)
        return self._fields(value)

    async def stageflow_aresolve(self) -> Any:
        """Async twin of :meth:`stageflow_resolve` (a pipeline's ``acall`` forces it on the loop)."""
        value = await self.avalue(by_engine=True)
        while type(value) is LazyResult:
            value = await value.avalue(by_engine=True)
        return self._fields(value)

    def _fields(self, value: Any) -> Any:
        if self._single is not None and not _is_record(value):
            return {self._single: value}
        return value

    def _run(self, by_engine: bool, reading: frozenset[int]) -> Any:
        """The stage's sync call (in the run's own context: the reader's results in progress and
        this one, see :data:`_RESOLVING`; not those of the context it was made in)."""
        _RESOLVING.set(reading | {id(self)})
        token = ENGINE_CALLS.set(self._stage) if by_engine else None
        try:
            out = self._stage(**self._args)
        finally:
            if token is not None:
                ENGINE_CALLS.reset(token)
        if inspect.iscoroutine(out):  # (an async function of yours, wrapped in nothing)
            out = _to_result(out, f"lazy stage {self._stage!r}")
        return out

    async def _arun(self, by_engine: bool, reading: frozenset[int]) -> Any:
        """The stage's async call (in the run's own task and context, as :meth:`_run`)."""
        _RESOLVING.set(reading | {id(self)})
        if by_engine:
            ENGINE_CALLS.set(self._stage)  # (the task's own context: gone with it)
        return await _awaited_call(self._stage, self._args)

    def value(self, by_engine: bool = False) -> Any:
        """Run the stage if it has not run yet, and return its result (or raise its error).
        ``by_engine``: a pipeline's engine forces it, and checks the result when it merges it."""
        from stageflow.engine.stopping import refuse_if_abandoned, run_as_callers

        while not self.done:
            mine: Future[None] = Future()
            try:
                running = self._claim(mine, asynchronous=False)
                if running is None:
                    continue  # (finished meanwhile)
                if running is not mine:
                    running.result()  # (then look again: kept, or given back to be run again)
                    continue
                refuse_if_abandoned()  # (a reader whose caller gave up starts no run of it)
                self._release(mine, run_as_callers(self._ctx, self._run, by_engine, _RESOLVING.get()))
            except BaseException as e:
                if self._running is not mine:
                    raise  # (not this reader's run: its wait, or a read that would wait for itself)
                interrupted = _interrupted(e, None)
                self._release(mine, error=None if interrupted else e)
                if interrupted:
                    raise
        return self._outcome()

    async def avalue(self, by_engine: bool = False) -> Any:
        """Async twin of :meth:`value`: run the stage's async call on this event loop if it has not
        run yet (a sync stage runs on a worker thread), and return its result (or raise its error)."""
        from stageflow.engine.stopping import refuse_if_abandoned, start_as_callers

        task = asyncio.current_task()
        while not self.done:
            mine: Future[None] = Future()
            try:
                running = self._claim(mine, asynchronous=True)
                if running is None:
                    continue
                if running is not mine:
                    # (shielded: a reader cancelled while it waits must not cancel the run's future,
                    # which every other reader waits on)
                    await asyncio.shield(asyncio.wrap_future(running))
                    continue
                refuse_if_abandoned()
                run = start_as_callers(self._ctx, self._arun, by_engine, _RESOLVING.get())
                try:
                    value = await run
                except asyncio.CancelledError:
                    if run.done() and not run.cancelled():
                        # (this reader was cancelled just as the run ended: the outcome stands)
                        error = run.exception()
                        if error is None:
                            self._release(mine, run.result())
                        elif isinstance(error, Exception):
                            self._release(mine, error=error)
                        del error
                    raise
                self._release(mine, value)
            except BaseException as e:
                if self._running is not mine:
                    raise
                interrupted = _interrupted(e, task)
                self._release(mine, error=None if interrupted else e)
                if interrupted:
                    raise
        return self._outcome()

    def _outcome(self) -> Any:
        error = self._error
        if error is not None:
            # (with the traceback it was raised with: raising it again does not grow it by every
            # reader's frames, kept alive with it)
            try:
                raise error.with_traceback(self._tb)
            finally:
                del error
        return self._value

    def _claim(self, mine: Future[None], asynchronous: bool) -> Future[None] | None:
        """Install ``mine`` as the run in progress when there is none (this reader then runs the
        stage), or return the run in progress to wait for; ``None`` when the result is there."""
        if id(self) in _RESOLVING.get() and self._running is not None and not self.done:
            raise RuntimeError(
                f"LazyResult of {self._stage!r} was read from inside its own run (by the stage, or by "
                "work it started): reading it there would wait for itself."
            )
        me = threading.get_ident()
        with self._lock:
            if self.done:
                return None
            running: Future[None] | None = self._running
            if running is None or running.done():  # (free; or released, but not yet cleared)
                object.__setattr__(self, "_running", mine)
                object.__setattr__(self, "_owner", (me, asynchronous))
                return mine
            owner, owner_async = self._owner or (None, False)
        if owner == me and not (asynchronous and owner_async):
            # (a sync wait here would block the thread, or the event loop, the run needs)
            how = "`await result.avalue()` on this thread's event loop" if owner_async else "this thread"
            raise RuntimeError(
                f"LazyResult of {self._stage!r} was read while it is being resolved by {how}: reading "
                "it there would wait for itself; "
                + ("await it (`await result.avalue()`) instead." if owner_async else "read it after it ends.")
            )
        return running

    def _release(self, future: Future[None], value: Any = _UNSET, error: BaseException | None = None) -> None:
        """End this reader's run: keep its outcome (none when it was interrupted), wake the readers
        waiting for it, then give the claim back (in that order: a release cut short leaves a done
        future, which the next reader takes over)."""
        with self._lock:
            if error is not None:
                tb: TracebackType | None = error.__traceback__
                object.__setattr__(self, "_tb", tb)
                object.__setattr__(self, "_error", error)
            elif value is not _UNSET:
                object.__setattr__(self, "_value", value)
        if not future.done():
            future.set_result(None)
        with self._lock:
            if self._running is future:
                object.__setattr__(self, "_running", None)
                object.__setattr__(self, "_owner", None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.value(), name)

    def __getitem__(self, key: Any) -> Any:
        value = self.value()
        if key == self._single and not _is_record(value):
            return value  # a function stage's single declared output, returned bare
        return value[key]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("LazyResult is read-only")

    def __repr__(self) -> str:
        return repr(self.value()) if self.done else f"LazyResult(pending: {self._stage!r})"


def _interrupted(error: BaseException, task: Any) -> bool:
    """Whether ``error`` ended the run because its reader was interrupted (Ctrl-C, an exit, a
    cancelled task, a reader whose fan-out gave up), not because the stage failed: not its result."""
    if isinstance(error, Exception):
        return False
    if not isinstance(error, asyncio.CancelledError):
        return True  # (KeyboardInterrupt, SystemExit, GeneratorExit)
    from stageflow.engine.stopping import enclosing_fan_out

    if task is not None and task.cancelling():
        return True  # (the reading task was cancelled)
    signal = enclosing_fan_out()
    return signal is not None and signal.gave_up()


async def _awaited_call(stage: Any, kwargs: dict[str, Any]) -> Any:
    """Await ``stage(**kwargs)`` as a pipeline's ``acall`` would: its async call on the loop (a
    module's ``aforward`` or ``acall`` of yours, an ``async def`` function), a sync one on a worker
    thread of the shared pool."""
    from stageflow.engine.concurrency import to_thread
    from stageflow.engine.module_call import own_acall

    if hasattr(stage, "aforward") or own_acall(stage):
        return await stage.acall(**kwargs)
    if _is_async_callable(stage):
        return await stage(**kwargs)
    out = await to_thread(stage, **kwargs)
    return await out if inspect.isawaitable(out) else out


def _is_record(value: Any) -> bool:
    return isinstance(value, Mapping | dspy.Example) or hasattr(value, "model_dump")
