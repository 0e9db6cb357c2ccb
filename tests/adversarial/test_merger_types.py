"""The default merge of a parallel group's shared ``content`` never invents text (issue 9).

Reproducer: a member returning ``content=None`` contributed the literal text ``'None'``
(``'None\\nb'``), and an int and a list were joined as ``"5\\n['x']"``. ``None`` is now left out,
strings are joined and lists concatenated; any other mix is a ContractError naming the stages.
"""

from __future__ import annotations

from typing import Any

import dspy
import pytest

import stageflow
from stageflow import ContractError, ResultMerger
from stageflow.testing import call


class Content(dspy.Module):
    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value

    def forward(self, question: str) -> dspy.Prediction:
        return dspy.Prediction(content=self.value)

    async def aforward(self, question: str) -> dspy.Prediction:
        return self.forward(question)


def group(*values: Any, merger: ResultMerger | None = None) -> Any:
    return stageflow.ParallelPipeline([[Content(v) for v in values]], merger)


@pytest.mark.parametrize(
    ("values", "merged"),
    [
        ((None, "b"), "b"),
        (("a", None, "c"), "a\nc"),
        ((None, None), None),
        ((["x"], None, ("y",)), ["x", "y"]),
        (("a", "b"), "a\nb"),
    ],
)
async def test_none_is_left_out_strings_join_and_lists_concatenate(
    values: tuple[Any, ...], merged: Any, mode: str
) -> None:
    assert (await call(group(*values), mode, question="q")).content == merged


@pytest.mark.parametrize("values", [(5, ["x"]), (5, 6), ("a", ["x"]), ({"k": 1}, "b")])
async def test_values_concatenate_cannot_join_clash_loudly_naming_the_stages(
    values: tuple[Any, ...], mode: str
) -> None:
    with pytest.raises(ContractError) as info:
        await call(group(*values), mode, question="q")
    err = info.value
    assert err.code == "merge_types"
    assert err.field == "content"
    assert "group 0" in err.message
    assert f"'stages[0]' wrote {type(values[0]).__name__}" in err.message
    assert f"'stages[1]' wrote {type(values[1]).__name__}" in err.message
    assert "strategies={'content': 'list'}" in (err.hint or "")


async def test_a_strategy_keeps_the_values_as_they_are(mode: str) -> None:
    listed = group(5, ["x"], merger=ResultMerger(strategies={"content": "list"}))
    assert (await call(listed, mode, question="q")).content == [5, ["x"]]
    first = group(5, ["x"], merger=ResultMerger(strategies={"content": "first"}))
    assert (await call(first, mode, question="q")).content == 5


def test_merge_called_directly() -> None:
    assert ResultMerger().merge([{"content": None}, {"content": "b"}]) == {"content": "b"}
    with pytest.raises(ContractError, match="'member 0' wrote int, 'member 1' wrote list"):
        ResultMerger().merge([{"content": 5}, {"content": ["x"]}])
