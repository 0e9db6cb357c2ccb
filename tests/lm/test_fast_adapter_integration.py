"""The fast adapters inside DSPy and stageflow: what callbacks, history, usage tracking, the LM
cache, optimizers, streaming and the repair policy see is what they see with DSPy's adapters."""

from __future__ import annotations

import asyncio
import copy
import io
import pickle
import re
import threading
from typing import Any

import dspy
import pytest
from test_fast_adapter_corpus import ScriptedLM, typed

from stageflow import SequentialPipeline, Stage
from stageflow.lm.fast import (
    FastChatAdapter,
    FastJSONAdapter,
    fast_adapter_for,
    fast_path_stats,
    reset_fast_path_stats,
)
from stageflow.testing import FakeLM

PAIRS = [(dspy.ChatAdapter, FastChatAdapter), (dspy.JSONAdapter, FastJSONAdapter)]
PAIR_IDS = ["chat", "json"]
MODES = ["sync", "async"]


def run(module: Any, mode: str, **inputs: Any) -> Any:
    if mode == "sync":
        return module(**inputs)
    return asyncio.run(module.acall(**inputs))


def json_or_chat(adapter_cls: type, **fields: Any) -> str:
    if issubclass(adapter_cls, dspy.JSONAdapter):
        import json

        return json.dumps(fields)
    return "".join(f"[[ ## {k} ## ]]\n{v}\n\n" for k, v in fields.items()) + "[[ ## completed ## ]]"


class Recorder(dspy.utils.callback.BaseCallback):
    """Every callback event: (hook, class name of the instance or None, inputs or outputs)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any, Any]] = []

    def _start(self, hook: str, instance: Any, inputs: dict[str, Any]) -> None:
        shown = {k: v for k, v in inputs.items() if k not in ("lm",)}
        self.events.append((hook, type(instance).__name__, repr(shown)))

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self._start("module_start", instance, inputs)

    def on_module_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        self.events.append(("module_end", None, repr(outputs)))

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self._start("lm_start", instance, inputs)

    def on_lm_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        self.events.append(("lm_end", None, repr(outputs)))

    def on_adapter_format_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self._start("format_start", instance, inputs)

    def on_adapter_format_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        self.events.append(("format_end", None, repr(outputs)))

    def on_adapter_parse_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self._start("parse_start", instance, inputs)

    def on_adapter_parse_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        self.events.append(("parse_end", None, repr(outputs)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_callbacks_see_the_same_events(pair: tuple[type, type], mode: str) -> None:
    results = []
    for adapter_cls in pair:
        recorder = Recorder()
        program = dspy.ChainOfThought("question -> answer: int")
        lm = ScriptedLM([json_or_chat(adapter_cls, reasoning="r", answer=4)])
        with dspy.context(lm=lm, adapter=adapter_cls(), callbacks=[recorder]):
            run(program, mode, question="2+2?")
        results.append(recorder.events)
    assert results[0] == results[1]
    assert [e[0] for e in results[0]].count("format_start") >= 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_history_usage_and_inspect_history_are_the_same(pair: tuple[type, type], mode: str) -> None:
    seen = []
    for adapter_cls in pair:
        lm = ScriptedLM([json_or_chat(adapter_cls, answer="Paris")])
        p = dspy.Predict("question -> answer")
        with dspy.context(lm=lm, adapter=adapter_cls(), track_usage=True):
            pred = run(p, mode, question="Capital of France?")
        out = io.StringIO()
        lm.inspect_history(n=1, file=out)
        printed = re.sub(r"\[\d{4}-\d\d-\d\dT[\d:.]+\]", "[time]", out.getvalue())
        entry = {k: v for k, v in lm.history[-1].items() if k not in ("timestamp", "uuid", "response")}
        seen.append((typed(pred.toDict()), pred.get_lm_usage(), entry, printed, len(p.history)))
    assert seen[0] == seen[1]
    assert seen[0][1]  # usage was tracked


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("schema", [False, True], ids=["json-mode", "schema"])
def test_the_lm_cache_key_is_the_same(pair: tuple[type, type], schema: bool) -> None:
    """A call through the fast adapter hits the cache entry a DSPy-adapter call stored."""
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
    lm = ScriptedLM([json_or_chat(pair[0], answer=7)], schema=schema, model="test/cache-key")
    lm.cache = True
    p = dspy.Predict("question -> answer: int")
    for adapter_cls in pair:
        with dspy.context(lm=lm, adapter=adapter_cls()):
            assert p(question="how many?").answer == 7
    assert len(lm.requests) == 1  # the second call was a cache hit


def _trainset() -> list[dspy.Example]:
    return [dspy.Example(question=f"q{i}", answer=f"a{i}").with_inputs("question") for i in range(4)]


class TwoSteps(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.draft = dspy.ChainOfThought("question -> draft")
        self.answer = dspy.Predict("question, draft -> answer")

    def forward(self, question: str) -> Any:
        return self.answer(question=question, draft=self.draft(question=question).draft)


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_bootstrap_few_shot_compiles_the_same_program(pair: tuple[type, type]) -> None:
    compiled = []
    for adapter_cls in pair:
        lm = FakeLM({"answer": lambda inputs: "a" + inputs["question"][1:], "draft": "d", "reasoning": "r"})
        optimizer = dspy.BootstrapFewShot(metric=lambda ex, pred, trace=None: ex.answer == pred.answer)
        with dspy.context(lm=lm, adapter=adapter_cls()):
            program = optimizer.compile(TwoSteps(), trainset=_trainset())
            program(question="q9")
        demos = {name: [d.toDict() for d in p.demos] for name, p in program.named_predictors()}
        compiled.append((demos, [h["messages"] for h in lm.history]))
    assert compiled[0] == compiled[1]
    assert all(compiled[0][0].values())  # every predictor got demos


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_the_repair_policy_works_with_a_fast_adapter(pair: tuple[type, type], mode: str) -> None:
    """stageflow's repair subclasses the active adapter and appends to the last message."""
    runs = []
    for adapter_cls in pair:
        answers = [json_or_chat(adapter_cls, n="seven"), json_or_chat(adapter_cls, n=7)]
        if adapter_cls is dspy.ChatAdapter or adapter_cls is FastChatAdapter:
            answers = [answers[0], '{"n": "seven"}', answers[1]]  # ChatAdapter retries as JSON first
        lm = ScriptedLM(answers)
        p = SequentialPipeline([Stage(dspy.Predict("question -> n: int"), repair=True)])
        with dspy.context(lm=lm, adapter=adapter_cls()):
            r = run(p, mode, question="how many?")
        runs.append((r.n, [h["messages"] for h in lm.history], [e.kind for e in r.run.events]))
    assert runs[0] == runs[1]
    assert runs[0][0] == 7
    assert "Your previous answer could not be used" in runs[0][1][-1][-1]["content"]


