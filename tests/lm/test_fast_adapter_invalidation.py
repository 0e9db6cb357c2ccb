"""What optimizers change between calls is seen on the next call: instructions, signatures, demos.

Each test changes one thing the way an optimizer (or a user) does, then checks the next prompt
of the fast adapter against DSPy's own for the changed predictor. The fast adapters' first-call
self-check is off, so a stale cache could not hide behind it.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable
from typing import Any

import dspy
import pytest

from stageflow.lm.fast import FastChatAdapter, FastJSONAdapter
from stageflow.lm.fast import adapters as fast_adapters
from stageflow.testing import FakeLM

PAIRS = [(dspy.ChatAdapter, FastChatAdapter), (dspy.JSONAdapter, FastJSONAdapter)]
PAIR_IDS = ["chat", "json"]


@pytest.fixture(autouse=True)
def _raw_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_adapters, "VERIFY_FIRST_CALL", False)


def prompts(adapter: Any, predictor: dspy.Predict, **inputs: Any) -> list[dict[str, Any]]:
    """The messages ``predictor`` sends through ``adapter`` (as the LM history records them)."""
    lm = FakeLM()
    with dspy.context(lm=lm, adapter=adapter):
        predictor(**inputs)
    return lm.history[-1]["messages"]  # type: ignore[no-any-return]


def check(pair: tuple[type, type], predictor: dspy.Predict, **inputs: Any) -> list[dict[str, Any]]:
    """Fast and plain prompts agree; returns them."""
    plain_cls, fast_cls = pair
    expected = prompts(plain_cls(), predictor, **inputs)
    assert prompts(fast_cls(), predictor, **inputs) == expected
    return expected


def demos(*pairs: tuple[str, str]) -> list[dspy.Example]:
    return [dspy.Example(question=q, answer=a).with_inputs("question") for q, a in pairs]


CHANGES: dict[str, Callable[[dspy.Predict], str]] = {}


def change(fn: Callable[[dspy.Predict], str]) -> Callable[[dspy.Predict], str]:
    """Register a change; it returns a text the next prompt must contain."""
    CHANGES[fn.__name__] = fn
    return fn


@change
def with_instructions(p: dspy.Predict) -> str:
    p.signature = p.signature.with_instructions("New instructions, «unicode» ✓.")
    return "New instructions, «unicode» ✓."


@change
def instructions_set_in_place(p: dspy.Predict) -> str:
    p.signature.instructions = "Changed in place."  # what dspy.InferRules does
    return "Changed in place."


@change
def field_description_edited_in_place(p: dspy.Predict) -> str:
    p.signature.model_fields["answer"].json_schema_extra["desc"] = "a one-word answer"
    return "a one-word answer"


@change
def updated_field_type(p: dspy.Predict) -> str:
    p.signature = p.signature.with_updated_fields("answer", type_=int)
    return "must be a single int value"


@change
def updated_field_description(p: dspy.Predict) -> str:
    p.signature = p.signature.with_updated_fields("answer", desc="in French")
    return "in French"


@change
def appended_field(p: dspy.Predict) -> str:
    p.signature = p.signature.append("confidence", dspy.OutputField(desc="0..1"), type_=float)
    return "confidence"


@change
def loaded_state(p: dspy.Predict) -> str:
    state = p.dump_state()
    state["signature"]["instructions"] = "Loaded from a saved program."
    p.load_state(state)
    return "Loaded from a saved program."


@change
def new_demo_list(p: dspy.Predict) -> str:
    p.demos = demos(("q-new", "a-new"))
    return "q-new"


@change
def demo_replaced_in_place(p: dspy.Predict) -> str:
    p.demos[0] = demos(("q-replaced", "a-replaced"))[0]
    return "q-replaced"


@change
def demo_appended(p: dspy.Predict) -> str:
    p.demos.append(demos(("q-appended", "a-appended"))[0])
    return "q-appended"


@change
def demo_field_edited_in_place(p: dspy.Predict) -> str:
    p.demos[0]["answer"] = "edited answer"
    return "edited answer"


@change
def demos_cleared(p: dspy.Predict) -> str:
    p.demos.clear()
    return "q0"  # the question of this call; the demo's "q1" must be gone (checked below)


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("name", sorted(CHANGES))
def test_a_change_is_seen_on_the_next_call(name: str, pair: tuple[type, type]) -> None:
    p = dspy.Predict("question -> answer")
    p.demos = demos(("q1", "a1"), ("q2", "a2"))
    before = check(pair, p, question="q0")
    check(pair, p, question="q0")  # now served from the cache
    must_contain = CHANGES[name](p)
    after = check(pair, p, question="q0")
    assert after != before
    assert must_contain in str(after)
    if name == "demos_cleared":
        assert "q1" not in str(after)


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_one_signature_object_with_different_demos(pair: tuple[type, type]) -> None:
    signature = dspy.Signature("question -> answer")
    a, b = dspy.Predict(signature), dspy.Predict(signature)
    a.demos, b.demos = demos(("qa", "aa")), demos(("qb", "ab"))
    for _ in range(2):
        pa, pb = check(pair, a, question="x"), check(pair, b, question="x")
        assert "qa" in str(pa)
        assert "qb" not in str(pa)
        assert "qb" in str(pb)
        assert "qa" not in str(pb)


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_demo_values_of_equal_text_but_other_types_are_not_confused(pair: tuple[type, type]) -> None:
    p = dspy.Predict("question -> n: int")
    for value in (1, True, 1.0, "1", [1], (1,), {"1": 1}, None):
        p.demos = [dspy.Example(question="q", n=value)]
        check(pair, p, question="x")


def test_plans_die_with_their_signatures() -> None:
    """Plans are keyed by the signature class itself (weakly), never by ``id()``."""
    adapter = FastChatAdapter()
    gc.collect()
    before = len(FastChatAdapter._plans)
    refs = []
    for i in range(50):
        s = dspy.Signature("question -> answer", f"Variant {i}.")
        adapter.format(s, [], {"question": "q"})
        refs.append(weakref.ref(s))
        del s
    gc.collect()
    alive = [r for r in refs if r() is not None]
    assert len(alive) < 5
    assert len(FastChatAdapter._plans) < before + 5


def test_a_new_signature_reusing_an_old_ones_address_gets_its_own_prompt() -> None:
    """Even if a dead signature's memory is reused, the plan of the new one is its own."""
    adapter, plain = FastChatAdapter(), dspy.ChatAdapter()
    for i in range(30):
        s = dspy.Signature("question -> answer", f"Instructions number {i}.")
        assert adapter.format(s, [], {"question": "q"}) == plain.format(s, [], {"question": "q"})
        del s
        gc.collect()


