"""What a nested pipeline remembers about running in line (``stageflow.engine.inline``'s tickets) is
dropped whenever it could stop holding: an attribute of the pipeline set or deleted, its class
changed, the global strictness changed, the pipeline copied; DSPy callbacks entered inside a stage
are seen by the pipelines nested below it. Every scenario runs sync and async."""

from __future__ import annotations

import contextlib
import copy
import pickle
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import ContractError, SequentialPipeline, stage
from stageflow.engine import inline, runner
from stageflow.fingerprinting import fingerprint
from stageflow.testing import call


class _Spy:
    """Records, per nested call, whether it ran in line."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.inline: list[bool] = []
        real = runner.begin_inline

        def spy(*args: Any) -> Any:
            started = real(*args)
            self.inline.append(started is not None)
            return started

        monkeypatch.setattr(runner, "begin_inline", spy)


def _add_one(x: int) -> dict[str, int]:
    return {"x": x + 1}


def _times_ten(x: int) -> dict[str, int]:
    return {"x": x * 10}


def _pair() -> tuple[SequentialPipeline, SequentialPipeline]:
    inner = SequentialPipeline([stage(_add_one, writes=["x"])])
    return inner, SequentialPipeline([inner])


async def _warm(outer: Any, mode: str) -> None:
    for _ in range(2):  # the first call checks the contracts, the second runs in line
        assert (await call(outer, mode, x=1)).x == 2


async def test_a_warm_nested_pipeline_runs_in_line(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, outer = _pair()
    await _warm(outer, mode)
    spy = _Spy(monkeypatch)
    assert (await call(outer, mode, x=5)).x == 6
    assert spy.inline == [True]


async def test_a_budget_set_later_is_enforced(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    inner, outer = _pair()
    await _warm(outer, mode)
    inner.set_budget(stageflow.LMBudget(max_calls=5))
    spy = _Spy(monkeypatch)
    assert (await call(outer, mode, x=1)).x == 2  # (no LM call: the budget allows it)
    assert spy.inline == [False]


async def test_attributes_that_opt_out_are_seen_on_the_next_call(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner, outer = _pair()
    await _warm(outer, mode)
    seen: list[str] = []

    class Listener(dspy.utils.callback.BaseCallback):  # type: ignore[misc]
        def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            seen.append(type(instance).__name__)

    inner.callbacks = [Listener()]
    spy = _Spy(monkeypatch)
    assert (await call(outer, mode, x=1)).x == 2
    assert spy.inline == [False]
    assert seen == ["SequentialPipeline"]  # DSPy's own __call__ ran for the nested pipeline
    del inner.callbacks
    assert (await call(outer, mode, x=1)).x == 2  # deleting an attribute drops the memo too
    assert (await call(outer, mode, x=1)).x == 2
    assert spy.inline[-1] is True


async def test_strictness_changed_later_is_checked(mode: str) -> None:
    inner = SequentialPipeline(
        [stage(lambda x: {"y": x}), stage(lambda y: {"z": y}, writes=["z"])]  # y: only at run time
    )
    outer = SequentialPipeline([inner])
    for _ in range(2):
        assert (await call(outer, mode, x=1)).z == 1
    inner.strict = True
    with pytest.raises(ContractError):
        await call(outer, mode, x=1)
    inner.strict = None
    assert (await call(outer, mode, x=1)).z == 1
    stageflow.configure(strict=True)
    try:
        with pytest.raises(ContractError):
            await call(outer, mode, x=1)
    finally:
        stageflow.configure(strict=False)
    assert (await call(outer, mode, x=1)).z == 1


async def test_copies_start_without_the_memo(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    inner, outer = _pair()
    await _warm(outer, mode)
    memos = [k for k in vars(inner) if k in inline.INLINE_MEMOS]
    assert memos  # the warm pipeline keeps one
    for twin in (copy.deepcopy(outer), pickle.loads(pickle.dumps(outer))):
        twin_inner = twin.stages[0]
        twin_inner.stages[0] = stage(_times_ten, writes=["x"])
        assert (await call(twin, mode, x=3)).x == 30
        assert (await call(twin, mode, x=3)).x == 30
    assert (await call(outer, mode, x=3)).x == 4


async def test_callbacks_entered_inside_a_stage_reach_nested_pipelines(mode: str) -> None:
    seen: list[str] = []

    class Listener(dspy.utils.callback.BaseCallback):  # type: ignore[misc]
        def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            seen.append(type(instance).__name__)

    deep = SequentialPipeline([SequentialPipeline([stage(lambda x: {"x": x + 1}, writes=["x"])])])

    def with_callbacks(x: int) -> dict[str, int]:
        with dspy.context(callbacks=[Listener()]):
            return {"x": deep(x=x).x}

    outer = SequentialPipeline([SequentialPipeline([stage(with_callbacks, writes=["x"])])])
    for _ in range(3):
        seen.clear()
        assert (await call(outer, mode, x=1)).x == 2
        assert seen == ["SequentialPipeline", "SequentialPipeline"]  # deep, and the one inside it


def test_the_fingerprint_of_a_pipeline_does_not_change_when_it_runs() -> None:
    class Mine(SequentialPipeline):  # a class of the user's own: its private attributes count
        pass

    inner = Mine([stage(lambda x: {"y": x + 1}, writes=["y"])])
    outer = SequentialPipeline([inner])
    before = fingerprint(inner), fingerprint(outer)
    for x in range(3):
        outer(x=x)
    assert (fingerprint(inner), fingerprint(outer)) == before
    inner.tag = "changed"  # what the user sets still counts
    assert fingerprint(inner) != before[0]


class _Extract(dspy.Module):
    def forward(self, text: str) -> dspy.Prediction:
        return dspy.Prediction(title=text.title())


class _Shout(dspy.Module):
    def forward(self, title: str) -> dspy.Prediction:
        return dspy.Prediction(loud=title.upper())


async def test_a_nested_pipeline_that_sets_strict_false_keeps_it_under_strict_contracts(mode: str) -> None:
    """``configure(strict=True)`` applies to every pipeline that does not set its own: an inner
    ``strict=False`` pipeline with undeclared outputs ran alone but was refused once nested."""
    stageflow.configure(strict=True)
    try:
        inner = SequentialPipeline([_Extract(), _Shout()], strict=False)
        assert (await call(inner, mode, text="hi")).loud == "HI"
        outer = SequentialPipeline([inner])
        for _ in range(2):
            assert (await call(outer, mode, text="hi")).loud == "HI"
        reader = SequentialPipeline([inner, stage(lambda loud: {"n": len(loud)}, writes=["n"])])
        with pytest.raises(ContractError) as info:  # the outer pipeline is strict: its own read is refused
            await call(reader, mode, text="hi")
        assert info.value.field == "loud"
    finally:
        stageflow.configure(strict=False)


async def test_deleting_strict_goes_back_to_the_default(mode: str) -> None:
    inner = SequentialPipeline([_Extract(), _Shout()], strict=True)
    outer = SequentialPipeline([inner])
    with pytest.raises(ContractError):
        await call(outer, mode, text="hi")
    del inner.strict
    for _ in range(2):
        assert (await call(outer, mode, text="hi")).loud == "HI"


# -- findings of the adversarial check (each reproducer, as a test) -----------------------------


def _three_deep(leaf: Any) -> tuple[SequentialPipeline, SequentialPipeline]:
    inner = SequentialPipeline([leaf])
    return inner, SequentialPipeline([SequentialPipeline([inner])])


async def test_a_callback_added_in_place_to_a_nested_pipeline_fires(mode: str) -> None:
    seen: list[str] = []

    class Listener(dspy.utils.callback.BaseCallback):  # type: ignore[misc]
        def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            seen.append(type(instance).__name__)

    inner, outer = _three_deep(stage(_add_one, writes=["x"]))
    for _ in range(2):
        await call(outer, mode, x=1)
    inner.callbacks.append(Listener())  # (no attribute set: the list grows in place)
    assert (await call(outer, mode, x=1)).x == 2
    assert seen == ["SequentialPipeline"]


async def test_a_global_callback_added_in_place_mid_run_hears_the_pipelines_after_it(mode: str) -> None:
    seen: list[str] = []

    class Listener(dspy.utils.callback.BaseCallback):  # type: ignore[misc]
        def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            seen.append(type(instance).__name__)

    listener = Listener()

    def enable_tracing(x: int) -> dict[str, int]:
        dspy.settings.callbacks.append(listener)  # (the global list grows in place, mid-run)
        return {"m": x}

    # A chain of nested pipelines run in line after the stage that adds the callback.
    outer = SequentialPipeline(
        [
            SequentialPipeline(
                [
                    stage(enable_tracing, writes=["m"]),
                    SequentialPipeline([_three_deep(stage(_add_one, writes=["x"]))[1]]),
                ]
            )
        ]
    )
    with dspy.context(callbacks=[]):
        for _ in range(2):
            await call(outer, mode, x=1)
            dspy.settings.callbacks.clear()
        seen.clear()
        assert (await call(outer, mode, x=1)).x == 2
        dspy.settings.callbacks.clear()
    assert seen == ["SequentialPipeline"] * 4


async def test_an_aforward_set_on_a_nested_pipeline_is_awaited(mode: str) -> None:
    inner, outer = _three_deep(stage(_add_one, writes=["x"]))

    async def ten_more(**kw: Any) -> Any:
        return await SequentialPipeline.aforward(inner, x=kw["x"] + 10)

    inner.aforward = ten_more
    for _ in range(3):
        assert (await call(outer, mode, x=1)).x == (12 if mode == "async" else 2)


async def test_protocol_methods_patched_on_the_instance_are_called(mode: str) -> None:
    from unittest import mock

    inner, outer = _three_deep(stage(_add_one, writes=["x"]))
    for _ in range(2):
        await call(outer, mode, x=1)

    def audited(self: Any, state: dict[str, Any], run: Any, hooks: Any = ()) -> stageflow.Result:
        return stageflow.Result({**state, "audited": 1}, run)

    with mock.patch.object(inner, "stageflow_result", audited.__get__(inner)):
        for _ in range(2):
            assert (await call(outer, mode, x=1)).audited == 1
    assert "audited" not in await call(outer, mode, x=1)


async def test_a_state_restored_with_setstate_is_seen(mode: str) -> None:
    inner, outer = _three_deep(dspy.Predict("q -> a"))
    with dspy.context(lm=stageflow.testing.FakeLM({"a": "A"})):
        for _ in range(2):
            assert (await call(outer, mode, q="x")).a == "A"
        limited = copy.deepcopy(inner)
        limited.set_budget(stageflow.LMBudget(max_calls=0))
        inner.__setstate__(limited.__getstate__())  # (DSPy's load path: no attribute set one by one)
        with pytest.raises(stageflow.BudgetExceeded):
            await call(outer, mode, q="x")


def test_a_memo_issued_while_another_thread_changes_the_pipeline_is_not_kept() -> None:
    import sys
    import threading

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    lost = 0
    old_lm = dspy.settings.lm
    dspy.configure(lm=stageflow.testing.FakeLM({"a": "A"}))  # (seen by every thread)
    try:
        if True:
            for _ in range(60):
                inner, outer = _three_deep(dspy.Predict("q -> a"))
                outer(q="x")
                outer(q="x")
                stop = threading.Event()

                def calls(outer: Any = outer, stop: threading.Event = stop) -> None:
                    while not stop.is_set():
                        with contextlib.suppress(stageflow.BudgetExceeded):
                            outer(q="x")

                def change(inner: Any = inner, stop: threading.Event = stop) -> None:
                    for i in range(30):
                        inner.tag = i
                    inner.set_budget(stageflow.LMBudget(max_calls=0))
                    stop.set()

                threads = [threading.Thread(target=calls) for _ in range(3)]
                threads.append(threading.Thread(target=change))
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                try:
                    outer(q="x")
                    lost += 1
                except stageflow.BudgetExceeded:
                    pass
    finally:
        sys.setswitchinterval(switch)
        dspy.configure(lm=old_lm)
    assert lost == 0


def test_a_pipeline_changed_then_pickled_runs_its_change_in_a_process_where_versions_match() -> None:
    inner = SequentialPipeline([stage(_add_one, writes=["x"])])
    outer = SequentialPipeline([inner])
    inner.stages.append(stage(_times_ten, writes=["x"]))
    data = pickle.dumps(outer)
    copy_ = pickle.loads(data)
    # What the pickled bookkeeping says matches this process: only a reset catches the change.
    assert vars(copy_.stages[0])["_seen_structure"] == -1
    assert copy_(x=1).x == 20


def test_defaults_and_grouping_are_part_of_the_fingerprint() -> None:
    def flaky(q: str) -> dict[str, str]:
        raise TimeoutError("down")

    fps = []
    for default in ("unknown", "N/A"):
        p = SequentialPipeline([stage(flaky, writes=["answer"])])
        p.set_defaults(fallback=stageflow.Fallback(default={"answer": default}))
        fps.append(fingerprint(p))
    assert fps[0] != fps[1]
    a = stage(lambda q: {"a": q + "A"}, writes=["a"])
    b = stage(lambda q: {"a": q + "B"}, writes=["a"])
    merger = stageflow.ResultMerger(strategies={"a": "list"})
    together = stageflow.ParallelPipeline([[a, b]], merger=merger)
    apart = stageflow.ParallelPipeline([[a], [b]], merger=merger)
    assert fingerprint(together) != fingerprint(apart)
    assert dict(together(q="x")) != dict(apart(q="x"))  # (they do differ)


async def test_a_forward_or_budget_written_into_dict_directly_is_seen(mode: str) -> None:
    inner, outer = _three_deep(stage(_add_one, writes=["x"]))
    for _ in range(2):
        await call(outer, mode, x=1)
    vars(inner)["forward"] = lambda **kw: dspy.Prediction(x=100)  # (no attribute set)
    assert (await call(outer, mode, x=1)).x == 100
    del vars(inner)["forward"]
    with dspy.context(lm=stageflow.testing.FakeLM({"a": "A"})):
        inner2, outer2 = _three_deep(dspy.Predict("q -> a"))
        for _ in range(2):
            await call(outer2, mode, q="x")
        vars(inner2)["lm_budget"] = stageflow.LMBudget(max_calls=0)
        with pytest.raises(stageflow.BudgetExceeded):
            await call(outer2, mode, q="x")


@pytest.mark.parametrize("change", ["replace", "append"])
async def test_a_grown_nested_pipeline_names_its_inner_stage_in_errors(mode: str, change: str) -> None:
    def draft(question: str) -> dict[str, str]:
        return {"draft": question}

    def answer(context: str, draft: str) -> dict[str, str]:
        return {"answer": context + draft}

    inner = SequentialPipeline([stage(draft, writes=["draft"]), stage(draft, writes=["draft"])])
    outer = SequentialPipeline([inner])
    await call(outer, mode, question="q")
    if change == "replace":
        inner.stages[1] = stage(answer, writes=["answer"])
    else:
        inner.stages.append(stage(answer, writes=["answer"]))
    where = "stages[0].stages[1]" if change == "replace" else "stages[0].stages[2]"
    with pytest.raises(ContractError) as info:
        await call(outer, mode, question="q")
    assert f"(for its stage '{where}')" in info.value.message
    assert info.value.field == "context"
