"""Usage per stage where DSPy's own accounting takes unusual turns: history off, a
``dspy.track_usage()`` opened inside a stage, token counts of unusual number types."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import dspy
import numpy as np
import pytest
from usage_kit import quiet_legacy_lm

import stageflow
from stageflow.testing import FakeLM, call
from stageflow.usage import _SHARED_TRACKER

HISTORY_OFF = [{"disable_history": True}, {"max_history_size": 0}]


def _cached_lm(**kwargs: Any) -> FakeLM:
    dspy.configure_cache(enable_memory_cache=True, enable_disk_cache=False)
    return FakeLM({"answer": "a"}, cache=True, model=f"fake/{uuid.uuid4().hex[:8]}", **kwargs)


@pytest.mark.parametrize("off", HISTORY_OFF, ids=["disable_history", "max_history_size_0"])
async def test_cost_and_lm_cache_hits_are_counted_with_dspy_history_off(
    mode: str, off: dict[str, Any]
) -> None:
    lm = _cached_lm(usage=(100, 20), cost=0.25)
    program = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=lm, **off):
        first = (await call(program, mode, question="q")).run.usage
        again = (await call(program, mode, question="q")).run.usage
    assert lm.calls == 1
    billed = first["stages[0]"]
    assert (billed.lm_calls, billed.input_tokens, billed.output_tokens) == (1, 100, 20)
    assert billed.cost == pytest.approx(0.25)
    assert billed.lm_cache_hits == 0
    hit = again["stages[0]"]
    assert (hit.lm_calls, hit.lm_cache_hits, hit.input_tokens) == (0, 1, 0)


async def test_a_call_with_history_off_does_not_make_the_next_cache_hit_look_billed(mode: str) -> None:
    lm = _cached_lm()
    program = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=lm, disable_history=True):
        await call(program, mode, question="first")  # billed, DSPy records no history entry
    with dspy.context(lm=lm):
        hit = (await call(program, mode, question="first")).run.usage.total
    assert (hit.lm_calls, hit.lm_cache_hits) == (0, 1)


class _TracksItsOwnUsage(dspy.Module):
    """A module that opens ``dspy.track_usage()`` around its own predictor (to log its tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.p = dspy.Predict("question -> answer")
        self.seen: list[dict[str, Any]] = []

    def forward(self, question: str) -> dspy.Prediction:
        with dspy.track_usage() as tracker:
            out = self.p(question=question)
        self.seen.append(tracker.get_total_tokens())
        return dspy.Prediction(answer=out.answer)


def test_dspy_track_usage_inside_a_stage_counts_for_that_stage_and_for_an_outer_tracker() -> None:
    lm = FakeLM({"answer": "a"}, usage=(10, 5), cost=0.2)
    module = _TracksItsOwnUsage()
    program = stageflow.SequentialPipeline([stageflow.Stage(module, writes=["answer"])])
    with dspy.context(lm=lm):
        for i in range(3):
            used = program(question=f"q{i}").run.usage["stages[0]"]
            assert (used.lm_calls, used.input_tokens, used.output_tokens) == (1, 10, 5)
            assert used.cost == pytest.approx(0.2)
            assert used.lm_cache_hits == 0  # a billed call, not a cache hit
        with dspy.track_usage() as outer:
            program(question="x")
    assert outer.get_total_tokens()[lm.model]["prompt_tokens"] == 10
    assert module.seen[-1][lm.model]["prompt_tokens"] == 10  # the module's own tracker still sees it
    shared = _SHARED_TRACKER[0]
    assert shared is not None
    assert sum(len(v) for v in shared.usage_data.values()) == 0  # nothing kept, call after call


class _ReportsUsage(dspy.BaseLM):  # type: ignore[misc]
    """An OpenAI-shaped LM that reports exactly the usage dict it is given."""

    def __init__(self, usage: dict[str, Any]) -> None:
        super().__init__("legacy/usage", "chat", 0.0, 1000, cache=False)
        self.usage_dict = usage

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        text = "[[ ## answer ## ]]\nok\n\n[[ ## completed ## ]]"
        message = SimpleNamespace(content=text, tool_calls=None, reasoning_content=None)
        choice = SimpleNamespace(message=message, finish_reason="stop", text=None)
        return SimpleNamespace(
            choices=[choice], usage=self.usage_dict, model="legacy/usage", _hidden_params={}
        )

    async def aforward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        return self.forward(prompt, messages, **kwargs)


@pytest.mark.parametrize(
    ("reported", "expected"),
    [
        ({"prompt_tokens": np.int64(7), "completion_tokens": np.int64(3)}, (7, 3)),
        ({"prompt_tokens": float("inf"), "completion_tokens": 2}, (0, 2)),
        ({"prompt_tokens": float("nan"), "completion_tokens": 2}, (0, 2)),
        ({"prompt_tokens": 7.0, "completion_tokens": "3"}, (7, 0)),
    ],
    ids=["numpy", "inf", "nan", "float-and-string"],
)
async def test_token_counts_of_any_number_type_never_fail_the_stage(
    mode: str, reported: dict[str, Any], expected: tuple[int, int]
) -> None:
    program = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    with quiet_legacy_lm(), dspy.context(lm=_ReportsUsage(reported)):
        result = await call(program, mode, question="q")
    assert result.answer == "ok"
    used = result.run.usage.total
    assert (used.lm_calls, used.input_tokens, used.output_tokens) == (1, *expected)


class _TracksWithoutUsage(dspy.Module):
    def __init__(self, history_off: bool = False) -> None:
        super().__init__()
        self.p = dspy.Predict("question -> answer")
        self.history_off = history_off

    def forward(self, question: str) -> Any:
        if self.history_off:  # history turned off by the stage's own code only
            with dspy.context(disable_history=True):
                return self.p(question=question)
        with dspy.track_usage():
            return self.p(question=question)


def test_a_billed_call_of_a_model_reporting_no_tokens_counts_under_a_stages_own_tracker() -> None:
    lm = FakeLM({"answer": "ok"}, usage=None, cost=0.2)
    program = stageflow.SequentialPipeline([_TracksWithoutUsage()])
    with dspy.context(lm=lm):
        used = program(question="q").run.usage.total
    assert lm.calls == 1
    assert (used.lm_calls, used.lm_cache_hits) == (1, 0)
    assert used.cost == pytest.approx(0.2)


async def test_history_turned_off_inside_a_stage_still_counts_cost_and_cache_hits(mode: str) -> None:
    lm = _cached_lm(usage=(10, 5), cost=0.2)
    program = stageflow.SequentialPipeline([_TracksWithoutUsage(history_off=True)])
    with dspy.context(lm=lm):
        billed = (await call(program, mode, question="q")).run.usage.total
        hit = (await call(program, mode, question="q")).run.usage.total
    assert (billed.lm_calls, billed.input_tokens, billed.lm_cache_hits) == (1, 10, 0)
    assert billed.cost == pytest.approx(0.2)
    assert (hit.lm_calls, hit.lm_cache_hits, hit.cost) == (0, 1, None)


class _FlakyEngine:
    """A canonical DSPy engine (``complete(request) -> Response``) whose call number ``fail_at``
    raises."""

    def __init__(self) -> None:
        self.calls, self.fail_at = 0, -1

    def complete(self, request: Any) -> Any:
        from dspy.lm15 import Message, Response, Usage

        self.calls += 1
        if self.calls == self.fail_at:
            raise ValueError("the engine failed")
        text = "[[ ## answer ## ]]\nok\n\n[[ ## completed ## ]]"
        usage = Usage(input_tokens=10, output_tokens=5, total_tokens=15)
        return Response(
            id=None, model="fake/lm", message=Message.assistant(text), finish_reason="stop", usage=usage
        )

    def close(self) -> None:
        return None


def test_a_call_that_failed_after_billing_part_does_not_make_the_next_cache_hit_look_billed() -> None:
    """``n=2`` whose second candidate fails: DSPy reports the first candidate's usage to the usage
    tracker and records no history entry; the next answer from DSPy's cache is still a cache hit."""
    dspy.configure_cache(enable_memory_cache=True, enable_disk_cache=False)
    engine = _FlakyEngine()
    lm = dspy.LM(f"fake/{uuid.uuid4().hex[:8]}", engine=engine, cache=True, num_retries=0)
    one = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    two = stageflow.SequentialPipeline([dspy.Predict("question -> answer", n=2)])
    with dspy.context(lm=lm):
        one(question="cached")
        engine.fail_at = engine.calls + 2
        with pytest.raises(stageflow.StageError):
            two(question="fails")
        hit = one(question="cached").run.usage.total
    assert (hit.lm_calls, hit.lm_cache_hits, hit.cost) == (0, 1, None)


async def test_an_lm_that_keeps_no_history_still_gets_its_calls_cost_and_cache_hits_counted(
    mode: str,
) -> None:
    class Forgetful(FakeLM):  # type: ignore[misc]
        def update_history(self, entry: Any) -> None:
            return None  # (DSPy's caller_modules never get the entry)

    dspy.configure_cache(enable_memory_cache=True, enable_disk_cache=False)
    lm = Forgetful({"answer": "a"}, usage=(10, 5), cost=0.2, cache=True, model=f"fake/{uuid.uuid4().hex[:8]}")
    program = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=lm):
        billed = (await call(program, mode, question="q")).run.usage.total
        hit = (await call(program, mode, question="q")).run.usage.total
    assert (billed.lm_calls, billed.input_tokens, billed.lm_cache_hits) == (1, 10, 0)
    assert billed.cost == pytest.approx(0.2)
    assert (hit.lm_calls, hit.lm_cache_hits) == (0, 1)


