"""A ``Stage`` or ``CachedStage`` subclass with its own ``forward`` runs that code inside a pipeline, as
it does called alone. Before, the engine unwrapped every ``Stage`` and called the wrapped module
itself, so the subclass's post-processing was silently skipped inside pipelines."""

from __future__ import annotations

from typing import Any

import pytest

import stageflow
from stageflow import CachedStage, SequentialPipeline, Stage, stage
from stageflow.testing import call


def _double(x: int) -> dict[str, int]:
    return {"y": x * 2}


@pytest.mark.parametrize("base", [Stage, CachedStage])
async def test_a_subclass_forward_runs_in_a_pipeline_as_alone(mode: str, base: type) -> None:
    class Plus(base):  # type: ignore[misc, valid-type]
        def forward(self, **kwargs: Any) -> Any:
            out = super().forward(**kwargs)
            return {"y": out["y"] + 1}

        async def aforward(self, **kwargs: Any) -> Any:
            out = await super().aforward(**kwargs)
            return {"y": out["y"] + 1}

    s = Plus(stage(_double, writes=["y"]))
    alone = await call(s, mode, x=3)
    assert alone["y"] == 7
    assert (await call(SequentialPipeline([s]), mode, x=3)).y == 7


async def test_a_cached_subclass_caches_once_in_a_pipeline(mode: str) -> None:
    calls = stageflow.untracked([])

    def double(x: int) -> dict[str, int]:
        calls.append(x)
        return {"y": x * 2}

    class Shifted(CachedStage):
        def forward(self, **kwargs: Any) -> Any:
            return {"y": super().forward(**kwargs)["y"] + 100}

        async def aforward(self, **kwargs: Any) -> Any:
            return {"y": (await super().aforward(**kwargs))["y"] + 100}

    s = Shifted(stage(double, writes=["y"]))
    p = SequentialPipeline([s])
    assert [(await call(p, mode, x=2)).y for _ in range(3)] == [104, 104, 104]
    assert calls == [2]
    assert (s.cache_misses, s.cache_hits) == (1, 2)


async def test_renames_of_a_subclass_still_apply(mode: str) -> None:
    class Loud(Stage):
        def forward(self, **kwargs: Any) -> Any:
            out = super().forward(**kwargs)
            return {"result": out["result"] * 10}

        async def aforward(self, **kwargs: Any) -> Any:
            out = await super().aforward(**kwargs)
            return {"result": out["result"] * 10}

    s = Loud(stage(_double, writes=["y"]), inputs={"x": "value"}, outputs={"y": "result"})
    p = SequentialPipeline([s])
    assert p.check(["value"]) == ("result", "value")
    assert (await call(p, mode, value=4)).result == 80


async def test_stageflow_s_own_wrappers_are_still_unwrapped(mode: str) -> None:
    s = CachedStage(stage(_double, writes=["y"]))
    p = SequentialPipeline([s])
    assert p._entries[0].chain == ("module", "fn")
    assert (await call(p, mode, x=5)).y == 10


async def test_a_subclass_around_a_single_value_function_keeps_its_one_output(mode: str) -> None:
    class Loud(Stage):
        def forward(self, **kwargs: Any) -> Any:
            return super().forward(**kwargs)

    s = Loud(stage(lambda x: x * x, writes=["y"]))
    assert (await call(SequentialPipeline([s]), mode, x=3)).y == 9


def test_a_subclass_around_a_str_reader_is_checked_like_the_function() -> None:
    def shout(text: str) -> dict[str, str]:
        return {"loud": text.upper()}

    class Wrapped(Stage):
        def forward(self, **kwargs: Any) -> Any:
            return super().forward(**kwargs)

    def lists(question: str) -> list[str]:
        return [question]

    p = SequentialPipeline([stage(lists, writes=["text"]), Wrapped(stage(shout, writes=["loud"]))])
    with pytest.raises(stageflow.ContractError) as info:
        p.check(["question"])
    assert (info.value.code, info.value.field, info.value.stage_path) == (
        "list_vs_scalar",
        "text",
        "stages[1]",
    )
