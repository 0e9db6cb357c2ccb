"""What the concurrent patterns share: run stage branches through the engine's fan-out.

A branch is ``(entry, branch_state)``: the engine's :func:`call_stage` runs ``entry`` over its own
copy of the state, with its own :class:`RunInfo`; the pattern then merges what each branch
produced. Sync calls fan out on threads, or, when every branch can be awaited natively (an ``async
def`` stage, a predictor whose LM awaits its own engine: :mod:`stageflow.engine.awaitable`), on
tasks on stageflow's background event loop; async calls fan out on tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from stageflow import _checks
from stageflow.engine.awaitable import awaits_natively
from stageflow.engine.bare import Outcomes, abare_fan_out, bare_ready, events_in_input_order, in_input_order
from stageflow.engine.concurrency import (
    BranchOutcome,
    FailurePolicy,
    afan_out,
    budget_chain,
    child_budget,
    fan_out,
    on_background_loop,
    run_on_background_loop,
)
from stageflow.engine.fanout import BranchTimeoutError, StopSignal, enclosing_fan_out
from stageflow.engine.plan import FUNCTION, StageEntry, join_path
from stageflow.engine.pool import to_thread
from stageflow.engine.runner import acall_stage, call_stage
from stageflow.engine.streaming import listening, loop_token
from stageflow.errors import ConfigurationError, PipelineError, StageTimeoutError
from stageflow.state import RunInfo

__all__ = [
    "Branch",
    "BranchResult",
    "Branches",
    "FlatResults",
    "absorb",
    "arun_branches",
    "check_fanout_options",
    "fanout_options",
    "flat_results",
    "raise_all_failed",
    "run_branches",
    "usage_kept",
]


@dataclass(slots=True)
class Branch:
    """One unit of concurrent work: run ``entry`` over ``state`` (a private copy)."""

    entry: StageEntry
    state: dict[str, Any]
    run: RunInfo = None  # type: ignore[assignment]  # given before the fan-out starts (see _own_runs)


_T = TypeVar("_T")


class _OnDemand(Sequence[_T]):
    """A sequence of one item per branch, made all at once when first read (:meth:`made`)."""

    __slots__ = ()
    entries: list[StageEntry]

    def made(self) -> list[_T]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: Any) -> Any:
        return self.made()[i]

    def __iter__(self) -> Iterator[_T]:
        return iter(self.made())


class Branches(_OnDemand[Branch]):
    """Branches given as two lists, their entries and their states: a :class:`Branch` object is made
    for each only when one is asked for (a bare fan-out asks once every branch is done, so no object
    per branch stays alive while they wait)."""

    __slots__ = ("_made", "entries", "run", "states")

    def __init__(self, entries: list[StageEntry], states: list[dict[str, Any]]) -> None:
        self.entries, self.states = entries, states
        self.run: RunInfo | None = None  # the run every branch records into, when they share one
        self._made: list[Branch] | None = None

    def made(self) -> list[Branch]:
        if self._made is None:
            run = self.run
            self._made = [Branch(e, s, run) for e, s in zip(self.entries, self.states, strict=True)]  # type: ignore[arg-type]
        return self._made


@dataclass(slots=True)
class BranchResult:
    """A branch after the fan-out: its outcome and the fields it produced."""

    branch: Branch
    outcome: BranchOutcome
    produced: dict[str, Any]


class FlatResults(_OnDemand[BranchResult]):
    """A fan-out's results as flat lists, indexed by branch position: the branches' entries and
    states, what each did (:class:`~stageflow.engine.bare.Outcomes`) and the runs they recorded
    into (one, when they shared it). A bare fan-out's results stay flat — no object per branch — until
    a :class:`BranchResult` is asked for; :func:`flat_results` gives any results this shape."""

    __slots__ = ("_branches", "_made", "entries", "outcomes", "prefix", "runs", "states")

    def __init__(
        self,
        branches: Sequence[Branch],
        entries: list[StageEntry],
        states: list[dict[str, Any]],
        outcomes: Outcomes,
        runs: list[RunInfo],
        prefix: str,
    ) -> None:
        self._branches, self.entries, self.states, self.outcomes = branches, entries, states, outcomes
        self.runs, self.prefix = runs, prefix
        self._made: list[BranchResult] | None = None

    def made(self) -> list[BranchResult]:
        if self._made is None:
            self._made = _results(self._branches, None, self.outcomes.listed(), self.prefix)
        return self._made


def flat_results(results: Sequence[BranchResult]) -> FlatResults:
    """``results`` as :class:`FlatResults` (the same object when they already are)."""
    if isinstance(results, FlatResults):
        return results
    runs: dict[int, RunInfo] = {}
    for r in results:
        runs.setdefault(id(r.branch.run), r.branch.run)
    flat = FlatResults(
        [r.branch for r in results],
        [r.branch.entry for r in results],
        [r.branch.state for r in results],
        Outcomes.of([r.outcome for r in results]),
        list(runs.values()),
        "",
    )
    flat._made = list(results)
    return flat


def check_fanout_options(
    max_concurrency: int | None, on_error: str, timeout: float | None, where: str
) -> None:
    """Validate the options every concurrent pattern takes."""
    if max_concurrency is not None and (
        isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1
    ):
        raise ConfigurationError(
            f"{where}: max_concurrency must be a positive int or None, got {max_concurrency!r}.",
            field="max_concurrency",
            code="bad_option",
        )
    if on_error not in ("collect", "skip", "fail_fast"):
        raise ConfigurationError(
            f"{where}: on_error must be 'collect', 'skip' or 'fail_fast', got {on_error!r}.",
            field="on_error",
            code="bad_option",
        )
    if timeout is not None:
        _checks.seconds(timeout, where, "timeout")


def fanout_options(owner: Any) -> dict[str, Any]:
    """The fan-out options a concurrent pattern holds (``max_concurrency``, ``on_error``, ``timeout``)."""
    return {
        "max_concurrency": owner.max_concurrency,
        "on_error": owner.on_error,
        "timeout": owner.timeout,
        "name": type(owner).__name__,
    }


def _window(n: int, own: int | None) -> int:
    caps = [b.limit for b in budget_chain()]
    if own is not None:
        caps.append(own)
    return min([n, *caps]) if caps else n


def _produced(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in after.items() if k not in before or before[k] is not v}


def _bare(branches: Sequence[Branch], until: Any, timeout: float | None) -> bool:
    """No early stop, no timeout, and no branch given a run of its own (a parallel group's branches
    carry the fields earlier groups failed to write): the branches may share one run."""
    if until is not None or timeout is not None:
        return False
    if isinstance(branches, Branches):
        return branches.run is None and branches._made is None
    return all(b.run is None for b in branches)


def _entries(branches: Sequence[Branch]) -> list[StageEntry]:
    return branches.entries if isinstance(branches, Branches) else [b.entry for b in branches]


def _share_run(branches: Sequence[Branch]) -> tuple[RunInfo, list[dict[str, Any]]]:
    """One run for every branch; the branches' states."""
    shared = RunInfo()
    if isinstance(branches, Branches):
        branches.run = shared
        return shared, branches.states
    for b in branches:
        b.run = shared
    return shared, [b.state for b in branches]


