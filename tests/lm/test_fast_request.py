"""The fast adapter's request conversion (``stageflow.lm.fast._request``): DSPy converts the
messages of every LM call into an lm15 ``Request``; for the fast adapter's calls that conversion is
kept per prompt prefix and only the user message is new. Every request an engine receives must
equal DSPy's own conversion of what was sent, call after call, for the whole corpus; anything the
lookup does not cover is DSPy's conversion, and a replacement of yours sees every call."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import threading
import warnings
from typing import Any

import dspy
import pytest
from test_fast_adapter_corpus import CASES, IDS, KINDS, Case, ScriptedLM, canonical_answer

from stageflow.lm.fast import FastChatAdapter, _request

_execution: Any = sys.modules["dspy.clients.execution"]
_DSPYS = sys.modules["dspy._vendor.lm15.providers.openai_chat"].request_from_openai_chat
_TEXT = "[[ ## answer ## ]]\n{}\n\n[[ ## completed ## ]]"


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The bodies DSPy's own conversion was run for (the lookup installed, as the fast path does)."""
    assert _request.install()
    seen: list[Any] = []

    def counting(body: Any, *, compat: Any = None) -> Any:
        seen.append(body)
        return _DSPYS(body, compat=compat)

    monkeypatch.setattr(_request, "_STATE", [counting, _request._STATE[1]])
    monkeypatch.setattr(_request, "_KEPT", {})
    return seen


def _varied(case: Case) -> list[dict[str, Any]]:
    """The case's inputs, the same again, and (when one is text) with that text changed."""
    out = [dict(case.inputs), dict(case.inputs)]
    for name, value in case.inputs.items():
        if isinstance(value, str):
            out.append({**case.inputs, name: value + " — once more, ünïcode"})
            break
    return out


def _requests(adapter: Any, case: Case, kind: str, mode: str, inputs: list[dict[str, Any]]) -> list[Any]:
    lm = ScriptedLM([canonical_answer(kind, case)], schema=kind == "json")
    predictor = dspy.Predict(case.signature)
    predictor.demos = list(case.demos)
    with dspy.context(lm=lm, adapter=adapter):
        for kw in inputs:
            if mode == "sync":
                predictor(**kw)
            else:
                asyncio.run(predictor.acall(**kw))
    return lm.requests


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_request_equals_dspys_conversion(
    case: Case, kind: str, mode: str, conversions: list[Any]
) -> None:
    plain_cls, fast_cls = KINDS[kind]
    inputs = _varied(case)
    try:
        expected = _requests(plain_cls(), case, kind, mode, inputs)
    except Exception:
        pytest.skip("DSPy's own adapter fails on this case")
    converted_for_plain = len(conversions)
    assert converted_for_plain == len(expected)  # (plain DSPy is never looked up)
    got = _requests(fast_cls(), case, kind, mode, inputs)
    assert got == expected
    fast_conversions = len(conversions) - converted_for_plain
    if case.fast and kind == "chat" and not case.demos:
        assert fast_conversions == 1, "the second and later calls are built from the kept request"


def test_the_corpus_takes_the_lookup(conversions: list[Any]) -> None:
    """(the test above could pass with the lookup never used) Most of the chat corpus is looked up."""
    looked_up = 0
    for case in CASES:
        before = len(conversions)
        try:
            requests = _requests(FastChatAdapter(), case, "chat", "sync", _varied(case))
        except Exception:
            continue
        looked_up += len(conversions) - before < len(requests)
    assert looked_up >= 40


@pytest.fixture
def lm() -> ScriptedLM:
    return ScriptedLM([_TEXT.format(4)])


