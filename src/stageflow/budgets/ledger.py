"""The accounting of LM budgets: reserve before a call, settle after it.

A :class:`BudgetLedger` is the live state of one :class:`~stageflow.budgets.spec.LMBudget` in force
(a ``with stageflow.budget(...)`` block, one pipeline run, one stage call). An LM call reserves what
it may use in *every* ledger of its chain (the budgets it runs inside, outermost first), atomically,
under one process-wide lock:

- it fits in all of them with what is already spent *and* reserved by calls in flight → reserved;
- it cannot fit in one of them even once every call in flight has settled → refused
  (:class:`~stageflow.BudgetExceeded`);
- otherwise it waits until a call in flight settles, and asks again (threads block, asyncio tasks
  suspend).

An LM call made *inside* another one (a router LM whose ``forward`` calls a model, an LM that runs
``dspy.Parallel``) names the tickets of the calls it runs inside (``inside``): those settle only
after it returns, so it never waits for them. It is refused when it cannot fit even once every
*other* call in flight has settled, and a probe of an unlearned model (:mod:`.calibrate`) inside a
probe does not wait for its enclosing probe. While it waits, the calls it runs inside are *stuck*:
they cannot settle either. A wait that only stuck calls could end would never end (routers running
side by side, each holding its own call while its inner call waits for the others'), so such a call
is refused at once instead: every call in flight in the budget it waits on is stuck or its own.
Meanwhile room that frees up goes to the calls made inside stuck ones first: a call made outside
any other waits while they do (finishing the calls in flight frees more than starting new ones).

Settling replaces the reservation with what the call really used. What is held for a call, and how
far a budget can be overshot when a call has no known upper bound or reports more than it held, is
:mod:`.calibrate`'s business: calls are never overshot; tokens and cost are not when every call's
hold is a true bound, and otherwise by at most what the calls in flight report beyond their holds.

Examples:
    >>> from stageflow.budgets.spec import LMBudget
    >>> ledger = BudgetLedger(LMBudget(max_calls=2), "doc")
    >>> ticket = try_reserve((ledger,), Need(calls=1, tokens=10, model="m"))
    >>> ledger.reserved_calls, ledger.calls
    (1, 0)
    >>> settle(ticket, calls=1, input_tokens=3, output_tokens=4, cost=None)
    []
    >>> ledger.calls, ledger.tokens, ledger.reserved_calls
    (1, 7, 0)
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from stageflow.budgets.calibrate import Hold, Knowledge, Need, cost_over
from stageflow.budgets.spec import LMBudget
from stageflow.errors import BudgetExceeded

__all__ = [
    "BudgetLedger",
    "Held",
    "Need",
    "Ticket",
    "areserve",
    "refusal",
    "release",
    "reserve",
    "settle",
    "try_reserve",
]

_LOCK = threading.Lock()
_WAITERS: list[Any] = []  # threading.Event, or (loop, future), of reservations waiting for a settle
#: Tickets of calls that cannot settle now: an LM call made inside them is waiting (see the docstring).
_STUCK: set[Ticket] = set()
#: Longest single wait before a waiting reservation looks again (a safety net, not the mechanism).
_RECHECK_S = 1.0


class Held(NamedTuple):
    """What the LM calls a call runs inside hold in one ledger (they settle only after it), and how
    many calls (``tickets``) hold it."""

    calls: int = 0
    tokens: int = 0
    cost: float = 0.0
    probes: int = 0
    tickets: int = 0


_NOTHING = Held()


class BudgetLedger:
    """The spending of one budget in force (thread-safe; read it any time).

    Attributes:
        limits: The :class:`~stageflow.LMBudget`.
        scope: Which budget this is, for messages (``"stageflow.budget()"``, ``"the run's budget"``).
        calls: LM calls settled (a failed call counts: it reached the model).
        input_tokens: Prompt tokens settled. ``output_tokens``: completion tokens.
        cost: Cost settled, from the models that report one.
        reserved_calls: Calls in flight; ``reserved_tokens`` / ``reserved_cost``: their reservations.
        waited: Seconds LM calls waited for calls in flight to settle.
        refused: Calls refused with :class:`~stageflow.BudgetExceeded`.
        exhausted: Spending has passed a limit (a call reported more than it held; the calls then in
            flight may add more, nothing starts after). Recorded once as ``budget_exhausted``.
        degraded: Whether the budget's :class:`~stageflow.Degrade` is in force.
        events: What the budget did (``budget_degraded``, ``budget_skipped``, ``usage_unreported``...),
            as :class:`~stageflow.PolicyEvent` entries; the run's ``events`` get them too.
    """

    def __init__(self, limits: LMBudget, scope: str) -> None:
        self.limits = limits
        self.scope = scope
        self.calls = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost = 0.0
        self.reserved_calls = 0
        self.reserved_tokens = 0
        self.reserved_cost = 0.0
        self.flying = 0  # reservations held (calls in flight)
        self.waited = 0.0
        self.refused = 0
        self.degraded = False
        self.exhausted = False  # a call reported more than was left: spent has passed a limit
        self.unreported = False  # a model reported no usage (recorded once)
        self.uncosted = False  # a model reported no cost under max_cost (recorded once)
        self.closed = False  # its block or call has ended: it no longer holds anything back
        self.events: list[Any] = []
        self.started = limits.clock()
        self.knowledge = Knowledge()  # what it has learned about each model's calls

    def __deepcopy__(self, memo: dict[int, Any]) -> BudgetLedger:
        return self  # one account, however often a program holding it is copied

    @property
    def tokens(self) -> int:
        """Prompt plus completion tokens settled."""
        return self.input_tokens + self.output_tokens

    def elapsed(self) -> float:
        """Seconds since the budget opened (on its clock)."""
        return float(self.limits.clock() - self.started)

    def share(self) -> float:
        """The largest share of a limit spent (0 when no limit is set): what :class:`Degrade` watches."""
        lim = self.limits
        shares = [
            _share(spent, limit)
            for spent, limit in (
                (self.calls, lim.max_calls),
                (self.tokens, lim.max_tokens),
                (self.cost, lim.max_cost),
                (self.elapsed() if lim.max_seconds is not None else 0.0, lim.max_seconds),
            )
            if limit is not None
        ]
        return max(shares, default=0.0)

    def remaining(self) -> dict[str, float | None]:
        """What is left of each limit (``None``: no limit), reservations of calls in flight excluded."""
        lim = self.limits
        return {
            "calls": None if lim.max_calls is None else lim.max_calls - self.calls,
            "tokens": None if lim.max_tokens is None else lim.max_tokens - self.tokens,
            "cost": None if lim.max_cost is None else lim.max_cost - self.cost,
            "seconds": None if lim.max_seconds is None else max(0.0, lim.max_seconds - self.elapsed()),
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary of the spending."""
        return {
            "scope": self.scope,
            "limits": self.limits.describe(),
            "calls": self.calls,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost": self.cost,
            "seconds": round(self.elapsed(), 6),
            "waited": round(self.waited, 6),
            "refused": self.refused,
            "degraded": self.degraded,
        }

    def __repr__(self) -> str:
        return (
            f"BudgetLedger({self.scope}: {self.calls} calls, {self.tokens} tokens, cost {self.cost:g}; "
            f"limits {self.limits.describe() or 'none'})"
        )

    # -- under _LOCK ---------------------------------------------------------------------------------
    def _check(self, need: Need, hold: Hold, held: Held = _NOTHING) -> BudgetExceeded | bool:
        """A refusal, ``True`` (fits now) or ``False`` (fits once calls in flight settle). ``held``:
        what the calls this one runs inside hold here, which cannot settle while it waits."""
        lim = self.limits
        if lim.max_seconds is not None:
            elapsed = self.elapsed()
            if elapsed >= lim.max_seconds:
                return self._refuse("max_seconds", elapsed, lim.max_seconds, 0, 0)
        fits = True
        limit: float | None = lim.max_calls
        if limit is not None:
            if self.calls + held.calls + need.calls > limit:
                return self._refuse("max_calls", self.calls, limit, need.calls, held.calls)
            fits = self.calls + self.reserved_calls + need.calls <= limit
        limit = lim.max_tokens
        if limit is not None:
            spent = self.input_tokens + self.output_tokens
            if spent + held.tokens + hold.tokens > limit:
                return self._refuse("max_tokens", spent, limit, hold.tokens, held.tokens)
            fits = fits and spent + self.reserved_tokens + hold.tokens <= limit
        limit = lim.max_cost
        if limit is not None:
            if self.cost >= limit or cost_over(self.cost + held.cost + hold.cost, limit):
                return self._refuse("max_cost", self.cost, limit, hold.cost, held.cost)
            fits = fits and not cost_over(self.cost + self.reserved_cost + hold.cost, limit)
        return fits and self.knowledge.fits(hold, held.probes)

    def _refuse(self, name: str, spent: float, limit: float, needed: float, held: float) -> BudgetExceeded:
        return BudgetExceeded.refused(
            name, spent=spent, limit=limit, needed=needed, scope=self.scope, ledger=self, held=held
        )

    def _hold(self, need: Need, hold: Hold) -> None:
        self.flying += 1
        self.reserved_calls += need.calls
        self.reserved_tokens += hold.tokens
        self.reserved_cost += hold.cost
        self.knowledge.take(hold)

    def _settle(
        self,
        need: Need,
        hold: Hold,
        used: tuple[int, int, int],
        cost: float | None,
        completed: bool,
    ) -> list[tuple[str, dict[str, Any]]]:
        """Replace a reservation by what was used (``used``: calls, input and output tokens); returns
        the events this settling makes (an overrun, the degradation point crossed)."""
        self.flying -= 1
        self.reserved_calls -= need.calls
        self.reserved_tokens -= hold.tokens
        self.reserved_cost = self.reserved_cost - hold.cost if self.reserved_calls else 0.0  # no float dust
        calls, input_tokens, output_tokens = used
        self.calls += calls
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        if cost is not None:
            self.cost += cost
        events: list[tuple[str, dict[str, Any]]] = []
        overrun = self.knowledge.learn(
            need, hold, used=input_tokens + output_tokens, cost=cost, completed=completed, limits=self.limits
        )
        crossed = self._crossed()
        if overrun is not None:
            events.append(
                ("budget_overrun", {**overrun, "in_flight": self.reserved_calls, "exhausted": bool(crossed)})
            )
        if crossed and not self.exhausted:  # spent past a limit: later calls are all refused
            self.exhausted = True
            events.append(("budget_exhausted", {"limit": crossed, "in_flight": self.reserved_calls}))
        if self.limits.degrade is not None and self._cross():
            events.append(("budget_degraded", {}))
        return events

    def _crossed(self) -> str | None:
        """The limit spending has passed (every later call is refused), or ``None``."""
        lim = self.limits
        if lim.max_tokens is not None and self.tokens > lim.max_tokens:
            return "max_tokens"
        if lim.max_cost is not None and cost_over(self.cost, lim.max_cost):
            return "max_cost"
        return None

    def _cross(self) -> bool:
        degrade = self.limits.degrade
        if degrade is None or self.degraded or self.share() < degrade.at:
            return False
        self.degraded = True
        return True

    def check_degraded(self) -> bool:
        """Whether the degradation is in force; ``True`` → newly (the time share may have crossed)."""
        with _LOCK:
            return self._cross()


