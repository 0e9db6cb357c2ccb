"""Usage per stage: LM calls, tokens, cost, cache hits, retries and repairs.

Every pipeline call keeps a :class:`UsageTable` (``result.run.usage``) keyed by its stages' paths.
LM work is attributed to the stage that was running when it happened — across threads and tasks,
because the stage's path travels in a context variable. The outermost call connects DSPy to the
tables once, for the duration of the call:

- stageflow's wrapper of DSPy's LM execution (:mod:`stageflow.budgets.intercept`, installed by the
  first pipeline call) hands each call's result to :func:`note_lm_result` before DSPy reports it,
  which counts the call — billed, with its tokens and cost, or answered by DSPy's cache — whatever
  tracker DSPy reports to (a stage's own ``dspy.track_usage()``, a ``dspy.Parallel``'s per-thread
  copies) and whatever its history keeps (``disable_history``, ``max_history_size=0``);
- a usage tracker in DSPy's ``settings.usage_tracker`` slot forwards the tokens to a tracker that
  was already active (``dspy.track_usage()`` around the pipeline call), so DSPy's totals stay right,
  and a probe among DSPy's ``caller_modules`` receives DSPy's history entries: those two count the
  calls that did not go through DSPy's ``execute`` (an LM client of its own), and the tokens of a
  call that failed after the model billed part of it.

Nested pipelines keep their own table, which joins the enclosing one under the nested stage's path
when the nested call ends (as its trace records do), so ``result.run.usage`` rolls up the whole tree.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
import threading
from collections.abc import Iterator, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, fields
from typing import Any

__all__ = [
    "StageUsage",
    "UsageTable",
    "calling_stage",
    "close_run",
    "current_table",
    "finalized",
    "finalizing",
    "metering",
    "note_fast_fallback",
    "note_lm_result",
    "note_lm_wait",
    "open_run",
    "note_policy_event",
    "reported_cost",
    "run_events",
    "stage_scope",
    "unwatch_lm_calls",
    "using_table",
    "watch_lm_calls",
]


@dataclass(slots=True)
class StageUsage:
    """What one stage (or a subtree of stages) used.

    Attributes:
        lm_calls: LM calls that reached the model and answered, as DSPy's history counts them (a
            retried stage's calls each count; an attempt that raised does not; DSPy-cached answers
            do not; a request with ``n=3`` is one call).
        input_tokens: Prompt tokens of those calls.
        output_tokens: Completion tokens of those calls.
        cost: Their cost, when the model reports one (``None`` when none did).
        lm_cache_hits: LM calls DSPy answered from its cache (no tokens billed).
        cache_hits: Stage outputs served by stageflow's stage cache (the stage did not run).
        retries: Attempts retried by a :class:`~stageflow.RetryPolicy`.
        repairs: Outputs asked for again by a :class:`~stageflow.RepairPolicy`.
        limit_wait: Seconds its LM calls waited for a rate limit (:func:`stageflow.rate_limit`) or for
            calls in flight to settle a budget (:func:`stageflow.budget`).
        fast_fallbacks: LM calls whose prompt stageflow's fast adapter path left to DSPy's own
            adapter (a signature or value it does not cover; the reasons are in
            :func:`stageflow.lm.fast.fast_path_stats`). The call itself is the same either way.
    """

    lm_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float | None = None
    lm_cache_hits: int = 0
    cache_hits: int = 0
    retries: int = 0
    repairs: int = 0
    limit_wait: float = 0.0
    fast_fallbacks: int = 0

    def add(self, other: StageUsage) -> None:
        """Add ``other``'s counts to this one."""
        self.lm_calls += other.lm_calls
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        if other.cost is not None:
            self.cost = (self.cost or 0.0) + other.cost
        self.lm_cache_hits += other.lm_cache_hits
        self.cache_hits += other.cache_hits
        self.retries += other.retries
        self.repairs += other.repairs
        self.limit_wait += other.limit_wait
        self.fast_fallbacks += other.fast_fallbacks

    def minus(self, other: StageUsage) -> StageUsage:
        """What this usage has beyond ``other`` (an earlier reading of the same counters).

        >>> StageUsage(lm_calls=3, cost=0.5).minus(StageUsage(lm_calls=1)).lm_calls
        2
        """
        values = {
            f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self) if f.name != "cost"
        }
        cost = None if self.cost is None else self.cost - (other.cost or 0.0)
        return StageUsage(**values, cost=cost)

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    def is_empty(self) -> bool:
        """Nothing was used or happened."""
        return self == StageUsage()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what traces and reports carry)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class UsageTable:
    """Usage by stage path for one pipeline call (thread-safe).

    ``table[path]`` is what that stage used itself (its own LM calls); :meth:`subtree` adds every
    stage nested under it; :attr:`total` is the whole call. :meth:`tree` nests the paths.

    Examples:
        >>> t = UsageTable()
        >>> t.record_lm("stages[0]", {"prompt_tokens": 10, "completion_tokens": 2})
        >>> t.record_lm("stages[1].stages[0]", {"prompt_tokens": 5, "completion_tokens": 1})
        >>> t.total.lm_calls, t.subtree("stages[1]").input_tokens
        (2, 5)
    """

    # One is made for every pipeline call, nested ones included: no instance dict to make.
    __slots__ = ("_by_path", "_lock", "events", "prefix")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_path: dict[str, StageUsage] = {}
        #: The run's ``events`` list and the full path of the pipeline call, set by the engine on the
        #: table LM calls record into while the run is live, so what happens inside an LM call (a
        #: rate-limit wait, a budget degradation) joins the run. Wiring, not data: a table made when
        #: a finished run's usage is first read (a fan-out branch's, or a nested pipeline's whose
        #: stages were all pipelines) has none; its counts are the same either way.
        self.events: list[Any] | None = None
        self.prefix = ""

    def __getstate__(self) -> dict[str, Any]:
        # A result (and its run's table) can be copied and pickled: the lock is not part of it.
        with self._lock:
            by_path = {k: StageUsage(**v.to_dict()) for k, v in self._by_path.items()}
        return {"_by_path": by_path, "events": self.events, "prefix": self.prefix}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)
        self._lock = threading.Lock()

    def _entry(self, path: str) -> StageUsage:
        usage = self._by_path.get(path)
        if usage is None:
            usage = self._by_path[path] = StageUsage()
        return usage

    def record_lm(self, path: str, usage: Mapping[str, Any]) -> None:
        """An LM call that reached the model, made while stage ``path`` ran, with its usage."""
        self.record_tokens(path, usage)
        self.record_history(path, True, None)

    def record_tokens(self, path: str, usage: Mapping[str, Any]) -> None:
        """The tokens of an LM call made while stage ``path`` ran (as DSPy's usage tracker gets them)."""
        got_in, got_out = _token_pair(usage)
        if not (got_in or got_out):
            return
        with self._lock:
            u = self._entry(path)
            u.input_tokens += got_in
            u.output_tokens += got_out

    def record_result(self, path: str, billed: bool, usage: Any, cost: Any) -> None:
        """An LM call, counted from its result: billed (with its tokens and cost) or answered by
        DSPy's LM cache. :meth:`record_tokens` and :meth:`record_history` in one step."""
        got_in, got_out = _token_pair(usage) if billed and usage else (0, 0)
        with self._lock:
            u = self._entry(path)
            u.input_tokens += got_in
            u.output_tokens += got_out
            _count_call(u, billed, cost)

    def record_history(self, path: str, billed: bool, cost: Any) -> None:
        """An LM call's outcome, as its history entry tells it: a billed call (counted, with its cost
        when the model reports one) or an answer from DSPy's LM cache."""
        with self._lock:
            _count_call(self._entry(path), billed, cost)

    def record_event(self, path: str, kind: str) -> None:
        """An event of stage ``path`` that is counted: a policy's (``retry``, ``repair``,
        ``cache_hit``) or an LM call's prompt left to DSPy's adapter (``fast_fallback``)."""
        attr = _EVENT_COUNTS.get(kind)
        if attr is None:
            return
        with self._lock:
            u = self._entry(path)
            setattr(u, attr, getattr(u, attr) + 1)

    def record_wait(self, path: str, seconds: float) -> None:
        """Seconds an LM call of stage ``path`` waited for a rate limit or a budget."""
        with self._lock:
            self._entry(path).limit_wait += seconds

    def add_usage(self, path: str, usage: StageUsage) -> None:
        """Add ``usage`` to what the stage at ``path`` used (a pipeline its own code called)."""
        if usage.is_empty():
            return
        with self._lock:
            self._entry(path).add(usage)

    def charge(self, path: str, used: StageUsage) -> None:
        """Add ``used`` to stage ``path``'s own row (what work of the stage whose own record is gone
        used: a nested pipeline's attempt a fallback replaced)."""
        if used.is_empty():
            return
        with self._lock:
            self._entry(path).add(used)

    def absorb(self, prefix: str, other: UsageTable) -> None:
        """Add a nested call's table under ``prefix`` (the stage that ran the nested pipeline)."""
        if not other._by_path:  # the usual case for a nested call without LM work: nothing to add
            return
        with other._lock:
            items = [(k, StageUsage(**v.to_dict())) for k, v in other._by_path.items()]
        with self._lock:
            for k, v in items:
                self._entry(f"{prefix}.{k}" if prefix and k else (k or prefix)).add(v)

    def __getitem__(self, path: str) -> StageUsage:
        with self._lock:
            return StageUsage(**self._by_path[path].to_dict())

    def get(self, path: str) -> StageUsage | None:
        """What stage ``path`` used itself, or ``None``."""
        with self._lock:
            u = self._by_path.get(path)
            return None if u is None else StageUsage(**u.to_dict())

    def paths(self) -> list[str]:
        """Every stage path with some usage."""
        with self._lock:
            return list(self._by_path)

    def subtree(self, path: str) -> StageUsage:
        """What stage ``path`` and every stage nested under it used."""
        out = StageUsage()
        with self._lock:
            for k, v in self._by_path.items():
                if not path or k == path or k.startswith(path + "."):
                    out.add(v)
        return out

    @property
    def total(self) -> StageUsage:
        """The whole call."""
        return self.subtree("")

    def tree(self) -> dict[str, Any]:
        """Nested roll-up: ``{"usage": {...}, "children": {segment: {...}}}`` by path segment."""
        root: dict[str, Any] = {"usage": self.total.to_dict(), "children": {}}
        for path in sorted(self.paths()):
            node = root
            parts = path.split(".")
            for i in range(len(parts)):
                key = parts[i]
                node = node["children"].setdefault(
                    key, {"usage": self.subtree(".".join(parts[: i + 1])).to_dict(), "children": {}}
                )
        return root

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{path: usage dict}`` of what each stage used itself."""
        with self._lock:
            return {k: v.to_dict() for k, v in self._by_path.items()}

    def __repr__(self) -> str:
        total = self.total
        return (
            f"UsageTable({len(self._by_path)} stages; {total.lm_calls} LM calls, {total.input_tokens} in / "
            f"{total.output_tokens} out tokens, cost {total.cost})"
        )


_EVENT_COUNTS = {
    "retry": "retries",
    "repair": "repairs",
    "cache_hit": "cache_hits",
    "fast_fallback": "fast_fallbacks",
}


def _token_pair(usage: Mapping[str, Any]) -> tuple[int, int]:
    """A call's (input, output) token counts; DSPy's usual counts, plain ints, are read without
    :func:`_tokens`' checks (once per LM call)."""
    got_in, got_out = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if type(got_in) is not int:
        got_in = _tokens(usage, "prompt_tokens", "input_tokens")
    if type(got_out) is not int:
        got_out = _tokens(usage, "completion_tokens", "output_tokens")
    return got_in, got_out