def _shared_results(
    branches: Sequence[Branch],
    entries: list[StageEntry],
    before: Sequence[dict[str, Any]] | None,
    outcomes: list[BranchOutcome],
    shared: RunInfo,
    prefix: str,
) -> Sequence[BranchResult]:
    """Results of branches that shared one run: flat unless the caller needs what each produced."""
    if before is not None:
        return _results(branches, before, outcomes, prefix)
    states = branches.states if isinstance(branches, Branches) else [b.state for b in branches]
    return FlatResults(branches, entries, states, Outcomes.of(outcomes), [shared], prefix)


def _on_threads(entry: StageEntry) -> bool:
    """A plain ``def`` function stage that runs on a worker thread (not ``blocking=False``)."""
    return entry.kind == FUNCTION and not entry.is_async_fn and entry.blocking


def _own_runs(branches: Sequence[Branch]) -> None:
    """Each branch records into a run of its own, joined to the caller's in input order afterwards."""
    for b in branches:
        if b.run is None:
            b.run = RunInfo()


def _timeout_error(branch: Branch, prefix: str, error: BranchTimeoutError) -> StageTimeoutError:
    path = join_path(prefix, branch.entry.path)
    err = StageTimeoutError(
        f"Stage '{path}' ({branch.entry.label}) took longer than the fan-out's timeout of {error.seconds}s.",
        stage_path=path,
        hint="raise the pattern's timeout=, or give the stage its own TimeoutPolicy and a Fallback",
    )
    err.path_is_full = True
    err.__cause__ = error
    return err


@contextlib.contextmanager
def _path_timeouts(branches: Sequence[Branch], prefix: str) -> Iterator[None]:
    """A fail-fast timeout leaves the fan-out as a StageTimeoutError naming the branch's path."""
    try:
        yield
    except BranchTimeoutError as e:
        raise _timeout_error(branches[e.index], prefix, e) from None


