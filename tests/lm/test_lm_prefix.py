"""The per-predictor prompt-prefix cache and token logprobs, with fake llama contexts."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import dspy
import numpy as np
import pytest
from dspy.lm15 import Message, Request, UnsupportedFeatureError

from stageflow.errors import ConfigurationError
from stageflow.lm import _models
from stageflow.lm.engine import LlamaCppEngine
from stageflow.lm.logprobs import LogprobRecorder
from stageflow.lm.prefix import PrefixCache, Snapshot, prefix_key, supports_snapshots

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing"
)


class Context:
    """A stand-in llama context: holds a token list; snapshots copy it."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.n_tokens = 0

    def feed(self, tokens: list[int]) -> None:
        self.tokens = list(tokens)
        self.n_tokens = len(tokens)


def fake_cache(log: list[str], *, fail_save: bool = False, fail_restore: bool = False) -> PrefixCache:
    def save(ctx: Context) -> Snapshot:
        if fail_save:
            raise RuntimeError("no room")
        log.append(f"save {ctx.tokens}")
        return Snapshot(tokens=list(ctx.tokens), data=None, size=len(ctx.tokens))

    def restore(ctx: Context, snap: Snapshot) -> None:
        if fail_restore:
            ctx.feed([])
            raise RuntimeError("refused")
        log.append(f"restore {list(snap.tokens)}")
        ctx.feed(list(snap.tokens))

    return PrefixCache(save=save, restore=restore)


# -- PrefixCache -------------------------------------------------------------------------------------


def test_alternating_keys_save_and_restore_their_own_prefix() -> None:
    log: list[str] = []
    cache, ctx = fake_cache(log), Context()
    cache.activate(ctx, "A", slots=4)
    ctx.feed([1, 2, 3])  # predictor A's call
    cache.activate(ctx, "B", slots=4)
    assert log == ["save [1, 2, 3]"]  # nothing stored for B yet: the context is left as it is
    ctx.feed([7, 8])
    cache.activate(ctx, "A", slots=4)
    assert log[-2:] == ["save [7, 8]", "restore [1, 2, 3]"]
    assert ctx.tokens == [1, 2, 3]
    assert cache.keys() == ["B"]  # A's snapshot is live in the context now
    assert (cache.saves, cache.restores, cache.failures) == (2, 1, 0)


def test_same_key_twice_touches_nothing() -> None:
    log: list[str] = []
    cache, ctx = fake_cache(log), Context()
    cache.activate(ctx, "A", slots=4)
    ctx.feed([1])
    cache.activate(ctx, "A", slots=4)
    assert log == []


def test_least_recently_used_snapshots_are_dropped() -> None:
    cache, ctx = fake_cache([]), Context()
    for key in ("A", "B", "C", "D"):
        cache.activate(ctx, key, slots=2)
        ctx.feed([ord(key)])
    assert cache.keys() == ["B", "C"]  # D is live, A was dropped
    cache.activate(ctx, "A", slots=2)
    assert ctx.tokens == [ord("D")]  # no snapshot for A any more: the context is left alone
    assert cache.keys() == ["C", "D"]


@pytest.mark.parametrize("key", [None, "A"])
def test_disabled_or_keyless_calls_leave_the_context_and_forget_the_live_key(key: str | None) -> None:
    log: list[str] = []
    cache, ctx = fake_cache(log), Context()
    cache.activate(ctx, "A", slots=4)
    ctx.feed([1, 2])
    cache.activate(ctx, key, slots=0 if key else 4)
    assert cache.current is None
    ctx.feed([5, 6])  # this call's prompt is not A's: it must never be saved as A
    cache.activate(ctx, "B", slots=4)
    assert log == []


def test_a_failed_restore_is_counted_and_leaves_a_cold_context() -> None:
    log: list[str] = []
    cache, ctx = fake_cache(log, fail_restore=True), Context()
    cache.activate(ctx, "A", slots=4)
    ctx.feed([1, 2])
    cache.activate(ctx, "B", slots=4)
    ctx.feed([3])
    cache.activate(ctx, "A", slots=4)
    assert cache.failures == 1
    assert ctx.tokens == []
    assert cache.current == "A"


def test_a_failed_save_keeps_the_live_context() -> None:
    cache, ctx = fake_cache([], fail_save=True), Context()
    cache.activate(ctx, "A", slots=4)
    ctx.feed([1, 2])
    cache.activate(ctx, "B", slots=4)
    assert cache.failures == 1
    assert len(cache) == 0
    assert ctx.tokens == [1, 2]


