"""An LM call made inside another one — a ``forward`` of yours on a ``dspy.LM`` subclass that calls
DSPy's own (DSPy 3.4's deprecated, still supported interface), which runs DSPy's LM execution again
for the same request — is one LM call: counted once in the usage and the budgets. Before, it was
counted twice, and under a token or cost budget it waited forever on its own reservation (helper
101, D1/D2)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import warnings
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import SequentialPipeline
from stageflow.testing import FakeLM, call


class Delegating(FakeLM):
    """Overrides ``forward`` / ``aforward`` and calls DSPy's own."""

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        return super().forward(prompt=prompt, messages=messages, **kwargs)

    async def aforward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        return await super().aforward(prompt=prompt, messages=messages, **kwargs)


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


@pytest.mark.parametrize("limit", [{"max_tokens": 100_000}, {"max_cost": 10.0}, {"max_calls": 5}])
async def test_a_budget_counts_it_once_and_does_not_wait_on_itself(mode: str, limit: dict[str, Any]) -> None:
    lm = Delegating({"answer": "42"}, model="fake/delegating")
    program = SequentialPipeline([dspy.Predict("question -> answer")])
    outcome: list[Any] = []

    def run() -> None:
        with dspy.context(lm=lm), stageflow.budget(**limit) as spent:
            outcome.append((asyncio.run(call(program, mode, question="?")).answer, spent.calls))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "the LM call waited on its own budget reservation"
    assert outcome == [("42", 1)]


async def test_the_usage_counts_it_once(mode: str) -> None:
    plain, delegating = FakeLM({"answer": "42"}), Delegating({"answer": "42"})
    program = SequentialPipeline([dspy.Predict("question -> answer")])
    usage = []
    for lm in (plain, delegating):
        with dspy.context(lm=lm):
            usage.append((await call(program, mode, question="?")).run.usage.total)
    assert usage[1].lm_calls == usage[0].lm_calls == 1
    assert usage[1].input_tokens == usage[0].input_tokens > 0


class Router(dspy.LM):  # type: ignore[misc]
    """An LM whose ``forward`` calls another LM: the inner calls are requests of their own."""

    def __init__(self, inner: Any) -> None:
        super().__init__("router/r", cache=False, num_retries=0)
        self.inner = inner

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        return self.inner.forward(prompt=prompt, messages=messages, **kwargs)


def test_the_calls_a_router_lm_makes_to_another_lm_are_rate_limited() -> None:
    """(helper 103, F2) Counting a call made inside another once must not hide another model's
    calls: a first version let a router's calls to its inner model past that model's rate limit."""
    inner = FakeLM({"answer": "A"}, model="fake/routed-inner")
    program = SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=Router(inner)), stageflow.rate_limit("fake/routed-inner", rpm=1000) as limiter:
        program(question="q1")
        program(question="q2")
    assert inner.calls == 2
    assert limiter.requests == 2


# -- calls to another LM made inside an LM call never wait for the call they run inside ------------


class AsyncRouter(Router):
    """A router with an ``aforward`` too (``acall`` runs that one)."""

    async def aforward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        return await self.inner.aforward(prompt=prompt, messages=messages, **kwargs)


class FanningRouter(Router):
    """An LM whose ``forward`` runs two calls to another LM in ``dspy.Parallel`` worker threads."""

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        calls = [(lambda: self.inner.forward(prompt=prompt, messages=messages, **kwargs), ()) for _ in "ab"]
        outs = dspy.Parallel(num_threads=2, disable_progress_bar=True, max_errors=0)(calls)
        return outs[0]