def _results(
    branches: Sequence[Branch],
    before: Sequence[dict[str, Any]] | None,
    outcomes: list[BranchOutcome],
    prefix: str,
) -> list[BranchResult]:
    for o in outcomes:
        if isinstance(o.error, BranchTimeoutError):
            o.error = _timeout_error(branches[o.index], prefix, o.error)
    return [
        BranchResult(b, o, _produced(before[i], b.state) if o.ok and before is not None else {})
        for i, (b, o) in enumerate(zip(branches, outcomes, strict=True))
    ]


class _SharedCalls(Sequence[Callable[[], Any]]):
    """The branches' calls for :func:`fan_out`, made when a thread takes one (none waits as an object)."""

    __slots__ = ("branches", "owner", "prefix", "run")

    def __init__(self, owner: Any, branches: Sequence[Branch], run: RunInfo, prefix: str) -> None:
        self.owner, self.branches, self.run, self.prefix = owner, branches, run, prefix

    def __len__(self) -> int:
        return len(self.branches)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(self.branches, Branches):
            entry, state = self.branches.entries[i], self.branches.states[i]
        else:
            entry, state = self.branches[i].entry, self.branches[i].state
        return functools.partial(call_stage, self.owner, entry, state, self.run, (), self.prefix)


def run_branches(
    owner: Any,
    branches: Sequence[Branch],
    hooks: tuple[Any, ...],
    prefix: str,
    *,
    max_concurrency: int | None,
    on_error: FailurePolicy,
    timeout: float | None,
    name: str,
    until: Callable[[list[BranchOutcome]], bool] | None = None,
    produced: bool = True,
    on_start: Callable[[Callable[[], None]], None] | None = None,
) -> Sequence[BranchResult]:
    """Run ``branches`` concurrently from a sync call (``on_start``: see :func:`fan_out`)."""
    entries = _entries(branches)
    if branches and on_background_loop() and any(e.is_async_fn for e in entries):
        # (threads would hand the async stages back to this very loop, which waits on them)
        first = next(e for e in entries if e.is_async_fn)
        raise ConfigurationError(
            f"{name}: its stage '{first.path}' is an async function, and the fan-out was called "
            "synchronously from stageflow's own event loop (from an async stage or an async engine); "
            "it cannot run there without blocking the loop it needs.",
            stage_path=first.path,
            code="async_in_sync",
            hint="call it with `await <fan-out>.acall(...)` from the async stage",
        )
    from_loop = on_background_loop()
    if (
        branches
        and on_start is None
        and not from_loop
        and not _LOOP_WAITS.get()
        and not listening()
        and loop_token() is None
        and awaits_natively(owner, entries)
    ):
        return run_on_background_loop(  # type: ignore[no-any-return]
            arun_branches(
                owner,
                branches,
                hooks,
                prefix,
                max_concurrency=max_concurrency,
                on_error=on_error,
                timeout=timeout,
                name=name,
                until=until,
                produced=produced,
            ),
            stop_with=enclosing_fan_out(),  # (stopped with the thread fan-out it runs in, if any)
        )

    # (threads started from the loop, which waits for them: a fan-out inside them must not send its
    # branches to that loop, or both would wait for ever)
    with _loop_waits(from_loop):
        before = [dict(b.state) for b in branches] if produced else None
        if _bare(branches, until, timeout) and bare_ready(entries, hooks, max_concurrency, is_async=False):
            # Plain function stages, nothing around their calls: the threads share one run (fewer
            # objects alive per waiting branch), put back in input order afterwards.
            shared, _ = _share_run(branches)
            calls = _SharedCalls(owner, branches, shared, prefix)
            outcomes = fan_out(calls, on_error=on_error, on_start=on_start)
            in_input_order(shared, entries)
            events_in_input_order(shared, [o.value for o in outcomes])
            return _shared_results(branches, entries, before, outcomes, shared, prefix)
        _own_runs(branches)

        def thunk(b: Branch) -> Callable[[], Any]:
            return lambda: call_stage(owner, b.entry, b.state, b.run, hooks, prefix)

        with child_budget(max_concurrency, name), _path_timeouts(branches, prefix):
            outcomes = fan_out(
                [thunk(b) for b in branches],
                max_concurrency=_window(len(branches), max_concurrency),
                on_error=on_error,
                timeout=timeout,
                until=until,
                on_start=on_start,
            )
        return _results(branches, before, outcomes, prefix)