def _ask(lm: Any, question: str, mode: str = "sync", **config: Any) -> Any:
    predictor = dspy.Predict("question -> answer")
    with dspy.context(lm=lm, adapter=FastChatAdapter()):
        if mode == "sync":
            predictor(question=question, config=config)
        else:
            asyncio.run(predictor.acall(question=question, config=config))
    return lm.requests[-1]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_settings_of_each_call_are_its_own(lm: ScriptedLM, mode: str, conversions: list[Any]) -> None:
    first = _ask(lm, "a", mode, temperature=0.1)
    again = _ask(lm, "b", mode, temperature=0.1)
    other = _ask(lm, "c", mode, temperature=0.7, max_tokens=77)
    assert (first.config.temperature, again.config.temperature, other.config.temperature) == (0.1, 0.1, 0.7)
    assert other.config.max_tokens == 77
    assert "c" in other.messages[-1].parts[0].text
    assert "b" in again.messages[-1].parts[0].text
    assert len(conversions) == 2  # (one per set of settings)


def test_minus_zero_and_false_are_other_settings_than_zero(lm: ScriptedLM, conversions: list[Any]) -> None:
    _ask(lm, "a", temperature=0.0)
    assert _request.prefix_key({"t": 0.0}, [{"role": "user", "content": "x"}], None) != _request.prefix_key(
        {"t": -0.0}, [{"role": "user", "content": "x"}], None
    )
    assert _request.prefix_key({"t": 0}, [{"role": "user", "content": "x"}], None) != _request.prefix_key(
        {"t": False}, [{"role": "user", "content": "x"}], None
    )


def test_settings_that_are_not_plain_scalars_are_dspys_to_convert(
    lm: ScriptedLM, conversions: list[Any]
) -> None:
    for question in "abc":
        request = _ask(lm, question, stop=["\n\n"])
        assert request.config.stop == ("\n\n",)
    assert len(conversions) == 3


def test_a_changed_instruction_is_a_new_prefix(lm: ScriptedLM, conversions: list[Any]) -> None:
    predictor = dspy.Predict("question -> answer")
    with dspy.context(lm=lm, adapter=FastChatAdapter()):
        predictor(question="a")
        predictor.signature = predictor.signature.with_instructions("Answer in French.")
        predictor(question="b")
    assert "French" in lm.requests[-1].system
    assert "French" not in lm.requests[0].system
    assert len(conversions) == 2


def test_plain_dspy_calls_are_never_looked_up(lm: ScriptedLM, conversions: list[Any]) -> None:
    predictor = dspy.Predict("question -> answer")
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        for q in "abc":
            predictor(question=q)
    assert len(conversions) == 3
    with dspy.context(lm=lm), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (DSPy 3.4 deprecates messages=)
        for q in "abc":
            lm(messages=[{"role": "user", "content": q}])
    assert len(conversions) == 6