def _within(seconds: float, fn: Any) -> list[Any]:
    """Run ``fn`` on a thread; its result or error, failing the test if it is still running after
    ``seconds`` (the hang these tests guard against)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as e:
            outcome.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "an LM call made inside another waited for it forever"
    return outcome


@pytest.mark.parametrize("limit", [{"max_calls": 2}, {"max_tokens": 100_000}, {"max_cost": 10.0}])
def test_a_router_runs_under_a_budget_that_affords_it(mode: str, limit: dict[str, Any]) -> None:
    """(closing note of session 34) A router LM under a token budget waited forever: its own call and
    its inner call were both probes of unlearned models, and the inner waited for the outer one."""
    inner = FakeLM({"answer": "A"}, model="fake/routed")
    program = SequentialPipeline([dspy.Predict("question -> answer")])

    def run() -> Any:
        with dspy.context(lm=AsyncRouter(inner)), stageflow.budget(**limit) as spent:
            return asyncio.run(call(program, mode, question="?")).answer, spent.calls

    assert _within(10, run) == [("A", 1)]  # the request its model got (the router passed it on)
    assert inner.calls == 1


def test_a_router_that_does_not_fit_is_refused_naming_what_its_outer_call_holds(mode: str) -> None:
    """Under ``max_calls=1`` the router's own call holds the one call: its inner call cannot wait for
    that to settle (it settles after it), so it is refused, and says why."""
    inner = FakeLM({"answer": "A"}, model="fake/routed")
    program = SequentialPipeline([dspy.Predict("question -> answer")])

    def run() -> Any:
        with dspy.context(lm=AsyncRouter(inner)), stageflow.budget(max_calls=1):
            return asyncio.run(call(program, mode, question="?"))

    [error] = _within(10, run)
    assert isinstance(error, stageflow.BudgetExceeded), error
    assert error.limit_name == "max_calls"
    assert error.held == 1
    assert "the LM call it was made inside holds 1 LM call more" in str(error)
    assert "stages[0]" in str(error)
    assert inner.calls == 0


@pytest.mark.parametrize("limit", [{"max_calls": 3}, {"max_tokens": 100_000}])
def test_dspy_parallel_inside_an_lm_call_runs_under_a_budget(limit: dict[str, Any]) -> None:
    """``dspy.Parallel``'s worker threads copy DSPy's settings, not the context: the calls made there
    must still know which call they run inside (before, they waited for it forever)."""
    inner = FakeLM({"answer": "A"}, model="fake/fanned")
    program = SequentialPipeline([dspy.Predict("question -> answer")])

    def run() -> Any:
        with dspy.context(lm=FanningRouter(inner)), stageflow.budget(**limit) as spent:
            return program(question="?").answer, spent.calls

    assert _within(10, run) == [("A", 2)]  # its two requests (the outer call passed one on)
    assert inner.calls == 2


def test_dspy_parallel_inside_an_lm_call_runs_under_a_concurrency_cap_of_one() -> None:
    """The outer call holds the cap's one LM slot; the calls made inside it run in that slot (before,
    they waited for it forever)."""
    inner = FakeLM({"answer": "A"}, model="fake/fanned")
    program = SequentialPipeline([dspy.Predict("question -> answer")])

    def run() -> Any:
        with dspy.context(lm=FanningRouter(inner)), stageflow.limits(max_concurrency=1):
            return program(question="?").answer

    assert _within(10, run) == ["A"]
    assert inner.calls == 2


class SelfFanning(FakeLM):
    """An LM whose ``forward`` runs DSPy's own twice in ``dspy.Parallel`` worker threads."""

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        own = super().forward
        calls = [(lambda: own(prompt=prompt, messages=messages, **kwargs), ()) for _ in "ab"]
        return dspy.Parallel(num_threads=2, disable_progress_bar=True, max_errors=0)(calls)[0]


def test_the_same_lms_calls_in_parallel_workers_are_part_of_its_call() -> None:
    """The same LM's calls made inside its call are part of it, in ``dspy.Parallel``'s worker threads
    as on the calling thread (before, the workers' calls were counted beside it: 3 for 1)."""
    lm = SelfFanning({"answer": "A"}, model="fake/self-fanning")
    program = SequentialPipeline([dspy.Predict("question -> answer")])

    def run() -> Any:
        with dspy.context(lm=lm), stageflow.budget(max_calls=1) as spent:
            result = program(question="?")
            return result.answer, spent.calls, result.run.usage.total.lm_calls

    assert _within(10, run) == [("A", 1, 1)]
    assert lm.calls == 2


# -- a router's call that passes its model's answer on is not counted beside it ------------------


