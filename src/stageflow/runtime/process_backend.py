"""The process backend: records run in worker processes on this machine; the journal stays here.

One Python process runs Python code on one core at a time (the GIL). A DSPy ``Predict`` call costs
hundreds of microseconds of CPU to format the prompt and parse the answer, so with fast models and
many records in flight a thread-based batch is bound by that one core long before the model is
the limit. ``backend="processes"`` (``--backend processes``) runs the records in ``processes``
worker processes (default: one per CPU), each running its share of ``concurrency`` records at once
on its threads. The parent keeps the journal, the progress bar and the output, exactly as in a
local run: resume, exactly-once output, Ctrl-C and the summary behave the same.

How the workers get the program (``start_method``):

- ``"fork"`` (the default on Linux; macOS and Windows default to ``"spawn"``): each worker is a
  copy of this process made when the run starts. The program, its LM object and every setting
  (``dspy.configure``, ``stageflow.configure``) are there as they are; nothing is pickled, so a
  program holding locks, open files or closures works. stageflow's own background threads are
  restarted in the copy, and the fork waits for a moment no other thread is importing a module. A
  copy has only the thread that made it: if another thread of this process holds a lock of its own
  the program needs at that moment (say, another pipeline runs at the same time in a thread of
  yours), the worker could wait for it forever — use ``"spawn"`` then.
- ``"spawn"`` / ``"forkserver"``: fresh interpreters. The program travels as the pipeline file (a
  path passed to ``run_batch``) or pickled with cloudpickle, as for Ray; a program that cannot be
  pickled gets an error naming the part that cannot. Each worker imports DSPy (seconds).

A budget (``stageflow.budget``) or a rate limit (``stageflow.rate_limit``) in force in this process
cannot be shared with worker processes, so ``run_batch`` refuses to start rather than let each worker
spend the whole budget (see :func:`refuse_unshareable_limits`). A worker process that dies (killed, out of
memory) turns the records it was running into error rows naming the exit; it is replaced, at most
``max_restarts`` times per run, after which the batch stops (the journal keeps what finished).
"""

from __future__ import annotations

import contextlib
import contextvars
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

from stageflow._options import whole_number
from stageflow.errors import ConfigurationError, StageflowError
from stageflow.runtime.heap import batch_heap
from stageflow.runtime.outcome import Outcome, Usage, error_info, run_record
from stageflow.runtime.records import Record
from stageflow.runtime.runner import BackendError

__all__ = ["ProcessBackend", "UnsendableInputError", "WorkerDiedError", "refuse_unshareable_limits"]

_METHODS = ("fork", "spawn", "forkserver")
_SEND_HINT = (
    "use start_method='fork' (Linux), build the program in each worker from a pipeline file (pass its "
    "path instead of the object), or make the part picklable; pass lm= as a model string or a factory"
)