def _count_call(u: StageUsage, billed: bool, cost: Any) -> None:
    """Count one LM call in ``u`` (the caller holds the table's lock): billed, with its cost when the
    model reports one, or answered by DSPy's LM cache."""
    if not billed:
        u.lm_cache_hits += 1
        return
    u.lm_calls += 1
    if isinstance(cost, int | float) and not isinstance(cost, bool):
        u.cost = (u.cost or 0.0) + float(cost)


def _tokens(usage: Mapping[str, Any], *names: str) -> int:
    """A token count as a model reported it: an integer (numpy's too), or a finite number (its whole
    part); anything else (``None``, ``inf``, a string) counts nothing rather than failing the stage."""
    for n in names:
        v = usage.get(n)
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, numbers.Integral):
            return int(v)
        if isinstance(v, numbers.Real) and math.isfinite(v):
            return int(float(v))
    return 0


# -- where the current LM work goes ------------------------------------------------------------------

_TABLE: ContextVar[UsageTable | None] = ContextVar("stageflow_usage_table", default=None)
_STAGE: ContextVar[str] = ContextVar("stageflow_usage_stage", default="")
#: Whether the LM call whose history entry DSPy records next was billed (set by the usage tracker,
#: which DSPy calls for billed calls only): for calls that do not go through DSPy's execute.
_BILLED: ContextVar[bool] = ContextVar("stageflow_usage_billed", default=False)
#: The last LM call result :func:`note_lm_result` counted, and whether DSPy is reporting that very
#: call now (its ``finalize``: usage tracker, history), so the tracker and the probe leave it alone.
_COUNTED: ContextVar[Any] = ContextVar("stageflow_usage_counted", default=None)
_REPORTING_COUNTED: ContextVar[bool] = ContextVar("stageflow_usage_reporting_counted", default=False)
_WATCH: ContextVar[list[dict[str, Any]] | None] = ContextVar("stageflow_usage_watch", default=None)