def test_returned_messages_are_fresh_objects() -> None:
    """Callers (the repair policy) edit the last message; the cache must not see that."""
    adapter = FastChatAdapter()
    s = dspy.Signature("question -> answer")
    ex = demos(("q1", "a1"))
    first = adapter.format(s, ex, {"question": "q"})
    for message in first:
        message["content"] += " EDITED"
    second = adapter.format(s, ex, {"question": "q"})
    assert "EDITED" not in str(second)
    assert second == dspy.ChatAdapter().format(s, ex, {"question": "q"})


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_an_adapter_call_looks_the_plan_up_once_and_the_next_call_sees_a_change(
    pair: tuple[type, type], mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups: list[Any] = []
    real = fast_adapters.plan_for

    def counting(plans: Any, signature: Any) -> Any:
        lookups.append(signature)
        return real(plans, signature)

    monkeypatch.setattr(fast_adapters, "plan_for", counting)
    p = dspy.Predict("question -> answer")
    lm = FakeLM({"answer": "ok"})

    def call() -> Any:
        with dspy.context(lm=lm, adapter=pair[1]()):
            return p(question="q") if mode == "sync" else asyncio.run(p.acall(question="q"))

    assert call().answer == "ok"
    assert len(lookups) == 1  # preprocess, format, postprocess and parse share it
    p.signature = p.signature.with_instructions("Answer in one word, changed.")
    lookups.clear()
    call()
    assert lookups == [p.signature]
    assert "changed." in lm.history[-1]["messages"][0]["content"]


def stage_prompts(adapter: Any, predictor: dspy.Predict, mode: str, **inputs: Any) -> list[dict[str, Any]]:
    """The messages ``predictor`` sends through ``adapter`` called as a pipeline's LM stage is (the
    stage path hands the adapter the signature's plan it has just checked)."""
    from stageflow.lm.fast.call import acall_predictor, call_predictor

    lm = FakeLM()
    with dspy.context(lm=lm, adapter=adapter):
        if mode == "sync":
            call_predictor(predictor, inputs)
        else:
            asyncio.run(acall_predictor(predictor, inputs))
    return lm.history[-1]["messages"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("name", sorted(CHANGES))
def test_a_change_is_seen_on_the_next_call_of_the_stage_path(
    name: str, pair: tuple[type, type], mode: str
) -> None:
    """The stage path's adapter call trusts its plan's check of the signature: every change an
    optimizer makes must still reach the prompt on the next call."""
    p = dspy.Predict("question -> answer")
    p.demos = demos(("q1", "a1"), ("q2", "a2"))
    plain, fast = pair[0](), pair[1]()
    before = stage_prompts(fast, p, mode, question="q0")
    assert before == prompts(plain, p, question="q0")
    stage_prompts(fast, p, mode, question="q0")  # now served from the plans
    must_contain = CHANGES[name](p)
    after = stage_prompts(fast, p, mode, question="q0")
    assert after == prompts(plain, p, question="q0")
    assert after != before
    assert must_contain in str(after)


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_the_stage_path_checks_the_signature_once_per_call(
    pair: tuple[type, type], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One check of the signature per LM stage call (the adapter's plan was found to match beside
    the stage path's, so it is not checked again), and a full one again after a change."""
    from stageflow.lm.fast import _plan
    from stageflow.lm.fast.call import call_predictor

    checks: list[Any] = []
    real = _plan.Plan.matches

    def counting(self: Any, signature: Any) -> bool:
        checks.append(signature)
        return real(self, signature)

    p = dspy.Predict("question -> answer")
    lm, adapter = FakeLM({"answer": "ok"}), pair[1]()
    with dspy.context(lm=lm, adapter=adapter):
        call_predictor(p, {"question": "q"})
        monkeypatch.setattr(_plan.Plan, "matches", counting)
        call_predictor(p, {"question": "q"})
        assert checks == [p.signature]
        p.signature.instructions = "Changed in place, once."
        checks.clear()
        call_predictor(p, {"question": "q"})
        assert len(checks) == 2  # the stage path's plan, stale; then the adapter's, stale too
        checks.clear()
        assert call_predictor(p, {"question": "q"}).answer == "ok"
        assert checks == [p.signature]
    assert "Changed in place, once." in lm.history[-1]["messages"][0]["content"]
