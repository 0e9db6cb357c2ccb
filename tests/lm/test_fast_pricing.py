"""The pricing step of the fast adapter's async LM calls (``stageflow.lm.fast._pricing``): DSPy's
``aexecute`` prices each answer on a worker thread, because the first pricing may load DSPy's model
metadata over the network. For the fast adapter's calls it runs in line when it cannot wait on
anything (a custom engine's answer, or the metadata already loaded), with the same cost figures;
every other step, every other call and DSPy's sync call keep DSPy's way."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import dspy
import pytest

from canonical_lm import CanonicalLM
from stageflow.lm.fast import FastChatAdapter, _pricing
from stageflow.lm.fast._request import sending

_execution: Any = sys.modules["dspy.clients.execution"]
_metadata: Any = sys.modules["dspy.clients.model_metadata"]
_TEXT = "[[ ## answer ## ]]\n4\n\n[[ ## completed ## ]]"


def _history(lm: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k not in ("timestamp", "uuid")} for e in lm.history]


async def _ask(adapter: Any, lm: Any) -> Any:
    with dspy.context(lm=lm, adapter=adapter):
        return await dspy.Predict("question -> answer").acall(question="2+2?")


async def test_a_fast_async_call_prices_in_line_with_dspys_figures(hops: list[str]) -> None:
    fast_lm, plain_lm = CanonicalLM(_TEXT, cache=False), CanonicalLM(_TEXT, cache=False)
    got = await _ask(FastChatAdapter(), fast_lm)
    fast_hops = list(hops)
    expected = await _ask(dspy.ChatAdapter(), plain_lm)
    assert got.answer == expected.answer == "4"
    assert "_price_result" not in fast_hops
    assert "_price_result" in hops[len(fast_hops) :]  # (plain DSPy: on a worker thread, as before)
    assert _history(fast_lm) == _history(plain_lm)  # (cost and cost details included)
    assert "cost" in fast_lm.history[-1]


async def test_the_cache_steps_keep_their_threads(hops: list[str]) -> None:
    lm = CanonicalLM(_TEXT, cache=True)  # (the plugin gives each test a memory-only cache)
    await _ask(FastChatAdapter(), lm)
    assert "_price_result" not in hops
    assert {"_cached", "_store"} <= set(hops)


async def _price(provider: Any, hops: list[str]) -> list[str]:
    """``_price_result`` through the proxy as ``aexecute`` sends it, in a fast call."""
    before = len(hops)

    class Result:
        cost: Any = None
        cost_details: Any = None

    token = sending.set([])
    try:
        await _pricing._PROXY.to_thread(_execution._price_result, None, Result(), None, provider, None)
    finally:
        sending.reset(token)
    return hops[before:]


async def test_a_provider_whose_metadata_is_not_loaded_yet_is_priced_on_a_thread(
    hops: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """(the first load may fetch over the network, with a five-second timeout: never on the loop)"""
    monkeypatch.setattr(_metadata, "_data", None)
    assert await _price("openai", hops) == ["_price_result"]
    monkeypatch.setattr(_metadata, "_data", {})
    assert await _price("openai", hops) == []
    assert await _price(None, hops) == []


async def test_outside_a_fast_call_every_step_goes_to_asyncio(hops: list[str]) -> None:
    class Result:
        cost: Any = None
        cost_details: Any = None

    await _pricing._PROXY.to_thread(_execution._price_result, None, Result(), None, None, None)
    await _pricing._PROXY.to_thread(len, [1, 2])
    assert hops == ["_price_result", "len"]


def test_dspys_execution_module_sees_asyncios_names() -> None:
    assert _pricing.install()
    seen = _execution.asyncio
    assert seen is not asyncio
    assert seen.sleep is asyncio.sleep
    assert seen.get_running_loop is asyncio.get_running_loop
    assert seen.CancelledError is asyncio.CancelledError


def test_a_replacement_of_yours_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    _pricing.uninstall()
    assert _execution.asyncio is asyncio
    mine = type(sys)("mine")
    monkeypatch.setattr(_execution, "asyncio", mine)
    assert not _pricing.install()
    assert _execution.asyncio is mine
    monkeypatch.undo()
    assert _pricing.install()
    assert _pricing.installed()


def test_sync_calls_are_not_changed(hops: list[str]) -> None:
    lm = CanonicalLM(_TEXT, cache=False)
    with dspy.context(lm=lm, adapter=FastChatAdapter()):
        assert dspy.Predict("question -> answer")(question="2+2?").answer == "4"
    assert hops == []


def _predictor() -> Any:
    return dspy.Predict("question -> answer")


async def test_a_fast_call_still_gives_the_loop_a_turn() -> None:
    """(helper 111, finding 1) With the LM cache off and an engine that answers without waiting,
    the pricing hop was the call's only wait: priced in line, a loop of calls never let another
    task, a timeout or a cancellation in (``wait_for(..., 0.2)`` ran for 3 s)."""
    lm = CanonicalLM(_TEXT, cache=False)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    with dspy.context(lm=lm, adapter=FastChatAdapter()):
        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        before = ticks
        for _ in range(5):
            await _predictor().acall(question="q")
        task.cancel()
        assert ticks - before >= 5

        calls = 0

        async def endless() -> None:
            nonlocal calls
            while calls < 20_000:  # (bounded: a loop that never yields ends here, and fails below)
                calls += 1
                await _predictor().acall(question="q")

        with pytest.raises(TimeoutError):
            await asyncio.wait_for(endless(), timeout=0.05)
    assert calls < 20_000


async def test_a_pricing_function_of_yours_keeps_its_thread(
    hops: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """(helper 111, finding 2) A price hook put in DSPy's place (it may call a service) ran on the
    event loop; it runs on a worker thread, as in plain DSPy."""
    costs = sys.modules["dspy.clients.costs"]
    original = costs.estimate_cost
    threads: list[str] = []

    def hook(*args: Any, **kwargs: Any) -> Any:
        import threading

        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(costs, "estimate_cost", hook)
    await _ask(FastChatAdapter(), CanonicalLM(_TEXT, cache=False))
    assert "_price_result" in hops
    assert threads
    assert "MainThread" not in threads