def current_table() -> UsageTable | None:
    """The usage table of the pipeline call running here, if any."""
    return _TABLE.get()


@contextlib.contextmanager
def using_table(table: UsageTable) -> Iterator[None]:
    """LM work inside the block goes to ``table`` (a nested pipeline call's own table)."""
    token = _TABLE.set(table)
    try:
        yield
    finally:
        _TABLE.reset(token)


@contextlib.contextmanager
def stage_scope(path: str) -> Iterator[None]:
    """Attribute LM work done inside the block to stage ``path`` (a local path of the current call)."""
    token = _STAGE.set(path)
    try:
        yield
    finally:
        _STAGE.reset(token)


def note_policy_event(kind: str) -> None:
    """Count a policy event (``retry``, ``repair``, ``cache_hit``) for the stage running here."""
    table = _TABLE.get()
    if table is not None:
        table.record_event(_STAGE.get(), kind)


def note_fast_fallback() -> None:
    """Count an LM call made here whose prompt the fast adapter path left to DSPy's adapter."""
    table, path = _where()
    if table is not None:
        table.record_event(path, "fast_fallback")


def note_lm_wait(seconds: float) -> None:
    """Count ``seconds`` an LM call made here waited (rate limit, budget) for the stage running here."""
    table, path = _where()
    if table is not None:
        table.record_wait(path, seconds)


