"""Concurrency: one budget for the whole program, and the fan-out every concurrent pattern uses.

**Budget.** ``stageflow.configure(max_concurrency=N)`` (or ``with stageflow.limits(...)``) sets a
cap on concurrent *leaf* stage calls (predictors, modules, functions — not the pipelines around
them). Each fan-out may add its own cap (``max_concurrency=`` on the pattern). Caps form a chain
through the context, so a ``ForEach`` inside an ensemble inside a batch never exceeds any cap above
it: a leaf call takes one slot of every budget in its chain, outermost first. A leaf running
inside another leaf (a function stage that calls a pipeline) does not take a slot twice, so small
caps cannot deadlock. Without a cap nothing is limited: there is no silent default below what
the user set.

**Fan-out.** :func:`fan_out` (threads) and :func:`afan_out` (asyncio tasks) run branch thunks
concurrently and return one :class:`BranchOutcome` per branch, in input order:

- threads come from one long-lived pool (no pool per call); the calling thread works too (except
  with ``fail_fast``, ``until`` or a timeout, where it must stay free to stop early), so a
  saturated pool cannot deadlock nested fan-outs;
- each branch runs in a copy of the caller's context, so ``dspy.context`` settings, the DSPy
  trace list (optimizers) and the usage tracker reach every branch;
- failure policies: ``collect`` (default) records errors, ``skip`` drops failed branches,
  ``fail_fast`` stops at the first error and raises it;
- per-branch timeouts: async branches are cancelled; threads cannot be, so a timed-out thread is
  reported as abandoned (see :func:`abandoned_threads`) and a fresh worker takes over;
- ``until(outcomes)`` stops early (e.g. an ensemble quorum) and abandons the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Literal

from stageflow.errors import ConfigurationError

__all__ = [
    "BranchOutcome",
    "Budget",
    "FailurePolicy",
    "abandoned_threads",
    "afan_out",
    "configure",
    "fan_out",
    "get_config",
    "leaf_slots",
    "limits",
    "on_background_loop",
    "run_on_background_loop",
    "to_thread",
]

logger = logging.getLogger("stageflow")

FailurePolicy = Literal["collect", "skip", "fail_fast"]
POLICIES = ("collect", "skip", "fail_fast")


class Budget:
    """A counting semaphore usable from threads and from asyncio tasks alike.

    ``peak`` records the highest number of slots held at once (tests assert it).
    """

    def __init__(self, limit: int, name: str = "") -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(
                f"max_concurrency must be a positive int, got {limit!r}.",
                field="max_concurrency",
                code="bad_option",
                hint="pass max_concurrency=None for no cap",
            )
        self.limit = limit
        self.name = name
        self.used = 0
        self.peak = 0
        self._lock = threading.Lock()
        self._waiters: deque[Any] = deque()

    def __deepcopy__(self, memo: dict[int, Any]) -> Budget:
        return self

    def _take(self) -> None:
        self.used += 1
        if self.used > self.peak:
            self.peak = self.used

    def acquire(self) -> None:
        """Take a slot, blocking the thread until one is free."""
        with self._lock:
            if self.used < self.limit and not self._waiters:
                self._take()
                return
            event = threading.Event()
            self._waiters.append(event)
        event.wait()  # release() hands the slot over before setting the event

    async def aacquire(self) -> None:
        """Take a slot, suspending the task until one is free."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.used < self.limit and not self._waiters:
                self._take()
                return
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, fut))
        try:
            await fut
        except asyncio.CancelledError:
            with self._lock:
                handed = fut.done() and not fut.cancelled()
                with contextlib.suppress(ValueError):
                    self._waiters.remove((loop, fut))
            if handed:
                self.release()
            raise

    def release(self) -> None:
        """Free a slot, handing it to the longest waiter if there is one."""
        with self._lock:
            while self._waiters:
                waiter = self._waiters.popleft()
                if isinstance(waiter, threading.Event):
                    waiter.set()
                    return
                loop, fut = waiter
                if fut.done():
                    continue
                loop.call_soon_threadsafe(_hand_over, fut, self)
                return
            self.used -= 1


def _hand_over(fut: asyncio.Future[None], budget: Budget) -> None:
    if fut.done():  # cancelled meanwhile: pass the slot on
        budget.release()
    else:
        fut.set_result(None)


# -- configuration -------------------------------------------------------------------------------

_OPTIONS = {"max_concurrency", "max_threads"}


@dataclass
class _Config:
    max_concurrency: int | None = None
    max_threads: int = 512


