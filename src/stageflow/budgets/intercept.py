"""Where budgets and rate limits meet DSPy: around the one function every LM call runs through.

Every DSPy LM call — ``dspy.LM``, ``DummyLM``, a ``BaseLM`` subclass, sync or async, from a predictor,
an adapter's fallback, a retry or user code — runs ``dspy.clients.execution.execute`` (``aexecute``)
between preparing the request and recording its usage and history. The first pipeline call (or
budget, or rate limit) has :func:`install` wrap those two functions (``LM.__call__`` looks them up
on each call). While no budget is open and no rate limit is set, the wrapper is one check, the
original call, and a note of the call's result for stageflow's usage accounting
(:func:`stageflow.usage.note_lm_result`); DSPy's ``finalize``, which reports the call to its usage
tracker and history, is wrapped too, so the accounting knows while it runs that the call is counted
(:func:`stageflow.usage.finalizing`). Otherwise, per LM call:

1. the budgets in force reserve what it may use and the model's rate limiter grants it room
   (:mod:`.ledger`, :mod:`.ratelimit`). When either cannot at once, DSPy's LM cache is asked first
   (a cached answer takes nothing: a cache hit is free even when the budget is spent); then a call
   the budgets refuse fails with :class:`~stageflow.BudgetExceeded` before anything is sent, the
   call waits for the rate limiter (holding no budget reservation meanwhile), and then for calls in
   flight to settle the budgets;
2. DSPy runs the call (cache, engine, its own retries of transient errors);
3. the reservation is settled with the usage the model reported (a cache hit gives it all back;
   a model that reports no usage is charged what was reserved; a call that raised counts as a call
   and gives its tokens back; a cancelled call gives everything back), the limiter is corrected,
   and a ``Retry-After`` the error carries pauses the model's limiter.

Around all of it, a ``stageflow.limits`` / ``stageflow.configure`` concurrency cap takes an LM-call
slot (:mod:`stageflow.engine.lm_slots`).

Waits are added to the running stage's usage (``limit_wait``) and recorded in the run's events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

from stageflow.budgets import ledger as ledger_mod
from stageflow.budgets._state import LIVE
from stageflow.budgets.ledger import BudgetLedger, Need, Ticket
from stageflow.budgets.ratelimit import RateLimiter, Slot, limiter_for
from stageflow.budgets.scope import active_chain, record_event
from stageflow.budgets.sizing import enforces_max_tokens, max_tokens, price_known, prices, prompt_size
from stageflow.budgets.spec import DEFAULT_MAX_TOKENS
from stageflow.engine.lm_slots import acall_capped, call_capped, lm_caps, lm_slots
from stageflow.engine.stopping import refuse_if_abandoned
from stageflow.usage import finalized, finalizing, note_lm_result, note_lm_wait, reported_cost

__all__ = ["install", "installed", "uninstall"]

logger = logging.getLogger("stageflow")

#: Where an LM call of an LM of yours (one with its own ``forward``: DSPy runs it, not its engine)
#: leaves its :class:`_Call` in DSPy's settings overrides while it runs: the calls made inside it
#: find it there, on this thread or task and in the worker threads DSPy starts meanwhile
#: (``dspy.Parallel`` copies DSPy's settings into them, not the context).
_KEY = "stageflow_lm_call"


class _Call:
    """An LM call in progress whose ``forward`` may make LM calls of its own.

    - The same LM's call made again inside it (a ``forward`` of yours calling DSPy's own: DSPy 3.4's
      legacy interface) is part of it: counted once, not metered again (counted again, it was billed
      twice and waited on its own reservation).
    - A call to another LM made inside it (a router of yours, ``dspy.Parallel`` in a ``forward``) is a
      request of its own, metered as one; it takes no concurrency slot (the call it runs inside holds
      one) and never waits for the budget reservations of the calls it runs inside
      (:mod:`.ledger`): those settle only after it returns, so waiting for them would never end.
    - A call that only passes on what an inner call returned or raised (:meth:`passed_on`: the same
      object) adds nothing to the usage and the budgets: its inner calls were the requests. Anything
      else it returns or raises counts as a request of its own (counted once too many rather than
      never: a call whose request is not counted could overshoot a budget).
    """

    __slots__ = ("cost", "inner", "lm", "outer", "sent", "slots", "ticket")

    def __init__(self, lm: Any, outer: _Call | None) -> None:
        self.lm, self.outer = lm, outer
        self.ticket: Ticket | None = None  # its budget reservation, once taken
        self.slots: tuple[Any, ...] = ()  # the concurrency slots it holds
        self.inner: list[Any] = []  # what the calls to other LMs made inside it returned or raised
        self.sent = False  # its LM's own call ran inside it (a request of its own)
        self.cost: float | None = None  # what that call's engine reported it cost

    def sending(self, result: Any) -> Any:
        """Its LM's own call (DSPy's ``forward``, run by a ``forward`` of yours) returned ``result``:
        a request of its own, whose cost is kept for :meth:`kept_cost`."""
        self.sent = True
        raw = getattr(result, "raw", None)
        cost = reported_cost(
            getattr(result, "cost", None), raw if raw is not None else getattr(result, "responses", None)
        )
        if cost is not None:
            self.cost = (self.cost or 0.0) + cost
        return result

    def kept_cost(self, result: Any) -> Any:
        """``result`` of this call, with the cost its LM's own call reported when it carries none:
        DSPy's ``forward`` hands out a response without the cost (``provider_response()`` drops it),
        so a ``forward`` of yours delegating to it returned no cost, and a ``max_cost`` budget
        counted nothing for a request that cost something."""
        if self.cost is not None and getattr(result, "cost", 0) is None:
            with contextlib.suppress(AttributeError, TypeError):
                result.cost = self.cost
        return result

    def free_slots(self) -> tuple[Any, ...]:
        """The concurrency caps in force here whose slot neither this call nor one it runs inside
        holds: a call made inside it takes those (a cap opened inside its ``forward``)."""
        caps = lm_caps()
        if not caps:
            return ()
        held: list[Any] = []
        call: _Call | None = self
        while call is not None:
            held.extend(call.slots)
            call = call.outer
        return tuple(cap for cap in caps if all(cap is not h for h in held))

    def passed_on(self, outcome: Any) -> bool:
        """Whether ``outcome`` (a result, or an error with what it was raised from) is what an LM call
        made inside this one returned or raised, passed on as it was — a router returning its
        model's response (the very one, as DSPy's ``forward`` hands it out), or letting its error
        through — and this call sent no request of its own (its LM's own ``forward`` did not run
        inside it). Those calls were counted, so counting this one too would count their tokens
        twice; anything else it returns or raises counts as a request of its own (once too many
        rather than never: a request not counted could overshoot a budget)."""
        inner = self.inner
        if not inner or self.sent:
            return False
        if isinstance(outcome, BaseException):
            seen: set[int] = set()
            e: BaseException | None = outcome
            while e is not None and id(e) not in seen:
                if any(e is r for r in inner):
                    return True
                seen.add(id(e))
                e = e.__cause__ or e.__context__
            return False
        raw = getattr(outcome, "raw", None)
        for r in inner:
            if outcome is r or (raw is not None and raw is getattr(r, "raw", None)):
                return True
            if raw is not None and not isinstance(r, BaseException) and _response_of(r) == raw:
                return True
        return False

    def tickets(self) -> tuple[Ticket, ...]:
        """The reservations of this call and of those it runs inside."""
        out: list[Ticket] = []
        call: _Call | None = self
        while call is not None:
            if call.ticket is not None:
                out.append(call.ticket)
            call = call.outer
        return tuple(out)


_INSTALLED = [False]
_ORIGINALS: list[Any] = []  # DSPy's execute / aexecute, while wrapped
_INSTALL_LOCK = threading.Lock()


def installed() -> bool:
    """Whether DSPy's LM execution is wrapped (it stays wrapped; idle, it costs one check per call)."""
    return _INSTALLED[0]