def _share(spent: float, limit: float) -> float:
    return 1.0 if limit <= 0 else spent / limit


class Ticket:
    """A reservation held in every ledger of a chain, until :func:`settle` or :func:`release`."""

    __slots__ = ("done", "holds", "ledgers", "need", "stuck")

    def __init__(self, ledgers: Sequence[BudgetLedger], need: Need, holds: list[Hold]) -> None:
        self.ledgers = ledgers
        self.need = need
        self.holds = holds
        self.done = False
        self.stuck = 0  # LM calls made inside its call that are waiting for a reservation


def _held(ledger: BudgetLedger, inside: Iterable[Ticket]) -> Held:
    """What ``inside`` (tickets) hold in ``ledger`` (under ``_LOCK``)."""
    calls = tokens = probes = count = 0
    cost = 0.0
    for ticket in inside:
        if ticket.done:
            continue
        for their, hold in zip(ticket.ledgers, ticket.holds, strict=True):
            if their is ledger:
                calls += ticket.need.calls
                tokens += hold.tokens
                cost += hold.cost
                probes += hold.probe
                count += 1
    return Held(calls, tokens, cost, probes, count)


def _attempt(
    chain: Sequence[BudgetLedger], need: Need, waiter: Any, inside: Sequence[Ticket], stuck: bool = False
) -> Ticket | BudgetExceeded | None:
    """Reserve now, refuse, or (``None``) register ``waiter`` to wait; a call made inside others
    (``inside``) marks them stuck the first time it waits (``stuck``: it already did)."""
    with _LOCK:
        holds = []
        fits = True
        for ledger in chain:
            hold = ledger.knowledge.hold(need, ledger.limits)
            verdict = ledger._check(need, hold, _held(ledger, inside) if inside else _NOTHING)
            if verdict is False and inside and waiter is not None:
                verdict = _unless_stuck(ledger, need, hold, inside)
            elif verdict is True and _STUCK and not inside and _held(ledger, _STUCK).tickets:
                verdict = False  # (calls inside stuck ones wait for room here: they take it first)
            if verdict is not True:
                if verdict is not False:
                    return verdict
                fits = False
            holds.append(hold)
        if not fits:
            if waiter is not None:
                _WAITERS.append(waiter)
                if inside and not stuck:
                    _stick(inside)
            return None
        for ledger, hold in zip(chain, holds, strict=True):
            ledger._hold(need, hold)
        return Ticket(chain, need, holds)