def run_events() -> tuple[list[Any] | None, str]:
    """The events list of the pipeline call running here and the full path of the stage running
    in it: ``(None, "")`` outside any pipeline call."""
    table, path = _where()
    if table is None or table.events is None:
        return None, ""
    prefix = table.prefix
    return table.events, (f"{prefix}.{path}" if prefix and path else prefix or path)


def reported_cost(cost: Any, responses: Any) -> float | None:
    """A call's cost: DSPy's figure, else what the model's responses carry in
    ``provider_data["cost"]`` (how a custom engine reports one; ``stageflow.testing.FakeLM(cost=...)``
    does)."""
    if isinstance(cost, int | float) and not isinstance(cost, bool):
        return float(cost)
    if not isinstance(responses, list | tuple):
        if not getattr(responses, "provider_data", None):  # (one response, carrying nothing)
            return None
        responses = (responses,)
    total: float | None = None
    for response in responses:
        data = getattr(response, "provider_data", None)
        value = data.get("cost") if isinstance(data, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            total = (total or 0.0) + float(value)
    return total


def watch_lm_calls() -> tuple[list[dict[str, Any]], Token[list[dict[str, Any]] | None]]:
    """Start collecting what each LM call made in this context records, until :func:`unwatch_lm_calls`.

    Returns the list that fills (one dict per LM call: ``usage``, ``cost``, ``response_model``,
    ``cache_hit``) and the token to stop with. Used by instrumentation that makes a span per LM call
    (DSPy's ``on_lm_start``/``on_lm_end`` callbacks run in the LM call's own context). Only LM calls
    made inside a pipeline call (where stageflow meters usage) are seen.
    """
    calls: list[dict[str, Any]] = []
    return calls, _WATCH.set(calls)


def unwatch_lm_calls(token: Token[list[dict[str, Any]] | None]) -> None:
    """Stop the collection :func:`watch_lm_calls` started (in the same context)."""
    _WATCH.reset(token)


#: The key under which the outermost call's table travels in DSPy's settings overrides: DSPy copies
#: them into the worker threads of ``dspy.Parallel`` (stageflow's own context variables do not go).
_SETTINGS_KEY = "stageflow_usage_table"
#: Whether DSPy's parallel executor carries the running stage into its threads (installed by the
#: first pipeline call: see stageflow._parallel_usage).
_PARALLEL = [False]


def carry_into_parallel() -> None:
    """Have ``dspy.Parallel`` carry the running stage (and a cache's watch for replaced failures)
    into its worker threads, once per process (see :mod:`stageflow._parallel_usage`)."""
    if not _PARALLEL[0]:
        from stageflow._parallel_usage import install

        install()
        _PARALLEL[0] = True


def _where() -> tuple[UsageTable | None, str]:
    """The table and stage the LM work happening here belongs to."""
    table = _TABLE.get()
    if table is not None:
        return table, _STAGE.get()
    # A thread DSPy started (dspy.Parallel inside a stage) without stageflow's context: the work
    # counts for the pipeline call itself (path "").
    settings_module = sys.modules.get("dspy.dsp.utils.settings")
    if settings_module is None:
        return None, ""
    # The stage that started the thread (stageflow._parallel_usage) or the pipeline call itself.
    fallback = settings_module.thread_local_overrides.get().get(_SETTINGS_KEY)
    if type(fallback) is tuple:
        return fallback[0], fallback[1]
    return (fallback, "") if isinstance(fallback, UsageTable) else (None, "")


def calling_stage() -> tuple[UsageTable, str, str | None] | None:
    """The table and stage of the pipeline call whose stage's own code is running here (a custom
    module calling a pipeline, in its thread or in ``dspy.Parallel``'s), else ``None``; and, in
    ``dspy.Parallel``'s threads, the path that was running where they were started."""
    table = _TABLE.get()
    if table is not None:
        return table, _STAGE.get(), None
    settings_module = sys.modules.get("dspy.dsp.utils.settings")
    if settings_module is None:
        return None
    carried = settings_module.thread_local_overrides.get().get(_SETTINGS_KEY)
    return carried if type(carried) is tuple else None


class _RolledUp(list):  # type: ignore[type-arg]
    """``tracker.usage_data[lm]`` of stageflow's tracker: DSPy's ``track_usage()`` opened inside a
    stage adds what it collected to its parent tracker on exit (``usage_data[lm].extend(...)``); each
    entry goes on to the tracker around the pipeline call, if any, and nothing is kept (the stage's
    table counted those calls' tokens as they ran: :func:`note_lm_result`)."""

    def __init__(self, tracker: Any, lm: str) -> None:
        super().__init__()
        self.tracker, self.lm = tracker, lm

    def append(self, entry: Any) -> None:
        self.extend((entry,))

    def extend(self, entries: Any) -> None:
        parent = self.tracker.parent
        if parent is not None:
            for entry in entries:
                parent.add_usage(self.lm, entry)


class _RollUps(dict):  # type: ignore[type-arg]
    def __init__(self, tracker: Any) -> None:
        super().__init__()
        self.tracker = tracker

    def __missing__(self, lm: str) -> _RolledUp:
        return _RolledUp(self.tracker, lm)


def _dspy_tracker_class() -> type:
    from dspy.utils.usage_tracker import UsageTracker

    class StageflowTracker(UsageTracker):  # type: ignore[misc]
        """DSPy's usage tracker slot: tokens go to the running stage (and to an outer tracker)."""

        def __init__(self, parent: Any) -> None:
            super().__init__()
            self.parent = parent
            self.usage_data = _RollUps(self)

        def __deepcopy__(self, memo: dict[int, Any]) -> Any:
            # dspy.Parallel deep-copies the tracker into each worker thread and never merges the
            # copies back (DSPy loses that usage). Sharing this one keeps the tokens.
            return self

        def get_total_tokens(self) -> dict[str, dict[str, Any]]:
            return dict(self.parent.get_total_tokens()) if self.parent is not None else {}

        def add_usage(self, lm: str, usage_entry: dict[str, Any]) -> None:
            # Nothing is kept here: the stage tables and an outer tracker (dspy.track_usage) are
            # where the usage goes, so one tracker can serve every call.
            if self.parent is not None:
                self.parent.add_usage(lm, usage_entry)
            if _REPORTING_COUNTED.get():  # (counted, tokens included, from the call's result)
                return
            # A call that did not go through DSPy's execute, or failed after billing part of it.
            table, path = _where()
            if _history_off():  # (no history entry follows: the call is counted here)
                if table is not None:
                    table.record_lm(path, usage_entry)
                return
            if table is not None:
                table.record_tokens(path, usage_entry)
            _BILLED.set(True)  # (for the history entry next: DSPy reports billed calls only)

    return StageflowTracker


def _record_call(
    where: tuple[UsageTable | None, str], billed: bool, cost: Any, usage: Any, response_model: Any
) -> None:
    """An LM call — billed (with its cost) or answered by DSPy's cache — goes to the running stage's
    table (``where``: :func:`_where`) and to a watch."""
    table, path = where
    if table is not None:
        table.record_history(path, billed, cost)
    watch = _WATCH.get()
    if watch is not None:
        watch.append(
            {"usage": usage or {}, "cost": cost, "response_model": response_model, "cache_hit": not billed}
        )
    _BILLED.set(False)


class _Sink(list):  # type: ignore[type-arg]
    """The ``history`` list of the probe: it records and never stores anything."""

    def append(self, entry: Any) -> None:
        if not isinstance(entry, dict):
            return
        if _REPORTING_COUNTED.get():  # (the wrapper of DSPy's execute counted this call already)
            return
        cost = reported_cost(entry.get("cost"), entry.get("response"))
        _record_call(_where(), _BILLED.get(), cost, entry.get("usage"), entry.get("response_model"))


def _settings_value(name: str) -> Any:
    """DSPy's setting ``name`` here now, read as DSPy's settings object reads it (``None`` unset)."""
    settings_module = sys.modules.get("dspy.dsp.utils.settings")
    if settings_module is None:
        return None
    overrides = settings_module.thread_local_overrides.get()
    return overrides[name] if name in overrides else settings_module.main_thread_config.get(name)


def _history_off() -> bool:
    """Whether DSPy records no history entry for an LM call made here now (``disable_history``, or
    ``max_history_size=0``)."""
    return bool(_settings_value("disable_history")) or _settings_value("max_history_size") == 0


def note_lm_result(result: Any, *, count: bool = True) -> None:
    """An LM call finished (``result``: what DSPy's ``execute`` returned, before DSPy records it;
    called by stageflow's wrapper of it, see :mod:`stageflow.budgets.intercept`): it is counted for
    the running stage here — billed (with its tokens and cost) or answered by DSPy's cache —
    whatever tracker DSPy reports to and whatever its history keeps, and what DSPy reports of it
    next (to its usage tracker, in a history entry) is marked as counted. ``count=False``: the call
    only passed on what the LM calls made inside it returned (a router LM of yours), which were
    counted themselves; it is marked as counted and adds nothing."""
    if not count:
        _COUNTED.set(result)
        return
    table = _TABLE.get()
    if table is not None:  # (the common case, written out: see _where)
        path = _STAGE.get()
    else:
        table, path = _where()
    watch = _WATCH.get()
    if table is None and watch is None:
        return
    billed = getattr(result, "cache_hit", False) is not True
    cost = getattr(result, "cost", None)
    if isinstance(cost, int | float) and not isinstance(cost, bool):
        cost = float(cost)
    else:
        raw = getattr(result, "raw", None)
        cost = reported_cost(cost, raw if raw is not None else getattr(result, "responses", None))
    usage = getattr(result, "usage", None)
    if table is not None:
        table.record_result(path, billed, usage, cost)
    if watch is not None:
        model = getattr(result, "response_model", None)
        watch.append({"usage": usage or {}, "cost": cost, "response_model": model, "cache_hit": not billed})
    if _BILLED.get():
        _BILLED.set(False)
    _COUNTED.set(result)  # (what DSPy reports of this call next, in its finalize, is counted)


def finalizing(result: Any) -> Token[bool] | None:
    """DSPy starts reporting an LM call (its ``finalize``: usage tracker, history entry); when
    :func:`note_lm_result` counted that very call, the tracker and the probe leave it alone until
    :func:`finalized`. Returns what :func:`finalized` needs."""
    if result is None or _COUNTED.get() is not result:
        return None
    _COUNTED.set(None)
    return _REPORTING_COUNTED.set(True)


def finalized(token: Token[bool] | None) -> None:
    """DSPy finished reporting the call :func:`finalizing` was given."""
    if token is not None:
        _REPORTING_COUNTED.reset(token)


class _HistoryProbe:
    """A member of DSPy's ``caller_modules``: DSPy appends each LM call's history entry to it."""

    def __init__(self) -> None:
        self.history = _Sink()

    def __deepcopy__(self, memo: dict[int, Any]) -> _HistoryProbe:
        return self


_TRACKER_CLASS: list[type | None] = [None]
_SHARED_TRACKER: list[Any] = [None]  # the tracker when no outer one is active: it keeps nothing itself
_PROBE = _HistoryProbe()
_PROBE_ONLY: list[Any] = [_PROBE]


def open_run(table: UsageTable, adapter: Any = None) -> tuple[Any, ...]:
    """Start sending the LM usage of the current context to ``table`` (the outermost pipeline call);
    with ``adapter``, predictors use it. Returns what :func:`close_run` needs to undo it.

    DSPy is connected with one override of its settings (its usage tracker slot, its
    ``caller_modules``, the adapter), set directly on DSPy's context variable: the same thing
    ``dspy.context(...)`` does, without snapshotting every global setting on each call.
    """
    token = _TABLE.set(table)
    settings_module = sys.modules.get("dspy.dsp.utils.settings")
    if settings_module is None:  # DSPy not loaded: no LM can be called
        return (token, None, None)
    if not _PARALLEL[0]:
        carry_into_parallel()
    overrides_var = settings_module.thread_local_overrides
    cls = _TRACKER_CLASS[0]
    if cls is None:
        cls = _TRACKER_CLASS[0] = _dspy_tracker_class()
        _SHARED_TRACKER[0] = cls(None)
    current = overrides_var.get()
    new = settings_module.dotdict(current)
    main = settings_module.main_thread_config  # (read as DSPy's settings object reads them)
    parent = current["usage_tracker"] if "usage_tracker" in current else main.get("usage_tracker")
    if parent is None:
        new["usage_tracker"] = _SHARED_TRACKER[0]
    elif not isinstance(parent, cls):  # (stageflow's own records where the work runs: not twice)
        new["usage_tracker"] = cls(parent)
    callers = current["caller_modules"] if "caller_modules" in current else main.get("caller_modules")
    if not callers:
        new["caller_modules"] = _PROBE_ONLY
    elif callers[0] is not _PROBE:  # (a pipeline run in a stage's dspy.Parallel thread has it already)
        new["caller_modules"] = [_PROBE, *callers]
    new[_SETTINGS_KEY] = table
    if adapter is not None:
        new["adapter"] = adapter
    return (token, overrides_var, overrides_var.set(new))


def close_run(opened: tuple[Any, ...]) -> None:
    """Undo :func:`open_run`."""
    token, overrides_var, dspy_token = opened
    if overrides_var is not None:
        overrides_var.reset(dspy_token)
    _TABLE.reset(token)


@contextlib.contextmanager
def metering(table: UsageTable, adapter: Any = None) -> Iterator[None]:
    """Send the LM usage of everything inside the block to ``table`` (see the module docstring);
    with ``adapter``, predictors inside the block use it."""
    opened = open_run(table, adapter)
    try:
        yield
    finally:
        close_run(opened)
