"""Predictor inputs DSPy runs without (a default, a type that allows None) are optional in pipeline
contracts — and the places that turned on "every signature input is required" hold up: a ForEach
whose stage does not read its element, a signature replaced in place with only a default changed,
a pipeline file written from such a signature, two predictors fused over an input they read with
different defaults. Each runs sync and async where it calls."""

import dspy
import pytest

import stageflow
from stageflow import ConfigurationError, ContractError, ForEach, SequentialPipeline
from stageflow.testing import FakeLM, call


class _Sub(dspy.Signature):
    """Find a fact."""

    sub_question: str | None = dspy.InputField()
    fact: str = dspy.OutputField()


def _fact_lm() -> FakeLM:
    return FakeLM({"fact": lambda i: f"fact({i.get('sub_question', '<absent>')})"})


def test_a_for_each_whose_stage_does_not_read_the_element_is_refused() -> None:
    with pytest.raises(ContractError) as err:  # (when it is built: before anything runs)
        SequentialPipeline([ForEach(dspy.Predict(_Sub), over="questions", collect="facts")])
    assert err.value.code == "item_not_read"
    assert err.value.field == "question"
    assert "item='sub_question'" in str(err.value)


def test_a_for_each_stage_with_named_inputs_and_kwargs_must_name_the_element() -> None:
    def fact(question: str, **rest: object) -> dict[str, object]:  # (gets its named inputs only)
        return {"fact": rest.get("sub_question")}

    with pytest.raises(ContractError) as err:
        SequentialPipeline(
            [ForEach(stageflow.stage(fact, writes=["fact"]), over="sub_questions", collect="facts")]
        )
    assert err.value.code == "item_not_read"


def test_a_refused_for_each_is_located_in_the_pipeline_that_holds_it() -> None:
    with pytest.raises(ContractError) as err:
        SequentialPipeline(
            [dspy.Predict("q -> x"), ForEach(dspy.Predict("question -> fact"), over="sub_questions")]
        )
    assert err.value.stage_path == "stages[1]"
    assert "stages[1]" in str(err.value)


async def test_a_for_each_whose_element_is_an_optional_input_gets_it(mode: str) -> None:
    each = ForEach(dspy.Predict(_Sub), over="questions", item="sub_question", collect="facts")
    with dspy.context(lm=_fact_lm()):
        assert (await call(SequentialPipeline([each]), mode, questions=["a", "b"])).facts == [
            "fact(a)",
            "fact(b)",
        ]


class _Required(dspy.Signature):
    """Answer."""

    question: str = dspy.InputField()
    style: str = dspy.InputField()
    answer: str = dspy.OutputField()


def _styled_lm() -> FakeLM:
    return FakeLM({"answer": lambda i: f"{i['question']}|{i.get('style')}"})


async def test_a_default_added_in_place_is_seen_on_the_next_call(mode: str) -> None:
    predictor = dspy.Predict(_Required)
    pipe = SequentialPipeline([predictor])
    with dspy.context(lm=_styled_lm()):
        with pytest.raises(ContractError):
            await call(pipe, mode, question="q")
        predictor.signature = _Required.delete("style").insert(
            1, "style", dspy.InputField(default="dflt"), type_=str
        )
        assert (await call(pipe, mode, question="q")).answer == "q|dflt"


async def test_a_default_removed_in_place_is_seen_on_the_next_call(mode: str) -> None:
    with_default = _Required.delete("style").insert(1, "style", dspy.InputField(default="d"), type_=str)
    predictor = dspy.Predict(with_default)
    pipe = SequentialPipeline([predictor])
    with dspy.context(lm=_styled_lm()):
        assert (await call(pipe, mode, question="q")).answer == "q|d"
        predictor.signature = _Required
        with pytest.raises(ContractError) as err:
            await call(pipe, mode, question="q")
    assert err.value.field == "style"
    with pytest.raises(ContractError):
        pipe.check(["question"])


class _Defaulted(dspy.Signature):
    """Answer."""

    question: str = dspy.InputField()
    style: str = dspy.InputField(default="short")
    answer: str = dspy.OutputField()


def test_a_pipeline_file_cannot_carry_an_input_default_and_says_so() -> None:
    with pytest.raises(ConfigurationError) as err:
        stageflow.to_spec(SequentialPipeline([dspy.Predict(_Defaulted)]))
    assert err.value.code == "not_expressible"
    assert "'style' has a default" in str(err.value)


def test_an_input_with_a_default_factory_is_required_and_written_to_a_pipeline_file() -> None:
    import pydantic

    class Tagged(dspy.Signature):
        """Answer."""

        question: str = dspy.InputField()
        tags: list[str] = dspy.InputField(default_factory=list)  # (DSPy never fills it in)
        answer: str = dspy.OutputField()

    pipe = SequentialPipeline([dspy.Predict(Tagged)])
    assert pipe.stages[0] is not None
    assert stageflow.Stage(dspy.Predict(Tagged)).ports.required == ("question", "tags")
    assert "tags: list[str]" in str(stageflow.to_spec(pipe))
    assert pydantic  # (imported for the signature's field machinery)


async def test_a_cached_stage_sees_an_input_default_changed(mode: str) -> None:
    def with_default(value: str) -> type[dspy.Signature]:
        return _Defaulted.delete("style").insert(1, "style", dspy.InputField(default=value), type_=str)

    predictor = dspy.Predict(with_default("short"))
    pipe = SequentialPipeline([stageflow.CachedStage(predictor)])
    with dspy.context(lm=_styled_lm()):
        assert (await call(pipe, mode, question="q")).answer == "q|short"
        predictor.signature = with_default("long")
        assert (await call(pipe, mode, question="q")).answer == "q|long"
    fingerprints = {
        stageflow.fingerprint(SequentialPipeline([dspy.Predict(with_default(v))])) for v in ("a", "b", "a")
    }
    assert len(fingerprints) == 2


def test_an_optional_none_input_round_trips_through_a_pipeline_file() -> None:
    spec = stageflow.to_spec(SequentialPipeline([dspy.Predict(_Sub)]))
    assert "sub_question: Optional[str]" in str(spec) or "sub_question: str | None" in str(spec)


class _Draft(dspy.Signature):
    """Draft."""

    question: str = dspy.InputField()
    style: str = dspy.InputField(default="short")
    draft: str = dspy.OutputField()


class _Finish(dspy.Signature):
    """Finish."""

    draft: str = dspy.InputField()
    style: str = dspy.InputField()
    answer: str = dspy.OutputField()


async def test_predictors_reading_an_input_with_different_defaults_are_not_fused(mode: str) -> None:
    def build() -> SequentialPipeline:
        return SequentialPipeline([dspy.Predict(_Draft), dspy.Predict(_Finish)])

    fused = stageflow.fuse(build())
    assert len(fused.stages) == 2  # (left apart: one would lend the other its default)
    lm = FakeLM({"draft": "D", "answer": lambda i: f"answer({i.get('style')})"})
    with dspy.context(lm=lm):
        for pipe in (build(), fused):
            with pytest.raises(ContractError) as err:
                await call(pipe, mode, question="q")
            assert err.value.field == "style"
        assert (await call(fused, mode, question="q", style="long")).answer == "answer(long)"