def install() -> None:
    """Wrap DSPy's LM execution once (see the module docstring)."""
    if _INSTALLED[0]:
        return
    with _INSTALL_LOCK:
        if _INSTALLED[0]:
            return
        from dspy.clients import execution

        original, aoriginal = execution.execute, execution.aexecute
        registry = ratelimit_registry()

        def own(lm: Any, call: Any) -> Any:  # (an LM's own forward: see _Call.kept_cost)
            here = overrides.get().get(_KEY)
            return here.kept_cost(original(lm, call))

        async def aown(lm: Any, call: Any) -> Any:
            here = overrides.get().get(_KEY)
            return here.kept_cost(await aoriginal(lm, call))

        def run(lm: Any, call: Any, here: _Call | None, outer: _Call | None) -> Any:
            call_original = original if here is None else own
            if not (LIVE[0] or registry):
                return call_original(lm, call)
            return _metered(lm, call, call_original, here, outer)

        async def arun(lm: Any, call: Any, here: _Call | None, outer: _Call | None) -> Any:
            call_original = aoriginal if here is None else aown
            if not (LIVE[0] or registry):
                return await call_original(lm, call)
            return await _ametered(lm, call, call_original, here, outer)

        settings = sys.modules["dspy.dsp.utils.settings"]
        overrides, dotdict = settings.thread_local_overrides, settings.dotdict

        def enter(lm: Any, outer: _Call | None) -> tuple[_Call | None, Any]:
            here = _Call(lm, outer)
            new = dotdict(overrides.get())
            new[_KEY] = here
            return here, overrides.set(new)

        def execute(lm: Any, call: Any) -> Any:
            refuse_if_abandoned()  # (work whose caller gave up sends nothing more)
            outer = overrides.get().get(_KEY)
            if outer is not None and outer.lm is lm:  # (this LM's own call, made again inside it)
                return outer.sending(original(lm, call))
            # (a call DSPy's engine runs makes no LM call of its own: nothing to leave for them)
            here, token = (None, None) if call.managed else enter(lm, outer)
            try:
                # (a stageflow.limits() cap holds for LM calls too; a call inside another is in its slot)
                slots = lm_slots() if outer is None else outer.free_slots()
                if here is not None:
                    here.slots = slots
                result = (
                    run(lm, call, here, outer)
                    if not slots
                    else call_capped(slots, lambda: run(lm, call, here, outer))
                )
                count = here is None or not here.passed_on(result)
            except BaseException as e:
                if outer is not None:
                    outer.inner.append(e)
                raise
            finally:
                if token is not None:
                    overrides.reset(token)
                    here.inner.clear()  # type: ignore[union-attr]  # (what its inner calls raised keeps their frames)
            if outer is not None:
                outer.inner.append(result)
            note_lm_result(result, count=count)  # (billed or a cache hit, for stageflow's usage; see there)
            return result

        async def aexecute(lm: Any, call: Any) -> Any:
            refuse_if_abandoned()
            outer = overrides.get().get(_KEY)
            if outer is not None and outer.lm is lm:
                return outer.sending(await aoriginal(lm, call))
            here, token = (None, None) if call.managed else enter(lm, outer)
            try:
                slots = lm_slots() if outer is None else outer.free_slots()
                if here is not None:
                    here.slots = slots
                result = await (
                    arun(lm, call, here, outer)
                    if not slots
                    else acall_capped(slots, lambda: arun(lm, call, here, outer))
                )
                count = here is None or not here.passed_on(result)
            except BaseException as e:
                if outer is not None:
                    outer.inner.append(e)
                raise
            finally:
                if token is not None:
                    overrides.reset(token)
                    here.inner.clear()  # type: ignore[union-attr]
            if outer is not None:
                outer.inner.append(result)
            note_lm_result(result, count=count)
            return result

        original_finalize = execution.finalize

        def finalize(lm: Any, call: Any, result: Any) -> Any:
            # (DSPy reports the call to its usage tracker and history here: stageflow's usage
            # accounting knows while it does so whether execute above counted this very call)
            token = finalizing(result)
            try:
                return original_finalize(lm, call, result)
            finally:
                finalized(token)

        _ORIGINALS[:] = [original, aoriginal, original_finalize]
        execution.execute, execution.aexecute, execution.finalize = execute, aexecute, finalize
        _INSTALLED[0] = True