def test_a_repair_subclass_of_a_fast_adapter_stays_fast() -> None:
    from stageflow.engine.guarded import _repair_adapter

    s = dspy.Signature("question -> answer")
    for adapter_cls in (FastChatAdapter, FastJSONAdapter):
        with dspy.context(adapter=adapter_cls()):
            repair = _repair_adapter("bad answer")
        with dspy.context(adapter=adapter_cls._dspy_base()):
            plain_repair = _repair_adapter("bad answer")
        assert isinstance(repair, adapter_cls)
        reset_fast_path_stats()
        for _ in range(2):
            assert repair.format(s, [], {"question": "q"}) == plain_repair.format(s, [], {"question": "q"})
        assert fast_path_stats().fast_calls == 2


@pytest.mark.parametrize("mode", MODES)
def test_the_json_fallback_of_the_chat_adapter_is_the_same(mode: str) -> None:
    runs = []
    for adapter in (dspy.ChatAdapter(), FastChatAdapter()):
        lm = ScriptedLM(["no markers at all", '{"answer": "from json"}'])
        with dspy.context(lm=lm, adapter=adapter):
            pred = run(dspy.Predict("question -> answer"), mode, question="q")
        runs.append((pred.answer, [h["messages"] for h in lm.history]))
    assert runs[0] == runs[1]
    assert runs[0][0] == "from json"


def test_streaming_listeners_accept_the_fast_adapters() -> None:
    async def chunks(adapter: Any) -> list[Any]:
        lm = ScriptedLM(["[[ ## answer ## ]]\nhello streaming world\n\n[[ ## completed ## ]]"])
        listener = dspy.streaming.StreamListener(signature_field_name="answer")
        program = dspy.streamify(dspy.Predict("question -> answer"), stream_listeners=[listener])
        with dspy.context(lm=lm, adapter=adapter):
            return [x.chunk if hasattr(x, "chunk") else x.toDict() async for x in program(question="q")]

    plain, fast = asyncio.run(chunks(dspy.ChatAdapter())), asyncio.run(chunks(FastChatAdapter()))
    assert fast == plain
    assert "".join(c for c in plain if isinstance(c, str)) == "hello streaming world"


def test_class_names_are_dspys_and_qualified_names_say_fast() -> None:
    assert (FastChatAdapter.__name__, FastJSONAdapter.__name__) == ("ChatAdapter", "JSONAdapter")
    assert FastChatAdapter.__qualname__ == "FastChatAdapter"
    assert "FastJSONAdapter object" in repr(FastJSONAdapter())


def test_copy_and_pickle() -> None:
    s = dspy.Signature("question -> answer")
    for adapter in (FastChatAdapter(), FastJSONAdapter(use_native_function_calling=False)):
        for clone in (copy.deepcopy(adapter), pickle.loads(pickle.dumps(adapter))):
            assert type(clone) is type(adapter)
            assert clone.__dict__ == adapter.__dict__
            assert clone.format(s, [], {"question": "q"}) == adapter.format(s, [], {"question": "q"})


# -- fast_adapter_for and the counters ------------------------------------------------------