class OwnRequest(FakeLM):
    """An LM that asks another LM (a judge, say) and then sends a request of its own (DSPy's own
    ``forward``: its engine, reporting 7 + 3 tokens)."""

    def __init__(self, judge: Any) -> None:
        super().__init__({"answer": "own"}, model="fake/own", usage=(7, 3))
        self.judge = judge

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        self.judge.forward(prompt=prompt, messages=messages, **kwargs)
        return super().forward(prompt=prompt, messages=messages, **kwargs)


@pytest.mark.parametrize("budgeted", [False, True])
async def test_a_routers_answer_counts_once_in_the_usage_and_the_budget(mode: str, budgeted: bool) -> None:
    """(before: 2 calls and twice the tokens for one request, while DSPy's tracker said one)"""
    program = SequentialPipeline([dspy.Predict("question -> answer")])
    plain = FakeLM({"answer": "A"}, model="fake/routed")
    with dspy.context(lm=plain):
        alone = (await call(program, mode, question="?")).run.usage.total
    inner = FakeLM({"answer": "A"}, model="fake/routed")
    with (
        dspy.context(lm=AsyncRouter(inner)),
        dspy.track_usage() as tracker,
        stageflow.budget(max_tokens=10**6) if budgeted else contextlib.nullcontext() as spent,
    ):
        routed = (await call(program, mode, question="?")).run.usage.total
    assert (routed.lm_calls, routed.input_tokens, routed.output_tokens) == (
        1,
        alone.input_tokens,
        alone.output_tokens,
    )
    assert tracker.get_total_tokens()["router/r"]["prompt_tokens"] == routed.input_tokens  # DSPy agrees
    if budgeted:
        assert (spent.calls, spent.tokens) == (1, alone.input_tokens + alone.output_tokens)


def test_an_lm_that_sends_its_own_request_beside_an_inner_call_counts_both() -> None:
    judge = FakeLM({"answer": "judged"}, model="fake/judge", usage=(20, 2))
    program = SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=OwnRequest(judge)), stageflow.budget(max_calls=5) as spent:
        result = program(question="?")
    assert result.answer == "own"
    total = result.run.usage.total
    assert (spent.calls, spent.tokens) == (2, 20 + 2 + 7 + 3)  # the judge's request, and its own
    assert (total.lm_calls, total.input_tokens, total.output_tokens) == (2, 27, 5)


def test_a_routers_calls_are_learned_so_later_ones_run_side_by_side() -> None:
    """Passed on, the router's call settles as using nothing, and its budget learns its model: its
    later calls are not probes that wait for one another under a token budget."""
    inner = FakeLM({"y": "A"}, model="fake/routed")
    program = stageflow.ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys")
    with dspy.context(lm=Router(inner)), stageflow.budget(max_tokens=10**7) as spent:
        program(xs=["a"])
        assert "router/r" in spent.knowledge.known
        assert program(xs=[str(i) for i in range(8)]).ys == ["A"] * 8
    assert spent.calls == 9
    assert spent.reserved_calls == 0
    assert spent.reserved_tokens == 0


# -- routers side by side near the end of a budget (helper 104, F1/F3/F4) --------------------------


class MeetingRouter(AsyncRouter):
    """A router whose calls all wait for one another before calling their model: every router's own
    call holds its reservation while its model's calls ask for theirs."""

    def __init__(self, inner: Any, parties: int) -> None:
        super().__init__(inner)
        self.parties = parties
        self.barrier = threading.Barrier(parties, timeout=5)
        self.abarrier: asyncio.Barrier | None = None

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        self.barrier.wait()
        return super().forward(prompt=prompt, messages=messages, **kwargs)

    async def aforward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        if self.abarrier is None:
            self.abarrier = asyncio.Barrier(self.parties)
        async with asyncio.timeout(5):
            await self.abarrier.wait()
        return await super().aforward(prompt=prompt, messages=messages, **kwargs)