def uninstall() -> None:
    """Give DSPy its own functions back (budgets and rate limits stop holding until the next use
    installs the wrapper again). For benchmarks and tests that measure DSPy untouched."""
    with _INSTALL_LOCK:
        if not _INSTALLED[0]:
            return
        from dspy.clients import execution

        execution.execute, execution.aexecute, execution.finalize = _ORIGINALS
        _ORIGINALS.clear()
        _INSTALLED[0] = False


def ratelimit_registry() -> dict[str, RateLimiter]:
    from stageflow.budgets.ratelimit import _REGISTRY

    return _REGISTRY


# -- what a call may use (see .sizing and .calibrate) -------------------------------------------


class _Plan:
    """One metered call: its budgets, limiter and what it may use."""

    __slots__ = ("chain", "estimate", "here", "inside", "limiter", "need", "slot", "ticket")

    def __init__(
        self,
        lm: Any,
        call: Any,
        chain: tuple[BudgetLedger, ...],
        limiter: RateLimiter | None,
        here: _Call | None,
        outer: _Call | None,
    ) -> None:
        prompt_bound, chars = prompt_size(call)
        max_out = max_tokens(call)
        reserve_out = (
            max_out
            if max_out is not None
            else max((ledger.limits.default_max_tokens for ledger in chain), default=DEFAULT_MAX_TOKENS)
        )
        n = call.n
        bounded = max_out is not None and enforces_max_tokens(lm)
        cost_bound = None
        if bounded and any(ledger.limits.max_cost is not None for ledger in chain):
            rates = prices(lm)
            if rates is not None:
                cost_bound = n * (prompt_bound * rates[0] + reserve_out * rates[1])
        self.chain, self.limiter = chain, limiter
        self.need = Need(
            n, n * (prompt_bound + reserve_out), str(lm.model), n * prompt_bound, bounded, cost_bound
        )
        self.estimate = n * (chars // 4 + (max_out or 0))  # what the rate limiter counts until settled
        self.ticket: Ticket | None = None
        self.slot: Slot | None = None
        self.here = here  # (its reservation is noted there, for the calls made inside it)
        self.inside = () if outer is None else outer.tickets()  # the calls it runs inside

    def reserved(self, ticket: Ticket) -> None:
        self.ticket = ticket
        if self.here is not None:
            self.here.ticket = ticket


def _response_of(result: Any) -> Any:
    """The provider response DSPy's ``forward`` makes of an LM call's result (a fresh object each
    time, equal in content), or ``None``."""
    make = getattr(result, "provider_response", None)
    if make is None:
        return None
    try:
        return make()
    except Exception:  # (not a response DSPy can shape: nothing to compare with)
        return None


def _plan(lm: Any, call: Any, here: _Call | None, outer: _Call | None) -> _Plan | None:
    chain = active_chain()
    limiter = limiter_for(str(lm.model))
    if not chain and limiter is None:
        return None
    return _Plan(lm, call, chain, limiter, here, outer)


def _cached(lm: Any, call: Any, asynchronous: bool) -> Any:
    """DSPy's cached answer for this call, or ``None`` (what ``execute`` would return first)."""
    from dspy.clients import execution

    lookup = getattr(execution, "_cached", None)
    return lookup(lm, call, asynchronous) if lookup is not None else None


# -- the metered call -----------------------------------------------------------------------------


def _metered(
    lm: Any, call: Any, original: Callable[[Any, Any], Any], here: _Call | None, outer: _Call | None
) -> Any:
    plan = _plan(lm, call, here, outer)
    if plan is None:
        return original(lm, call)
    if not _take_now(plan):
        try:
            hit = _cached(lm, call, False) if call.cache else None
            if hit is not None:  # the answer is cached: nothing is taken, nothing waits
                _give_back(plan)
                return hit
            _take_waiting(plan)
            refuse_if_abandoned()  # (given up on while it waited: nothing is sent)
        except BaseException:
            _give_back(plan)
            raise
    try:
        result = original(lm, call)
    except BaseException as error:
        _failed(plan, error)
        raise
    _finished(plan, result)
    return result


async def _ametered(
    lm: Any, call: Any, original: Callable[[Any, Any], Any], here: _Call | None, outer: _Call | None
) -> Any:
    if not price_known(lm) and any(ledger.limits.max_cost is not None for ledger in active_chain()):
        await asyncio.to_thread(prices, lm)  # the first look-up loads DSPy's price table: off the loop
    plan = _plan(lm, call, here, outer)
    if plan is None:
        return await original(lm, call)
    if not _take_now(plan):
        try:
            hit = await asyncio.to_thread(_cached, lm, call, True) if call.cache else None
            if hit is not None:
                _give_back(plan)
                return hit
            await _atake_waiting(plan)
            refuse_if_abandoned()
        except BaseException:
            _give_back(plan)
            raise
    try:
        result = await original(lm, call)
    except BaseException as error:
        _failed(plan, error)
        raise
    _finished(plan, result)
    return result


def _take_now(plan: _Plan) -> bool:
    """Reserve and take room without waiting; ``False`` when something would have to wait or refuse
    (what was taken stays held; :func:`_take_waiting` completes it)."""
    if plan.chain:
        got = ledger_mod.try_reserve(plan.chain, plan.need, plan.inside)
        if not isinstance(got, Ticket):
            return False
        plan.reserved(got)
    if plan.limiter is not None:
        plan.slot = plan.limiter.try_acquire(plan.need.calls, plan.estimate)
        if plan.slot is None:
            return False
    return True


def _before_rate_wait(plan: _Plan) -> None:
    """Before waiting for the rate limiter: a call the budgets refuse fails now, and no budget
    reservation is held through the (possibly long) wait."""
    if plan.ticket is not None:
        ledger_mod.release(plan.ticket)
        plan.ticket = None
    elif plan.chain:
        refusal = ledger_mod.refusal(plan.chain, plan.need, plan.inside)
        if refusal is not None:
            raise refusal


def _take_waiting(plan: _Plan) -> None:
    """Take what :func:`_take_now` could not: room in the rate limiter first, then the budgets'
    reservation (waiting for each as needed). The caller gives everything back if this raises."""
    if plan.limiter is not None and plan.slot is None:
        _before_rate_wait(plan)
        plan.slot, waited = plan.limiter.acquire(plan.need.calls, plan.estimate)
        _waited(plan, waited, "rate_limited")
    if plan.chain and plan.ticket is None:
        ticket, waited = ledger_mod.reserve(plan.chain, plan.need, plan.inside)
        plan.reserved(ticket)
        _waited(plan, waited, "budget_wait")


async def _atake_waiting(plan: _Plan) -> None:
    """Async twin of :func:`_take_waiting`."""
    if plan.limiter is not None and plan.slot is None:
        _before_rate_wait(plan)
        plan.slot, waited = await plan.limiter.aacquire(plan.need.calls, plan.estimate)
        _waited(plan, waited, "rate_limited")
    if plan.chain and plan.ticket is None:
        ticket, waited = await ledger_mod.areserve(plan.chain, plan.need, plan.inside)
        plan.reserved(ticket)
        _waited(plan, waited, "budget_wait")


def _give_back(plan: _Plan) -> None:
    """The call will not reach the model: return everything taken."""
    if plan.ticket is not None:
        ledger_mod.release(plan.ticket)
        plan.ticket = None
    if plan.slot is not None and plan.limiter is not None:
        plan.limiter.refund(plan.slot)
        plan.slot = None


def _waited(plan: _Plan, seconds: float, kind: str) -> None:
    if seconds <= 0:
        return
    note_lm_wait(seconds)
    if kind == "rate_limited" and plan.limiter is not None:
        _run_event(kind, seconds, model=plan.limiter.model)
    elif plan.chain:
        _run_event(kind, seconds, model=plan.need.model)


def _run_event(kind: str, seconds: float, **detail: Any) -> None:
    from stageflow.policies.recovery import PolicyEvent
    from stageflow.usage import run_events

    events, path = run_events()
    if events is not None:
        events.append(PolicyEvent(path, kind, delay=seconds, detail=detail))


def _retry_after(error: BaseException) -> float | None:
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        value = getattr(e, "retry_after", None)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value)  # (an infinite one too: the limiter caps it at its max_pause)
        e = e.__cause__ or e.__context__
    return None


