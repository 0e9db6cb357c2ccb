"""The fast JSON adapter's call: DSPy's ``JSONAdapter.__call__`` / ``acall`` (the response format
chosen inside the capability-planning scope, then ``ChatAdapter``'s call without its JSON fallback)
with the scopes set directly and the LM called as the fast chat adapter calls it. What the LM is
sent, what it returns, its history, the usage, the errors and the callbacks are DSPy's; a replaced
``JSONAdapter.__call__`` / ``acall`` gets DSPy's own call, patch and all."""

from __future__ import annotations

import asyncio
import warnings
from types import SimpleNamespace
from typing import Any

import dspy
import pytest
from dspy.lm15 import Response
from dspy.utils.callback import BaseCallback
from dspy.utils.exceptions import AdapterParseError

from canonical_lm import CanonicalLM
from stageflow.lm.fast import FastChatAdapter, FastJSONAdapter
from stageflow.lm.fast import _adapter_call as adapter_call


class _Answer(dspy.Signature):  # type: ignore[misc]
    """Answer the question."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()
    score: int = dspy.OutputField(desc="0 to 10")


_JSON = '{"answer": "4", "score": 7}'


class _Canonical(CanonicalLM):
    """A canonical-engine LM answering ``text`` (JSON by default) and keeping every request."""

    def __init__(self, text: str = _JSON, **kwargs: Any) -> None:
        super().__init__(text, **kwargs)


class _Structured(_Canonical):
    """An LM that takes a response schema: the JSON adapter sends a structured-output format."""

    @property
    def supported_params(self) -> set[str]:
        return {"response_format"}

    @property
    def supports_response_schema(self) -> bool:
        return True


class _JSONMode(_Structured):
    """An LM that takes ``response_format`` but no schema: the JSON adapter asks for JSON mode."""

    @property
    def supports_response_schema(self) -> bool:
        return False


class _Legacy(dspy.BaseLM):  # type: ignore[misc]
    """A custom LM on DSPy's old interface (``forward``)."""

    def __init__(self, text: str = _JSON) -> None:
        super().__init__("test/legacy")
        self.text = text

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        choice = SimpleNamespace(
            message=SimpleNamespace(content=self.text, tool_calls=None), finish_reason="stop", logprobs=None
        )
        usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        return SimpleNamespace(choices=[choice] * kwargs.get("n", 1), usage=usage, model=self.model)

    async def aforward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        return self.forward(prompt, messages, **kwargs)


_LMS = [_Canonical, _Structured, _JSONMode, _Legacy]
_LM_IDS = ["canonical", "schema", "json-mode", "legacy"]


async def _run(adapter: Any, lm: Any, mode: str, lm_kwargs: dict[str, Any] | None = None) -> Any:
    args = (lm, dict(lm_kwargs or {}), _Answer, [], {"question": "q"})
    return adapter(*args) if mode == "sync" else await adapter.acall(*args)


def _same_format(value: Any) -> Any:
    """A structured-output model class (DSPy builds one per call) as its name and schema."""
    if isinstance(value, type):
        return (value.__name__, value.model_json_schema())
    return value


def _record(lm: Any) -> list[dict[str, Any]]:
    """The LM's history, minus what differs between any two calls (time, id, the identity of the
    structured-output model class)."""
    out = []
    for entry in lm.history:
        entry = {k: v for k, v in entry.items() if k not in ("timestamp", "uuid")}
        entry["kwargs"] = {k: _same_format(v) for k, v in entry["kwargs"].items()}
        out.append(entry)
    return out


@pytest.mark.parametrize("make", _LMS, ids=_LM_IDS)
@pytest.mark.parametrize("lm_kwargs", [{}, {"temperature": 0.5, "n": 2}], ids=["plain", "n2"])
async def test_the_call_sends_returns_and_records_what_dspys_does(
    mode: str, make: Any, lm_kwargs: dict[str, Any], hops: list[str]
) -> None:
    fast_lm, plain_lm = make(), make()
    with (
        dspy.context(track_usage=True),
        dspy.track_usage() as fast_usage,
        warnings.catch_warnings(record=True) as w1,
    ):
        warnings.simplefilter("always")
        got = await _run(FastJSONAdapter(), fast_lm, mode, lm_kwargs)
    fast_hops = list(hops)
    with (
        dspy.context(track_usage=True),
        dspy.track_usage() as plain_usage,
        warnings.catch_warnings(record=True) as w2,
    ):
        warnings.simplefilter("always")
        expected = await _run(dspy.JSONAdapter(), plain_lm, mode, lm_kwargs)
    assert got == expected
    assert got[0] == {"answer": "4", "score": 7}
    assert [(x.category, str(x.message)) for x in w1] == [(x.category, str(x.message)) for x in w2]
    assert _record(fast_lm) == _record(plain_lm)
    assert len(fast_lm.history) == 1
    assert fast_usage.get_total_tokens() == plain_usage.get_total_tokens()
    if isinstance(fast_lm, _Canonical):
        assert fast_lm.requests == plain_lm.requests  # the response format sent included
    if isinstance(fast_lm, _Structured):
        kwargs = fast_lm.history[0]["kwargs"]
        wanted = {"type": "json_object"} if isinstance(fast_lm, _JSONMode) else None
        assert "response_format" in kwargs
        assert wanted is None or kwargs["response_format"] == wanted
    if mode == "async":  # DSPy prepares the request on a worker thread; the fast call in line
        assert "prepare" not in fast_hops
        assert "prepare" in hops[len(fast_hops) :]


