"""Engine tests with a fake llama.cpp model: request translation, locking, errors, identity, DSPy wiring."""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import pickle
import threading
import time
from pathlib import Path

import dspy
import pytest
from dspy.lm15 import ContextLengthError, Message, Request, TextPart, ThinkingPart, UnsupportedFeatureError

from stageflow.errors import ConfigurationError
from stageflow.lm import _models
from stageflow.lm.engine import AsyncLlamaCppEngine, LlamaCppEngine, default_threads, make_local_lm
from stageflow.lm.grammar import FIXED_CHAR_CLASS

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing"
)


class FakeLlama:
    """Stands in for llama_cpp.Llama; records calls and detects concurrent use."""

    def __init__(
        self, reply: str = '{"answer": "Paris"}', delay: float = 0.0, error: Exception | None = None
    ):
        self.reply = reply
        self.delay = delay
        self.error = error
        self.calls: list[dict] = []
        self.active = 0
        self.max_active = 0
        self._guard = threading.Lock()

    def create_chat_completion(self, **kwargs):
        with self._guard:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.calls.append(kwargs)
            if self.delay:
                time.sleep(self.delay)
            if self.error is not None:
                raise self.error
            if kwargs.get("stream"):
                return self._stream()
            return {
                "id": "chatcmpl-1",
                "choices": [
                    {"message": {"role": "assistant", "content": self.reply}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16},
            }
        finally:
            with self._guard:
                self.active -= 1

    def _stream(self):
        half = len(self.reply) // 2
        yield {"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]}
        yield {"choices": [{"delta": {"content": self.reply[:half]}, "finish_reason": None}]}
        yield {"choices": [{"delta": {"content": self.reply[half:]}, "finish_reason": None}]}
        yield {"choices": [{"delta": {}, "finish_reason": "stop"}]}


@pytest.fixture
def gguf(tmp_path) -> Path:
    path = tmp_path / "Tiny-Model.Q4.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 32)
    return path


@pytest.fixture
def fake(monkeypatch) -> FakeLlama:
    llama = FakeLlama()
    loaded = _models.LoadedModel(llama=llama, load_seconds=0.0)
    monkeypatch.setattr(_models, "load_model", lambda path, n_ctx, n_threads: loaded)
    return llama


def request(**config) -> Request:
    return Request(
        model="local/x",
        system="You are terse.",
        messages=(Message.user("Q1"), Message.assistant("A1"), Message.user("Q2")),
        config=dspy.lm15.Config(**config),
    )


# -- construction -------------------------------------------------------------------------------------


def test_construction_checks_the_file_but_does_not_load(gguf, monkeypatch):
    def boom(*args):
        raise AssertionError("must not load at construction")

    monkeypatch.setattr(_models, "load_model", boom)
    eng = LlamaCppEngine(gguf)
    assert eng.model_path == gguf.resolve()
    assert eng.n_ctx == 4096


def test_construction_rejects_corrupt_model(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    with pytest.raises(ConfigurationError) as info:
        make_local_lm(bad)
    assert info.value.code == "bad_model_file"


def test_missing_llama_cpp_is_a_configuration_error(gguf, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llama_cpp" else real(name))
    with pytest.raises(ConfigurationError) as info:
        LlamaCppEngine(gguf)
    assert info.value.code == "missing_dependency"
    assert "llama-cpp-python==0.3.36" in info.value.hint


@pytest.mark.parametrize(
    "kwargs", [{"n_ctx": 10}, {"n_threads": 0}, {"default_max_tokens": 0}, {"max_items": 0}]
)
def test_bad_settings(gguf, kwargs):
    with pytest.raises((ConfigurationError, ValueError)):
        LlamaCppEngine(gguf, **kwargs)


def test_default_threads(monkeypatch):
    monkeypatch.delenv("STAGEFLOW_LM_THREADS", raising=False)
    assert 1 <= default_threads() <= 4
    monkeypatch.setenv("STAGEFLOW_LM_THREADS", "3")
    assert default_threads() == 3
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv("STAGEFLOW_LM_THREADS", bad)
        with pytest.raises(ConfigurationError):
            default_threads()


# -- request translation --------------------------------------------------------------------------------


def test_plain_request_defaults(gguf, fake):
    response = LlamaCppEngine(gguf).complete(request())
    call = fake.calls[0]
    assert call["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    assert call["temperature"] == 0.0
    assert call["max_tokens"] == 512
    assert "grammar" not in call
    assert response.text == '{"answer": "Paris"}'
    assert response.finish_reason == "stop"
    assert response.usage.input_tokens == 11
    assert response.usage.output_tokens == 5
    assert response.model == "local/x"


def test_sampling_params_pass_through(gguf, fake):
    LlamaCppEngine(gguf).complete(
        request(temperature=0.7, max_tokens=9, top_p=0.9, top_k=5, seed=3, stop=("##",))
    )
    call = fake.calls[0]
    assert (call["temperature"], call["max_tokens"], call["top_p"], call["top_k"], call["seed"]) == (
        0.7,
        9,
        0.9,
        5,
        3,
    )
    assert call["stop"] == ["##"]


def test_json_schema_becomes_a_grammar(gguf, fake):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    LlamaCppEngine(gguf).complete(request(response_format={"type": "json_schema", "schema": schema}))
    call = fake.calls[0]
    assert "response_format" not in call, "llama-cpp-python silently ignores json_schema; a grammar is sent"
    gbnf = call["grammar"]._grammar
    assert f"char ::= {FIXED_CHAR_CLASS}" in gbnf
    assert gbnf.count("char") > 100  # bounded string: up to 200 chars


def test_json_object_mode_uses_a_generic_object_grammar(gguf, fake):
    LlamaCppEngine(gguf).complete(request(response_format={"type": "json_object"}))
    assert "root ::= object" in fake.calls[0]["grammar"]._grammar


def test_developer_and_thinking_parts(gguf, fake):
    req = Request(
        model="local/x",
        messages=(
            Message.developer("Be brief."),
            Message.user("Q"),
            Message.assistant([ThinkingPart("hidden"), TextPart("shown")]),
            Message.user("Q2"),
        ),
    )
    LlamaCppEngine(gguf).complete(req)
    assert fake.calls[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "shown"},
        {"role": "user", "content": "Q2"},
    ]


def test_non_text_input_is_refused(gguf, fake):
    from dspy.lm15 import ImagePart

    req = Request(
        model="local/x", messages=(Message.user([TextPart("look"), ImagePart(url="https://x/y.png")]),)
    )
    with pytest.raises(UnsupportedFeatureError):
        LlamaCppEngine(gguf).complete(req)


def test_length_finish_reason(gguf, fake):
    fake.reply = '{"answer": "Par'
    original = fake.create_chat_completion

    def truncated(**kwargs):
        out = original(**kwargs)
        out["choices"][0]["finish_reason"] = "length"
        return out

    fake.create_chat_completion = truncated
    assert LlamaCppEngine(gguf).complete(request()).finish_reason == "length"


# -- errors ----------------------------------------------------------------------------------------------


def test_context_overflow_maps_to_context_length_error(gguf, fake):
    fake.error = ValueError("Requested tokens (5000) exceed context window of 4096")
    with pytest.raises(ContextLengthError):
        LlamaCppEngine(gguf).complete(request())


def test_context_overflow_through_dspy(gguf, fake):
    fake.error = ValueError("Requested tokens (5000) exceed context window of 4096")
    lm = make_local_lm(gguf, cache=False, num_retries=0)
    with pytest.raises(dspy.ContextWindowExceededError):
        lm("hello")


def test_other_errors_propagate(gguf, fake):
    fake.error = RuntimeError("something else")
    with pytest.raises(RuntimeError, match="something else"):
        LlamaCppEngine(gguf).complete(request())


# -- locking ---------------------------------------------------------------------------------------------


def test_one_context_never_serves_two_threads(gguf, fake):
    fake.delay = 0.05
    eng = LlamaCppEngine(gguf)
    threads = [threading.Thread(target=eng.complete, args=(request(),)) for _ in range(4)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake.calls) == 4
    assert fake.max_active == 1
    assert time.perf_counter() - started >= 0.2


def test_two_engines_on_one_file_share_the_model(gguf, monkeypatch):
    loads = []

    class CountingLlama(FakeLlama):
        def __init__(self, **kwargs):
            loads.append(kwargs)
            super().__init__()

    import llama_cpp

    monkeypatch.setattr(llama_cpp, "Llama", CountingLlama)
    monkeypatch.setattr(_models, "_MODELS", {})
    a, b = LlamaCppEngine(gguf, n_threads=1), LlamaCppEngine(gguf, n_threads=1)
    a.complete(request())
    b.complete(request())
    assert len(loads) == 1
    assert loads[0]["n_ctx"] == 4096
    assert loads[0]["n_threads"] == 1
    assert loads[0]["verbose"] is False
    assert a._model() is b._model()


# -- streaming and async -----------------------------------------------------------------------------------


def test_stream_events(gguf, fake):
    events = list(LlamaCppEngine(gguf).stream(request()))
    assert events[0].type == "start"
    assert events[-1].type == "end"
    assert events[-1].finish_reason == "stop"
    assert "".join(e.delta.text for e in events if e.type == "delta") == fake.reply


def test_stream_releases_the_lock_when_abandoned(gguf, fake):
    eng = LlamaCppEngine(gguf)
    stream = eng.stream(request())
    next(stream)
    assert eng._model().lock.locked()
    stream.close()
    assert not eng._model().lock.locked()


def test_async_engine(gguf, fake):
    aeng = AsyncLlamaCppEngine(LlamaCppEngine(gguf))

    async def run():
        response = await aeng.complete(request())
        events = [e async for e in aeng.stream(request())]
        await aeng.aclose()
        return response, events

    response, events = asyncio.run(run())
    assert response.text == fake.reply
    assert events[-1].type == "end"
    assert not aeng.sync._model().lock.locked()


# -- identity, copying, saving -------------------------------------------------------------------------------


def test_deepcopy_and_pickle(gguf):
    eng = LlamaCppEngine(gguf)
    aeng = AsyncLlamaCppEngine(eng)
    assert copy.deepcopy(eng) is eng
    assert copy.deepcopy(aeng) is aeng
    clone = pickle.loads(pickle.dumps(eng))  # holds settings only; the model stays in the registry
    assert clone.model_path == eng.model_path
    assert clone.model_name == eng.model_name


def test_state_round_trip(gguf):
    eng = LlamaCppEngine(gguf, n_ctx=2048, max_items=3)
    state = eng.dump_state()
    json.dumps(state)
    again = LlamaCppEngine.load_state(state)
    assert again.model_name == eng.model_name
    assert again.n_ctx == 2048
    assert AsyncLlamaCppEngine.load_state(state).sync.max_items == 3


def test_model_name_is_unique_per_file_and_settings(tmp_path):
    a = tmp_path / "Same.gguf"
    b = tmp_path / "other" / "Same.gguf"
    b.parent.mkdir()
    a.write_bytes(b"GGUF" + b"\x00" * 10)
    b.write_bytes(b"GGUF" + b"\x00" * 20)
    name_a = LlamaCppEngine(a).model_name
    assert name_a.startswith("local/same-")
    assert name_a != LlamaCppEngine(b).model_name
    assert name_a != LlamaCppEngine(a, max_items=2).model_name
    assert name_a == LlamaCppEngine(a).model_name


def test_make_local_lm_wiring(gguf, fake):
    lm = make_local_lm(gguf, cache=False)
    assert isinstance(lm, dspy.LM)
    assert lm.model.startswith("local/tiny-model.q4-")
    assert isinstance(lm.engine, LlamaCppEngine)
    assert lm.kwargs["temperature"] == 0.0
    assert lm.supports_response_schema
    assert "response_format" in lm.supported_params
    predictor = dspy.Predict("question -> answer")
    predictor.lm = lm
    copied = copy.deepcopy(predictor)
    assert copied.lm.engine is lm.engine
    assert copied.lm._async_engine_spec is lm._async_engine_spec
    state = lm.dump_state()
    assert state["engine"]["state"]["model_path"] == str(gguf)


def test_jsonadapter_end_to_end_with_fake_model(gguf, fake):
    class Sig(dspy.Signature):
        question: str = dspy.InputField()
        sub_questions: list[str] = dspy.OutputField()
        answer: str = dspy.OutputField()

    fake.reply = json.dumps({"sub_questions": ["a?", "b?"], "answer": "c"})
    lm = make_local_lm(gguf, cache=False)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        out = dspy.Predict(Sig)(question="q")
        out_async = asyncio.run(dspy.Predict(Sig).acall(question="q"))
    assert out.sub_questions == ["a?", "b?"]
    assert out.answer == "c"
    assert out_async.answer == "c"
    gbnf = fake.calls[0]["grammar"]._grammar
    assert "sub-questions-kv" in gbnf
    assert "answer-kv" in gbnf