def _unless_stuck(
    ledger: BudgetLedger, need: Need, hold: Hold, inside: Sequence[Ticket]
) -> BudgetExceeded | bool:
    """A call made inside others that must wait in ``ledger``: ``False`` (wait) while a call in flight
    there can settle; otherwise (every one is stuck, or one it runs inside) nothing it waits for can
    end, so what it gets with all of them counted as spent: a refusal, or ``True`` when only their
    probes held it back (see :mod:`.calibrate`). Under ``_LOCK``."""
    frozen = _held(ledger, {*inside, *_STUCK})
    if ledger.flying > frozen.tickets:
        return False
    verdict = ledger._check(need, hold, frozen)
    if isinstance(verdict, BudgetExceeded):  # (its message tells its own outer calls from the others)
        own = _held(ledger, inside)
        field = {"max_calls": 0, "max_tokens": 1, "max_cost": 2}.get(verdict.limit_name)
        if field is not None:
            verdict.held, verdict.stuck = own[field], frozen[field] - own[field]
            verdict._compose()
    return verdict


def _stick(inside: Sequence[Ticket]) -> None:
    """The calls of ``inside`` cannot settle while an LM call made inside them waits: the other waiting
    reservations look again (one of them may now be waiting for stuck calls only). Under ``_LOCK``."""
    for ticket in inside:
        ticket.stuck += 1
        _STUCK.add(ticket)
    _wake_all()


