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
