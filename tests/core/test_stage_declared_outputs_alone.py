"""A stage that declares its outputs is held to them on its own as it is in a pipeline: a result
missing a declared field is a ``ContractError`` naming the stage and the field, on every path
(``Stage``, ``stage()``, with and without policies, renamed, sync and async)."""

from __future__ import annotations

from typing import Any

import dspy
import pydantic
import pytest

import stageflow
from stageflow import ContractError, SequentialPipeline, Stage, StageError
from stageflow.testing import call


def wrong(x: int) -> dict[str, int]:
    return {"z": x}


def right(x: int) -> dict[str, int]:
    return {"y": x + 1}


SHAPES: dict[str, Any] = {
    "Stage": lambda fn: Stage(fn, writes=["y"]),
    "Stage retry=": lambda fn: Stage(fn, writes=["y"], retry=2),
    "stage()": lambda fn: stageflow.stage(fn, writes=["y"]),
    "Stage(stage())": lambda fn: Stage(stageflow.stage(fn, writes=["y"])),
    "Stage(Stage()) cache": lambda fn: Stage(Stage(fn, writes=["y"]), cache=True),
}


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_a_missing_declared_output_is_refused_alone_as_in_a_pipeline(mode: str, shape: str) -> None:
    with pytest.raises(ContractError) as alone:
        await call(SHAPES[shape](wrong), mode, x=1)
    assert alone.value.field == "y"
    assert alone.value.code == "missing_output"
    assert "'y'" in str(alone.value)
    assert "['z']" in str(alone.value)
    with pytest.raises(ContractError) as piped:
        await call(SequentialPipeline([SHAPES[shape](wrong)]), mode, x=1)
    assert piped.value.field == alone.value.field


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_declared_outputs_returned_pass_unchanged(mode: str, shape: str) -> None:
    out = await call(SHAPES[shape](right), mode, x=1)
    assert out["y"] == 2


async def test_the_error_names_the_renamed_output(mode: str) -> None:
    renamed = Stage(wrong, writes=["y"], outputs={"y": "answer"})
    with pytest.raises(ContractError) as info:
        await call(renamed, mode, x=1)
    assert info.value.field == "answer"
    assert info.value.stage_path == "Stage(function wrong())"


async def test_a_module_returning_a_prediction_without_a_signature_field(mode: str) -> None:
    class Partial(dspy.Module):  # type: ignore[misc]
        def forward(self, question: str) -> dspy.Prediction:
            return dspy.Prediction(draft=question)

        async def aforward(self, question: str) -> dspy.Prediction:
            return self.forward(question=question)

    with pytest.raises(ContractError) as info:
        await call(Stage(Partial(), writes=["answer"]), mode, question="q")
    assert info.value.field == "answer"


async def test_a_pydantic_result_is_checked_by_its_fields(mode: str) -> None:
    class Out(pydantic.BaseModel):
        z: int

    with pytest.raises(ContractError):
        await call(Stage(lambda x: Out(z=x), writes=["y"]), mode, x=1)


async def test_a_bare_single_output_is_left_as_it_is(mode: str) -> None:
    assert await call(Stage(lambda x: x * 3, writes=["y"]), mode, x=2) == 6


async def test_undeclared_outputs_are_not_checked(mode: str) -> None:
    assert await call(Stage(wrong), mode, x=1) == {"z": 1}


async def test_a_fallback_missing_a_declared_output_is_refused_alone(mode: str) -> None:
    def boom(x: int) -> dict[str, int]:
        raise ValueError("down")

    with pytest.raises(StageError) as info:
        await call(Stage(boom, writes=["y"], fallback={"z": 1}), mode, x=1)
    assert "declares output 'y'" in str(info.value)


class OwnForward(Stage):
    def forward(self, **kwargs: Any) -> Any:
        return {"z": 1}


class OwnCall(Stage):
    def __call__(self, **kwargs: Any) -> Any:
        return {"z": 1}


class PassesOn(Stage):
    def forward(self, **kwargs: Any) -> Any:
        return super().forward(**kwargs)