def _unstick(inside: Sequence[Ticket]) -> None:
    """The wait :func:`_stick` noted is over (calls that waited for it look again)."""
    with _LOCK:
        freed = False
        for ticket in inside:
            ticket.stuck -= 1
            if ticket.stuck <= 0 and ticket in _STUCK:
                _STUCK.discard(ticket)
                freed = True
        if freed and _WAITERS:
            _wake_all()


def refusal(
    chain: Sequence[BudgetLedger], need: Need, inside: Sequence[Ticket] = ()
) -> BudgetExceeded | None:
    """The refusal ``need`` would get now (counted), or ``None`` when it may fit; nothing is reserved."""
    with _LOCK:
        for ledger in chain:
            held = _held(ledger, inside) if inside else _NOTHING
            verdict = ledger._check(need, ledger.knowledge.hold(need, ledger.limits), held)
            if isinstance(verdict, BudgetExceeded):
                ledger.refused += 1
                return verdict
    return None


def try_reserve(
    chain: Sequence[BudgetLedger], need: Need, inside: Sequence[Ticket] = ()
) -> Ticket | BudgetExceeded | None:
    """Reserve ``need`` in every ledger now: a :class:`Ticket`, the refusal, or ``None`` (must wait).
    ``inside``: the tickets of the LM calls this one is made inside (see the module docstring)."""
    return _attempt(chain, need, None, inside)


def _timeout(chain: Sequence[BudgetLedger]) -> float:
    left = [
        ledger.limits.max_seconds - ledger.elapsed()
        for ledger in chain
        if ledger.limits.max_seconds is not None
    ]
    return max(0.0, min([_RECHECK_S, *left]))