async def test_the_callers_keyword_arguments_get_the_response_format_as_dspys_do(mode: str) -> None:
    fast_kwargs: dict[str, Any] = {}
    plain_kwargs: dict[str, Any] = {}
    args = (_Answer, [], {"question": "q"})
    if mode == "sync":
        FastJSONAdapter()(_JSONMode(), fast_kwargs, *args)
        dspy.JSONAdapter()(_JSONMode(), plain_kwargs, *args)
    else:
        await FastJSONAdapter().acall(_JSONMode(), fast_kwargs, *args)
        await dspy.JSONAdapter().acall(_JSONMode(), plain_kwargs, *args)
    assert fast_kwargs == plain_kwargs == {"response_format": {"type": "json_object"}}


async def test_a_parse_error_is_dspys_and_not_retried(mode: str) -> None:
    fast_lm, plain_lm = _Canonical("not json at all"), _Canonical("not json at all")
    with pytest.raises(AdapterParseError) as fast:
        await _run(FastJSONAdapter(), fast_lm, mode)
    with pytest.raises(AdapterParseError) as plain:
        await _run(dspy.JSONAdapter(), plain_lm, mode)
    assert str(fast.value) == str(plain.value)
    assert len(fast_lm.history) == len(plain_lm.history) == 1


async def test_the_chat_adapters_json_fallback_is_dspys(mode: str) -> None:
    fast_lm, plain_lm = _Canonical(), _Canonical()  # (a JSON answer: the chat parse fails)
    got = await _run(FastChatAdapter(), fast_lm, mode)
    expected = await _run(dspy.ChatAdapter(), plain_lm, mode)
    assert got == expected == [{"answer": "4", "score": 7}]
    assert _record(fast_lm) == _record(plain_lm)
    assert len(fast_lm.history) == 2
    assert fast_lm.requests == plain_lm.requests