async def test_routers_side_by_side_at_the_end_of_a_budget_do_not_wait_for_one_another(mode: str) -> None:
    """Four routers in flight hold all of ``max_calls=4``; each one's model call could only fit once
    another router settled, and each router waited for its own model call: they all waited forever.
    Now the last model call to ask, seeing every call in flight stuck, is refused; its router gives
    its call back, and the other three are answered."""
    inner = FakeLM({"answer": "A"}, model="fake/routed")
    program = stageflow.ForEach(dspy.Predict("question -> answer"), over="questions", on_error="collect")

    def run() -> Any:
        with dspy.context(lm=MeetingRouter(inner, 4)), stageflow.budget(max_calls=4) as spent:
            result = asyncio.run(call(program, mode, questions=["q1", "q2", "q3", "q4"]))
            return sorted(map(str, result.answers)), spent.calls, spent.reserved_calls, spent.refused

    assert _within(20, run) == [(["A", "A", "A", "None"], 3, 0, 1)]
    assert inner.calls == 3


@pytest.mark.parametrize("limit", [{"max_calls": 1}, {"max_tokens": 5_000}])
async def test_a_router_whose_model_call_was_refused_spends_nothing(mode: str, limit: dict[str, Any]) -> None:
    """(F3) Nothing was sent for it: before, its own call was settled as a call that reached a model."""
    inner = FakeLM({"answer": "A"}, model="fake/routed")
    program = SequentialPipeline([dspy.Predict("question -> answer")])

    def run() -> Any:
        with dspy.context(lm=AsyncRouter(inner)), stageflow.budget(**limit) as spent:
            with contextlib.suppress(stageflow.BudgetExceeded):
                asyncio.run(call(program, mode, question="?"))
            return spent.calls, spent.tokens, spent.reserved_calls, spent.reserved_tokens

    assert _within(10, run) == [(0, 0, 0, 0)]
    assert inner.calls == 0


def test_a_cap_opened_inside_an_lms_forward_caps_the_calls_made_there() -> None:
    """(F4) A call made inside another skips the slots of the caps its outer call holds, not those of
    a cap opened inside it."""

    class CapInside(Router):
        def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
            with stageflow.limits(max_concurrency=1):
                calls = [
                    (lambda: self.inner.forward(prompt=prompt, messages=messages, **kwargs), ())
                    for _ in "abcd"
                ]
                return dspy.Parallel(num_threads=4, disable_progress_bar=True, max_errors=0)(calls)[0]

    inner = FakeLM({"answer": "A"}, model="fake/capped", rendezvous=2, rendezvous_timeout=0.2)
    with dspy.context(lm=CapInside(inner)):
        assert SequentialPipeline([dspy.Predict("question -> answer")])(question="?").answer == "A"
    assert inner.calls == 4
    assert inner.peak_active == 1


# -- what a router passes on is recognised by identity, never by equal numbers (helper 106) -------


class AskThenAnswer(FakeLM):
    """An LM that asks another LM, then sends its own request (DSPy's own ``forward``: its engine),
    whose usage equals the other call's: a request of its own all the same."""

    def __init__(self, judge: Any) -> None:
        super().__init__({"answer": "own"}, model="fake/asking", usage=(20, 2))
        self.judge = judge

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        self.judge.forward(prompt=prompt, messages=messages, **kwargs)
        return super().forward(prompt=prompt, messages=messages, **kwargs)


def test_an_own_request_with_the_same_usage_as_an_inner_call_is_counted() -> None:
    """(U1) A first version took equal usage for passing on: the own request went uncounted, and a
    budget was overshot."""
    judge = FakeLM({"answer": "judged"}, model="fake/judge", usage=(20, 2))
    asker = AskThenAnswer(judge)
    program = SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=asker), stageflow.budget(max_calls=3) as spent:
        assert program(question="1").answer == "own"
        assert (spent.calls, spent.tokens) == (2, 44)  # the judge's request and its own
        with pytest.raises(stageflow.BudgetExceeded):  # its own call holds the third: the judge's
            program(question="2")  # is refused, and the call, which sent nothing, gives it back
    assert (judge.calls, asker.calls) == (1, 1)
    assert (spent.calls, spent.reserved_calls) == (2, 0)