def test_fast_adapter_for() -> None:
    reset_fast_path_stats()
    default = fast_adapter_for(None)
    assert type(default) is FastChatAdapter
    assert fast_adapter_for(None) is not default  # (a new one each time, as DSPy's default)
    user = dspy.ChatAdapter(use_json_adapter_fallback=False)
    twin = fast_adapter_for(user)
    assert type(twin) is FastChatAdapter
    assert twin.use_json_adapter_fallback is False
    user.callbacks.append(Recorder())
    assert twin.callbacks is user.callbacks
    assert fast_adapter_for(twin) is twin
    json_twin = fast_adapter_for(dspy.JSONAdapter())
    assert type(json_twin) is FastJSONAdapter

    class MyChat(dspy.ChatAdapter):
        pass

    for other in (dspy.XMLAdapter(), MyChat()):
        assert fast_adapter_for(other) is other
    assert fast_path_stats().adapter_fallbacks == {
        "XMLAdapter": 1,
        "test_fast_adapter_for.<locals>.MyChat": 1,
    }


def test_twins_die_with_their_adapters() -> None:
    import gc

    from stageflow.lm.fast import twin as twin_module

    gc.collect()  # adapters earlier tests dropped die now, not between the two counts
    before = len(twin_module._TWINS)
    adapters = [dspy.ChatAdapter() for _ in range(10)]
    for a in adapters:
        fast_adapter_for(a)
    assert len(twin_module._TWINS) == before + 10
    del a, adapters
    gc.collect()
    assert len(twin_module._TWINS) == before


def test_fallbacks_are_counted_with_their_reason() -> None:
    reset_fast_path_stats()
    adapter = FastChatAdapter()
    history = dspy.Signature("question, history: dspy.History -> answer")
    adapter.format(history, [], {"question": "q", "history": dspy.History(messages=[])})
    adapter.format(dspy.Signature("question -> answer"), [], {"question": dspy.Image("https://x.org/a.png")})
    adapter.format(dspy.Signature("question -> answer"), [], {"question": "q"})
    stats = fast_path_stats()
    assert stats.fast_calls == 1
    assert stats.fallback_calls == 2
    assert any("field 'history'" in reason and "History" in reason for reason in stats.fallbacks)
    assert any("input value serialises to DSPy custom-type blocks" in r for r in stats.fallbacks)
    assert stats.fast_share == pytest.approx(1 / 3)


def test_a_subclass_overriding_a_formatting_method_gets_dspys_code_path() -> None:
    class Shouting(FastChatAdapter):
        def format_task_description(self, signature: Any) -> str:
            return super().format_task_description(signature).upper()

    reset_fast_path_stats()
    s = dspy.Signature("question -> answer", "be brief")
    messages = Shouting().format(s, [], {"question": "q"})
    assert "BE BRIEF" in messages[0]["content"]
    stats = fast_path_stats()
    assert stats.fast_calls == 0
    assert list(stats.fallbacks) == [
        "test_a_subclass_overriding_a_formatting_method_gets_dspys_code_path.<locals>.Shouting "
        "overrides a formatting method"
    ]


def test_a_fast_prompt_that_differs_from_dspys_is_caught_on_the_first_call(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from stageflow.lm.fast import adapters

    monkeypatch.setattr(adapters, "user_content", lambda plan, inputs, reminder: "wrong")
    reset_fast_path_stats()
    s = dspy.Signature("question -> answer", "A signature seen for the first time.")
    expected = dspy.ChatAdapter().format(s, [], {"question": "q"})
    for _ in range(3):
        assert FastChatAdapter().format(s, [], {"question": "q"}) == expected
    assert "differed from DSPy's output" in caplog.text
    stats = fast_path_stats()
    assert stats.fast_calls == 0
    assert stats.fallbacks == {"the fast prompt differed from DSPy's output": 3}


def test_a_fast_parse_that_differs_from_dspys_is_caught_on_the_first_call(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from stageflow.lm.fast import adapters

    monkeypatch.setattr(adapters, "parse_chat", lambda plan, signature, completion: {"answer": "wrong"})
    s = dspy.Signature("question -> answer", "Another signature seen for the first time.")
    text = "[[ ## answer ## ]]\nright\n\n[[ ## completed ## ]]"
    for _ in range(3):
        assert FastChatAdapter().parse(s, text) == {"answer": "right"}
    assert "the fast parse differed" in caplog.text


def test_many_threads_with_different_demos() -> None:
    s = dspy.Signature("question -> answer")
    plain, fast = dspy.ChatAdapter(), FastChatAdapter()
    errors: list[str] = []

    def work(k: int) -> None:
        for i in range(40):
            demos = [dspy.Example(question=f"q{k}-{i % 5}", answer=f"a{j}") for j in range(i % 3)]
            inputs = {"question": f"thread {k} call {i}"}
            if fast.format(s, demos, inputs) != plain.format(s, demos, inputs):
                errors.append(f"{k}/{i}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
