"""The linked multi-hop architectures on fake LMs: candidates, programs, registry, evaluation, demo."""

from __future__ import annotations

import json
from typing import Any

import dspy
import pytest

from stageflow.apps.multihop import load_devset, load_trainset
from stageflow.apps.multihop.architectures import (
    ARCHITECTURES,
    DEFAULT_ARCHITECTURE,
    build_architecture,
    get_architecture,
)
from stageflow.apps.multihop.candidates import answer_type, candidate_spans, propose_candidates
from stageflow.apps.multihop.demo import demo_stage_name, fake_lm, format_text, run_demo
from stageflow.apps.multihop.evaluate import count_lm_calls, evaluate_program, passages_of
from stageflow.apps.multihop.linked import LinkedQA, build_linked_program, first_candidate
from stageflow.errors import ConfigurationError
from stageflow.testing import FakeLM, isolated_dspy

QUESTION = "In which village was the author of Pride and Prejudice born?"


@pytest.fixture(autouse=True)
def _isolated() -> Any:
    with isolated_dspy():
        yield


def pick(index: int) -> FakeLM:
    """A fake LM answering with the candidate at ``index`` (or the last one)."""
    return FakeLM({"answer": lambda i: i["candidates"][min(index, len(i["candidates"]) - 1)]})


# -- candidates -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "kind"),
    [
        ("In what year did the Berlin Wall fall?", "year"),
        ("When was Dune published?", "year"),
        ("How many bones are in the adult human skeleton?", "number"),
        ("Which river flows through Prague?", "name"),
        ("Who wrote Dune?", "name"),
    ],
)
def test_answer_type(question: str, kind: str) -> None:
    assert answer_type(question) == kind


def test_name_spans_skip_adjectives_leading_words_initials_and_what_the_question_names() -> None:
    passages = [
        "Jane Austen: Jane Austen was an English novelist born in Steventon, Hampshire. "
        "The novels of Jane Austen, such as Emma, are read by J. K. Rowling.",
        "Stratford: In Stratford-upon-Avon the Royal Shakespeare Company plays.",
    ]
    spans = candidate_spans("Where was the author of Emma born?", passages, exclude=["Jane Austen"], limit=9)
    assert spans == ["Steventon", "Hampshire", "Rowling", "Stratford-upon-Avon", "Royal Shakespeare Company"]


def test_numbers_and_years() -> None:
    text = ["Berlin Wall: It was built in 1961 and fell on 9 November 1989, after 100,000 protests."]
    assert candidate_spans("In what year did the Berlin Wall fall?", text) == ["1961", "1989"]
    assert candidate_spans("How many people protested?", text) == ["1961", "9", "1989", "100,000"]
    assert candidate_spans("Who?", ["Nobody here."], limit=1) == ["Nobody"]
    assert candidate_spans("Who?", ["A B C D"], limit=2) == ["B C D"]


def test_propose_reads_linked_passages_first_and_never_proposes_a_bridge() -> None:
    passages = [
        "Pride and Prejudice: Pride and Prejudice is a novel by Jane Austen set in Hertfordshire.",
        "Jane Austen: Jane Austen was an English novelist born in Steventon.",
    ]
    out = propose_candidates(QUESTION, passages, linked=["Jane Austen"])
    assert out == {"candidates": ["Steventon", "Hertfordshire"]}


# -- the linked program ---------------------------------------------------------------------------


def test_structure_and_declared_outputs() -> None:
    program = build_linked_program()
    assert isinstance(program, LinkedQA)
    assert [name for name, _ in program.named_predictors()] == ["stages[2].module.predict"]
    assert program.check(["question"]) == (
        "answer",
        "candidates",
        "choice_scores",
        "linked",
        "passages",
        "question",
    )
    control = build_linked_program(answerer="first")
    assert control.answer_predictor() is None
    assert not control.uses_lm
    assert control.check(["question"]) == ("answer", "candidates", "linked", "passages", "question")


def test_choose_answers_with_a_candidate_in_one_call() -> None:
    program = build_linked_program()
    lm = pick(1)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        result = program(question=QUESTION)
    assert result.answer == result.candidates[1]
    assert "Jane Austen" in result.linked
    assert any(p.startswith("Jane Austen: ") for p in result.passages)
    assert lm.calls == 1


def test_the_control_calls_no_model() -> None:
    program = build_linked_program(answerer="first")
    lm = pick(0)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        result = program(question=QUESTION)
    assert result.answer == "Steventon"
    assert lm.calls == 0
    assert first_candidate([]) == {"answer": ""}


def test_read_writes_freely() -> None:
    program = build_linked_program(answerer="read")
    with dspy.context(lm=FakeLM({"answer": "somewhere"}), adapter=dspy.JSONAdapter()):
        assert program(question=QUESTION).answer == "somewhere"


def test_async_run_matches_sync() -> None:
    import asyncio

    program = build_linked_program()

    async def run() -> Any:
        with dspy.context(lm=pick(0), adapter=dspy.JSONAdapter()):
            return await program.acall(question=QUESTION)

    assert asyncio.run(run()).answer == "Steventon"


def test_train_demos_are_complete_and_cost_no_model_call() -> None:
    program = build_linked_program()
    lm = pick(0)
    with dspy.context(lm=lm):
        program.add_train_demos(3, load_trainset()[:10])
    demos = program.answer_predictor().demos
    assert len(demos) == 3
    assert lm.calls == 0
    for demo in demos:
        assert demo.answer in demo.candidates
        assert demo.passages
        assert set(demo.inputs().keys()) == {"question", "passages", "candidates"}