@dataclass
class ProcessBackend:
    """Options of the process backend (``run_batch(..., backend=ProcessBackend(...))``;
    ``"processes"`` = the defaults).

    Attributes:
        processes: Worker processes; default: the CPUs this process may use (at most ``concurrency``).
        start_method: ``"fork"``, ``"spawn"`` or ``"forkserver"``; default: ``"fork"`` on Linux,
            else ``"spawn"`` (see the module documentation for the difference).
        max_restarts: Worker processes replaced after dying, per run, before the batch stops.

    Examples:
        >>> import stageflow
        >>> from stageflow.runtime import ProcessBackend
        >>> size = stageflow.stage(lambda text: {"n": len(text)}, writes=["n"])
        >>> summary = stageflow.run_batch(size, [{"text": "hi"}, {"text": "hello"}],
        ...                               backend=ProcessBackend(processes=2), concurrency=4)
        >>> [row.outputs for row in summary.rows()], summary.backend
        ([{'n': 2}, {'n': 5}], 'processes')
    """

    processes: int | None = None
    start_method: str | None = None
    max_restarts: int = 3

    def __post_init__(self) -> None:
        self.processes = whole_number(self.processes, "processes", none_ok=True)
        if self.start_method is not None and self.start_method not in multiprocessing.get_all_start_methods():
            raise ConfigurationError(
                f"start_method={self.start_method!r} is not available here; this platform has "
                f"{', '.join(m for m in _METHODS if m in multiprocessing.get_all_start_methods())}.",
                field="start_method",
                code="bad_option",
            )
        self.max_restarts = whole_number(self.max_restarts, "max_restarts", minimum=0)

    def method(self) -> str:
        """The start method this backend uses."""
        if self.start_method is not None:
            return self.start_method
        # (macOS has fork too, but its system libraries are not safe to use in a forked child)
        return "fork" if sys.platform.startswith("linux") else "spawn"

    def executor(
        self,
        source: Any,
        program: Any,
        lm: Any,
        adapter: Any,
        allow_modules: Sequence[str],
        concurrency: int,
        max_concurrency: int | None,
        settings: dict[str, Any],
    ) -> ProcessExecutor:
        """Start the worker processes for one run (called by :func:`stageflow.run_batch`)."""
        method = self.method()
        n = max(1, min(concurrency, self.processes or _cpus()))
        if max_concurrency is not None:  # each process gets an equal share: together at most the cap
            n = min(n, max_concurrency)
        cap = None if max_concurrency is None else max_concurrency // n
        _enough_files(concurrency)
        if method == "fork":  # the objects themselves, and the caller's context (dspy.context, ...)
            payload: dict[str, Any] = {
                "program": program,
                "settings": settings,
                "context": contextvars.copy_context(),
            }
        else:
            payload = _spawn_payload(source, program, lm, adapter, allow_modules)
        payload["cap"] = cap
        return ProcessExecutor(
            multiprocessing.get_context(method), payload, n, concurrency, self.max_restarts
        )


def _enough_files(concurrency: int) -> None:
    """Each record in flight takes a pipe (two file descriptors here): raise this process's soft limit
    as far as needed (up to the hard one), or refuse clearly instead of failing mid-run."""
    try:
        import resource
    except ImportError:  # not Unix
        return
    need = 2 * concurrency + 256  # (the journal, the input and output files, the program's own)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < need:
        raise ConfigurationError(
            f"concurrency={concurrency} on the process backend needs about {need} open files (a pipe per "
            f"record in flight); this process may open {soft} (ulimit -n, hard limit {hard}).",
            field="concurrency",
            code="bad_option",
            hint="lower --concurrency, or raise the limit (ulimit -n) before the run",
        )


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _spawn_payload(
    source: Any, program: Any, lm: Any, adapter: Any, allow_modules: Sequence[str]
) -> dict[str, Any]:
    """What a fresh interpreter needs to build the program and its DSPy settings (all bytes/text)."""
    import cloudpickle  # (a DSPy dependency)
    import dspy

    from stageflow.runtime.sendable import pickle_for_workers

    def send(obj: Any, what: str) -> bytes:
        return pickle_for_workers(obj, what, _SEND_HINT, dumps=cloudpickle.dumps, dest="the worker processes")

    payload: dict[str, Any] = {"allow_modules": list(allow_modules)}
    if isinstance(source, str | os.PathLike):
        payload["program_path"] = str(Path(source).resolve())
    else:
        payload["program_pickle"] = send(program, "program")
    lm = dspy.settings.lm if lm is None else lm
    adapter = dspy.settings.adapter if adapter is None else adapter
    payload["lm"] = lm if isinstance(lm, str) or lm is None else send(lm, "LM")
    payload["adapter"] = None if adapter is None else send(adapter, "adapter")
    cache = getattr(dspy, "cache", None)
    payload["cache"] = {
        "enable_disk_cache": bool(getattr(cache, "enable_disk_cache", True)),
        "enable_memory_cache": bool(getattr(cache, "enable_memory_cache", True)),
    }
    return payload