_CONFIG = _Config()
_ROOT: list[Budget | None] = [None]
_BUDGETS: contextvars.ContextVar[tuple[Budget, ...] | None] = contextvars.ContextVar(
    "stageflow_budgets", default=None
)
_HELD: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("stageflow_held", default=frozenset())


def _check_options(options: dict[str, Any], where: str) -> None:
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown option(s) {unknown}. Known options: {sorted(_OPTIONS)}.",
            field=unknown[0],
            code="unknown_option",
        )


def configure(**options: Any) -> None:
    """Set process-wide defaults: ``max_concurrency`` (cap on concurrent leaf stage calls in
    stageflow's fan-outs; ``None`` = no cap) and ``max_threads`` (size of the shared thread pool).

    An unknown option raises :class:`ConfigurationError`; it is never silently ignored.
    """
    _check_options(options, "stageflow.configure")
    if "max_concurrency" in options:
        cap = options["max_concurrency"]
        _ROOT[0] = None if cap is None else Budget(cap, "global")
        _CONFIG.max_concurrency = cap
    if "max_threads" in options:
        n = options["max_threads"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigurationError(
                f"max_threads must be a positive int, got {n!r}.", field="max_threads", code="bad_option"
            )
        _CONFIG.max_threads = n
        _reset_pool()


def get_config() -> dict[str, Any]:
    """The current process-wide options."""
    return {"max_concurrency": _CONFIG.max_concurrency, "max_threads": _CONFIG.max_threads}


def _chain() -> tuple[Budget, ...]:
    chain = _BUDGETS.get()
    if chain is None:
        root = _ROOT[0]
        return (root,) if root is not None else ()
    return chain


@contextlib.contextmanager
def limits(max_concurrency: int | None = None, **options: Any) -> Iterator[Budget | None]:
    """Cap concurrent leaf stage calls inside the block (nested under any cap already active)."""
    _check_options({"max_concurrency": max_concurrency, **options}, "stageflow.limits")
    if max_concurrency is None:
        yield None
        return
    budget = Budget(max_concurrency, "limits")
    token = _BUDGETS.set((*_chain(), budget))
    try:
        yield budget
    finally:
        _BUDGETS.reset(token)


@contextlib.contextmanager
def child_budget(max_concurrency: int | None, name: str) -> Iterator[None]:
    """Add a fan-out's own cap to the chain for the branches it starts."""
    if max_concurrency is None:
        yield
        return
    token = _BUDGETS.set((*_chain(), Budget(max_concurrency, name)))
    try:
        yield
    finally:
        _BUDGETS.reset(token)


def leaf_slots() -> tuple[Budget, ...]:
    """Budgets a leaf call must take a slot of here (empty on the unlimited fast path)."""
    chain = _BUDGETS.get()
    if chain is None:
        root = _ROOT[0]
        if root is None:
            return ()
        chain = (root,)
    if not chain:
        return ()
    held = _HELD.get()
    return tuple(b for b in chain if id(b) not in held)


def enter_leaf(budgets: tuple[Budget, ...]) -> contextvars.Token[frozenset[int]]:
    for b in budgets:
        b.acquire()
    return _HELD.set(_HELD.get() | {id(b) for b in budgets})


async def aenter_leaf(budgets: tuple[Budget, ...]) -> contextvars.Token[frozenset[int]]:
    taken: list[Budget] = []
    try:
        for b in budgets:
            await b.aacquire()
            taken.append(b)
    except BaseException:
        for b in reversed(taken):
            b.release()
        raise
    return _HELD.set(_HELD.get() | {id(b) for b in budgets})


def exit_leaf(budgets: tuple[Budget, ...], token: contextvars.Token[frozenset[int]]) -> None:
    _HELD.reset(token)
    for b in reversed(budgets):
        b.release()


# -- the shared thread pool and background loop ---------------------------------------------------

_POOL: list[ThreadPoolExecutor | None] = [None]
_POOL_LOCK = threading.Lock()
_ABANDONED = [0]


def _pool() -> ThreadPoolExecutor:
    pool = _POOL[0]
    if pool is None:
        with _POOL_LOCK:
            pool = _POOL[0]
            if pool is None:
                pool = ThreadPoolExecutor(max_workers=_CONFIG.max_threads, thread_name_prefix="stageflow")
                _POOL[0] = pool
    return pool


def _reset_pool() -> None:
    with _POOL_LOCK:
        old, _POOL[0] = _POOL[0], None
    if old is not None:
        old.shutdown(wait=False)


async def to_thread(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on stageflow's long-lived pool from async code, in a copy of the context.

    Unlike ``asyncio.to_thread`` (the loop's default executor: ``min(32, cpus + 4)`` threads),
    this never caps concurrency below what the user set.
    """
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    return await loop.run_in_executor(_pool(), functools.partial(ctx.run, fn, *args, **kwargs))


def abandoned_threads() -> int:
    """How many timed-out branch threads were abandoned (still running or finished late)."""
    return _ABANDONED[0]


_LOOP: list[asyncio.AbstractEventLoop | None] = [None]


def _background_loop() -> asyncio.AbstractEventLoop:
    loop = _LOOP[0]
    if loop is None:
        with _POOL_LOCK:
            loop = _LOOP[0]
            if loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="stageflow-loop", daemon=True).start()
                _LOOP[0] = loop
    return loop


def on_background_loop() -> bool:
    """Whether the current thread is stageflow's background event loop (never block it)."""
    try:
        return asyncio.get_running_loop() is _LOOP[0]
    except RuntimeError:
        return False


def run_on_background_loop(coro: Awaitable[Any]) -> Any:
    """Run ``coro`` on stageflow's long-lived event loop and wait (the caller's context follows)."""
    return asyncio.run_coroutine_threadsafe(coro, _background_loop()).result()  # type: ignore[arg-type]


# -- fan-out ---------------------------------------------------------------------------------------


@dataclass
class BranchOutcome:
    """What one branch of a fan-out did.

    Attributes:
        index: Position in the fan-out's input order.
        ok: ``True`` when the branch returned a value.
        value: The branch's return value (``None`` on failure).
        error: The exception, when it failed (a ``TimeoutError`` for a timeout).
        elapsed: Wall seconds the branch ran (or until it was abandoned).
        status: ``"ok"``, ``"error"``, ``"timeout"``, ``"cancelled"`` (abandoned after fail_fast or
            ``until``) or ``"skipped"`` (never started).
    """

    index: int
    ok: bool = False
    value: Any = None
    error: BaseException | None = None
    elapsed: float = 0.0
    status: str = "skipped"


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ConfigurationError(
            f"on_error must be one of {list(POLICIES)}, got {policy!r}.", field="on_error", code="bad_option"
        )


class _SyncFanOut:
    """State of one threaded fan-out: pullers take the next branch until none are left."""

    def __init__(
        self,
        thunks: Sequence[Callable[[], Any]],
        window: int,
        policy: str,
        timeout: float | None,
        until: Callable[[list[BranchOutcome]], bool] | None,
    ) -> None:
        self.thunks = thunks
        self.window = window
        self.policy = policy
        self.timeout = timeout
        self.until = until
        self.outcomes = [BranchOutcome(i) for i in range(len(thunks))]
        self.next = 0
        self.done = 0
        self.timeouts = 0
        self.running: dict[int, float] = {}
        self.stopped = False
        self.cond = threading.Condition()
        self.first_error: BaseException | None = None

    def take(self) -> int | None:
        with self.cond:
            if self.stopped or self.next >= len(self.thunks):
                return None
            i = self.next
            self.next += 1
            self.running[i] = perf_counter()
            return i

    def finish(self, i: int, value: Any, error: BaseException | None, t0: float) -> None:
        with self.cond:
            if i not in self.running:  # timed out or abandoned meanwhile: the result is dropped
                return
            del self.running[i]
            o = self.outcomes[i]
            o.elapsed = perf_counter() - t0
            if error is None:
                o.ok, o.value, o.status = True, value, "ok"
            else:
                o.error, o.status = error, "error"
                if self.policy == "fail_fast" and self.first_error is None:
                    self.first_error = error
                    self.stopped = True
            self.done += 1
            if self.until is not None and not self.stopped and self.until(self.outcomes):
                self.stopped = True
            if self.timeout is not None or self.finished():
                self.cond.notify_all()  # wake the caller only when it has something to do

    def pull(self, ctx: contextvars.Context) -> None:
        while (i := self.take()) is not None:
            t0 = perf_counter()
            try:
                value = ctx.copy().run(self.thunks[i])
            except BaseException as e:
                self.finish(i, None, e, t0)
            else:
                self.finish(i, value, None, t0)

    def finished(self) -> bool:
        if self.done + self.timeouts >= len(self.thunks):
            return True
        return self.stopped and (not self.running or self.policy == "fail_fast" or self.until is not None)


def fan_out(
    thunks: Sequence[Callable[[], Any]],
    *,
    max_concurrency: int | None = None,
    on_error: FailurePolicy = "collect",
    timeout: float | None = None,
    until: Callable[[list[BranchOutcome]], bool] | None = None,
) -> list[BranchOutcome]:
    """Run ``thunks`` concurrently on threads; see the module docstring."""
    _check_policy(on_error)
    n = len(thunks)
    if n == 0:
        return []
    window = min(n, max_concurrency or n, _CONFIG.max_threads + 1)
    run = _SyncFanOut(thunks, window, on_error, timeout, until)
    ctx = contextvars.copy_context()
    pool = _pool()
    # The caller works too (progress even when the pool is saturated by nested fan-outs), unless
    # the fan-out may have to stop early or time branches out: then it only waits and watches.
    caller_works = timeout is None and until is None and on_error != "fail_fast"
    for _ in range(window - 1 if caller_works else window):
        pool.submit(run.pull, ctx)
    if caller_works:
        run.pull(ctx)
    with run.cond:
        while not run.finished():
            wait = None
            if timeout is not None and run.running:
                now = perf_counter()
                oldest = min(run.running.values())
                wait = max(0.0, oldest + timeout - now)
                expired = [i for i, t in run.running.items() if now - t >= timeout]
                for i in expired:
                    o = run.outcomes[i]
                    o.status, o.elapsed = "timeout", now - run.running.pop(i)
                    run.timeouts += 1
                    o.error = TimeoutError(f"branch {i} timed out after {timeout}s")
                    _ABANDONED[0] += 1
                    logger.warning(
                        "stageflow: branch %d timed out after %ss; its thread cannot be cancelled "
                        "and was abandoned",
                        i,
                        timeout,
                    )
                    if on_error == "fail_fast" and run.first_error is None:
                        run.first_error, run.stopped = o.error, True
                    if not run.stopped and run.next < n:
                        pool.submit(run.pull, ctx)  # replace the stuck worker
                if expired:
                    continue
            run.cond.wait(wait)
        run.stopped = True
        for i in list(run.running):  # still running after fail_fast / until: abandoned
            run.outcomes[i].status = "cancelled"
            _ABANDONED[0] += 1
        run.running.clear()
    if run.first_error is not None:
        raise run.first_error
    return run.outcomes


async def afan_out(
    thunks: Sequence[Callable[[], Awaitable[Any]]],
    *,
    max_concurrency: int | None = None,
    on_error: FailurePolicy = "collect",
    timeout: float | None = None,
    until: Callable[[list[BranchOutcome]], bool] | None = None,
) -> list[BranchOutcome]:
    """Run async ``thunks`` concurrently as tasks; abandoned branches are cancelled."""
    _check_policy(on_error)
    n = len(thunks)
    outcomes = [BranchOutcome(i) for i in range(n)]
    if n == 0:
        return outcomes
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency and max_concurrency < n else None
    first_error: list[BaseException] = []
    stopped = [False]
    tasks: list[asyncio.Task[None]] = []

    def stop(me: int) -> None:
        # Abandon every other branch: O(n) once, instead of re-waiting on all pending tasks.
        stopped[0] = True
        for k, t in enumerate(tasks):
            if k != me and not t.done():
                t.cancel()

    async def one(i: int) -> None:
        o = outcomes[i]
        if gate is not None:
            await gate.acquire()
        try:
            if stopped[0]:
                o.status = "cancelled"
                return
            t0 = perf_counter()
            try:
                if timeout is None:
                    o.value = await thunks[i]()
                else:
                    async with asyncio.timeout(timeout):
                        o.value = await thunks[i]()
            except TimeoutError as e:
                o.status = "timeout"
                o.error = e if str(e) else TimeoutError(f"branch {i} timed out after {timeout}s")
            except asyncio.CancelledError:
                o.status, o.elapsed = "cancelled", perf_counter() - t0
                raise
            except Exception as e:
                o.error, o.status = e, "error"
            else:
                o.ok, o.status = True, "ok"
            o.elapsed = perf_counter() - t0
            if stopped[0]:
                return
            if not o.ok and on_error == "fail_fast":
                first_error.append(o.error)  # type: ignore[arg-type]
                stop(i)
            elif until is not None and until(outcomes):
                stop(i)
        finally:
            if gate is not None:
                gate.release()

    tasks.extend(asyncio.ensure_future(one(i)) for i in range(n))
    try:
        await asyncio.gather(*tasks, return_exceptions=True)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        raise
    for o in outcomes:
        if o.status == "skipped":
            o.status = "cancelled"
    if first_error:
        raise first_error[0]
    return outcomes


def available_cpus() -> int:
    """CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