class FailingRouter(AsyncRouter):
    """A router whose model raises, the error passed on as it is."""


@pytest.mark.parametrize(
    "error", [RuntimeError("model down"), KeyboardInterrupt()], ids=["error", "interrupt"]
)
async def test_a_router_passing_on_its_models_error_is_not_charged_beside_it(
    mode: str, error: BaseException
) -> None:
    """(O1) The model's call counts (it reached the model); the router's, which only let its error
    through, does not (before: 2 calls for 1 request)."""
    inner = FakeLM({"answer": "A"}, model="fake/failing", fail_with=lambda n: error)
    program = SequentialPipeline([dspy.Predict("question -> answer")])

    def run() -> Any:
        with dspy.context(lm=FailingRouter(inner)), stageflow.budget(max_calls=3) as spent:
            with contextlib.suppress(Exception, KeyboardInterrupt):
                asyncio.run(call(program, mode, question="?"))
            return spent.calls, spent.reserved_calls

    assert _within(10, run) == [(1, 0)]
    assert inner.calls == 1


async def test_a_router_cancelled_while_its_models_call_waits_spends_nothing() -> None:
    """(O2) Nothing was sent: before, the router's call was charged a call and its prompt."""
    slow = FakeLM({"answer": "S"}, model="fake/slow", usage=(100, 50), latency=0.5)
    inner = FakeLM({"answer": "A"}, model="fake/waiting", usage=(100, 50))

    async def ask(lm: Any) -> Any:
        with dspy.context(lm=lm):
            return await dspy.Predict("question -> answer").acall(question="?")

    with stageflow.budget(max_calls=2) as spent:
        first = asyncio.create_task(ask(slow))
        await asyncio.sleep(0.05)
        routed = asyncio.create_task(ask(AsyncRouter(inner)))
        while spent.waited == 0 and not routed.done():  # (its model's call waits for the slow one)
            await asyncio.sleep(0.01)
        routed.cancel()
        assert isinstance((await asyncio.gather(routed, return_exceptions=True))[0], asyncio.CancelledError)
        await first
        assert (spent.calls, spent.reserved_calls) == (1, 0)
        assert (await ask(FakeLM({"answer": "P"}, model="fake/plain"))).answer == "P"
    assert (spent.calls, inner.calls) == (2, 0)


def test_the_refusal_of_a_stuck_call_tells_its_own_outer_call_from_the_others() -> None:
    """(helper 107) The message said its outer call held all the routers' calls."""
    inner = FakeLM({"answer": "A"}, model="fake/routed")
    program = stageflow.ForEach(dspy.Predict("question -> answer"), over="questions", on_error="collect")
    with dspy.context(lm=MeetingRouter(inner, 4)), stageflow.budget(max_calls=4):
        result = program(questions=["q1", "q2", "q3", "q4"])
    [error] = [e["error"] for e in result.run.extras["item_errors"]]
    refusal = error if isinstance(error, stageflow.BudgetExceeded) else error.__cause__
    assert isinstance(refusal, stageflow.BudgetExceeded)
    assert (refusal.held, refusal.stuck) == (1, 3)
    assert "the LM call it was made inside holds 1 LM call more" in str(refusal)
    assert "other LM calls like it hold 3 LM calls more" in str(refusal)


async def test_an_lm_delegating_to_dspys_own_forward_keeps_its_engines_cost(mode: str) -> None:
    """(helper 107) DSPy's ``forward`` hands out a response without the cost its engine reported, so
    an LM of yours returning it reported none: ``max_cost`` counted nothing for a paid request."""
    lm = Delegating({"answer": "42"}, model="fake/priced", usage=(100, 10), cost=0.01)
    program = SequentialPipeline([dspy.Predict("question -> answer")])

    def run() -> Any:
        with dspy.context(lm=lm), stageflow.budget(max_cost=1.0) as spent:
            result = asyncio.run(call(program, mode, question="?"))
            return spent.cost, result.run.usage.total.cost

    [(spent, used)] = _within(10, run)
    assert spent == pytest.approx(0.01)
    assert used == pytest.approx(0.01)