def _build(payload: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The program and the ``dspy.context`` settings, inside a worker process."""
    if "program" in payload:  # forked: the objects themselves
        return payload["program"], payload["settings"]
    import cloudpickle
    import dspy

    from stageflow.runtime.program import load_program, run_settings

    if "program_path" in payload:
        program = load_program(payload["program_path"], payload["allow_modules"])
    else:
        program = cloudpickle.loads(payload["program_pickle"])
    lm, adapter = payload["lm"], payload["adapter"]
    lm = cloudpickle.loads(lm) if isinstance(lm, bytes) else lm
    adapter = cloudpickle.loads(adapter) if isinstance(adapter, bytes) else adapter
    dspy.configure_cache(**payload["cache"])
    return program, run_settings(lm, adapter)


def _worker_main(payload: dict[str, Any], conns: list[Connection], inherited: list[Connection]) -> None:
    """A worker process: one thread per connection, each running the records it receives."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if hasattr(signal, "pthread_sigmask"):  # (started with it blocked: see ProcessExecutor._start)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if "program" in payload:  # forked while holding the import lock (see _no_import_in_flight)
        import _imp

        while _imp.lock_held():
            _imp.release_lock()
    for conn in inherited:  # the parent's ends: this process must not keep them open
        with contextlib.suppress(OSError):
            conn.close()
    if "program" in payload:
        _own_connections()
        _reseed()
    _exit_with_parent()
    try:
        program, settings = _build(payload)
        if payload.get("cap") is not None:
            from stageflow.engine.concurrency import configure

            configure(max_concurrency=payload["cap"])
    except BaseException as exc:  # tell the parent why, on every connection, then stop
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.send(("setup_failed", f"{type(exc).__name__}: {exc}"))
        _stop()
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.send(("ready", os.getpid()))
    context = payload.get("context") or contextvars.copy_context()
    threads = [
        threading.Thread(target=context.copy().run, args=(_serve, conn, program, settings), daemon=True)
        for conn in conns
    ]
    with batch_heap():  # (the program's heap, copied from the parent, left alone by the collector)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    _stop()


def _stop() -> None:
    """End this worker now: flush what it exports, caches to a file and prints, and exit without
    waiting for threads a stage may have left running (the parent waits for this process)."""
    from stageflow.engine.hooks import active_hooks

    for hook in active_hooks():  # (hooks that export from here: the OpenTelemetry one)
        flush = getattr(hook, "flush", None)
        if callable(flush) and getattr(hook, "exports_from_workers", False):
            with contextlib.suppress(Exception):
                flush()
    write_queue = sys.modules.get("stageflow.policies.write_queue")
    if write_queue is not None:  # (stage caches kept in a file: commit what this worker queued)
        with contextlib.suppress(Exception):
            write_queue.flush_all()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _reseed() -> None:
    """A forked worker starts with the parent's random state: Python's ``random`` reseeds itself at a
    fork, numpy's global generator does not (every worker would draw the same numbers)."""
    np = sys.modules.get("numpy")
    if np is not None:
        with contextlib.suppress(Exception):
            np.random.seed()


def _exit_with_parent() -> None:
    """Stop this worker when the batch's process is gone (killed): its records' results could not
    be kept, so running them on would only spend model calls."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="stageflow-parent-watch", daemon=True).start()


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    if not hasattr(signal, "pthread_sigmask"):  # (not Unix)
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """A Ctrl-C meanwhile is raised as ``KeyboardInterrupt`` when the block ends, not inside it (in
    the main thread; in another thread Ctrl-C is raised in the main thread, never here)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[int] = []
    try:
        old = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    except (ValueError, OSError):  # (not the main interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if pressed and old is not signal.SIG_IGN:
        if callable(old):
            old(signal.SIGINT, None)
        raise KeyboardInterrupt


@contextlib.contextmanager
def _no_import_in_flight(timeout: float = 2.0) -> Iterator[None]:
    """Hold Python's import lock, at a moment no other thread is part-way through importing a module.

    A forked child has only the thread that forked: a module another thread was importing at that
    instant stays half-imported in the child, its lock held forever, and the first record that
    imports it (DSPy imports modules inside its LM call) would wait for ever. Holding the import lock
    keeps new imports from starting until the fork is done; the child releases it first thing.
    After ``timeout`` seconds of imports that do not end, it forks anyway (with a warning).
    """
    import _imp
    import importlib._bootstrap as bootstrap

    me = threading.get_ident()
    deadline = time.monotonic() + timeout
    while True:
        _imp.acquire_lock()
        try:  # (a Ctrl-C here must not leave the lock held: every other thread's imports would wait)
            locks = [ref() for ref in list(getattr(bootstrap, "_module_locks", {}).values())]
            quiet = all(getattr(lock, "owner", None) in (None, me) for lock in locks if lock is not None)
        except BaseException:
            _imp.release_lock()
            raise
        if quiet:
            break
        if time.monotonic() > deadline:
            import warnings

            warnings.warn(
                f"another thread has been importing a module for {timeout:g} s; starting the batch worker "
                "processes anyway (a worker that needs that module may wait for it for ever: use "
                "ProcessBackend(start_method='spawn') if it does)",
                RuntimeWarning,
                stacklevel=2,
            )
            break
        _imp.release_lock()
        time.sleep(0.001)
    try:
        yield
    finally:
        _imp.release_lock()


def _own_connections() -> None:
    """A forked worker must not share the parent's open HTTP connections (two processes writing to
    one socket garble both): forget LiteLLM's cached clients, so this process opens its own. The
    parent's sockets are not closed (that would close them for the parent too)."""
    litellm = sys.modules.get("litellm")
    cache = getattr(litellm, "in_memory_llm_clients_cache", None)
    for name in ("cache_dict", "ttl_dict"):
        table = getattr(cache, name, None)
        if isinstance(table, dict):
            table.clear()
    heap = getattr(cache, "expiration_heap", None)
    if isinstance(heap, list):
        heap.clear()


def _serve(conn: Connection, program: Any, settings: dict[str, Any]) -> None:
    """Receive chunks of record inputs, send back their outcomes, until the parent is gone.

    Every chunk gets an answer, one outcome per record, whatever happens here: the parent waits for
    it, so a record that raises ``KeyboardInterrupt``, inputs that cannot be rebuilt in this process,
    an outcome that cannot be sent all become error rows rather than a thread that silently stops.
    """
    import dspy

    with dspy.context(**settings) if settings else contextlib.nullcontext():
        while True:
            try:
                message = conn.recv_bytes()
            except (EOFError, OSError):
                return
            if message == _STOP:
                return
            count = int.from_bytes(message[:4], "big")
            try:
                outcomes = [_run_one(program, inputs) for inputs in _loads(message[4:])]
            except BaseException as exc:  # the inputs cannot be rebuilt in this process
                outcomes = [_failed(_unloadable(exc)) for _ in range(count)]
            try:
                conn.send(outcomes)
            except (EOFError, OSError):
                return
            except BaseException as exc:  # an outcome that cannot be pickled (never expected: JSON text)
                with contextlib.suppress(EOFError, OSError):
                    conn.send([_failed(exc, o) for o in outcomes])


_STOP = b"stop"


def _loads(data: bytes) -> Any:
    return ForkingPickler.loads(data)


def _run_one(program: Any, inputs: dict[str, Any]) -> Outcome:
    """:func:`run_record`, with a ``KeyboardInterrupt`` a stage raises as the record's error: in a
    worker process it is never the user's Ctrl-C (the parent handles that), so it ends the record."""
    try:
        return run_record(program, inputs)
    except BaseException as exc:
        return _failed(exc)


def _failed(exc: BaseException, outcome: Outcome | None = None) -> Outcome:
    if outcome is None:
        return Outcome(False, None, error_info(exc), Usage(), 0.0)
    return Outcome(False, None, error_info(exc), outcome.usage, outcome.elapsed)


def _unloadable(exc: BaseException) -> StageflowError:
    err = UnsendableInputError(
        f"the record's inputs could not be rebuilt in the worker process ({type(exc).__name__}: {exc}); "
        "the record did not run.",
        hint="give records plain data (text, numbers, lists, dicts); with start_method='spawn', a class "
        "defined in the main script must be importable from a module",
    )
    err.__cause__ = exc
    return err


class UnsendableInputError(StageflowError):
    """A record's inputs cannot be sent to (or rebuilt in) a worker process: the record's error; it
    did not run."""

    default_code = "unsendable_input"


class WorkerDiedError(StageflowError):
    """The worker process running a record died (killed, out of memory, crashed): the record's error.
    ``retry_failed`` runs such records again."""

    default_code = "worker_died"


#: The parent's ends of the pipes of every process-backend run going on in this process: a forked
#: worker closes them all (one kept open by another run's worker would hide that run's end from it).
_PARENT_ENDS: set[Connection] = set()
_PARENT_ENDS_LOCK = threading.Lock()


class ProcessExecutor:
    """Parent side: the worker processes of one run. Worker thread ``k`` of the batch loop talks to
    process ``k % n`` over its own pipe (no multiplexing: a pipe carries one chunk at a time)."""

    name = "processes"
    chunk = 1

    def __init__(
        self, ctx: Any, payload: dict[str, Any], n: int, concurrency: int, max_restarts: int
    ) -> None:
        self._ctx = ctx
        self._forked = ctx.get_start_method() == "fork"
        self._ready_timeout = 120.0 if self._forked else 600.0  # (a fresh interpreter imports DSPy)
        self._payload = payload
        self.n = n
        self.workers = concurrency
        self._restarts_left = max_restarts
        self._lock = threading.Lock()
        self._restarting = [threading.Lock() for _ in range(n)]
        self._conns: list[Connection | None] = [None] * concurrency
        self._procs: list[Any] = [None] * n
        self._retired: list[Any] = []  # replaced processes (closed with the rest at the end)
        self._generation = [0] * n
        self._closed = False
        self._busy = 0  # records being run now (close() tells a finished run from an abandoned one)
        self._reap_lock = threading.Lock()
        try:
            for i in range(n):
                self._start(i)
            for i in range(n):
                self._wait_ready(i)
        except BaseException:
            self.close()
            raise

    # -- processes -------------------------------------------------------------------------------
    def _slots(self, i: int) -> list[int]:
        return list(range(i, self.workers, self.n))

    def _start(self, i: int) -> None:
        """Start worker process ``i`` with a fresh pipe for each of its batch-loop threads."""
        pairs = [self._ctx.Pipe(duplex=True) for _ in self._slots(i)]
        mine = [parent for parent, _ in pairs]
        with _PARENT_ENDS_LOCK:
            _PARENT_ENDS.update(mine)
            inherited = list(_PARENT_ENDS) if self._forked else []
        proc = self._ctx.Process(
            target=_worker_main,
            args=(self._payload, [child for _, child in pairs], inherited),
            name=f"stageflow-batch-worker-{i}",
            daemon=False,  # (a daemonic process may not start processes: a stage could want to)
        )
        # A forked (or forkserver) worker starts with Ctrl-C blocked, until it ignores it: it is the
        # parent's to handle. (A spawned interpreter resets the mask: a Ctrl-C while it imports still
        # prints its traceback.) A Ctrl-C pressed meanwhile is raised here once the new process is
        # registered, so close() knows every process started: one started but not registered was
        # left running, and the interpreter waited for it at exit. (Blocking it in this thread is
        # not enough: another thread of the process can take the signal, and Python then raises
        # KeyboardInterrupt in the main thread wherever it is.)
        with _ctrl_c_deferred(), _sigint_blocked():
            with _no_import_in_flight() if self._forked else contextlib.nullcontext():
                proc.start()
            for _, child in pairs:
                child.close()  # only the worker holds its ends: its exit is seen here as EOF
            with self._lock:
                for k, parent in zip(self._slots(i), mine, strict=True):
                    _drop(self._conns[k])
                    self._conns[k] = parent
                if self._procs[i] is not None:
                    self._retired.append(self._procs[i])
                self._procs[i] = proc
                closed = self._closed
        if closed:  # close() ran meanwhile: this one is not needed
            proc.kill()
            for conn in mine:
                _drop(conn)

    def _wait_ready(self, i: int) -> None:
        proc = self._procs[i]
        for k in self._slots(i):
            conn = self._conns[k]
            if conn is None:
                raise BackendError("the process backend is closed.")
            kind, detail = "setup_failed", ""
            try:
                if conn.poll(self._ready_timeout):
                    kind, detail = conn.recv()
                else:
                    proc.kill()
                    detail = f"the process did not start within {self._ready_timeout:g} s"
            except (EOFError, OSError):
                self._reap(proc, 5.0)
                detail = f"the process {_exit_text(proc)} before it was ready"
            if kind == "ready":
                continue
            code = proc.exitcode
            hint = "check that the program, its modules and its files can be loaded in a new process"
            if code is not None and code < 0:  # killed from outside while it started
                hint = "look for what kills the worker processes (memory: lower --concurrency)"
            elif not self._forked:
                hint += (
                    " (its error is printed above); a script that starts a batch with start_method "
                    f'{self._ctx.get_start_method()!r} must do so under `if __name__ == "__main__":`, '
                    "since each worker imports the script"
                )
            else:
                hint += " (its error is printed above)"
            raise ConfigurationError(
                f"the batch worker processes could not build the program: {detail}",
                code="worker_setup_failed",
                hint=hint,
            )

    def _alive(self, proc: Any) -> bool:
        with self._reap_lock:
            return bool(proc.is_alive())

    def _reap(self, proc: Any, timeout: float) -> None:
        """Wait for ``proc`` to exit (one thread at a time: two threads reaping one process at once
        could each see it neither running nor exited)."""
        with self._reap_lock:
            proc.join(timeout=timeout)

    def _replace(self, i: int, generation: int, proc: Any) -> None:
        """Worker ``i`` died: start another (once per death), or stop the batch when out of restarts.
        Only the threads of worker ``i`` wait for its successor; the others and :meth:`close` do not."""
        with self._restarting[i]:  # (a second thread that saw the death waits for the successor)
            with self._lock:
                if self._closed or self._generation[i] != generation:
                    return  # already replaced by another thread
                if self._restarts_left <= 0:
                    raise BackendError(
                        f"batch worker process {i} (pid {proc.pid}) {_exit_text(proc)}, and the process "
                        "backend has no restarts left (max_restarts): the batch stopped.",
                        hint="look for what kills the workers (memory: lower --concurrency), then resume",
                    )
                self._restarts_left -= 1
                self._generation[i] += 1
            with contextlib.suppress(OSError):
                proc.kill()  # (it may be alive but unusable: its pipe failed)
            self._reap(proc, 5.0)
            self._start(i)
            self._wait_ready(i)

    # -- the Executor protocol -------------------------------------------------------------------
    def thread_scope(self, worker: int) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def run(self, worker: int, records: list[Record]) -> list[Outcome]:
        i = worker % self.n
        message = len(records).to_bytes(4, "big") + _dumps(records)
        for attempt in range(2):
            with self._lock:
                conn, generation, proc = self._conns[worker], self._generation[i], self._procs[i]
                if conn is not None:
                    self._busy += 1
            if conn is None:
                raise BackendError("the process backend is closed.")
            try:
                try:
                    conn.send_bytes(message)
                except (EOFError, OSError):  # it died before taking them: nothing ran; try its successor
                    self._replace(i, generation, proc)
                    if attempt == 0:
                        continue
                    raise
                try:
                    # Wait for the answer, looking at the process twice a second: a process the
                    # worker started holds copies of its pipes (and of its sentinel), so the worker's
                    # end need not close them.
                    while not conn.poll(0.5):
                        if not self._alive(proc):
                            if conn.poll():
                                break
                            raise EOFError
                    outcomes: list[Outcome] = conn.recv()
                    return outcomes
                except (EOFError, OSError):
                    self._reap(proc, 1.0)
                    died = (
                        f"batch worker process {i} (pid {proc.pid}) {_exit_text(proc)} while running "
                        "this record"
                    )
                    self._replace(i, generation, proc)
                    raise WorkerDiedError(  # (the pipe's EOFError says nothing more)
                        died, hint="resume with retry_failed (--retry-failed) to run it again"
                    ) from None
            finally:
                with self._lock:
                    self._busy -= 1
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Stop the workers: at once when records are still running (a second Ctrl-C abandoned them)
        or on Ctrl-C while waiting, else after they finish their current work (5 s at most, all
        together)."""
        with self._lock:
            self._closed = True
            abandoning = self._busy > 0
            conns, self._conns = self._conns, [None] * self.workers
            procs = [p for p in self._procs if p is not None]
            retired = self._retired
        if abandoning:
            _kill(procs)
        for conn in conns:
            if conn is not None and not abandoning:
                with contextlib.suppress(OSError):
                    conn.send_bytes(_STOP)
            _drop(conn)
        try:
            deadline = time.monotonic() + 5.0
            for proc in procs:
                proc.join(timeout=max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:  # Ctrl-C while they finish: stop waiting (every record is in)
            pass
        _kill([p for p in procs if p.is_alive()])
        for proc in procs:
            proc.join(timeout=5)
        for proc in procs + retired:
            with contextlib.suppress(ValueError):  # (a process still running cannot be closed)
                proc.close()


def _drop(conn: Connection | None) -> None:
    """Close a parent-side pipe end and forget it."""
    if conn is None:
        return
    with _PARENT_ENDS_LOCK:
        _PARENT_ENDS.discard(conn)
    with contextlib.suppress(OSError):
        conn.close()


def _kill(procs: list[Any]) -> None:
    for proc in procs:
        with contextlib.suppress(OSError, ValueError):
            proc.kill()


def _dumps(records: list[Record]) -> bytes:
    """The records' inputs as bytes for a worker; an input that cannot be pickled is an error naming
    its field (the record fails; nothing ran)."""
    inputs = [r.inputs for r in records]
    try:
        return bytes(ForkingPickler.dumps(inputs))
    except Exception as exc:
        field = next((k for r in records for k, v in r.inputs.items() if not _picklable(v)), None)
        where = f"the input field '{field}'" if field is not None else "an input field"
        raise UnsendableInputError(
            f"{where} of this record cannot be sent to a worker process ({type(exc).__name__}: {exc}); the "
            "record did not run.",
            field=field,
            hint="give records plain data (text, numbers, lists, dicts), or run this batch with "
            "backend='local'",
        ) from exc


def _picklable(value: Any) -> bool:
    try:
        ForkingPickler.dumps(value)
    except Exception:
        return False
    return True


def _exit_text(proc: Any) -> str:
    code = proc.exitcode
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def refuse_unshareable_limits(backend: str, forked: bool = False) -> None:
    """Raise :class:`ConfigurationError` when something in force here would not hold in worker
    processes (``backend``): a budget or rate limit (each process would spend its own copy), or
    hooks such as a ``Tracer`` or ``Profiler`` (what they collect would stay in the workers, so the
    caller's would stay empty). OpenTelemetry instrumentation is allowed in ``forked`` workers: each
    exports its own spans, flushed when it stops."""
    from stageflow.budgets.ratelimit import rate_limits
    from stageflow.budgets.scope import active_chain
    from stageflow.engine.hooks import active_hooks

    found = []
    if active_chain():
        found.append("a budget (stageflow.budget)")
    limits = rate_limits()
    if limits:
        found.append(f"rate limits ({', '.join(sorted(limits))})")
    if found:
        raise ConfigurationError(
            f"{' and '.join(found)} in force here cannot be shared with the {backend} backend's worker "
            "processes: each process would count against its own copy, so together they would overshoot it.",
            field="backend",
            code="unshareable_limits",
            hint="run this batch with backend='local' (threads share budgets and rate limits)"
            + (
                ", or give the pipeline its own run budget (pipeline.set_budget(...)), which holds per "
                "record in any backend"
                if active_chain()
                else ""
            ),
        )
    hooks = [h for h in active_hooks() if not (forked and getattr(h, "exports_from_workers", False))]
    if hooks:
        names = ", ".join(sorted({type(h).__name__ for h in hooks}))
        raise ConfigurationError(
            f"hooks attached here ({names}) would not see this batch: its records run in the {backend} "
            "backend's worker processes, so what the hooks collect would stay there and yours would stay "
            "empty.",
            field="backend",
            code="unshareable_hooks",
            hint="run this batch with backend='local' to trace or profile it"
            + ("; OpenTelemetry instrumentation works with forked workers" if backend != "ray" else ""),
        )