def test_clear() -> None:
    cache, ctx = fake_cache([]), Context()
    cache.activate(ctx, "A", slots=4)
    ctx.feed([1])
    cache.activate(ctx, "B", slots=4)
    cache.clear()
    assert len(cache) == 0
    assert cache.current is None


def test_prefix_key_ignores_only_the_last_message() -> None:
    system = {"role": "system", "content": "S"}
    demo = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    a = prefix_key([system, *demo, {"role": "user", "content": "x"}])
    assert a == prefix_key([system, *demo, {"role": "user", "content": "y"}])
    assert a != prefix_key([system, {"role": "user", "content": "x"}])
    assert a != prefix_key([{"role": "system", "content": "T"}, *demo, {"role": "user", "content": "x"}])
    assert prefix_key([]) is None


def test_only_a_real_llama_supports_snapshots() -> None:
    assert not supports_snapshots(object())
    assert not supports_snapshots(Context())


# -- the engine drives the cache -----------------------------------------------------------------------


class ChatLlama(Context):
    """A fake Llama whose context 'holds' the last prompt; records calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def create_chat_completion(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        self.feed([len(m["content"]) for m in kwargs["messages"]])
        return {
            "id": "x",
            "choices": [{"message": {"content": '{"answer": "ok"}'}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        }


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "Tiny.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 32)
    return path


def chat(system: str, question: str) -> Request:
    return Request(model="local/x", system=system, messages=(Message.user(question),))


@needs_llama
@pytest.mark.parametrize(("slots", "restores"), [(8, 1), (0, 0)])
def test_engine_restores_each_predictors_prefix(
    gguf: Path, monkeypatch: pytest.MonkeyPatch, slots: int, restores: int
) -> None:
    log: list[str] = []
    loaded = _models.LoadedModel(llama=ChatLlama(), load_seconds=0.0, prefix=fake_cache(log), snapshots=True)
    monkeypatch.setattr(_models, "load_model", lambda *a: loaded)
    engine = LlamaCppEngine(gguf, prefix_slots=slots)
    for request in (chat("decompose", "q1"), chat("synthesize", "q1"), chat("decompose", "q2")):
        engine.complete(request)
    assert loaded.prefix.restores == restores
    assert len(loaded.llama.calls) == 3


@needs_llama
def test_engine_without_snapshot_support_never_touches_the_cache(
    gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[str] = []
    loaded = _models.LoadedModel(llama=ChatLlama(), load_seconds=0.0, prefix=fake_cache(log))
    monkeypatch.setattr(_models, "load_model", lambda *a: loaded)
    engine = LlamaCppEngine(gguf)
    engine.complete(chat("a", "q"))
    engine.complete(chat("b", "q"))
    assert log == []
    assert loaded.prefix.current is None


@needs_llama
def test_prefix_slots_setting(gguf: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        LlamaCppEngine(gguf, prefix_slots=-1)
    assert info.value.field == "prefix_slots"
    engine = LlamaCppEngine(gguf, prefix_slots=3)
    assert engine.dump_state()["prefix_slots"] == 3
    assert LlamaCppEngine.load_state(engine.dump_state()).prefix_slots == 3


# -- logprobs ------------------------------------------------------------------------------------------


class Vocab:
    """Detokenizes token ids of a 6-token vocabulary."""

    pieces = (b"<eos>", b'{"a": "', b"Par", b"is", b'"}', b"\xc3")

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes:
        return b"".join(self.pieces[t] for t in tokens)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def run_recorder(steps: list[tuple[np.ndarray, int]], text: str, top: int = 0) -> tuple:
    """Drive a recorder as llama-cpp-python would: one call per step; the chosen token enters the
    context before the next step (the last one never does)."""
    recorder = LogprobRecorder(Vocab(), top=top)
    context = [9, 9, 9]  # the prompt
    for logits, chosen in steps:
        out = recorder(np.array(context, dtype=np.intc), logits.astype(np.float32))
        assert out is not None
        context.append(chosen)
    return recorder.finish(text), recorder


def test_recorder_reports_each_token_of_the_text_with_its_logprob() -> None:
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=6) for _ in range(5)]
    tokens = [1, 2, 3, 4, 0]  # '{"a": "', 'Par', 'is', '"}', then end of sequence
    entries, _ = run_recorder(list(zip(rows, tokens, strict=True)), '{"a": "Paris"}', top=2)
    assert [e.token for e in entries] == ['{"a": "', "Par", "is", '"}']
    assert [e.token_id for e in entries] == [1, 2, 3, 4]
    for entry, row, token in zip(entries, rows, tokens, strict=False):
        assert entry.logprob == pytest.approx(float(log_softmax(row)[token]), abs=1e-5)
        assert len(entry.top) == 2
        assert entry.top[0].logprob >= entry.top[1].logprob
        assert entry.top[0].token_id == int(np.argmax(row))


def test_recorder_finds_the_last_token_by_its_text() -> None:
    rows = [np.array([0.0, 5, 0, 0, 0, 0]), np.array([0.0, 0, 4, 0, 0, 0])]
    entries, _ = run_recorder(list(zip(rows, [1, 2], strict=True)), '{"a": "Par')  # stopped by max_tokens
    assert [e.token for e in entries] == ['{"a": "', "Par"]
    assert entries[1].logprob == pytest.approx(float(log_softmax(rows[1])[2]), abs=1e-5)


def test_recorder_drops_tokens_past_the_returned_text() -> None:
    rows = [np.zeros(6), np.zeros(6), np.zeros(6)]
    entries, _ = run_recorder(list(zip(rows, [1, 2, 3], strict=True)), '{"a": "')  # a trimmed stop string
    assert [e.token for e in entries] == ['{"a": "']


def test_recorder_rejects_negative_top() -> None:
    with pytest.raises(ValueError):
        LogprobRecorder(Vocab(), top=-1)


class LogprobLlama(ChatLlama):
    """Calls the logits processor like llama.cpp would, for a fixed 3-step generation."""

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes:
        return Vocab().detokenize(tokens)

    def create_chat_completion(self, **kwargs: Any) -> dict[str, Any]:
        out = super().create_chat_completion(**kwargs)
        processors = kwargs.get("logits_processor") or []
        context = [9, 9]
        for chosen in (1, 2, 4):
            for proc in processors:
                proc(np.array(context, dtype=np.intc), np.eye(6, dtype=np.float32)[chosen] * 3)
            context.append(chosen)
        out["choices"][0]["message"]["content"] = '{"a": "Par"}'
        return out


@needs_llama
def test_engine_returns_logprobs_when_asked(gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = _models.LoadedModel(llama=LogprobLlama(), load_seconds=0.0)
    monkeypatch.setattr(_models, "load_model", lambda *a: loaded)
    engine = LlamaCppEngine(gguf)
    plain = engine.complete(chat("s", "q"))
    assert plain.logprobs is None
    assert "logits_processor" not in loaded.llama.calls[-1]
    asked = Request(model="local/x", messages=(Message.user("q"),), config=dspy.lm15.Config(logprobs=1))
    response = engine.complete(asked)
    assert [t.token for t in response.logprobs] == ['{"a": "', "Par", '"}']
    assert all(len(t.top) == 1 for t in response.logprobs)
    assert response.text == '{"a": "Par"}'


@needs_llama
def test_engine_logprobs_through_dspy(gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stageflow.lm.engine import make_local_lm

    loaded = _models.LoadedModel(llama=LogprobLlama(), load_seconds=0.0)
    monkeypatch.setattr(_models, "load_model", lambda *a: loaded)
    lm = make_local_lm(gguf, cache=False)
    out = lm("q", logprobs=True)[0]
    assert [t["token"] for t in out["logprobs"]["content"]] == ['{"a": "', "Par", '"}']
    assert "logprobs" in LlamaCppEngine.supported_params


@needs_llama
def test_streaming_with_logprobs_is_refused(gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = _models.LoadedModel(llama=LogprobLlama(), load_seconds=0.0)
    monkeypatch.setattr(_models, "load_model", lambda *a: loaded)
    asked = Request(model="local/x", messages=(Message.user("q"),), config=dspy.lm15.Config(logprobs=0))
    with pytest.raises(UnsupportedFeatureError, match="logprobs"):
        list(LlamaCppEngine(gguf).stream(asked))


def test_doctests() -> None:
    import doctest

    import stageflow.lm.prefix

    result = doctest.testmod(stageflow.lm.prefix)
    assert result.attempted > 0
    assert result.failed == 0