def test_a_conversion_of_yours_sees_every_call(lm: ScriptedLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replaced before the fast path's first call or after it, yours is called for each request."""
    _request.uninstall()
    calls: list[str] = []

    def mine(body: Any, *, compat: Any = None) -> Any:
        calls.append(body["messages"][-1]["content"])
        return _DSPYS(body, compat=compat)

    monkeypatch.setattr(_execution, "request_from_openai_chat", mine)
    for q in "ab":
        _ask(lm, q)
    assert len(calls) == 2
    assert not _request.installed()
    monkeypatch.undo()
    _ask(lm, "c")
    assert _request.installed()
    monkeypatch.setattr(_execution, "request_from_openai_chat", mine)
    for q in "de":
        _ask(lm, q)
    assert len(calls) == 4


def test_a_kept_request_that_does_not_rebuild_goes_to_dspy(
    lm: ScriptedLM, monkeypatch: pytest.MonkeyPatch, conversions: list[Any]
) -> None:
    """A request is kept only if rebuilt with its own text it is DSPy's again; a mismatch (a future
    lm15 whose request depends on the text in a way this module does not know) sends that prefix
    to DSPy for good."""
    copy = _request._copy

    def wrong(obj: Any, name: str, value: Any) -> Any:  # (a rebuild whose text is not the one sent)
        return copy(obj, name, value + "!" if name == "text" else value)

    monkeypatch.setattr(_request, "_copy", wrong)
    first, second, third = _ask(lm, "a"), _ask(lm, "second question"), _ask(lm, "third question")
    assert "second question" in second.messages[-1].parts[0].text
    assert "third question" in third.messages[-1].parts[0].text
    assert not any(r.messages[-1].parts[0].text.endswith("!") for r in (first, second, third))
    assert len(conversions) == 3


def test_the_last_messages_text_is_not_kept(lm: ScriptedLM, conversions: list[Any]) -> None:
    """(helper 109, F2) What is kept for a prefix held the first call's whole request, its user text
    with it: 300 prompts of 280 KB kept 84 MB of inputs alive after every reference was gone."""
    secret = "confidential " * 20
    for i in range(3):
        _ask(lm, secret + str(i), temperature=i / 10)
    kept = [k for k in _request._KEPT.values() if k is not _request._DSPY]
    assert len(kept) == 3
    assert all(secret not in k.messages[-1].parts[0].text for k in kept)
    assert all(k.messages[-1].parts[0].text == "" for k in kept)


def test_a_patch_of_a_function_the_conversion_runs_through_sees_every_call(
    lm: ScriptedLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(helper 109, F1) A patch one level down (``_ingest_openai_chat``) ran for a prefix's first
    call only, and its change to the request stayed on the later ones."""
    module = sys.modules["dspy._vendor.lm15.providers.openai_chat"]
    original = module._ingest_openai_chat
    _ask(lm, "before the patch")  # (a prefix kept already)
    lengths: list[int] = []

    def tagging(provider: Any, body: Any, compat: Any) -> Any:
        request = original(provider, body, compat)
        lengths.append(len(body["messages"][-1]["content"]))
        return dataclasses.replace(request, system=f"{request.system} [user-len={lengths[-1]}]")

    monkeypatch.setattr(module, "_ingest_openai_chat", tagging)
    tails = [_ask(lm, "q" * n).system.rsplit(" ", 1)[-1] for n in (1, 10, 100)]
    assert len(lengths) == 3
    assert tails == [f"[user-len={n}]" for n in lengths]
    monkeypatch.undo()
    assert "user-len" not in _ask(lm, "after the patch").system


def test_kept_prefixes_are_bounded(
    lm: ScriptedLM, monkeypatch: pytest.MonkeyPatch, conversions: list[Any]
) -> None:
    monkeypatch.setattr(_request, "_LIMIT", 3)
    for i in range(7):
        _ask(lm, "q", temperature=i / 10)
    assert 1 <= len(_request._KEPT) <= 3
    request = _ask(lm, "last", temperature=0.6)
    assert request.config.temperature == 0.6
    assert "last" in request.messages[-1].parts[0].text


def test_threads_each_get_their_own_request(conversions: list[Any]) -> None:
    """32 threads, two signatures, one LM: every request carries its own question."""
    lm = ScriptedLM([_TEXT.format(4)])
    ask = dspy.Predict("question -> answer")
    tell = dspy.Predict("topic -> answer")
    errors: list[BaseException] = []
    barrier = threading.Barrier(32)

    def work(i: int) -> None:
        try:
            barrier.wait()
            with dspy.context(lm=lm, adapter=FastChatAdapter()):
                for j in range(10):
                    (ask if (i + j) % 2 else tell)(**{"question" if (i + j) % 2 else "topic": f"q{i}-{j}"})
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    texts = [r.messages[-1].parts[0].text for r in lm.requests]
    assert len(texts) == 320
    for i in range(32):
        for j in range(10):
            assert sum(f"q{i}-{j}\n" in t for t in texts) == 1
    for r in lm.requests:
        assert ("`question`" in r.system) == ("[[ ## question ## ]]" in r.messages[-1].parts[0].text)
    assert len(conversions) < 320


def test_uninstall_gives_dspy_its_conversion_back() -> None:
    assert _request.install()
    assert _execution.request_from_openai_chat is not _DSPYS
    _request.uninstall()
    assert _execution.request_from_openai_chat is _DSPYS
    assert not _request.installed()
    assert _request.install()
