"""Lazy evaluation: run a stage only when its result is first used, exactly once."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import dspy

from stageflow.stages import ENGINE_CALLS, FunctionStage, Ports, _is_async_callable, describe, wraps_function

__all__ = ["LazyResult", "LazyStage"]

_UNSET = object()


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

    __slots__ = ("_args", "_ctx", "_error", "_lock", "_owner", "_running", "_single", "_stage", "_value")

    def __init__(self, stage: Any, kwargs: dict[str, Any], single: str | None = None) -> None:
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_single", single)
        object.__setattr__(self, "_args", kwargs)
        object.__setattr__(self, "_ctx", contextvars.copy_context())
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_value", _UNSET)
        object.__setattr__(self, "_error", None)
        #: While a forcer runs the stage: a future set when it ends, and (thread id, is async).
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
        stage's single declared output, returned bare, under its name)."""
        return self._fields(self.value(by_engine=True))

    async def stageflow_aresolve(self) -> Any:
        """Async twin of :meth:`stageflow_resolve` (a pipeline's ``acall`` forces it on the loop)."""
        return self._fields(await self.avalue(by_engine=True))

    def _fields(self, value: Any) -> Any:
        if self._single is not None and not _is_record(value):
            return {self._single: value}
        return value

    def _run(self, by_engine: bool) -> Any:
        token = ENGINE_CALLS.set(self._stage) if by_engine else None
        try:
            return self._stage(**self._args)
        finally:
            if token is not None:
                ENGINE_CALLS.reset(token)

    async def _arun(self, by_engine: bool) -> Any:
        token = ENGINE_CALLS.set(self._stage) if by_engine else None
        try:
            return await _awaited_call(self._stage, self._args)
        finally:
            if token is not None:
                ENGINE_CALLS.reset(token)

    def value(self, by_engine: bool = False) -> Any:
        """Run the stage if it has not run yet, and return its result (or raise its error).
        ``by_engine``: a pipeline's engine forces it, and checks the result when it merges it."""
        from stageflow.engine.stopping import run_as_callers

        while not self.done:
            running = self._claim(asynchronous=False)
            if running is None:
                continue  # (finished meanwhile)
            if running.owned:
                self._settle(running, lambda: run_as_callers(self._ctx, self._run, by_engine), None)
            else:
                running.future.result()  # (then look again: kept, or given back to run again)
        return self._outcome()

    async def avalue(self, by_engine: bool = False) -> Any:
        """Async twin of :meth:`value`: run the stage's async call on this event loop if it has not
        run yet (a sync stage runs on a worker thread), and return its result (or raise its error)."""
        from stageflow.engine.stopping import arun_as_callers

        while not self.done:
            running = self._claim(asynchronous=True)
            if running is None:
                continue
            if running.owned:
                task = asyncio.current_task()
                await self._asettle(running, lambda: arun_as_callers(self._ctx, self._arun, by_engine), task)
            else:
                await asyncio.wrap_future(running.future)
        return self._outcome()

    def _outcome(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def _claim(self, asynchronous: bool) -> _Running | None:
        """Take the run (``owned``), or find the one in progress to wait for; ``None`` when done."""
        me = threading.get_ident()
        with self._lock:
            if self.done:
                return None
            future = self._running
            if future is None:
                future = Future()
                object.__setattr__(self, "_running", future)
                object.__setattr__(self, "_owner", (me, asynchronous))
                return _Running(future, owned=True)
            owner, owner_async = self._owner or (None, False)
        if owner == me and not (asynchronous and owner_async):
            # (waiting here would never end: the run in progress is below this call on this thread,
            # or on this thread's event loop, which a sync wait blocks)
            how = "`await result.avalue()` on this thread's event loop" if owner_async else "this thread"
            raise RuntimeError(
                f"LazyResult of {self._stage!r} was read while it is being resolved by {how}: reading "
                "it there would wait for itself; "
                + ("await it (`await result.avalue()`) instead." if owner_async else "read it after it ends.")
            )
        return _Running(future, owned=False)

    def _release(self, future: Future[None], value: Any = _UNSET, error: BaseException | None = None) -> None:
        """End the run: keep its outcome (none when it was interrupted), wake whoever waits."""
        with self._lock:
            if error is not None:
                object.__setattr__(self, "_error", error)
            elif value is not _UNSET:
                object.__setattr__(self, "_value", value)
            object.__setattr__(self, "_running", None)
            object.__setattr__(self, "_owner", None)
        future.set_result(None)

    def _settle(self, running: _Running, run: Callable[[], Any], task: Any) -> None:
        try:
            value = run()
        except BaseException as e:
            self._release(running.future, error=None if _interrupted(e, task) else e)
            if _interrupted(e, task):
                raise
        else:
            self._release(running.future, value)

    async def _asettle(self, running: _Running, run: Callable[[], Any], task: Any) -> None:
        try:
            value = await run()
        except BaseException as e:
            self._release(running.future, error=None if _interrupted(e, task) else e)
            if _interrupted(e, task):
                raise
        else:
            self._release(running.future, value)

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


class _Running:
    """A run in progress of a lazy result: its future, and whether the caller holding this owns it."""

    __slots__ = ("future", "owned")

    def __init__(self, future: Future[None], owned: bool) -> None:
        self.future, self.owned = future, owned


def _interrupted(error: BaseException, task: Any) -> bool:
    """Whether ``error`` ended the run because its forcer was interrupted (Ctrl-C, an exit, a
    cancelled task, a forcer whose fan-out gave up), not because the stage failed: not its result."""
    if isinstance(error, Exception):
        return False
    if not isinstance(error, asyncio.CancelledError):
        return True  # (KeyboardInterrupt, SystemExit, GeneratorExit)
    from stageflow.engine.stopping import enclosing_fan_out

    if task is not None and task.cancelling():
        return True  # (the forcing task was cancelled)
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


class LazyStage(dspy.Module):  # type: ignore[misc]
    """Wrap a stage (any module, pipeline or function) so calling it defers the work.

    A ``dspy.Module``: the wrapped stage is its attribute ``underlying_stage``, so its predictors are
    visible to DSPy's optimizers and to ``save``/``load``. Calling it returns a :class:`LazyResult`
    at once; the stage runs on the first access to the result (``result.get_result()``,
    ``result.predictions``, a field, an item), exactly once. In a pipeline, the lazy stage's outputs
    are merged into the state when it finishes, which resolves it then. Its contract is the wrapped
    stage's: it receives only the inputs that stage takes and promises the outputs it declares.

    Examples:
        >>> import stageflow
        >>> ran = []
        >>> double = LazyStage(stageflow.stage(lambda x: ran.append(x) or {"y": 2 * x}, writes=["y"]))
        >>> r = double(x=21)
        >>> ran, r.done
        ([], False)
        >>> r["y"], r.get_result()["y"], ran
        (42, 42, [21])
    """

    #: The engine forces its result as part of the stage's call in a pipeline (policies apply).
    stageflow_lazy = True

    #: Its ports are its stage's, read live: a plan follows that stage's signature (see
    #: ``stageflow.engine.plan.signature_of``).
    stageflow_live_ports_of = "underlying_stage"

    def __init__(self, underlying_stage: Any) -> None:
        super().__init__()
        if not callable(underlying_stage):
            from stageflow.errors import ConfigurationError

            raise ConfigurationError(
                f"LazyStage needs a callable stage, got {underlying_stage!r}.", code="not_a_stage"
            )
        self.underlying_stage = underlying_stage

    @property
    def stage(self) -> Any:
        """The wrapped stage (an alias of ``underlying_stage``)."""
        return self.underlying_stage

    def stageflow_ports(self) -> Ports:
        """The wrapped stage's inputs and outputs: a pipeline feeds it exactly what that stage takes."""
        return describe(self.underlying_stage)

    def _single(self) -> str | None:
        """The one declared output of a function stage (or a ``Stage`` around one, under its renamed
        name), which the function may return bare."""
        stage = self.underlying_stage
        if not (isinstance(stage, FunctionStage) or wraps_function(stage)):
            return None
        outputs = stage.ports.outputs
        return outputs[0] if outputs is not None and len(outputs) == 1 else None

    def forward(self, **kwargs: Any) -> LazyResult:
        """Return a lazy result wrapper; nothing runs yet."""
        return LazyResult(self.underlying_stage, kwargs, self._single())

    async def aforward(self, **kwargs: Any) -> LazyResult:
        """Async twin of :meth:`forward` (the result is resolved on first access, as in sync code)."""
        return LazyResult(self.underlying_stage, kwargs, self._single())

    def __repr__(self) -> str:
        return f"LazyStage({self.underlying_stage!r})"