class _Recorder(BaseCallback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_adapter_format_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.events.append("format")

    def on_adapter_parse_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.events.append("parse")

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.events.append("lm_start")

    def on_lm_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        self.events.append("lm_end")


async def test_callbacks_see_what_they_see_with_dspys_adapter(mode: str) -> None:
    seen = []
    for adapter in (FastJSONAdapter(), dspy.JSONAdapter()):
        recorder = _Recorder()
        with dspy.context(callbacks=[recorder]):
            assert await _run(adapter, _Structured(), mode) == [{"answer": "4", "score": 7}]
        seen.append(recorder.events)
    assert seen[0] == seen[1]
    assert seen[0].count("lm_start") == 1
    assert "parse" in seen[0]


@pytest.mark.parametrize("method", ["__call__", "acall"])
async def test_a_replaced_json_adapter_call_gets_dspys_call(
    mode: str, method: str, monkeypatch: pytest.MonkeyPatch, hops: list[str]
) -> None:
    calls: list[str] = []
    original = getattr(dspy.JSONAdapter, method)
    if method == "acall":

        async def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(method)
            return await original(self, *args, **kwargs)

    else:

        def patched(self: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            calls.append(method)
            return original(self, *args, **kwargs)

    monkeypatch.setattr(dspy.JSONAdapter, method, patched)
    assert not adapter_call.json_untouched()
    lm = _Structured()
    assert await _run(FastJSONAdapter(), lm, mode) == [{"answer": "4", "score": 7}]
    called = (mode == "sync") == (method == "__call__")
    assert calls == ([method] if called else [])
    if mode == "async":  # the untouched check is for both methods: DSPy's whole call, hop and all
        assert "prepare" in hops
    monkeypatch.undo()
    assert adapter_call.json_untouched()


async def test_a_subclass_response_format_is_used(mode: str) -> None:
    class Mine(FastJSONAdapter):
        def _prepare_response_format(self, lm: Any, lm_kwargs: dict[str, Any], signature: Any) -> None:
            lm_kwargs["response_format"] = {"type": "text"}

    lm = _Structured()
    assert await _run(Mine(), lm, mode) == [{"answer": "4", "score": 7}]
    assert lm.history[0]["kwargs"]["response_format"] == {"type": "text"}


async def test_the_chat_adapters_json_fallback_runs_a_patched_json_adapter(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reproducer (helper 75, t03b/t19): with JSONAdapter.parse replaced after import, the fast chat
    # adapter's JSON fallback still parsed with the fast JSON adapter: the patch never ran.
    original = dspy.JSONAdapter.parse

    def parse(self: Any, signature: Any, completion: str) -> dict[str, Any]:
        return {**original(self, signature, completion), "answer": "patched"}

    monkeypatch.setattr(dspy.JSONAdapter, "parse", parse)
    fast_lm, plain_lm = _Canonical(), _Canonical()  # (a JSON answer: the chat parse fails)
    got = await _run(FastChatAdapter(), fast_lm, mode)
    expected = await _run(dspy.ChatAdapter(), plain_lm, mode)
    assert got == expected == [{"answer": "patched", "score": 7}]
    assert fast_lm.requests == plain_lm.requests


async def test_a_patched_prepare_response_format_is_run_by_a_fast_json_adapter(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reproducer (helper 75, t03): a FastJSONAdapter made directly kept sending its cached schema.
    def text_format(self: Any, lm: Any, lm_kwargs: dict[str, Any], signature: Any) -> None:
        lm_kwargs["response_format"] = {"type": "text"}

    adapter = FastJSONAdapter()
    await _run(adapter, _Structured(), mode)  # (the schema built and cached first)
    monkeypatch.setattr(dspy.JSONAdapter, "_prepare_response_format", text_format)
    assert not adapter_call.json_format_untouched()
    lm = _Structured()
    await _run(adapter, lm, mode)
    assert lm.history[0]["kwargs"]["response_format"] == {"type": "text"}
    monkeypatch.undo()
    assert adapter_call.json_format_untouched()


async def test_a_format_call_during_a_call_uses_its_own_adapters_hooks(mode: str) -> None:
    # Reproducer (helper 75, t11): the per-call plan memo was keyed by class, so another adapter of
    # the class formatting inside the call (here, from the LM) got the outer call's system message.
    def custom() -> FastJSONAdapter:
        adapter = FastJSONAdapter()
        adapter.format_task_description = lambda signature: "CUSTOM TASK"
        return adapter

    expected = custom().format(_Answer, [], {"question": "q"})
    inside: list[Any] = []

    class Formatting(_Structured):
        def answer(self, request: Any) -> Response:
            inside.append(custom().format(_Answer, [], {"question": "q"}))
            return super().answer(request)

    await _run(FastJSONAdapter(), Formatting(), mode)
    assert inside == [expected]
    assert "CUSTOM TASK" in inside[0][0]["content"]


@pytest.mark.parametrize("change", ["model_config", "mutable_default"])
async def test_a_schema_edited_in_place_between_calls_is_sent_as_dspy_sends_it(
    mode: str, change: str
) -> None:
    # Reproducer (helper 75, t14): the schema was kept per signature, so a nested model's
    # json_schema_extra or an output's list default edited in place was not seen on the next call.
    import pydantic

    sent = []
    for adapter in (FastJSONAdapter(), dspy.JSONAdapter()):

        class Item(pydantic.BaseModel):
            x: int

        sig = dspy.Signature(
            {
                "question": (str, dspy.InputField()),
                "item": (Item, dspy.OutputField()),
                "tags": (list[str], dspy.OutputField(default=["a"])),
            }
        )
        lm = _Structured('{"item": {"x": 1}, "tags": []}')
        for i in range(2):
            if i == 1 and change == "model_config":
                Item.model_config["json_schema_extra"] = {"examples": [{"x": 1}]}
            if i == 1 and change == "mutable_default":
                sig.output_fields["tags"].default.append("b")
            args = (lm, {}, sig, [], {"question": "q"})
            await (adapter.acall(*args) if mode == "async" else asyncio.to_thread(adapter, *args))
        sent.append([_same_format(entry["kwargs"]["response_format"]) for entry in lm.history])
    assert sent[0] == sent[1]
    assert sent[0][0] != sent[0][1]  # (the edit changed the schema)
