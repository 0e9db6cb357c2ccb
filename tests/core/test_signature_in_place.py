"""A predictor whose signature is replaced in place after its pipeline was built (``pred.signature =
pred.signature.prepend(...)``, as DSPy code does) runs with the fields it has now: the stage is fed
its new inputs, a missing one is a ContractError naming the stage and the field, a Stage wrapper
whose contract was computed from the old fields says so, and a signature with the same fields (new
instructions, what optimizers set) keeps the plan. Every scenario runs sync and async."""

from __future__ import annotations

from typing import Any

import dspy
import pytest

import stageflow
from stageflow import ConfigurationError, ContractError, SequentialPipeline, Stage, stage
from stageflow.patterns.base import Pipeline
from stageflow.testing import FakeLM, call, isolated_dspy


@pytest.fixture
def lm() -> Any:
    fake = FakeLM({"answer": lambda inputs: "|".join(sorted(inputs))})
    with isolated_dspy(fake):
        yield fake


def _with_context(pred: Any) -> SequentialPipeline:
    return SequentialPipeline([stage(lambda question: {"context": "ctx"}, writes=["context"]), pred])


async def test_a_prepended_input_is_fed_on_the_next_call(mode: str, lm: Any) -> None:
    pred = dspy.Predict("question -> answer")
    program = _with_context(pred)
    assert (await call(program, mode, question="q")).answer == "question"
    pred.signature = pred.signature.prepend("context", dspy.InputField(), type_=str)
    assert (await call(program, mode, question="q")).answer == "context|question"
    assert lm.log[-1][1] == {"context": "ctx", "question": "q"}
    assert (await call(program, mode, question="q")).answer == "context|question"


