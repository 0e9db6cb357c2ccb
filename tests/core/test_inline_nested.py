"""Nested pipelines run in line (``stageflow.engine.inline``): nothing observable changes.

Each scenario runs twice on fresh pipelines — once as the engine runs it, once with the in-line path
switched off (every nested pipeline called through the layered path) — three calls each (the first
call of a nested pipeline checks its contracts and takes the layered path; later ones run in line),
and everything a caller can observe is compared: result fields, trace paths and order, stage
outputs (nested results included), details, events, usage per stage path, DSPy history and the
``caller_modules`` an LM call sees, errors with their paths and carried runs. Every scenario runs
sync and async (the ``mode`` fixture).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import ContractError, ParallelPipeline, SequentialPipeline, Stage, StageflowError, stage
from stageflow.engine import inline, runner
from stageflow.state import Result, RunInfo
from stageflow.testing import FakeLM, call

CALLS = 3


def _plain(value: Any) -> Any:
    """``value`` with what differs between two equal runs left out: wall times, and exceptions
    (compared by identity) given as their type and message."""
    if isinstance(value, BaseException):
        return (type(value).__name__, str(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "elapsed"}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _describe_run(run: RunInfo) -> dict[str, Any]:
    return {
        "trace": [(r.path, r.ok) for r in run.trace],
        "outputs": {k: _describe_output(v) for k, v in run.stage_outputs.items()},
        "details": _plain(run.details),
        "extras": _plain(run.extras),
        "events": [(e.stage, e.kind, e.error) for e in run.events],
        "usage": run.usage.to_dict(),
        "total": run.usage.total.to_dict(),
    }


def _describe_output(out: Any) -> Any:
    if isinstance(out, Result):
        return {"fields": dict(out), "run": _describe_run(out.run)}
    if isinstance(out, dspy.Prediction):
        return dict(out)
    return out


def _describe(result: Result) -> dict[str, Any]:
    return {"fields": dict(result), "run": _describe_run(result.run), "details": _plain(result.details)}


def _describe_error(error: BaseException) -> dict[str, Any]:
    described: dict[str, Any] = {"type": type(error).__name__, "message": str(error)}
    if isinstance(error, StageflowError):
        described["path"] = error.stage_path
        described["field"] = error.field
        described["events"] = [(e.stage, e.kind, e.error) for e in error.events]
        described["run"] = _describe_run(error.run) if error.run is not None else None
    described["cause"] = repr(error.__cause__)
    return described


async def _observe(build: Callable[[], Any], mode: str, inputs: dict[str, Any]) -> list[Any]:
    """What ``CALLS`` calls of a freshly built program show (results or errors, and extra records
    the scenario keeps: ``build`` returns the program and a function giving those records)."""
    program, records = build()
    seen: list[Any] = []
    for _ in range(CALLS):
        try:
            result = await call(program, mode, **inputs)
        except Exception as e:
            seen.append(_describe_error(e))
        else:
            seen.append(_describe(result))
    seen.append(records())
    return seen


def _layered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "begin_inline", lambda *args: None)


class _Spy:
    """Counts the nested calls that ran in line."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = runner.begin_inline

        def spy(*args: Any) -> Any:
            started = real(*args)
            self.count += started is not None
            return started

        monkeypatch.setattr(runner, "begin_inline", spy)


async def _same_either_way(
    build: Callable[[], Any],
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
    expect_inline: bool = True,
    **inputs: Any,
) -> list[Any]:
    spy = _Spy(monkeypatch)
    fast = await _observe(build, mode, inputs)
    assert (spy.count > 0) == expect_inline
    with monkeypatch.context() as m:
        _layered(m)
        slow = await _observe(build, mode, inputs)
    assert fast == slow
    return fast