def test_unknown_answerer() -> None:
    with pytest.raises(ConfigurationError) as info:
        build_linked_program(answerer="oracle")  # type: ignore[arg-type]
    assert "choose" in (info.value.hint or "")


# -- the registry ---------------------------------------------------------------------------------


def test_registry_and_default() -> None:
    assert DEFAULT_ARCHITECTURE in ARCHITECTURES
    assert [name for name, a in ARCHITECTURES.items() if not a.uses_lm] == ["linked-first"]
    with pytest.raises(ConfigurationError) as info:
        get_architecture("nope")
    assert "linked-choose" in (info.value.hint or "")


@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if n != "linked-likelihood"])
def test_every_architecture_builds_and_runs_on_a_fake_lm(name: str) -> None:
    program = build_architecture(name, compact=False)
    with dspy.context(lm=fake_lm(), adapter=dspy.JSONAdapter()):
        result = program(question=QUESTION)
    assert isinstance(result.answer, str)
    assert passages_of(result)


def test_likelihood_needs_an_lm_with_logprobs() -> None:
    program = build_architecture("linked-likelihood", compact=False)
    with dspy.context(lm=fake_lm(), adapter=dspy.JSONAdapter()), pytest.raises(Exception) as info:
        program(question=QUESTION)
    assert "no log-probabilities" in str(info.value)


def test_build_architecture_settings(tmp_path) -> None:
    with pytest.raises(ConfigurationError):
        build_architecture("linked-choose", k=0)
    with pytest.raises(ConfigurationError):
        build_architecture("linked-choose", demos=-1)
    program = build_architecture("linked-choose", demos=2)
    assert len(program.answer_predictor().demos) == 2
    decompose = build_architecture("decompose")
    assert all(len(p.demos) == 4 for _, p in decompose.named_predictors() if p.demos)
    missing = tmp_path / "none.jsonl"
    with pytest.raises(ConfigurationError, match="Corpus file not found"):
        build_architecture("linked-first", corpus=missing)


# -- evaluation of any architecture ---------------------------------------------------------------


def test_evaluate_reports_recall_calls_and_matches() -> None:
    dev = load_devset()[:4]
    report = evaluate_program(build_linked_program(), dev, lm=pick(0), adapter=dspy.JSONAdapter())
    assert report.n == 4
    assert report.recall == 1.0
    assert report.all_found == 4
    assert report.lm_calls == 1.0
    assert report.errors == 0
    control = evaluate_program(build_linked_program(answerer="first"), dev)
    assert control.lm_calls == 0.0
    assert [r.answer for r in control.results] == [r.answer for r in report.results]
    assert 0.0 <= report.exact <= report.matched <= 1.0


def test_evaluate_refuses_a_program_without_the_answer_field() -> None:
    class NoAnswer(dspy.Module):
        def forward(self, question: str) -> dspy.Prediction:
            return dspy.Prediction(reply="Steventon")

    with pytest.raises(ConfigurationError) as info:
        evaluate_program(NoAnswer(), load_devset()[:2])
    assert "'answer'" in info.value.message
    assert "reply" in info.value.message
    report = evaluate_program(NoAnswer(), load_devset()[:1], answer_field="reply")
    assert report.matched == 1.0
    assert report.recall is None  # no passages exposed: no recall, not zero


def test_evaluate_records_errors_and_goes_on() -> None:
    report = evaluate_program(build_linked_program(), load_devset()[:2], lm=FakeLM(fail_times=99))
    assert report.errors == 2
    assert report.matched == 0.0
    assert report.recall is None


def test_passages_of_flattens() -> None:
    assert passages_of(dspy.Prediction(passages=[["a"], ["b", "c"]])) == ["a", "b", "c"]
    assert passages_of(dspy.Prediction(passages=[{"text": "t"}])) == ["t"]


def test_count_lm_calls_nests_inside_other_callbacks() -> None:
    with dspy.context(lm=FakeLM({"answer": "x"})), count_lm_calls() as outer:
        with count_lm_calls() as inner:
            dspy.Predict("q -> answer")(q="?")
        dspy.Predict("q -> answer")(q="?")
    assert (outer.calls, inner.calls) == (2, 1)


# -- the demo -------------------------------------------------------------------------------------


def test_demo_shows_hops_candidates_and_the_choice() -> None:
    result = run_demo(load_devset()[3].question, lm=fake_lm(), compact=False)
    text = format_text(result)
    assert "architecture linked-choose" in text
    assert "hop 2  Alexander Graham Bell  (linked from Telephone)" in text
    assert "Edinburgh  <- chosen" in text
    assert "[correct; from the shipped dev set]" in text
    assert "1 model call" in text
    data = result.to_json()
    json.dumps(data)
    assert data["answer"] == "Edinburgh"
    assert data["lm_calls"] == 1


def test_demo_control_and_stage_names() -> None:
    result = run_demo(QUESTION, lm=None, compact=True, architecture="linked-first")
    assert result.model == "no model"
    assert result.lm_calls == 0
    assert "with no model (the control)" in format_text(result)
    assert demo_stage_name("stages[2]") == "answer"
    assert demo_stage_name("stages[0]", "decompose") == "decompose"


@pytest.mark.parametrize(
    "name",
    [
        "stageflow.apps.multihop.candidates",
        "stageflow.apps.multihop.linked",
        "stageflow.apps.multihop.evaluate",
    ],
)
def test_doctests(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0
    assert result.failed == 0