class _OwnTracker(dspy.Module):
    """A stage whose own code puts another tracker in DSPy's slot around its LM work."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.p = dspy.Predict("question -> answer")
        self.inner = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
        self.how = how
        self.mine: Any = None

    def forward(self, question: str) -> Any:
        if self.how == "context":
            from dspy.utils.usage_tracker import UsageTracker

            self.mine = UsageTracker()
            with dspy.context(usage_tracker=self.mine):
                return self.p(question=question)
        with dspy.track_usage() as self.mine:
            if self.how == "parallel":
                runs = dspy.Parallel(num_threads=3, disable_progress_bar=True)
                outs = runs([(self.p, {"question": f"{question} {i}"}) for i in range(3)])
                return dspy.Prediction(answer=outs[0].answer)
            return dspy.Prediction(answer=self.inner(question=question).answer)


@pytest.mark.parametrize(("how", "calls"), [("context", 1), ("parallel", 3), ("nested pipeline", 1)])
def test_tokens_count_when_a_stage_puts_its_own_tracker_in_dspys_slot(how: str, calls: int) -> None:
    lm = FakeLM({"answer": "a"}, usage=(10, 5), cost=0.2)
    module = _OwnTracker(how)
    program = stageflow.SequentialPipeline([stageflow.Stage(module, writes=["answer"])])
    with dspy.context(lm=lm), dspy.track_usage() as outer:
        used = program(question="q").run.usage.total
    assert lm.calls == calls
    assert (used.lm_calls, used.input_tokens, used.output_tokens) == (calls, 10 * calls, 5 * calls)
    assert used.cost == pytest.approx(0.2 * calls)
    if how != "parallel":  # (DSPy never merges dspy.Parallel's per-thread tracker copies back)
        assert module.mine.get_total_tokens()[lm.model]["prompt_tokens"] == 10 * calls
    if how == "nested pipeline":
        assert outer.get_total_tokens()[lm.model]["prompt_tokens"] == 10


class _OwnCall(dspy.BaseLM):  # type: ignore[misc]
    """An LM with its own ``__call__`` (it does not go through DSPy's execute) that records the call
    through DSPy's ``_record_response``: 7 / 3 tokens, cost 0.1."""

    def __init__(self) -> None:
        super().__init__("own/lm", "chat", 0.0, 1000, cache=False)

    def __call__(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        response = SimpleNamespace(
            choices=[],
            usage={"prompt_tokens": 7, "completion_tokens": 3},
            model="own/lm",
            _hidden_params={"response_cost": 0.1},
        )
        return self._record_response(response, prompt, messages, ["x"], kwargs)


@pytest.mark.parametrize("before", ["lm.forward", "cache hit with history off"])
def test_a_call_outside_dspys_execute_counts_whatever_came_before_it(before: str) -> None:
    """A call DSPy's execute ran without DSPy reporting it (``lm.forward(...)``; a cache hit with
    history off) must not make the next call of an LM with its own ``__call__`` go uncounted."""
    lm = _cached_lm(usage=(10, 5), cost=0.2)
    own = _OwnCall()

    def direct(question: str) -> dict[str, str]:
        if before == "lm.forward":
            lm.forward(prompt=f"hi {question}")  # billed 10 / 5, cost 0.2 (DSPy reports nothing)
        else:
            with dspy.context(disable_history=True):
                dspy.Predict("question -> answer")(question="cached")
        own("hello")
        return {"answer": "x"}

    program = stageflow.SequentialPipeline([stageflow.stage(direct, writes=["answer"])])
    with dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question="cached")  # (fills DSPy's cache)
        used = program(question="q").run.usage.total
    if before == "lm.forward":
        assert (used.lm_calls, used.input_tokens, used.output_tokens) == (2, 17, 8)
        assert used.cost == pytest.approx(0.3)
    else:
        assert (used.lm_calls, used.input_tokens, used.output_tokens, used.lm_cache_hits) == (1, 7, 3, 1)