def _chain(depth: int, leaf: Any) -> SequentialPipeline:
    """``leaf`` inside ``depth`` nested pipelines, each with a function stage of its own around it."""
    p = SequentialPipeline([leaf])
    for level in range(depth - 1):
        p = SequentialPipeline(
            [stage(lambda x, level=level: {"x": x + 1, f"seen{level}": x}, writes=["x", f"seen{level}"]), p]
        )
    return p


async def test_deep_nesting_records_the_same_run(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def build() -> Any:
        return _chain(6, stage(lambda x: {"x": x * 10}, writes=["x"])), lambda: None

    seen = await _same_either_way(build, mode, monkeypatch, x=1)
    first = seen[0]
    assert first["fields"]["x"] == 60
    paths = [p for p, _ in first["run"]["trace"]]
    assert paths[:3] == ["stages[0]", "stages[1]", "stages[1].stages[0]"]
    assert paths[-1] == "stages[1]" + ".stages[1]" * 4 + ".stages[0]"
    assert seen[1] == seen[2] == first


async def test_lm_usage_history_and_caller_modules(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def build() -> Any:
        callers: list[list[str]] = []

        def look(question: str) -> dict[str, Any]:
            callers.append([type(m).__name__ for m in dspy.settings.caller_modules])
            return {"question": question + "?"}

        predict = dspy.Predict("question -> answer")
        inner = SequentialPipeline([stage(look, writes=["question"]), predict])
        middle = SequentialPipeline([inner])
        outer = SequentialPipeline([middle])
        lm = FakeLM({"answer": "a"})
        p = SequentialPipeline([outer])

        class WithLM:
            def __call__(self, **kw: Any) -> Any:
                with dspy.context(lm=lm):
                    return p(**kw)

            async def acall(self, **kw: Any) -> Any:
                with dspy.context(lm=lm):
                    return await p.acall(**kw)

        def records() -> Any:
            return callers, [len(m.history) for m in (p, outer, middle, inner, predict)]

        return WithLM(), records

    seen = await _same_either_way(build, mode, monkeypatch, question="q")
    usage = seen[1]["run"]["usage"]
    assert list(usage) == ["stages[0].stages[0].stages[0].stages[1]"]
    assert seen[1]["run"]["total"]["lm_calls"] == 1
    callers, history = seen[-1]
    assert len(callers) == CALLS
    assert callers[1] == callers[0]
    assert callers[0][-4:] == ["SequentialPipeline"] * 4
    assert history == [CALLS] * 5


async def test_a_failure_deep_inside(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(x: int) -> dict[str, Any]:
        if x > 2:
            raise ValueError(f"too big: {x}")
        return {"x": x}

    def build() -> Any:
        return _chain(4, stage(fail, writes=["x"])), lambda: None

    seen = await _same_either_way(build, mode, monkeypatch, x=0)
    error = seen[1]
    assert error["type"] == "StageError"
    assert error["path"] == "stages[1].stages[1].stages[1].stages[0]"
    assert "too big: 3" in error["message"]
    assert error["run"]["trace"][-1] == ("stages[1].stages[1].stages[1].stages[0]", False)


async def test_skipped_and_recovered_stages_inside(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(x: int) -> dict[str, Any]:
        raise KeyError("missing")

    def build() -> Any:
        optional = Stage(stage(broken, writes=["y"]), skip_on=[KeyError])
        inner = SequentialPipeline([optional, stage(lambda x: {"x": x + 1}, writes=["x"])])
        return SequentialPipeline([SequentialPipeline([inner])]), lambda: None

    seen = await _same_either_way(build, mode, monkeypatch, x=1)
    assert seen[0]["fields"]["x"] == 2
    assert [e[:2] for e in seen[0]["run"]["events"]] == [("stages[0].stages[0].stages[0]", "skipped")]


async def test_failed_outputs_of_a_nested_parallel_drop_stale_values(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    @stageflow.stage(writes=["answer"])
    def failing(question: str) -> dict[str, Any]:
        raise ValueError("model down")

    @stageflow.stage(writes=["other"])
    def other(question: str) -> dict[str, Any]:
        return {"other": 1}

    def build() -> Any:
        par = ParallelPipeline([[failing, other]])
        return SequentialPipeline([SequentialPipeline([SequentialPipeline([par])])]), lambda: None

    seen = await _same_either_way(build, mode, monkeypatch, question="q", answer="STALE")
    assert "answer" not in seen[1]["fields"]
    assert seen[1]["fields"]["other"] == 1

    def build_reader() -> Any:
        par = ParallelPipeline([[failing, other]])
        use = stage(lambda answer: {"final": answer}, writes=["final"])
        return SequentialPipeline([SequentialPipeline([SequentialPipeline([par])]), use]), lambda: None

    seen = await _same_either_way(build_reader, mode, monkeypatch, question="q", answer="STALE")
    assert seen[1]["type"] == "ContractError"
    assert seen[1]["field"] == "answer"


async def test_nested_foreach_details(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def half(n: int) -> dict[str, Any]:
        if n == 3:
            raise ValueError("odd one")
        return {"h": n / 2}

    def build() -> Any:
        each = stageflow.ForEach(
            stage(half, writes=["h"]), over="ns", item="n", collect="hs", on_error="collect"
        )
        return SequentialPipeline([SequentialPipeline([SequentialPipeline([each])])]), lambda: None

    seen = await _same_either_way(build, mode, monkeypatch, ns=[1, 2, 3])
    details = seen[1]["details"]
    assert any("item_errors" in d for d in details.values())


async def test_hooks_defaults_and_budgets_take_the_layered_path(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def build() -> Any:
        inner = SequentialPipeline([stage(lambda x: {"x": x + 1}, writes=["x"])])
        inner.set_defaults(retry=2)
        return SequentialPipeline([SequentialPipeline([inner])]), lambda: None

    # the middle pipeline runs in line; the one with defaults does not (its own defaults take effect)
    seen = await _same_either_way(build, mode, monkeypatch, x=1)
    assert seen[2]["fields"]["x"] == 2

    def build_observed() -> Any:
        events: list[str] = []

        class Hook(stageflow.Hook):
            def after_stage(self, **kw: Any) -> None:
                events.append(kw["path"])

        p = SequentialPipeline([SequentialPipeline([stage(lambda x: {"x": x + 1}, writes=["x"])])])

        class Observed:
            def __call__(self, **kw: Any) -> Any:
                with stageflow.attach_hooks(Hook()):
                    return p(**kw)

            async def acall(self, **kw: Any) -> Any:
                with stageflow.attach_hooks(Hook()):
                    return await p.acall(**kw)

        return Observed(), lambda: events

    seen = await _same_either_way(build_observed, mode, monkeypatch, expect_inline=False, x=1)
    assert seen[-1] == ["stages[0].stages[0]", "stages[0]"] * CALLS


async def test_patching_a_pipeline_class_later_is_seen(mode: str) -> None:
    class Tagged(SequentialPipeline):
        pass

    inner = Tagged([stage(lambda x: {"x": x + 1}, writes=["x"])])
    outer = SequentialPipeline([inner])
    for _ in range(2):
        assert (await call(outer, mode, x=1)).x == 2

    def tagged_result(self: Any, state: dict[str, Any], run: RunInfo, hooks: Any = ()) -> Result:
        return Result({**state, "tagged": True}, run)

    Tagged.stageflow_result = tagged_result  # type: ignore[method-assign]
    try:
        result = await call(outer, mode, x=1)
        assert result.tagged is True
    finally:
        del Tagged.stageflow_result
    assert "tagged" not in await call(outer, mode, x=1)


async def test_a_forward_set_on_the_instance_is_called(mode: str) -> None:
    inner = SequentialPipeline([stage(lambda x: {"x": x + 1}, writes=["x"])])
    outer = SequentialPipeline([inner])
    assert (await call(outer, mode, x=1)).x == 2
    assert (await call(outer, mode, x=1)).x == 2
    inner.forward = lambda **kw: dspy.Prediction(x=100)
    assert (await call(outer, mode, x=1)).x == 100


def test_only_plain_pipeline_classes_qualify() -> None:
    class OwnResult(SequentialPipeline):
        def stageflow_result(self, state: dict[str, Any], run: RunInfo, hooks: Any = ()) -> Result:
            return Result(state, run)

    class OwnForward(SequentialPipeline):
        def forward(self, **inputs: Any) -> Result:
            return super().forward(**inputs)

    assert inline.eligible(SequentialPipeline, "__call__")
    assert inline.eligible(SequentialPipeline, "acall")
    assert not inline.eligible(OwnResult, "__call__")
    assert not inline.eligible(OwnForward, "__call__")
    assert not inline.eligible(OwnForward, "acall")  # acall runs its own forward too (no aforward of its own)


async def test_a_contract_error_of_a_grown_nested_pipeline(mode: str) -> None:
    inner = SequentialPipeline([stage(lambda x: {"x": x + 1}, writes=["x"])])
    outer = SequentialPipeline([inner])
    for _ in range(2):
        assert (await call(outer, mode, x=1)).x == 2
    inner.add_stage(stage(lambda missing: {"x": missing}, writes=["x"]))
    with pytest.raises(ContractError) as info:
        await call(outer, mode, x=1)
    assert "missing" in str(info.value)


# -- a chain of in-line runs sets its context up where a stage needs it (inline.set_up) ----------


def _callers() -> list[str]:
    """The tagged modules an LM call here would record its history in, outermost first."""
    return [m.tag for m in dspy.settings.caller_modules or [] if hasattr(m, "tag")]


def _tagged(stages: list[Any], tag: str) -> SequentialPipeline:
    p = SequentialPipeline(stages)
    p.tag = tag
    return p


async def test_a_stage_after_a_nested_pipeline_sees_its_own_callers_and_table(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Levels b and c run nothing but a nested pipeline before their own stage does; the callers an
    # LM call sees and the usage paths are the layered path's, stage by stage.
    def build() -> Any:
        seen: list[tuple[str, list[str]]] = []

        def look(name: str) -> Any:
            def fn(question: str) -> dict[str, Any]:
                seen.append((name, _callers()))
                return {"question": question + name}

            return stage(fn, writes=["question"], name=f"look_{name}")

        d = _tagged([look("d"), dspy.Predict("question -> answer")], "d")
        c = _tagged([d, look("c"), dspy.Predict("question -> note")], "c")
        b = _tagged([c, look("b")], "b")
        a = _tagged([b], "a")
        lm = FakeLM({"answer": "x", "note": "n"})

        class WithLM:
            def __call__(self, **kw: Any) -> Any:
                with dspy.context(lm=lm):
                    return a(**kw)

            async def acall(self, **kw: Any) -> Any:
                with dspy.context(lm=lm):
                    return await a.acall(**kw)

        return WithLM(), lambda: (seen, [len(m.history) for m in (a, b, c, d)])

    seen = await _same_either_way(build, mode, monkeypatch, question="q")
    looks, history = seen[-1]
    assert looks[-3:] == [
        ("d", ["a", "b", "c", "d"]),
        ("c", ["a", "b", "c"]),
        ("b", ["a", "b"]),
    ]
    assert history == [2 * CALLS, 2 * CALLS, 2 * CALLS, CALLS]
    assert sorted(seen[1]["run"]["usage"]) == [
        "stages[0].stages[0].stages[0].stages[1]",
        "stages[0].stages[0].stages[2]",
    ]


async def test_a_fan_out_in_a_chain_sees_every_enclosing_pipeline(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def build() -> Any:
        seen: list[list[str]] = []

        def item(n: int) -> dict[str, Any]:
            seen.append(_callers())
            return {"m": n * 2}

        each = stageflow.ForEach(stage(item, writes=["m"]), over="ns", item="n", collect="ms")
        each.tag = "each"
        program = _tagged([_tagged([_tagged([each], "c")], "b")], "a")
        return program, lambda: seen

    seen = await _same_either_way(build, mode, monkeypatch, ns=[1, 2, 3])
    assert seen[1]["fields"]["ms"] == [2, 4, 6]
    assert seen[-1][-3:] == [["a", "b", "c", "each"]] * 3


async def test_the_context_is_restored_after_a_chain_fails(mode: str) -> None:
    from stageflow.engine.hooks import _PATH
    from stageflow.usage import _TABLE

    class Stop(KeyboardInterrupt):
        pass

    def fail(x: int) -> dict[str, Any]:
        if x == 1:
            raise ValueError("bad")
        if x == 2:
            raise Stop
        return {"x": x}

    program = SequentialPipeline([SequentialPipeline([SequentialPipeline([stage(fail, writes=["x"])])])])
    assert (await call(program, mode, x=0)).x == 0
    assert (await call(program, mode, x=0)).x == 0  # (in line from here on)
    before = list(dspy.settings.caller_modules or [])
    with pytest.raises(StageflowError, match="bad"):
        await call(program, mode, x=1)
    with pytest.raises(Stop):
        await call(program, mode, x=2)
    assert list(dspy.settings.caller_modules or []) == before
    assert _PATH.get() == ""
    assert _TABLE.get() is None
    assert (await call(program, mode, x=0)).x == 0


async def test_a_chain_sets_its_context_up_once_per_call(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    program = SequentialPipeline([stage(lambda x: {"x": x + 1}, writes=["x"])])
    for _ in range(5):
        program = SequentialPipeline([program])
    for _ in range(2):
        assert (await call(program, mode, x=0)).x == 1
    set_ups: list[str] = []
    real = inline.set_up

    def counted(run: RunInfo) -> None:
        set_ups.append(run._pending.prefix)
        real(run)

    monkeypatch.setattr(runner, "set_up_inline", counted)
    result = await call(program, mode, x=0)
    assert result.x == 1
    assert set_ups == [".".join(["stages[0]"] * 5)]  # the innermost only, where the stage runs
    assert [r.path for r in result.trace][-1] == ".".join(["stages[0]"] * 6)


async def test_a_hook_installed_by_a_stage_inside_a_chain_is_seen_by_the_next_nested_pipeline(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A chain checks the context once, at its first level; a stage that ran since (here one that
    # installs a global hook) makes the next nested pipeline check it again.
    from stageflow.engine.hooks import install_hook, uninstall_hook

    def build() -> Any:
        paths: list[str] = []

        class Hook(stageflow.Hook):
            def after_stage(self, **kw: Any) -> None:
                paths.append(kw["path"])

        hook = Hook()

        def install(x: int) -> dict[str, Any]:
            install_hook(hook)
            return {"x": x}

        def remove(x: int) -> dict[str, Any]:
            uninstall_hook(hook)
            return {"x": x}

        leaf = SequentialPipeline([SequentialPipeline([stage(lambda x: {"x": x + 1}, writes=["x"])])])
        middle = SequentialPipeline([stage(install, writes=["x"]), leaf, stage(remove, writes=["x"])])
        return SequentialPipeline([middle]), lambda: paths

    try:
        seen = await _same_either_way(build, mode, monkeypatch, x=1)
    finally:
        from stageflow.engine.hooks import _GLOBAL

        _GLOBAL[0] = ()
    assert seen[-1][:2] == ["stages[0].stages[1].stages[0].stages[0]", "stages[0].stages[1].stages[0]"]
    assert [s["fields"]["x"] for s in seen[:CALLS]] == [2] * CALLS


def test_an_in_line_run_has_every_field_of_a_blank_run() -> None:
    # begin writes RunInfo.blank out: a field added to RunInfo must be set there too.
    program = SequentialPipeline([SequentialPipeline([stage(lambda x: {"x": x + 1}, writes=["x"])])])
    program(x=0)
    runs: list[dict[str, Any]] = []
    real = runner.begin_inline

    def spy(*args: Any) -> Any:
        started = real(*args)
        if started is not None:  # (its fields as begin left them; an unset one raises here)
            runs.append({name: copy.copy(getattr(started.run, name)) for name in RunInfo.__slots__})
        return started

    runner.begin_inline = spy
    try:
        assert program(x=0).x == 1
    finally:
        runner.begin_inline = real
    assert len(runs) == 1
    blank = RunInfo.blank(None)
    for name in RunInfo.__slots__:
        if name != "_pending":
            assert runs[0][name] == getattr(blank, name), name


async def test_a_class_with_its_own_entry_point_is_called_through_it_deep_in_a_chain(mode: str) -> None:
    # A nested level of a chain does not look at its class's __call__ / acall on each call: a class
    # whose entry point is not DSPy's own does not qualify for running in line at all.
    calls: list[str] = []

    class Counted(SequentialPipeline):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            calls.append("__call__")
            return super().__call__(*args, **kwargs)

        async def acall(self, *args: Any, **kwargs: Any) -> Any:
            calls.append("acall")
            return await super().acall(*args, **kwargs)

    assert not inline.eligible(Counted, "__call__")
    assert not inline.eligible(Counted, "acall")
    program = SequentialPipeline(
        [SequentialPipeline([Counted([SequentialPipeline([stage(lambda x: {"x": x + 1}, writes=["x"])])])])]
    )
    for _ in range(3):
        assert (await call(program, mode, x=0)).x == 1
    assert calls == ["__call__" if mode == "sync" else "acall"] * 3


async def test_a_stage_calling_its_own_pipeline_again_counts_that_call_as_its_own(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine's call of a nested pipeline is told from a call its stages' own code makes by the
    # usage table in force: a stage of P calling P again is the stage's call (its LM usage is the
    # stage's), on the layered path as in line.
    def build() -> Any:
        holder: dict[str, Any] = {}

        def again(question: str, depth: int) -> dict[str, Any]:
            if depth < 1:
                return {"answer2": holder["p"](question=question + "+", depth=depth + 1).answer}
            return {"answer2": "leaf"}

        inner = SequentialPipeline([dspy.Predict("question -> answer"), stage(again, writes=["answer2"])])
        holder["p"] = inner
        return SequentialPipeline([SequentialPipeline([inner])]), lambda: None

    with dspy.context(lm=FakeLM({"answer": "A"})):
        seen = await _same_either_way(build, mode, monkeypatch, question="q", depth=0)
    assert [s["run"]["total"]["lm_calls"] for s in seen[:CALLS]] == [2] * CALLS


async def test_a_class_with_its_own_stageflow_failed_sees_its_context(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The layered path calls stageflow_failed inside the failing pipeline's context; a class that
    # overrides it runs layered, so every call sees the same path and caller_modules.
    from stageflow.engine.hooks import current_path

    def build() -> Any:
        seen: list[tuple[str, list[str]]] = []

        class Audited(SequentialPipeline):
            def stageflow_failed(self, run: RunInfo, hooks: Any, error: BaseException) -> None:
                callers = [type(m).__name__ for m in (dspy.settings.caller_modules or [])]
                seen.append((current_path(), callers))

        def boom(x: str) -> dict[str, Any]:
            raise ValueError("boom")

        inner = Audited([stage(lambda text: {"x": text}, writes=["x"]), stage(boom, writes=["y"])])
        return SequentialPipeline([Audited([inner])]), lambda: seen

    assert not inline.eligible(
        type("Own", (SequentialPipeline,), {"stageflow_failed": lambda *a: None}), "__call__"
    )
    seen = await _same_either_way(build, mode, monkeypatch, expect_inline=False, text="t")
    records = seen[-1]
    assert len(records) == 2 * CALLS
    assert records[:2] * CALLS == records  # every call sees the same
    assert records[0][0] == "stages[0].stages[0]"