def _taken(got: Ticket | BudgetExceeded | None) -> Ticket | None:
    """What an attempt of :func:`reserve` / :func:`areserve` got: the ticket, ``None`` (wait), or the
    refusal raised (counted)."""
    if isinstance(got, BudgetExceeded):
        try:
            raise _counted(got)
        finally:
            del got  # (the error's traceback keeps this frame: no cycle through it)
    return got


def reserve(chain: Sequence[BudgetLedger], need: Need, inside: Sequence[Ticket] = ()) -> tuple[Ticket, float]:
    """Reserve ``need`` (blocking the thread while it must wait); returns the ticket and the seconds
    waited. Raises :class:`~stageflow.BudgetExceeded` when it cannot fit. ``inside``: the tickets of
    the LM calls this one is made inside (see the module docstring)."""
    waited = 0.0
    stuck = False
    try:
        while True:
            event = threading.Event()
            ticket = _taken(_attempt(chain, need, event, inside, stuck))
            if ticket is not None:
                return ticket, waited
            stuck = bool(inside)
            t0 = chain[0].limits.clock()
            try:
                event.wait(_timeout(chain))
            finally:
                with _LOCK, contextlib.suppress(ValueError):
                    _WAITERS.remove(event)
            waited += _note_wait(chain, chain[0].limits.clock() - t0)
    finally:
        if stuck:
            _unstick(inside)


async def areserve(
    chain: Sequence[BudgetLedger], need: Need, inside: Sequence[Ticket] = ()
) -> tuple[Ticket, float]:
    """Async twin of :func:`reserve` (the task suspends while it must wait; cancelling it holds nothing)."""
    waited = 0.0
    loop = asyncio.get_running_loop()
    stuck = False
    try:
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            waiter = (loop, fut)
            ticket = _taken(_attempt(chain, need, waiter, inside, stuck))
            if ticket is not None:
                return ticket, waited
            stuck = bool(inside)
            t0 = chain[0].limits.clock()
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_timeout(chain)):
                        await fut
            finally:
                with _LOCK, contextlib.suppress(ValueError):
                    _WAITERS.remove(waiter)
            waited += _note_wait(chain, chain[0].limits.clock() - t0)
    finally:
        if stuck:
            _unstick(inside)


def _counted(error: BudgetExceeded) -> BudgetExceeded:
    with _LOCK:
        error.ledger.refused += 1
    return error


def _note_wait(chain: Sequence[BudgetLedger], seconds: float) -> float:
    seconds = max(0.0, float(seconds))
    with _LOCK:
        for ledger in chain:
            ledger.waited += seconds
    return seconds


def _wake_all() -> None:
    """Every waiting reservation looks again (called under ``_LOCK`` after a settle or release)."""
    waiters = list(_WAITERS)
    _WAITERS.clear()
    for waiter in waiters:
        if isinstance(waiter, threading.Event):
            waiter.set()
        else:
            loop, fut = waiter
            with contextlib.suppress(RuntimeError):  # its loop has closed: nobody waits any more
                loop.call_soon_threadsafe(_resolve, fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def settle(
    ticket: Ticket,
    *,
    calls: int,
    input_tokens: int,
    output_tokens: int,
    cost: float | None,
    completed: bool = True,
) -> list[tuple[BudgetLedger, str, dict[str, Any]]]:
    """Replace the ticket's reservation with what the call used (``completed``: the model answered,
    so the budgets learn from it). Returns the events to record, as (ledger, kind, detail): a call
    that reported more than it held (``budget_overrun``), a degradation point crossed
    (``budget_degraded``). At most once per ticket; later calls are no-ops."""
    with _LOCK:
        if ticket.done:
            return []
        ticket.done = True
        events = []
        used = (calls, input_tokens, output_tokens)
        for ledger, hold in zip(ticket.ledgers, ticket.holds, strict=True):
            for kind, detail in ledger._settle(ticket.need, hold, used, cost, completed):
                events.append((ledger, kind, detail))
        if _WAITERS:
            _wake_all()
    return events


def release(ticket: Ticket) -> None:
    """Give the whole reservation back (the call never reached the model)."""
    settle(ticket, calls=0, input_tokens=0, output_tokens=0, cost=None, completed=False)