def _failed(plan: _Plan, error: BaseException) -> None:
    """The request was sent and the call raised: it counts as a call (a failure bounds retry loops).
    A failure gives its tokens back. A cancellation (a timeout's, Ctrl-C) may have left the request
    running at the provider: its prompt counts too. A ``Retry-After`` pauses the model's limiter."""
    if plan.here is not None and plan.here.passed_on(error):
        _give_back(plan)  # (what a call made inside it raised, passed on: nothing was sent for it)
        return
    cancelled = not isinstance(error, Exception)
    prompt = plan.need.prompt_tokens if cancelled else 0
    if plan.ticket is not None:
        ledger_mod.settle(
            plan.ticket,
            calls=plan.need.calls,
            input_tokens=prompt,
            output_tokens=0,
            cost=None,
            completed=False,
        )
    if plan.limiter is not None:
        if plan.slot is not None:
            plan.limiter.settle(plan.slot, prompt)
        wait = _retry_after(error)
        if wait is not None:
            plan.limiter.pause(wait)


def _usage(result: Any) -> tuple[int, int] | None:
    usage = getattr(result, "usage", None) or {}
    tin = usage.get("prompt_tokens", usage.get("input_tokens"))
    tout = usage.get("completion_tokens", usage.get("output_tokens"))
    total = usage.get("total_tokens")
    if not isinstance(tin, int) and not isinstance(tout, int):
        return (total, 0) if isinstance(total, int) else None
    return (tin if isinstance(tin, int) else 0), (tout if isinstance(tout, int) else 0)


