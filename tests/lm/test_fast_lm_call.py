"""The fast chat adapter's LM call (``_lm_call``): DSPy's ``BaseLM.__call__`` / ``acall`` as their
steps, the async request prepared in line instead of on a worker thread. What the LM returns, its
history, the usage tracked, the errors and the callbacks are DSPy's; anything that could tell the
difference sends the call through DSPy's own method, hop and all."""

from __future__ import annotations

import re
import sys
import warnings
from types import SimpleNamespace
from typing import Any

import dspy
import pytest
from dspy.utils.callback import BaseCallback

import stageflow
from canonical_lm import CanonicalLM
from stageflow.lm.fast import FastChatAdapter
from stageflow.lm.fast import _lm_call as lm_call

_execution: Any = sys.modules["dspy.clients.execution"]
_SIG = dspy.Signature("question -> answer")
_TEXT = "[[ ## answer ## ]]\n4\n\n[[ ## completed ## ]]"


class _Canonical(CanonicalLM):
    """A canonical-engine LM answering ``_TEXT`` and keeping every request."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(_TEXT, **kwargs)


class _Legacy(dspy.BaseLM):  # type: ignore[misc]
    """A custom LM on DSPy's old interface (``forward``), which DSPy 3.4 warns about on each call."""

    def __init__(self) -> None:
        super().__init__("test/legacy")

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        choice = SimpleNamespace(
            message=SimpleNamespace(content=_TEXT, tool_calls=None), finish_reason="stop", logprobs=None
        )
        usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        return SimpleNamespace(choices=[choice] * kwargs.get("n", 1), usage=usage, model=self.model)

    async def aforward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        return self.forward(prompt, messages, **kwargs)


def _dummy() -> Any:
    return dspy.utils.DummyLM([{"answer": "4"}] * 4)


async def _run(adapter: Any, lm: Any, mode: str, lm_kwargs: dict[str, Any] | None = None) -> Any:
    args = (lm, dict(lm_kwargs or {}), _SIG, [], {"question": "q"})
    return adapter(*args) if mode == "sync" else await adapter.acall(*args)


def _record(lm: Any) -> list[dict[str, Any]]:
    """The LM's history, minus what differs between any two calls (time, id)."""
    return [{k: v for k, v in e.items() if k not in ("timestamp", "uuid")} for e in lm.history]


@pytest.mark.parametrize("make", [_Canonical, _dummy, _Legacy], ids=["canonical", "dummy", "legacy"])
@pytest.mark.parametrize("lm_kwargs", [{}, {"temperature": 0.5, "n": 2}], ids=["plain", "n2"])
async def test_the_call_returns_and_records_what_dspys_does(
    mode: str, make: Any, lm_kwargs: dict[str, Any], hops: list[str]
) -> None:
    fast_lm, plain_lm = make(), make()
    assert lm_call.direct(fast_lm, lm_kwargs)
    with (
        dspy.context(track_usage=True),
        dspy.track_usage() as fast_usage,
        warnings.catch_warnings(record=True) as w1,
    ):
        warnings.simplefilter("always")
        got = await _run(FastChatAdapter(), fast_lm, mode, lm_kwargs)
    fast_hops = list(hops)
    with (
        dspy.context(track_usage=True),
        dspy.track_usage() as plain_usage,
        warnings.catch_warnings(record=True) as w2,
    ):
        warnings.simplefilter("always")
        expected = await _run(dspy.ChatAdapter(), plain_lm, mode, lm_kwargs)
    assert got == expected
    # DSPy's deprecation warnings of the call (a legacy LM's), the same and no more
    assert [(x.category, str(x.message)) for x in w1] == [(x.category, str(x.message)) for x in w2]
    assert bool(w1) is isinstance(fast_lm, _Legacy)
    assert got[0] == {"answer": "4"}
    assert _record(fast_lm) == _record(plain_lm)
    assert len(fast_lm.history) == 1
    assert fast_usage.get_total_tokens() == plain_usage.get_total_tokens()
    if isinstance(fast_lm, _Canonical):
        assert fast_lm.requests == plain_lm.requests
        assert fast_usage.get_total_tokens()  # (a canonical LM reports usage: it was tracked)
    if mode == "async":  # DSPy prepares the request on a worker thread; the fast call in line
        assert "prepare" not in fast_hops
        assert "prepare" in hops[len(fast_hops) :]


