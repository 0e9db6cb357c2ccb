"""The types of fields produced on several paths (a ``BranchingPipeline``'s branches and default,
an ``AdaptivePipeline``'s structures) reach the contract check: a path producing a list, read later
as a single ``str``, is refused before anything runs, as it is after a plain stage. Before, the type
of the first path alone was kept, and a list from another path reached the ``str`` reader (``len``
counted items)."""

from __future__ import annotations

from typing import Union

import dspy
import pytest

import stageflow
from stageflow import BranchingPipeline, ContractError, SequentialPipeline, describe, stage
from stageflow.testing import FakeLM

_LISTS = dspy.Signature({"question": (str, dspy.InputField()), "answer": (list[str], dspy.OutputField())})


def count(answer: str) -> dict[str, int]:
    return {"n": len(answer)}


def _router(question: str) -> dict[str, str]:
    return {"branch": "text"}


def _text(question: str) -> dict[str, str]:
    return {"answer": "plain text"}


def _number(question: str) -> dict[str, int]:
    return {"answer": 3}


def _branching(lists_where: str) -> BranchingPipeline:
    text = stage(_text, writes=["answer"])
    lists = dspy.Predict(_LISTS)
    if lists_where == "default":
        return BranchingPipeline(stage(_router, writes=["branch"]), {"text": text}, default=lists)
    return BranchingPipeline(stage(_router, writes=["branch"]), {"text": text, "lists": lists})


@pytest.mark.parametrize("lists_where", ["default", "branch"])
async def test_a_list_from_any_branch_read_as_str_is_refused_before_the_lm_runs(
    mode: str, lists_where: str
) -> None:
    lm = FakeLM({"answer": ["aa", "bb"]})
    p = SequentialPipeline([_branching(lists_where), count])
    with pytest.raises(ContractError) as info:
        p.check(["question"])
    err = info.value
    assert (err.code, err.field, err.stage_path) == ("list_vs_scalar", "answer", "stages[1]")
    assert "list[str]" in str(err)
    with dspy.context(lm=lm), pytest.raises(ContractError):
        await stageflow.testing.call(p, mode, question="q")
    assert lm.calls == 0


def test_a_list_read_as_a_list_after_branches_is_fine() -> None:
    def total(answer: list[str]) -> dict[str, int]:
        return {"n": len(answer)}

    lists = BranchingPipeline(
        stage(_router, writes=["branch"]),
        {"text": dspy.Predict(_LISTS)},
        default=dspy.Predict(_LISTS),
    )
    p = SequentialPipeline([lists, stage(total, writes=["n"])])
    assert "n" in p.check(["question"])
    with dspy.context(lm=FakeLM({"answer": ["aa", "bb"]})):
        assert p(question="q").n == 2


def test_branches_that_disagree_on_a_scalar_type_give_the_union_and_no_error() -> None:
    branching = BranchingPipeline(
        stage(_router, writes=["branch"]),
        {"text": dspy.Predict("question -> answer: str"), "number": dspy.Predict("question -> answer: int")},
    )
    assert describe(branching).types["answer"] == Union[str, int]  # noqa: UP007
    p = SequentialPipeline([branching, stage(count, writes=["n"])])
    assert "n" in p.check(["question"])


def test_branches_that_agree_keep_the_type() -> None:
    branching = BranchingPipeline(
        stage(_router, writes=["branch"]),
        {"a": dspy.Predict("question -> answer: str"), "b": stage(_text, writes=["answer"])},
        default=dspy.Predict("question -> answer: str"),
    )
    assert describe(branching).types["answer"] is str


def test_an_adaptive_structure_producing_a_list_read_as_str_is_refused() -> None:
    adaptive = stageflow.AdaptivePipeline(
        {"direct": stage(_text, writes=["answer"]), "lists": dspy.Predict(_LISTS)}
    )
    p = SequentialPipeline([adaptive, count])
    with pytest.raises(ContractError) as info:
        p.check(["question"])
    assert (info.value.code, info.value.field) == ("list_vs_scalar", "answer")


def test_a_number_branch_beside_a_list_branch_still_names_the_list() -> None:
    branching = BranchingPipeline(
        stage(_router, writes=["branch"]),
        {"number": stage(_number, writes=["answer"]), "lists": dspy.Predict(_LISTS)},
    )
    assert describe(branching).types["answer"] == list[str]