def _passed_on(plan: _Plan) -> None:
    """The call only passed on what the calls made inside it returned (they were charged): it used
    nothing itself. Its budgets learn that (a router's calls are probes no longer); its model's
    rate limiter gets its room back."""
    if plan.ticket is not None:
        ledger_mod.settle(plan.ticket, calls=0, input_tokens=0, output_tokens=0, cost=None)
        plan.ticket = None
    if plan.slot is not None and plan.limiter is not None:
        plan.limiter.refund(plan.slot)
        plan.slot = None


def _finished(plan: _Plan, result: Any) -> None:
    if getattr(result, "cache_hit", False):
        _give_back(plan)
        return
    if plan.here is not None and plan.here.passed_on(result):
        _passed_on(plan)
        return
    need = plan.need
    used = _usage(result)
    if used is None:  # charged what was reserved: a token budget still ends
        used = (need.prompt_tokens, need.tokens - need.prompt_tokens)
        _note_unreported(plan)
    if plan.ticket is not None:
        cost = reported_cost(getattr(result, "cost", None), getattr(result, "responses", None))
        if cost is None:
            _note_uncosted(plan)
        events = ledger_mod.settle(
            plan.ticket, calls=need.calls, input_tokens=used[0], output_tokens=used[1], cost=cost
        )
        for ledger, kind, detail in events:
            if kind == "budget_degraded" and ledger.limits.degrade is not None:
                detail = ledger.limits.degrade.describe()
            record_event(ledger, kind, **detail, spent=ledger.to_dict())
    if plan.limiter is not None and plan.slot is not None:
        plan.limiter.settle(plan.slot, used[0] + used[1])


