"""Issue 9: bad policy values are refused when given, with a ConfigurationError naming the
parameter (``TimeoutPolicy(nan)``, ``ForEach(timeout=nan)``, ``nan`` delays... used to be accepted
and only misbehaved later: a ``nan`` timeout never fires, a ``nan`` delay makes ``sleep`` raise)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from stageflow import (
    ConfigurationError,
    EnsemblePipeline,
    Fallback,
    ForEach,
    ParallelPipeline,
    RepairPolicy,
    RetryPolicy,
    SequentialPipeline,
    Stage,
    TimeoutPolicy,
    stage,
)

NAN = float("nan")
INF = float("inf")


def leaf() -> object:
    return stage(lambda q: {"a": q}, writes=["a"])


BAD_SECONDS = [NAN, INF, -INF, 0, 0.0, -1, True, False, "1", None]

CASES: dict[str, tuple[Callable[[], object], str]] = {
    **{f"TimeoutPolicy({v!r})": ((lambda v=v: TimeoutPolicy(v)), "seconds") for v in BAD_SECONDS},  # type: ignore[misc]
    **{
        f"Stage(timeout={v!r})": ((lambda v=v: Stage(leaf(), timeout=v)), "timeout")
        for v in [NAN, INF, 0, -2.5]
    },
    **{
        f"set_defaults(timeout={v!r})": (
            (lambda v=v: SequentialPipeline([leaf()]).set_defaults(timeout=v)),
            "timeout",
        )
        for v in [NAN, -1]
    },
    **{
        f"ForEach(timeout={v!r})": ((lambda v=v: ForEach(leaf(), over="qs", timeout=v)), "timeout")
        for v in [NAN, INF, 0, True, "5"]
    },
    "ParallelPipeline(timeout=nan)": (lambda: ParallelPipeline([[leaf()]], timeout=NAN), "timeout"),
    "EnsemblePipeline(timeout=nan)": (lambda: EnsemblePipeline([leaf(), leaf()], timeout=NAN), "timeout"),
    **{
        f"RetryPolicy(max_attempts={v!r})": ((lambda v=v: RetryPolicy(max_attempts=v)), "max_attempts")
        for v in [0, -1, 1.5, NAN, True, "3"]
    },
    **{
        f"RetryPolicy({name}={v!r})": ((lambda name=name, v=v: RetryPolicy(**{name: v})), name)
        for name in ("initial_delay", "backoff", "max_delay", "jitter")
        for v in [NAN, INF, -0.5, True, "1"]
    },
    **{
        f"RetryPolicy(max_elapsed={v!r})": ((lambda v=v: RetryPolicy(max_elapsed=v)), "max_elapsed")
        for v in [NAN, INF, 0, -1, True]
    },
    **{
        f"RetryPolicy({name}=1)": ((lambda name=name: RetryPolicy(**{name: 1})), name)
        for name in ("sleep", "asleep", "rng", "clock")
    },
    "Stage(retry=0)": (lambda: Stage(leaf(), retry=0), "max_attempts"),
    **{
        f"RepairPolicy(max_repairs={v!r})": ((lambda v=v: RepairPolicy(max_repairs=v)), "max_repairs")
        for v in [-1, 1.0, NAN, True]
    },
    "Stage(repair=-1)": (lambda: Stage(leaf(), repair=-1), "max_repairs"),
    "Fallback(default=[('a', 1)])": (lambda: Fallback(default=[("a", 1)]), "default"),  # type: ignore[arg-type]
    "Fallback(default={1: 'x'})": (lambda: Fallback(default={1: "x"}), "default"),  # type: ignore[dict-item]
    "Fallback(stage=42)": (lambda: Fallback(stage=42), "stage"),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_value_is_refused_naming_its_parameter(case: str) -> None:
    make, name = CASES[case]
    with pytest.raises(ConfigurationError) as info:
        make()
    assert info.value.field == name
    assert name in str(info.value)
    assert info.value.code == "bad_option"


@pytest.mark.parametrize("value", [NAN, INF, 0])
def test_the_message_says_what_is_allowed_and_what_was_given(value: float) -> None:
    with pytest.raises(ConfigurationError) as info:
        TimeoutPolicy(value)
    assert str(info.value).splitlines()[0] == (
        f"TimeoutPolicy: seconds must be a finite number of seconds > 0, got {value!r}."
    )


def test_good_values_still_work() -> None:
    assert TimeoutPolicy(1).seconds == 1
    assert TimeoutPolicy(0.25).seconds == 0.25
    retry = RetryPolicy(max_attempts=1, initial_delay=0, backoff=0, max_delay=0, jitter=0, max_elapsed=1.5)
    assert retry.delay(1, ValueError()) == 0
    assert RepairPolicy(max_repairs=0).max_repairs == 0
    assert ForEach(leaf(), over="qs", timeout=3).timeout == 3
    assert Fallback(default={}).default == {}
