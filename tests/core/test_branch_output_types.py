"""The types of fields produced on several paths (a ``BranchingPipeline``'s branches and default,
an ``AdaptivePipeline``'s structures) reach the contract check: a path producing a list, read later
as a single ``str``, is refused before anything runs, as it is after a plain stage. Before, the type
of the first path alone was kept, and a list from another path reached the ``str`` reader (``len``
counted items)."""

from __future__ import annotations

from typing import Annotated, Any, Union

import dspy
import pydantic
import pytest

import stageflow
from stageflow import BranchingPipeline, ContractError, SequentialPipeline, describe, stage
from stageflow.stages import Ports, declared_types
from stageflow.testing import FakeLM

_LISTS = dspy.Signature({"question": (str, dspy.InputField()), "answer": (list[str], dspy.OutputField())})


def count(answer: str) -> dict[str, int]:
    return {"n": len(answer)}


def _router(question: str) -> dict[str, str]:
    return {"branch": "text"}


def _text(question: str) -> dict[str, str]:
    return {"answer": "plain text"}


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


def test_a_number_branch_beside_a_list_branch_gives_the_union_and_still_refuses_a_str_reader() -> None:
    branching = BranchingPipeline(
        stage(_router, writes=["branch"]),
        {"number": dspy.Predict("question -> answer: int"), "lists": dspy.Predict(_LISTS)},
    )
    assert describe(branching).types["answer"] == Union[int, list[str]]  # noqa: UP007
    with pytest.raises(ContractError) as info:
        SequentialPipeline([branching, count]).check(["question"])
    assert info.value.code == "list_vs_scalar"
    assert "may produce a list" in str(info.value)
    assert "make every path produce a single str" in (info.value.hint or "")


def test_an_optional_list_read_as_str_is_refused() -> None:
    sig = dspy.Signature(
        {"question": (str, dspy.InputField()), "answer": (list[str] | None, dspy.OutputField())}
    )
    with pytest.raises(ContractError) as info:
        SequentialPipeline([dspy.Predict(sig), count]).check(["question"])
    assert info.value.code == "list_vs_scalar"


def test_a_branch_that_joins_its_list_back_into_a_str_is_fine() -> None:
    def join(answer: list[str]) -> dict[str, str]:
        return {"answer": " / ".join(answer)}

    lists = SequentialPipeline([dspy.Predict(_LISTS), stage(join, writes=["answer"])])
    branching = BranchingPipeline(
        stage(_router, writes=["branch"]), {"text": stage(_text, writes=["answer"]), "lists": lists}
    )
    p = SequentialPipeline([branching, stage(count, writes=["n"])])
    assert "n" in p.check(["question"])  # (join's parameter type is what it reads, not what it writes)


class _Reply(pydantic.BaseModel):
    text: str


def test_every_branch_s_declared_class_is_kept_for_persisted_caches() -> None:
    replies = dspy.Signature({"question": (str, dspy.InputField()), "answer": (_Reply, dspy.OutputField())})
    branching = BranchingPipeline(
        stage(_router, writes=["branch"]),
        {"model": dspy.Predict(replies), "lists": dspy.Predict(_LISTS)},
    )
    assert _Reply in declared_types(branching)


class _Odd(dspy.Module):  # type: ignore[misc]
    """A stage declaring its output with an annotation no union can hold (dict metadata)."""

    def stageflow_ports(self) -> Ports:
        return Ports(
            required=("question",), outputs=("answer",), types={"answer": Annotated[str, {"unit": "cm"}]}
        )

    def forward(self, question: str) -> Any:
        return dspy.Prediction(answer="1")


def test_unhashable_annotations_do_not_break_the_merge() -> None:
    branching = BranchingPipeline(
        stage(_router, writes=["branch"]), {"text": _Odd(), "number": dspy.Predict("question -> answer: int")}
    )
    assert describe(branching).types["answer"] is None  # (types that cannot form a union: unknown)
    assert SequentialPipeline([branching])(question="q").answer == "1"


def _optional_count(answer: str = "") -> dict[str, int]:
    return {"n": len(answer)}


@pytest.mark.parametrize("where", ["nested", "optional"])
async def test_a_str_reader_inside_a_nested_pipeline_or_with_a_default_is_refused(
    mode: str, where: str
) -> None:
    reader = (
        SequentialPipeline([stage(count, writes=["n"])])
        if where == "nested"
        else stage(_optional_count, writes=["n"])
    )
    lm = FakeLM({"answer": ["aa", "bb"]})
    p = SequentialPipeline([_branching("branch"), reader])
    with pytest.raises(ContractError) as info:
        p.check(["question"])
    assert (info.value.code, info.value.field) == ("list_vs_scalar", "answer")
    with dspy.context(lm=lm), pytest.raises(ContractError):
        await stageflow.testing.call(p, mode, question="q")
    assert lm.calls == 0


def test_a_nested_pipeline_says_what_type_its_stages_want() -> None:
    inner = SequentialPipeline([stage(count, writes=["n"]), stage(_optional_count, writes=["m"])])
    assert describe(inner).types["answer"] is str
    fine = SequentialPipeline([stage(_text, writes=["answer"]), inner])
    assert "n" in fine.check(["question"])


def test_a_nested_str_reader_after_a_nested_list_reader_is_still_refused() -> None:
    def total(answer: list[str]) -> dict[str, int]:
        return {"t": len(answer)}

    inner = SequentialPipeline([stage(total, writes=["t"]), stage(count, writes=["n"])])
    with pytest.raises(ContractError) as info:
        SequentialPipeline([dspy.Predict(_LISTS), inner]).check(["question"])
    assert (info.value.code, info.value.field) == ("list_vs_scalar", "answer")


def test_a_function_annotated_to_return_a_list_produces_a_list() -> None:
    def search(question: str) -> list[str]:
        return [question]

    assert describe(stage(search, writes=["answer"])).types["answer"] == list[str]
    with pytest.raises(ContractError) as info:
        SequentialPipeline([stage(search, writes=["answer"]), count]).check(["question"])
    assert info.value.code == "list_vs_scalar"
    # (a mapping annotation is the outputs' container, not the one output's type)
    assert "answer" not in describe(stage(_text, writes=["answer"])).types
