"""The demo and the evaluation count the calls that reached the model, not DSPy's cached answers."""

from __future__ import annotations

from collections.abc import Iterator

import dspy
import pytest

from stageflow.apps.multihop import load_devset
from stageflow.apps.multihop.demo import fake_lm, format_text, run_demo
from stageflow.apps.multihop.evaluate import evaluate_program
from stageflow.apps.multihop.linked import build_linked_program
from stageflow.testing import FakeLM, isolated_dspy

QUESTION = "In which city was the inventor who patented the telephone in 1876 born?"


@pytest.fixture(autouse=True)
def _memory_cache() -> Iterator[None]:
    with isolated_dspy():
        dspy.configure_cache(enable_memory_cache=True, enable_disk_cache=False)
        yield


def cached(lm: FakeLM) -> FakeLM:
    lm.cache = True  # DSPy's answer cache (FakeLM turns it off by default)
    return lm


def test_demo_counts_a_cached_answer_apart_from_model_calls() -> None:
    lm = cached(fake_lm())
    first = run_demo(QUESTION, lm=lm, compact=False)
    again = run_demo(QUESTION, lm=lm, compact=False)
    assert lm.calls == 1  # the second run never reached the model
    assert (first.lm_calls, first.lm_cache_hits) == (1, 0)
    assert (again.lm_calls, again.lm_cache_hits) == (0, 1)
    assert again.answer == first.answer
    assert again.to_json()["lm_calls"] == 0
    assert again.to_json()["lm_cache_hits"] == 1
    last = format_text(again).splitlines()[-1]
    assert last.startswith("0 model calls (1 answer from DSPy's LM cache")
    assert format_text(first).splitlines()[-1] == "1 model call"


def test_evaluation_leaves_cached_answers_out_of_model_calls() -> None:
    lm = cached(FakeLM({"answer": lambda i: i["candidates"][0]}))
    questions = load_devset()[3:4] * 2  # the same question twice: the second answer is cached
    report = evaluate_program(build_linked_program(), questions, lm=lm, adapter=dspy.JSONAdapter())
    assert lm.calls == 1
    assert [r.lm_calls for r in report.results] == [1, 0]
    assert report.results[0].answer == report.results[1].answer


def test_evaluation_of_a_plain_dspy_program_counts_what_dspy_called() -> None:
    program = dspy.Predict("question -> answer")
    report = evaluate_program(program, load_devset()[:2], lm=FakeLM({"answer": "x"}))
    assert [r.lm_calls for r in report.results] == [1, 1]