class _Recorder(BaseCallback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.events.append("lm_start")

    def on_lm_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        self.events.append("lm_end")


async def test_callbacks_in_force_get_dspys_call(mode: str, hops: list[str]) -> None:
    recorder = _Recorder()
    lm = _Canonical(callbacks=[recorder])
    assert not lm_call.direct(lm, {})
    assert await _run(FastChatAdapter(), lm, mode) == [{"answer": "4"}]
    assert recorder.events == ["lm_start", "lm_end"]
    lm, recorder = _Canonical(), _Recorder()
    with dspy.context(callbacks=[recorder]):
        assert not lm_call.direct(lm, {})
        assert await _run(FastChatAdapter(), lm, mode) == [{"answer": "4"}]
    assert recorder.events == ["lm_start", "lm_end"]
    if mode == "async":
        assert hops.count("prepare") == 2


async def test_an_lm_that_replaces_its_call_is_called(mode: str, hops: list[str]) -> None:
    calls: list[str] = []

    class Own(_Canonical):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            calls.append("__call__")
            return super().__call__(*args, **kwargs)

        async def acall(self, *args: Any, **kwargs: Any) -> Any:
            calls.append("acall")
            return await super().acall(*args, **kwargs)

    lm = Own()
    assert not lm_call.direct(lm, {})
    assert await _run(FastChatAdapter(), lm, mode) == [{"answer": "4"}]
    assert calls == ["__call__" if mode == "sync" else "acall"]
    if mode == "async":  # (set on the instance: looked up there, as DSPy's adapter does)
        patched = _Canonical()
        original = patched.acall

        async def spy(*args: Any, **kwargs: Any) -> Any:
            calls.append("instance acall")
            return await original(*args, **kwargs)

        patched.acall = spy
        assert await _run(FastChatAdapter(), patched, mode) == [{"answer": "4"}]
        assert calls[-1] == "instance acall"


async def test_a_replaced_prepare_is_run_as_dspy_runs_it(
    mode: str, hops: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    original = _execution.prepare

    def prepare(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("asynchronous", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(_execution, "prepare", prepare)
    lm = _Canonical()
    assert not lm_call.direct(lm, {})
    assert await _run(FastChatAdapter(), lm, mode) == [{"answer": "4"}]
    assert seen == [mode == "async"]
    if mode == "async":
        assert hops.count("prepare") == 1  # (on a worker thread, as DSPy sends it)
    monkeypatch.undo()
    assert lm_call.direct(lm, {})  # (put back: seen again)


@pytest.mark.parametrize(
    "lm_kwargs",
    [{"prompt": "hi"}, {"messages": []}, {"request": None}, {"instance": 1}, {"self": 1}, {1: 2}],
    ids=["prompt", "messages", "request", "instance", "self", "not-a-string"],
)
async def test_keyword_arguments_dspy_binds_or_refuses_take_its_call(
    mode: str, lm_kwargs: dict[str, Any]
) -> None:
    assert not lm_call.direct(_Canonical(), lm_kwargs)
    outcomes, sent = [], []
    for adapter in (FastChatAdapter(), dspy.ChatAdapter()):
        lm = _Canonical()
        try:
            outcomes.append(("ok", await _run(adapter, lm, mode, lm_kwargs)))
        except Exception as e:  # (the same error from both)
            outcomes.append(("error", type(e), re.sub(r" at 0x[0-9a-f]+", "", str(e))))
        sent.append(len(lm.requests))
    assert outcomes[0] == outcomes[1]
    assert sent[0] == sent[1]


async def test_rollout_id_is_dspys_warning_and_request(mode: str) -> None:
    lm_kwargs = {"rollout_id": 1, "temperature": 0.0}
    seen = []
    for adapter in (FastChatAdapter(), dspy.ChatAdapter()):
        lm = _Canonical()
        assert not lm_call.direct(lm, lm_kwargs)  # (DSPy's warning names DSPy's frame: its call)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert await _run(adapter, lm, mode, lm_kwargs) == [{"answer": "4"}]
            assert lm_call.direct(lm, lm_kwargs)  # (warned once per LM: direct from then on)
            await _run(adapter, lm, mode, lm_kwargs)
        seen.append(([(str(w.message), w.filename) for w in caught], lm.requests, _record(lm)))
    assert seen[0] == seen[1]
    assert (
        seen[0][0][0][1]
        .replace("\\", "/")
        .endswith("dspy/clients/base_lm.py" if mode == "sync" else "concurrent/futures/thread.py")
    )
    assert [m for m, _ in seen[0][0]] == [
        "rollout_id has no effect when temperature=0; set temperature>0 to bypass the cache."
    ]


async def test_errors_of_preparation_are_dspys(mode: str) -> None:
    errors = []
    for adapter in (FastChatAdapter(), dspy.ChatAdapter()):
        with pytest.raises(ValueError, match="n must be a positive integer") as info:
            await _run(adapter, _Canonical(), mode, {"n": 0})
        errors.append(str(info.value))
    assert errors[0] == errors[1]


async def test_budgets_meter_the_direct_call(mode: str) -> None:
    lm = _Canonical()
    assert lm_call.direct(lm, {})
    with stageflow.budget(max_calls=1):
        await _run(FastChatAdapter(), lm, mode)
        with pytest.raises(stageflow.BudgetExceeded):
            await _run(FastChatAdapter(), lm, mode)
    assert len(lm.requests) == 1


async def test_an_lm_with_odd_keyword_arguments_fails_as_dspys(mode: str) -> None:
    outcomes = []
    for adapter in (FastChatAdapter(), dspy.ChatAdapter()):
        lm = _Canonical()
        lm.kwargs = None  # (what DSPy does with it is DSPy's business: the same error from both)
        try:
            outcomes.append(("ok", await _run(adapter, lm, mode)))
        except Exception as e:
            outcomes.append(("error", type(e), str(e)))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == "error"


class _PropertyCallbacks(_Canonical):
    """Callbacks DSPy's wrapper finds through ``getattr``, not in the instance's ``__dict__``."""

    recorder = _Recorder()

    @property
    def callbacks(self) -> list[Any]:
        return [self.recorder]

    @callbacks.setter
    def callbacks(self, value: Any) -> None:
        self.__dict__["callbacks"] = value


class _GetattrCallbacks(_Canonical):
    recorder = _Recorder()

    def __init__(self) -> None:
        super().__init__()
        del self.__dict__["callbacks"]

    def __getattr__(self, name: str) -> Any:
        if name == "callbacks":
            return [self.recorder]
        raise AttributeError(name)


@pytest.mark.parametrize("cls", [_PropertyCallbacks, _GetattrCallbacks], ids=["property", "getattr"])
async def test_callbacks_found_as_dspy_finds_them_get_dspys_call(mode: str, cls: Any) -> None:
    lm = cls()
    cls.recorder.events.clear()
    assert not lm_call.direct(lm, {})
    assert await _run(FastChatAdapter(), lm, mode) == [{"answer": "4"}]
    assert cls.recorder.events == ["lm_start", "lm_end"]


async def test_an_acall_of_another_lm_set_on_the_instance_is_the_one_called() -> None:
    seen = []
    for adapter in (FastChatAdapter(), dspy.ChatAdapter()):
        lm, other = _Canonical(), _Canonical()
        lm.acall = other.acall  # (DSPy's adapter calls lm.acall: the other LM answers and records it)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # (DSPy warns: the messages were marked for lm, not other)
            assert await adapter.acall(lm, {}, _SIG, [], {"question": "q"}) == [{"answer": "4"}]
        seen.append((len(lm.requests), len(other.requests), len(lm.history), len(other.history), len(caught)))
    assert seen[0] == seen[1] == (0, 1, 0, 1, 1)