_UNCOSTED_WARNED: set[str] = set()


def _note_uncosted(plan: _Plan) -> None:
    """A call under a ``max_cost`` budget whose model reported no cost: the budget cannot count it.
    Said once per budget as an event, and once per model in the process as a warning (a cost limit
    that silently counts nothing would never stop anything)."""
    for ledger in plan.chain:
        if ledger.limits.max_cost is not None and not ledger.uncosted:
            ledger.uncosted = True
            record_event(
                ledger,
                "cost_unreported",
                model=plan.need.model,
                note="the model reported no cost: its calls add nothing to max_cost",
            )
            if plan.need.model not in _UNCOSTED_WARNED:  # (a budget per call would say it every call)
                _UNCOSTED_WARNED.add(plan.need.model)
                logger.warning(
                    "stageflow budget: the model %r reported no cost, so max_cost=%s does not count its "
                    "calls (set max_calls or max_tokens too, or use a model with known prices)",
                    plan.need.model,
                    ledger.limits.max_cost,
                )


def _note_unreported(plan: _Plan) -> None:
    for ledger in plan.chain:
        if not ledger.unreported:
            ledger.unreported = True
            record_event(
                ledger,
                "usage_unreported",
                model=plan.need.model,
                charged=plan.need.tokens,
                note="the model reported no token usage; its calls are charged their reservations",
            )