async def test_new_instructions_keep_the_plan(mode: str, lm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pred = dspy.Predict("question -> answer")
    program = SequentialPipeline([pred])
    await call(program, mode, question="q")
    replanned: list[str] = []
    real = Pipeline.stageflow_replanned

    def spy(self: Any, entry: Any, prefix: str) -> Any:
        replanned.append(entry.path)
        return real(self, entry, prefix)

    monkeypatch.setattr(Pipeline, "stageflow_replanned", spy)
    pred.signature = pred.signature.with_instructions("Answer in one word.")
    assert (await call(program, mode, question="q")).answer == "question"
    assert replanned == []
    pred.signature = pred.signature.append("hint", dspy.InputField(), type_=str)
    assert (await call(program, mode, question="q", hint="h")).answer == "hint|question"
    assert replanned == ["stages[0]"]
    assert (await call(program, mode, question="q", hint="h")).answer == "hint|question"
    assert replanned == ["stages[0]"]  # (the new plan holds the new signature)


async def test_a_new_input_nobody_gives_is_a_contract_error(mode: str, lm: Any) -> None:
    pred = dspy.Predict("question -> answer")
    ran: list[str] = []
    program = SequentialPipeline([stage(lambda question: ran.append(question) or {}, writes=[]), pred])
    await call(program, mode, question="q")
    pred.signature = pred.signature.append("extra", dspy.InputField(), type_=str)
    calls = lm.calls
    for _ in range(2):
        with pytest.raises(ContractError) as info:
            await call(program, mode, question="q")
        assert info.value.stage_path == "stages[1]"
        assert info.value.field == "extra"
    assert lm.calls == calls  # the LM was never called without it
    assert ran == ["q"]  # both calls were refused by the contract check, before any stage ran


async def test_a_stage_wrapper_planned_with_the_old_fields_says_so(mode: str, lm: Any) -> None:
    pred = dspy.Predict("question -> answer")
    program = SequentialPipeline([Stage(pred, inputs={"question": "query"})])
    assert (await call(program, mode, query="q")).answer == "question"
    pred.signature = pred.signature.prepend("context", dspy.InputField(), type_=str)
    with pytest.raises(ConfigurationError) as info:
        await call(program, mode, query="q", context="c")
    assert info.value.stage_path == "stages[0]"
    assert info.value.code == "structure_changed"
    assert "['question'] -> ['context', 'question']" in str(info.value)


async def test_a_predictor_in_a_nested_pipeline_and_a_chain_of_thought(mode: str, lm: Any) -> None:
    cot = dspy.ChainOfThought("question -> answer")
    pred = dspy.Predict("question -> answer")
    inner = SequentialPipeline([cot, stage(lambda answer: {"question": answer}, writes=["question"]), pred])
    program = SequentialPipeline([stage(lambda question: {"context": "ctx"}, writes=["context"]), inner])
    for _ in range(2):  # (the nested pipeline runs in line from the second call)
        assert (await call(program, mode, question="q")).answer == "question"
    cot.predict.signature = cot.predict.signature.prepend("context", dspy.InputField(), type_=str)
    pred.signature = pred.signature.prepend("context", dspy.InputField(), type_=str)
    result = await call(program, mode, question="q")
    assert result.answer == "context|question"
    assert [inputs for _, inputs in lm.log[-2:]] == [
        {"context": "ctx", "question": "q"},
        {"context": "ctx", "question": "context|question"},
    ]


async def test_a_foreach_predictor_keeps_its_item_paths(mode: str, lm: Any) -> None:
    pred = dspy.Predict("question -> answer")
    each = stageflow.ForEach(pred, over="questions", item="question", collect={"answer": "answers"})
    program = SequentialPipeline([each])
    assert (await call(program, mode, questions=["a", "b"], tone="t")).answers == ["question"] * 2
    pred.signature = pred.signature.append("tone", dspy.InputField(), type_=str)
    result = await call(program, mode, questions=["a", "b"], tone="t")
    assert result.answers == ["question|tone"] * 2
    assert sorted(r.path for r in result.trace if r.path.startswith("stages[0].")) == [
        "stages[0].stage[0]",
        "stages[0].stage[1]",
    ]


async def test_a_signature_replaced_by_an_earlier_stage_mid_run(mode: str) -> None:
    # Seen at the stage call itself (the check before the run saw the old one): the stage runs with
    # the new plan's entry, recovery strategy included.
    lm = FakeLM({"answer": "fine"}, fail_with=lambda n: RuntimeError("model down") if n > 1 else None)
    pred = dspy.Predict("question -> answer")

    def prepare(question: str) -> dict[str, Any]:
        if question == "grow":
            pred.signature = pred.signature.append("hint", dspy.InputField(), type_=str)
        return {"hint": "h"}

    program = stageflow.ErrorHandlingPipeline(
        [stage(prepare, writes=["hint"]), pred],
        recovery_strategies={1: lambda error, state: {"answer": "recovered"}},
    )
    with dspy.context(lm=lm):
        assert (await call(program, mode, question="q")).answer == "fine"
        assert (await call(program, mode, question="grow")).answer == "recovered"
    assert lm.log[-1][1] == {"question": "grow", "hint": "h"}


# -- reproducers from the outside checks -----------------------------------------------------------


def _deep(pred: Any) -> Any:
    return SequentialPipeline([SequentialPipeline([pred])])


def _foreach(pred: Any) -> Any:
    return stageflow.ForEach(pred, over="qs", item="question", collect={"answer": "answers"})


@pytest.mark.parametrize("shape", ["nested", "three deep", "foreach", "branch"])
async def test_the_first_call_with_new_input_names_after_the_change(mode: str, lm: Any, shape: str) -> None:
    # Reproducer: below the outermost level, the first call failed with "needs input 'context', which
    # is not available" although the caller passed it (the nested pipeline's ports were stale).
    pred = dspy.Predict("question -> answer")
    build = {
        "nested": _deep,
        "three deep": lambda p: SequentialPipeline([_deep(p)]),
        "foreach": _foreach,
        "branch": lambda p: stageflow.BranchingPipeline(lambda question: "a", {"a": SequentialPipeline([p])}),
    }[shape]
    program = build(pred)
    inputs: dict[str, Any] = {"qs": ["q"]} if shape == "foreach" else {"question": "q"}
    await call(program, mode, **inputs)
    pred.signature = pred.signature.prepend("context", dspy.InputField(), type_=str)
    for _ in range(2):
        result = await call(program, mode, **inputs, context="c")
        assert (result.answers if shape == "foreach" else [result.answer]) == ["context|question"]


async def test_a_member_of_a_nested_ensemble_is_not_dropped(mode: str, lm: Any) -> None:
    pred = dspy.Predict("question -> answer")
    program = SequentialPipeline(
        [
            stageflow.EnsemblePipeline(
                [pred, dspy.Predict("question -> answer")], stageflow.ResultAggregator("majority")
            )
        ]
    )
    await call(program, mode, question="q")
    pred.signature = pred.signature.prepend("context", dspy.InputField(), type_=str)
    result = await call(program, mode, question="q", context="c")
    assert [m["status"] for m in result.details["stages[0]"]["individual_results"]] == ["ok", "ok"]


@pytest.mark.parametrize("when", ["before the first call", "before a deep copy"])
async def test_a_change_before_the_plan_is_used(mode: str, lm: Any, when: str) -> None:
    import copy

    pred = dspy.Predict("question -> answer")
    program = SequentialPipeline(
        [stage(lambda question: {"context": "ctx"}, writes=["context"]), _deep(pred)]
    )
    if when == "before a deep copy":
        await call(program, mode, question="q")
    pred.signature = pred.signature.prepend("context", dspy.InputField(), type_=str)
    if when == "before a deep copy":
        program = copy.deepcopy(program)
    assert (await call(program, mode, question="q")).answer == "context|question"


async def test_a_stage_wrapper_error_names_its_stage_once(mode: str, lm: Any) -> None:
    pred = dspy.Predict("question -> answer")
    program = _deep(Stage(pred, retry=stageflow.RetryPolicy(max_attempts=2)))
    await call(program, mode, question="q")
    pred.signature = pred.signature.prepend("context", dspy.InputField(), type_=str)
    for _ in range(2):
        with pytest.raises(ConfigurationError) as info:
            await call(program, mode, question="q", context="c")
        assert info.value.stage_path == "stages[0].stages[0]"


async def test_subclasses_of_predict_and_chain_of_thought(mode: str, lm: Any) -> None:
    class MyPredict(dspy.Predict):
        pass

    class MyThought(dspy.ChainOfThought):
        pass

    for pred in (MyPredict("question -> answer"), MyThought("question -> answer")):
        program = _with_context(pred)
        await call(program, mode, question="q")
        inner = pred.predict if isinstance(pred, dspy.ChainOfThought) else pred
        inner.signature = inner.signature.prepend("context", dspy.InputField(), type_=str)
        assert (await call(program, mode, question="q")).answer == "context|question"


async def test_a_demand_driven_run_uses_the_new_plan(mode: str, lm: Any) -> None:
    pred = dspy.Predict("question -> answer")
    program = _with_context(pred)
    assert (await call(program, mode, question="q", outputs=["answer"])).answer == "question"
    pred.signature = pred.signature.prepend("context", dspy.InputField(), type_=str)
    assert (await call(program, mode, question="q", outputs=["answer"])).answer == "context|question"
    pred.signature = dspy.Signature("context, question -> final")
    with pytest.raises(ContractError) as info:
        await call(program, mode, question="q", outputs=["answer"])
    assert info.value.code == "unknown_output"


async def test_a_foreach_collects_the_new_outputs_it_was_not_told(mode: str, lm: Any) -> None:
    pred = dspy.Predict("question -> answer")
    program = SequentialPipeline([stageflow.ForEach(pred, over="qs", item="question")])
    assert sorted(await call(program, mode, qs=["a"])) == ["answers", "qs"]
    pred.signature = dspy.Signature("question -> answer, extra")
    assert sorted(await call(program, mode, qs=["a"])) == ["answers", "extras", "qs"]


def test_an_adaptive_pipeline_copies_and_pickles(lm: Any) -> None:
    import copy

    import cloudpickle

    adaptive = stageflow.AdaptivePipeline(
        {"src": stage(lambda question: {"x": 1}, writes=["x"]), "leaf": dspy.Predict("question -> answer")},
        structures={"simple": ["src", "leaf"]},
    )
    for twin in (copy.deepcopy(adaptive), cloudpickle.loads(cloudpickle.dumps(adaptive)), adaptive):
        assert twin(question="q").answer == "question"


async def test_a_hierarchical_node_re_plans_once(mode: str, lm: Any) -> None:
    # Reproducer: a node that is a bare predictor re-planned on every call (each time dropping every
    # pipeline's contract checks) and never fed the new field.
    from stageflow.patterns._containers import _STRUCTURE_VERSION

    pred = dspy.Predict("question -> answer")
    program = stageflow.HierarchicalPipeline({"root": {"type": "module", "module": pred}})
    await call(program, mode, question="q")
    pred.signature = pred.signature.prepend("context", dspy.InputField(), type_=str)
    assert (await call(program, mode, question="q", context="c")).answer == "context|question"
    version = _STRUCTURE_VERSION[0]
    for _ in range(3):
        assert (await call(program, mode, question="q", context="c")).answer == "context|question"
    assert _STRUCTURE_VERSION[0] == version


async def test_a_demand_driven_run_reads_a_nested_pipelines_live_ports(mode: str, lm: Any) -> None:
    pred = dspy.Predict("question -> answer")
    program = _with_context(SequentialPipeline([pred]))
    assert (await call(program, mode, question="q", outputs=["answer"])).answer == "question"
    pred.signature = pred.signature.prepend("context", dspy.InputField(), type_=str)
    for _ in range(2):
        assert (await call(program, mode, question="q", outputs=["answer"])).answer == "context|question"


async def test_a_lazy_stage_follows_its_predictor(mode: str, lm: Any) -> None:
    # Reproducer: LazyStage(pred) kept feeding the old inputs after the change, silently.
    pred = dspy.Predict("question -> answer")
    program = SequentialPipeline(
        [
            stage(lambda question: {"context": "ctx"}, writes=["context"]),
            stageflow.LazyStage(pred),
            stage(lambda answer: {"out": str(answer)}, writes=["out"]),
        ]
    )
    assert (await call(program, mode, question="q")).out == "question"
    pred.signature = pred.signature.prepend("context", dspy.InputField(), type_=str)
    for _ in range(2):
        assert (await call(program, mode, question="q")).out == "context|question"
        assert lm.log[-1][1] == {"context": "ctx", "question": "q"}


@pytest.mark.parametrize("depth", [1, 2])
async def test_a_change_an_earlier_stage_makes_before_a_nested_pipeline_runs(
    mode: str, lm: Any, depth: int
) -> None:
    # Reproducer: once the nested pipeline ran in line, a stage of the same call that replaced a
    # nested predictor's signature was not seen: ContractError "needs input 'context'".
    pred = dspy.Predict("question -> answer")

    def source(question: str) -> dict[str, Any]:
        if question == "grow" and "context" not in pred.signature.input_fields:
            pred.signature = pred.signature.prepend("context", dspy.InputField(), type_=str)
        return {"context": "ctx"}

    nested: Any = pred
    for _ in range(depth):
        nested = SequentialPipeline([nested])
    program = SequentialPipeline([stage(source, writes=["context"]), nested])
    for _ in range(2):  # (in line from the second call)
        assert (await call(program, mode, question="q")).answer == "question"
    for _ in range(2):
        assert (await call(program, mode, question="grow")).answer == "context|question"


def _router_pipeline(where: str) -> tuple[Any, Any, Any]:
    """(pipeline, the predictor whose signature is replaced, its LM) for a predictor a pattern keeps
    outside its stage containers: a branching router or default stage, an adaptive selector."""
    if where == "router":
        pred = dspy.Predict("question -> branch")
        pipe = stageflow.BranchingPipeline(pred, {"math": dspy.Predict("question -> answer")})
        return pipe, pred, FakeLM({"branch": "math", "answer": lambda i: "|".join(sorted(i))})
    if where == "default":
        pred = dspy.Predict("question -> answer")
        router = dspy.Predict("question -> branch")
        pipe = stageflow.BranchingPipeline(router, {"math": dspy.Predict("question -> answer")}, default=pred)
        return pipe, pred, FakeLM({"branch": "unknown", "answer": lambda i: "|".join(sorted(i))})
    pred = dspy.Predict("question -> structure")
    pipe = stageflow.AdaptivePipeline(
        {"qa": dspy.Predict("question -> answer")}, pred, structures={"s": ["qa"]}
    )
    return pipe, pred, FakeLM({"structure": "s", "answer": lambda i: "|".join(sorted(i))})


@pytest.mark.parametrize("where", ["router", "default", "adaptive selector"])
async def test_a_predictor_kept_outside_the_stage_containers_gets_its_new_fields(
    mode: str, where: str
) -> None:
    from stageflow.patterns._containers import _STRUCTURE_VERSION

    pipe, pred, fake = _router_pipeline(where)
    with dspy.context(lm=fake):
        await call(pipe, mode, question="q")
        pred.signature = pred.signature.prepend("topic", dspy.InputField())
        with pytest.raises(ContractError, match="topic"):
            await call(pipe, mode, question="q")
        before = len(fake.log)
        await call(pipe, mode, question="q", topic="t")
        fed = [inputs for _, inputs, *_ in fake.log[before:]]
        assert any(inputs == {"topic": "t", "question": "q"} for inputs in fed)
        version = _STRUCTURE_VERSION[0]
        await call(pipe, mode, question="q", topic="t")
        assert _STRUCTURE_VERSION[0] == version  # the plan was made once, not again on every call


async def test_a_function_put_where_a_predictor_was_runs_as_a_function(mode: str) -> None:
    """What a lazy stage wraps, or a ForEach's stage, replaced by a function stage after a first call:
    the plan is made again for the function (it was an AttributeError from the signature check)."""
    from stageflow.policies.lazy import LazyStage

    lazy = LazyStage(dspy.Predict("question -> answer"))
    pipe = SequentialPipeline([lazy])
    each = stageflow.ForEach(dspy.Predict("item -> out"), over="things", item="item")
    with dspy.context(lm=FakeLM({"answer": "from the model", "out": "from the model"})):
        assert (await call(pipe, mode, question="q")).answer == "from the model"
        assert (await call(each, mode, things=["a"])).outs == ["from the model"]
        lazy.underlying_stage = stage(lambda question: {"answer": "from the function"}, writes=["answer"])
        each.stage = stage(lambda item: {"out": item.upper()}, writes=["out"])
        for _ in range(2):
            assert (await call(pipe, mode, question="q")).answer == "from the function"
            assert (await call(each, mode, things=["a"])).outs == ["A"]


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_check_sees_a_signature_replaced_in_place_since_its_last_check(nested: bool) -> None:
    pred = dspy.Predict("question -> answer")
    pipe = SequentialPipeline([SequentialPipeline([pred])] if nested else [pred])
    assert pipe.check(["question"]) == ("answer", "question")
    pred.signature = dspy.Signature("context, question -> reply")
    with pytest.raises(ContractError, match="context"):
        pipe.check(["question"])
    assert pipe.check(["context", "question"]) == ("context", "question", "reply")


async def test_a_field_type_changed_in_place_is_checked_again(mode: str) -> None:
    """``answer: str`` -> ``answer: list[str]`` keeps the field names; the wiring check still sees
    that the next stage takes one string (a freshly built pipeline is refused the same way)."""

    def count_chars(answer: str) -> dict[str, int]:
        return {"n": len(answer)}

    pred = dspy.Predict("question -> answer")
    pipe = SequentialPipeline([pred, stage(count_chars, writes=["n"])])
    with dspy.context(lm=FakeLM({"answer": "hello"})):
        assert (await call(pipe, mode, question="q")).n == 5
    pred.signature = dspy.Signature("question -> answer: list[str]")
    with dspy.context(lm=FakeLM({"answer": ["alpha", "beta"]})), pytest.raises(ContractError, match="list"):
        await call(pipe, mode, question="q")


async def test_a_foreach_collect_that_no_longer_fits_the_stage_is_refused_as_at_construction(
    mode: str,
) -> None:
    """``ForEach(pred, collect="facts")`` of a one-output predictor collects that output; when the
    predictor gains a second output in place, ``collect="facts"`` is as ambiguous as it would be at
    construction: a ConfigurationError, not a silently dropped output."""
    inner = dspy.Predict("sub_question -> fact")
    each = stageflow.ForEach(inner, over="sub_questions", collect="facts")
    with dspy.context(lm=FakeLM({"fact": "F", "confidence": 0.5})):
        assert (await call(each, mode, sub_questions=["a"])).facts == ["F"]
        inner.signature = inner.signature.append("confidence", dspy.OutputField(), type_=float)
        with pytest.raises(ConfigurationError, match="collect='facts'"):
            await call(each, mode, sub_questions=["a"])


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_signature_kept_behind_a_property_is_watched_too(mode: str) -> None:
    """(In a fresh interpreter: a test's ``dspy.Predict`` subclass left alive would be found by
    instrumentation that walks ``dspy.Predict.__subclasses__()`` in later tests, OpenInference's.)"""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import asyncio, dspy, stageflow
        from stageflow import ContractError, SequentialPipeline
        from stageflow.testing import FakeLM, call

        class PropertyPredict(dspy.Predict):
            @property
            def signature(self):
                return self._sig

            @signature.setter
            def signature(self, value):
                object.__setattr__(self, "_sig", value)

        async def main():
            pred = PropertyPredict("question -> answer")
            pipe = SequentialPipeline([pred])
            with dspy.context(lm=FakeLM({{"answer": lambda inputs: "|".join(sorted(inputs))}})):
                print((await call(pipe, {mode!r}, question="q")).answer)
                pred.signature = pred.signature.prepend("context", dspy.InputField())
                try:
                    await call(pipe, {mode!r}, question="q")
                except ContractError as e:
                    print("ContractError", e.field)
                print((await call(pipe, {mode!r}, question="q", context="c")).answer)

        asyncio.run(main())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["question", "ContractError", "context", "context|question"], out.stderr