@pytest.mark.parametrize("cls", [OwnForward, OwnCall, PassesOn])
@pytest.mark.parametrize("policies", [{}, {"retry": 2}])
def test_a_subclass_of_yours_is_held_to_its_outputs_alone(cls: type[Stage], policies: dict[str, Any]) -> None:
    with pytest.raises(ContractError) as alone:
        cls(stageflow.stage(wrong, writes=["y"]), **policies)(x=1)
    assert alone.value.field == "y"
    with pytest.raises(ContractError) as piped:
        SequentialPipeline([cls(stageflow.stage(wrong, writes=["y"]), **policies)])(x=1)
    # In a pipeline the engine's merge says it, with the stage's path.
    assert piped.value.stage_path == "stages[0]"
    # (named by your subclass, whose code runs: it may be what left the output out)
    assert str(piped.value).startswith(f"Stage 'stages[0]' ({cls.__name__}) declares output 'y'")


async def test_a_stage_around_a_stage_in_a_pipeline_keeps_the_pipelines_message(mode: str) -> None:
    pipeline = SequentialPipeline([Stage(Stage(wrong, writes=["y"]))])
    with pytest.raises(ContractError) as info:
        await call(pipeline, mode, x=1)
    assert info.value.stage_path == "stages[0]"
    assert str(info.value).startswith("Stage 'stages[0]'")


def branching() -> stageflow.BranchingPipeline:
    return stageflow.BranchingPipeline(
        router=stageflow.stage(lambda x: {"branch": "a" if x > 0 else "b"}, writes=["branch"]),
        branches={
            "a": stageflow.stage(lambda x: {"pa": 1}, writes=["pa"]),
            "b": stageflow.stage(lambda x: {"pb": 2}, writes=["pb"]),
        },
    )


async def test_writes_names_a_field_only_some_branches_produce(mode: str) -> None:
    with pytest.raises(ContractError) as info:
        await call(Stage(branching(), writes=["pa"]), mode, x=-1)
    assert info.value.field == "pa"
    assert (await call(Stage(branching(), writes=["pa"]), mode, x=1))["pa"] == 1


async def test_undeclared_partial_fields_of_a_composite_are_not_required(mode: str) -> None:
    out = await call(Stage(branching()), mode, x=-1)
    assert out["pb"] == 2


@pytest.mark.parametrize("returned", [5, None])
async def test_a_bare_value_under_two_declared_outputs_is_refused_alone(mode: str, returned: Any) -> None:
    for made in (
        Stage(lambda x: returned, writes=["a", "b"]),
        stageflow.stage(lambda x: returned, writes=["a", "b"]),
    ):
        with pytest.raises(StageError) as info:
            await call(made, mode, x=1)
        assert info.value.code == "bad_output"
        assert "expected fields ['a', 'b']" in str(info.value)


async def test_a_custom_module_returning_a_bare_value_is_refused_alone(mode: str) -> None:
    class Bare(dspy.Module):  # type: ignore[misc]
        def forward(self, x: int) -> int:
            return x

        async def aforward(self, x: int) -> int:
            return x

    with pytest.raises(StageError) as info:
        await call(Stage(Bare(), writes=["y"]), mode, x=1)
    assert info.value.code == "bad_output"


async def test_a_lazy_stage_missing_its_output_in_a_pipeline_is_named_by_its_path(mode: str) -> None:
    pipeline = SequentialPipeline(
        [
            stageflow.stage(lambda x: {"a": 1}, writes=["a"]),
            stageflow.LazyStage(stageflow.stage(wrong, writes=["y"])),
        ]
    )
    with pytest.raises(ContractError) as info:
        await call(pipeline, mode, x=1)
    assert info.value.stage_path == "stages[1]"
    assert str(info.value).startswith("Stage 'stages[1]' (LazyStage) declares output 'y'")


async def test_a_lazy_stage_alone_is_checked_when_forced(mode: str) -> None:
    pending = await call(stageflow.LazyStage(stageflow.stage(wrong, writes=["y"])), mode, x=1)
    with pytest.raises(ContractError) as info:
        pending.value()
    assert info.value.field == "y"