async def arun_branches(
    owner: Any,
    branches: Sequence[Branch],
    hooks: tuple[Any, ...],
    prefix: str,
    *,
    max_concurrency: int | None,
    on_error: FailurePolicy,
    timeout: float | None,
    name: str,
    until: Callable[[list[BranchOutcome]], bool] | None = None,
    produced: bool = True,
) -> Sequence[BranchResult]:
    """Run ``branches`` concurrently from an async call (results in input order)."""
    entries = _entries(branches)
    if entries and not listening() and all(_on_threads(e) for e in entries):
        # Plain function stages, which run on threads either way: the sync fan-out runs them (its
        # fail_fast stops further starts at once, its timeouts abandon threads; what each branch
        # produced is worked out there, once), awaited from the loop on a thread of its own; a
        # cancelled caller stops it from starting more.
        # (the worker may start the fan-out after this task was cancelled: it then starts nothing)
        signal = StopSignal()
        try:
            return await to_thread(  # type: ignore[no-any-return]
                run_branches,
                owner,
                branches,
                hooks,
                prefix,
                max_concurrency=max_concurrency,
                on_error=on_error,
                timeout=timeout,
                name=name,
                until=until,
                produced=produced,
                on_start=signal.register,
            )
        except asyncio.CancelledError:
            signal.stop()
            raise
    before = [dict(b.state) for b in branches] if produced else None
    if _bare(branches, until, timeout) and bare_ready(entries, hooks, max_concurrency, is_async=True):
        # Plain async function stages and nothing to wrap around their awaits: bare tasks, one
        # shared run (the widest fan-outs keep far fewer objects alive; see stageflow.engine.bare).
        shared, states = _share_run(branches)
        done = await abare_fan_out(owner, entries, states, shared, prefix, on_error)
        if before is not None:
            return _results(branches, before, done.listed(), prefix)
        return FlatResults(branches, entries, states, done, [shared], prefix)
    _own_runs(branches)

    def thunk(b: Branch) -> Callable[[], Any]:
        return lambda: acall_stage(owner, b.entry, b.state, b.run, hooks, prefix)

    with child_budget(max_concurrency, name), _path_timeouts(branches, prefix):
        outcomes = await afan_out(
            [thunk(b) for b in branches],
            max_concurrency=_window(len(branches), max_concurrency),
            on_error=on_error,
            timeout=timeout,
            until=until,
        )
    return _results(branches, before, outcomes, prefix)


#: Set in the threads of a fan-out the background loop waits for (see :func:`run_branches`).
_LOOP_WAITS: contextvars.ContextVar[bool] = contextvars.ContextVar("stageflow_loop_waits", default=False)


@contextlib.contextmanager
def _loop_waits(from_loop: bool) -> Iterator[None]:
    token = _LOOP_WAITS.set(True) if from_loop else None
    try:
        yield
    finally:
        if token is not None:
            _LOOP_WAITS.reset(token)


def raise_all_failed(what: str, results: Sequence[BranchResult]) -> None:
    """Every branch failed: a :class:`PipelineError` carrying each branch's error, by stage path."""
    errors = {r.branch.entry.path: r.outcome.error for r in results}
    err = PipelineError(
        f"{what}: " + "; ".join(f"'{p}': {type(e).__name__}: {e}" for p, e in errors.items()),
        code="all_failed",
        errors=errors,
    )
    raise err from next(iter(errors.values()))


@contextlib.contextmanager
def usage_kept(run: RunInfo, branches: Sequence[Branch]) -> Iterator[None]:
    """A fan-out that raises (a fail-fast failure, a timeout, an interrupt) keeps in ``run`` — which
    its error carries out — the LM usage its branches recorded until then: the failed branch's, the
    finished ones', and what those still running had used. Its profile row, its trace event and the
    run's totals then count the LM calls its branches made (they counted none of them)."""
    try:
        yield
    except BaseException:
        seen: set[int] = set()
        for b in branches:
            branch_run = b.run
            if branch_run is not None and branch_run is not run and id(branch_run) not in seen:
                seen.add(id(branch_run))
                run.absorb_usage(branch_run)
        raise


def absorb(run: RunInfo, results: Sequence[BranchResult]) -> None:
    """Add what each branch recorded (trace, stage outputs, events, nested details and usage) to the
    parent run; branch paths are already the parent's."""
    for branch_run in flat_results(results).runs:  # (branches that ran bare share one)
        run.absorb("", branch_run)
