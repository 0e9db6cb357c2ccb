"""Issue 9, caching: the fingerprint changes whenever the stage's behaviour can change.

Two stages that share a cache (same path, same store) must only share entries when they compute
the same thing; an edit made in place (a demo, an LM setting, a captured list) must miss.
"""

from __future__ import annotations

import array
import collections
from pathlib import Path
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import CachedStage, CachePolicy, MemoryStore, SequentialPipeline, Stage
from stageflow.policies.cache import CacheWarning
from stageflow.testing import FakeLM, call

FACTOR = 2


def shared(fn: Any, policy: CachePolicy) -> SequentialPipeline:
    """A one-stage pipeline whose stage uses ``policy`` (so two pipelines share one cache)."""
    return SequentialPipeline([Stage(fn, writes=["y"], cache=policy)])


async def test_a_changed_constant_misses(mode: str) -> None:
    policy = CachePolicy(MemoryStore())
    assert (await call(shared(lambda x: {"y": x * 2}, policy), mode, x=5)).y == 10
    assert (await call(shared(lambda x: {"y": x * 3}, policy), mode, x=5)).y == 15


async def test_a_changed_closure_value_misses(mode: str) -> None:
    policy = CachePolicy(MemoryStore())

    def make(k: int) -> Any:
        return lambda x: {"y": x * k}

    assert (await call(shared(make(2), policy), mode, x=5)).y == 10
    assert (await call(shared(make(3), policy), mode, x=5)).y == 15


async def test_a_different_captured_container_misses(mode: str) -> None:
    policy = CachePolicy(MemoryStore())

    def make(config: dict[str, int]) -> Any:
        return lambda x: {"y": x * config["k"]}

    assert (await call(shared(make({"k": 2}), policy), mode, x=5)).y == 10
    assert (await call(shared(make({"k": 3}), policy), mode, x=5)).y == 15


async def test_a_stage_that_records_its_calls_in_untracked_data_still_hits(mode: str) -> None:
    """Data a stage keeps for itself (a call log), created with stageflow.untracked, is not part of its
    key: it does not make every call a miss."""
    calls: list[int] = stageflow.untracked([])
    log: dict[int, int] = stageflow.untracked({})
    p = SequentialPipeline(
        [CachedStage(Stage(lambda x: calls.append(x) or log.update({x: x}) or {"y": x}, writes=["y"]))]
    )
    for _ in range(3):
        await call(p, mode, x=1)
    assert calls == [1]


async def test_a_stage_that_changes_data_it_can_reach_is_not_cached_and_warned_about(mode: str) -> None:
    """Its key holds that data, so the output would be filed under data it was not computed from:
    not stored, one CacheWarning naming the stage and pointing at stageflow.untracked."""
    calls: list[int] = []
    p = SequentialPipeline([CachedStage(Stage(lambda x: calls.append(x) or {"y": x}, writes=["y"]))])
    with pytest.warns(
        CacheWarning, match=r"not cached: the list .calls. \(1 item\) it can reach changed.*untracked"
    ):
        assert (await call(p, mode, x=1)).y == 1
    assert (await call(p, mode, x=1)).y == 1
    assert (await call(p, mode, x=1)).y == 1
    assert calls == [1, 1, 1]


async def test_a_rebound_closure_cell_misses(mode: str) -> None:
    k = 2

    def mul(x: int) -> dict[str, int]:
        return {"y": x * k}

    p = SequentialPipeline([CachedStage(Stage(mul, writes=["y"]))])
    assert (await call(p, mode, x=5)).y == 10
    k = 3
    assert (await call(p, mode, x=5)).y == 15


async def test_changed_defaults_and_kwdefaults_miss(mode: str) -> None:
    def mul(x: int, k: int = 2, *, extra: int = 0) -> dict[str, int]:
        return {"y": x * k + extra}

    p = SequentialPipeline([CachedStage(Stage(mul, reads=["x"], writes=["y"]))])
    assert (await call(p, mode, x=5)).y == 10
    mul.__defaults__ = (3,)
    assert (await call(p, mode, x=5)).y == 15
    mul.__kwdefaults__ = {"extra": 1}
    assert (await call(p, mode, x=5)).y == 16


async def test_a_changed_nested_lambda_misses(mode: str) -> None:
    policy = CachePolicy(MemoryStore())

    def two(x: int) -> dict[str, int]:
        g = lambda v: v * 2  # noqa: E731 - the constant lives in a nested code object
        return {"y": g(x)}

    def three(x: int) -> dict[str, int]:
        g = lambda v: v * 3  # noqa: E731
        return {"y": g(x)}

    three.__qualname__ = two.__qualname__
    assert (await call(shared(two, policy), mode, x=5)).y == 10
    assert (await call(shared(three, policy), mode, x=5)).y == 15


async def test_a_changed_global_misses(mode: str) -> None:
    global FACTOR
    p = SequentialPipeline([CachedStage(Stage(scale, writes=["y"]))])
    try:
        assert (await call(p, mode, x=5)).y == 10
        FACTOR = 3
        assert (await call(p, mode, x=5)).y == 15
    finally:
        FACTOR = 2


def scale(x: int) -> dict[str, int]:
    return {"y": x * FACTOR}


async def test_replaced_code_misses(mode: str) -> None:
    def mul(x: int) -> dict[str, int]:
        return {"y": x * 2}

    p = SequentialPipeline([CachedStage(Stage(mul, writes=["y"]))])
    assert (await call(p, mode, x=5)).y == 10
    mul.__code__ = (lambda x: {"y": x * 3}).__code__
    assert (await call(p, mode, x=5)).y == 15


class Mul:
    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, x: int) -> dict[str, int]:
        return {"y": x * self.k}


async def test_callable_objects_are_keyed_by_their_state(mode: str) -> None:
    policy = CachePolicy(MemoryStore())
    assert (await call(shared(Mul(2), policy), mode, x=5)).y == 10
    m = Mul(3)
    assert (await call(shared(m, policy), mode, x=5)).y == 15
    m.k = 4
    assert (await call(shared(m, policy), mode, x=5)).y == 20


# -- predictors: state as it is at call time -----------------------------------------------------


def predictor_pipeline() -> tuple[SequentialPipeline, Any]:
    pred = dspy.Predict("question -> answer")
    return SequentialPipeline([CachedStage(pred)]), pred


async def test_a_demo_edited_in_place_misses(mode: str) -> None:
    lm = FakeLM({"answer": "a"})
    p, pred = predictor_pipeline()
    pred.demos = [dspy.Example(question="x", answer="y")]
    with dspy.context(lm=lm):
        await call(p, mode, question="q")
        pred.demos[0]["answer"] = "changed"
        r1 = await call(p, mode, question="q")
        pred.demos[0] = dspy.Example(question="x2", answer="y2")
        r2 = await call(p, mode, question="q")
    assert [e.kind for e in r1.run.events] == []
    assert [e.kind for e in r2.run.events] == []
    assert lm.calls == 3


async def test_lm_kwargs_edited_in_place_miss(mode: str) -> None:
    lm = FakeLM({"answer": "a"})
    p, _ = predictor_pipeline()
    with dspy.context(lm=lm):
        await call(p, mode, question="q")
        lm.kwargs["temperature"] = 0.9
        r = await call(p, mode, question="q")
        again = await call(p, mode, question="q")
    assert [e.kind for e in r.run.events] == []
    assert [e.kind for e in again.run.events] == ["cache_hit"]
    assert lm.calls == 2


async def test_the_predictors_own_lm_kwargs_and_config_edited_in_place_miss(mode: str) -> None:
    lm = FakeLM({"answer": "a"})
    p, pred = predictor_pipeline()
    pred.lm = lm
    await call(p, mode, question="q")
    lm.kwargs["max_tokens"] = 7
    await call(p, mode, question="q")
    pred.config["temperature"] = 0.5
    await call(p, mode, question="q")
    assert lm.calls == 3


async def test_changing_the_adapter_misses(mode: str) -> None:
    lm = FakeLM({"answer": "a"})
    p, _ = predictor_pipeline()
    with dspy.context(lm=lm):
        await call(p, mode, question="q")
        with dspy.context(adapter=dspy.JSONAdapter()):
            r = await call(p, mode, question="q")
    assert [e.kind for e in r.run.events] == []


class Shout(dspy.Module):
    def __init__(self, suffix: str) -> None:
        super().__init__()
        self.suffix = suffix
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question: str) -> Any:
        out = self.predict(question=question)
        return dspy.Prediction(answer=out.answer.upper() + self.suffix)


async def test_a_module_attribute_edited_in_place_misses(mode: str) -> None:
    lm = FakeLM({"answer": "a"})
    module = Shout("!")
    p = SequentialPipeline([CachedStage(module, writes=["answer"])])
    with dspy.context(lm=lm):
        assert (await call(p, mode, question="q")).answer == "A!"
        module.suffix = "?"
        assert (await call(p, mode, question="q")).answer == "A?"
        module.predict.demos.append(dspy.Example(question="x", answer="y"))
        await call(p, mode, question="q")
    assert lm.calls == 3


# -- stageflow.fingerprint(program) ----------------------------------------------------------------


def build(factor: int = 2, demo: str = "y", temperature: float = 0.0) -> SequentialPipeline:
    pred = dspy.Predict("question -> answer")
    pred.demos = [dspy.Example(question="x", answer=demo)]
    pred.lm = FakeLM({"answer": "a"})
    pred.lm.kwargs["temperature"] = temperature
    inner = SequentialPipeline([pred, Stage(lambda answer: {"n": len(answer) * factor}, writes=["n"])])
    return SequentialPipeline([dspy.Predict("text -> question"), inner])


RATES = {"eur": 2}
STATE: dict[str, Any] = {"log": stageflow.untracked([]), "rate": 2}


def convert(x: int) -> dict[str, int]:
    return {"y": x * RATES["eur"]}


class Table:
    """A callable stage body holding its settings in a dict, and a log of its calls."""

    def __init__(self) -> None:
        self.rates = {"eur": 2}
        self.calls: list[int] = stageflow.untracked([])

    def __call__(self, x: int) -> dict[str, int]:
        self.calls.append(x)
        return {"y": x * self.rates["eur"]}


@pytest.fixture
def rates() -> Any:
    yield RATES
    RATES["eur"] = 2


@pytest.mark.parametrize("wrap", ["stage_cache", "cached_stage"])
async def test_a_module_setting_changed_in_place_misses(mode: str, wrap: str, rates: Any) -> None:
    """A dict a function stage reads from its module, changed in place, was served the old output."""
    if wrap == "stage_cache":
        p = SequentialPipeline([Stage(convert, writes=["y"], cache=CachePolicy(MemoryStore()))])
    else:
        p = SequentialPipeline([CachedStage(Stage(convert, writes=["y"]))])
    assert (await call(p, mode, x=3)).y == 6
    assert (await call(p, mode, x=3)).y == 6  # unchanged: a hit
    rates["eur"] = 5
    assert (await call(p, mode, x=3)).y == 15
    rates["eur"] = 2
    assert (await call(p, mode, x=3)).y == 6  # back: the first entry again


async def test_a_stage_that_logs_its_calls_and_reads_a_setting(mode: str, rates: Any) -> None:
    calls: list[int] = stageflow.untracked([])

    def logged(x: int) -> dict[str, int]:
        calls.append(x)
        return {"y": x * RATES["eur"]}

    p = SequentialPipeline([CachedStage(Stage(logged, writes=["y"]))])
    for _ in range(3):
        assert (await call(p, mode, x=3)).y == 6
    assert calls == [3]  # the log it writes is not part of its key
    rates["eur"] = 5
    assert (await call(p, mode, x=3)).y == 15  # the setting it reads is
    assert (await call(p, mode, x=3)).y == 15
    assert calls == [3, 3]


async def test_an_untracked_log_inside_a_settings_dict(mode: str) -> None:
    """The log is left out; the settings beside it are still part of the key."""

    def logged(x: int) -> dict[str, int]:
        STATE["log"].append(x)
        return {"y": x * STATE["rate"]}

    p = SequentialPipeline([CachedStage(Stage(logged, writes=["y"]))])
    try:
        for _ in range(3):
            assert (await call(p, mode, x=3)).y == 6
        assert STATE["log"] == [3]
        STATE["rate"] = 4
        assert (await call(p, mode, x=3)).y == 12
        assert STATE["log"] == [3, 3]
    finally:
        STATE["log"].clear()
        STATE["rate"] = 2


async def test_an_objects_settings_changed_in_place_miss(mode: str) -> None:
    body = Table()
    p = SequentialPipeline([CachedStage(Stage(body, writes=["y"]))])
    assert (await call(p, mode, x=3)).y == 6
    assert (await call(p, mode, x=3)).y == 6
    assert body.calls == [3]
    body.rates["eur"] = 7
    assert (await call(p, mode, x=3)).y == 21
    assert body.calls == [3, 3]


SHARED: dict[str, Any] = {"mode": "upper", "n": 0}


async def test_a_dict_one_stage_counts_in_is_still_a_setting_for_another(mode: str) -> None:
    """A global registry of 'written' containers left a dict one stage counts in out of every stage's
    key: the stage reading its 'mode' kept its old output."""

    def count(text: str) -> dict[str, str]:
        SHARED["n"] += 1
        return {"seen": text}

    def shout(seen: str) -> dict[str, str]:
        return {"out": seen.upper() if SHARED["mode"] == "upper" else seen.lower()}

    p = SequentialPipeline(
        [CachedStage(Stage(count, writes=["seen"])), CachedStage(Stage(shout, writes=["out"]))]
    )
    try:
        for _ in range(3):
            assert (await call(p, mode, text="Hi")).out == "HI"
        SHARED["mode"] = "lower"
        assert (await call(p, mode, text="Hi")).out == "hi"
    finally:
        SHARED.update(mode="upper", n=0)


async def test_a_setting_a_stage_normalises_once_is_still_a_setting(mode: str) -> None:
    """A value changed during one call only (as by another thread editing a setting meanwhile) was
    taken for the stage's own and left out of its key for good."""
    cfg = {"lang": "FR"}

    def greet(name: str) -> dict[str, str]:
        cfg["lang"] = cfg["lang"].lower()  # once: FR -> fr
        return {"out": ("bonjour " if cfg["lang"] == "fr" else "hello ") + name}

    p = SequentialPipeline([CachedStage(Stage(greet, writes=["out"]))])
    assert (await call(p, mode, name="bob")).out == "bonjour bob"
    assert (await call(p, mode, name="bob")).out == "bonjour bob"
    cfg["lang"] = "EN"
    assert (await call(p, mode, name="bob")).out == "hello bob"


async def test_a_stage_that_changes_its_own_attribute_is_never_served_a_wrong_turn(mode: str) -> None:
    """A call during which something besides lists, dicts and sets changed is not stored (its output
    was filed under the key of the state after the call)."""

    class Turns:
        def __init__(self) -> None:
            self.turn = 0
            self.calls: list[str] = []

        def __call__(self, x: str) -> dict[str, str]:
            self.calls.append(x)
            self.turn = 1 - self.turn
            return {"y": "AB"[self.turn] + x}

    p = SequentialPipeline([CachedStage(Stage(Turns(), writes=["y"]))])
    got = [(await call(p, mode, x="x")).y for _ in range(4)]
    assert got == ["Bx", "Ax", "Bx", "Ax"]


async def test_an_untracked_counter_hits_and_a_setting_beside_it_is_seen(mode: str, rates: Any) -> None:
    stats = stageflow.untracked({"n": 0})

    def counted(x: int) -> dict[str, int]:
        stats["n"] += 1
        return {"y": x * RATES["eur"]}

    p = SequentialPipeline([CachedStage(Stage(counted, writes=["y"]))])
    for _ in range(5):
        assert (await call(p, mode, x=3)).y == 6
    assert stats["n"] == 1
    rates["eur"] = 5
    assert (await call(p, mode, x=3)).y == 15
    assert stats["n"] == 2


async def test_a_counter_in_a_plain_dict_is_never_a_stale_hit(mode: str) -> None:
    """A stage counting in a dict that also holds its setting: the stage is not cached (the count is
    part of the key); a setting edit is always seen."""
    cfg = {"n": 0, "mode": "upper"}

    def shout(text: str) -> dict[str, str]:
        cfg["n"] += 1
        return {"y": text.upper() if cfg["mode"] == "upper" else text.lower()}

    p = SequentialPipeline([CachedStage(Stage(shout, writes=["y"]))])
    with pytest.warns(CacheWarning):
        assert (await call(p, mode, text="Ab")).y == "AB"
    cfg["mode"] = "lower"
    assert (await call(p, mode, text="Ab")).y == "ab"


async def test_a_table_the_stage_filled_is_a_setting_again_once_edited_from_outside(mode: str) -> None:
    table: dict[str, float] = {}

    def price(item: str) -> dict[str, float]:
        if not table:
            table.update(apple=1.0, pear=2.0)  # filled lazily, by the stage
        return {"y": table[item]}

    p = SequentialPipeline([CachedStage(Stage(price, writes=["y"]))])
    assert (await call(p, mode, item="apple")).y == 1.0
    assert (await call(p, mode, item="apple")).y == 1.0
    table["apple"] = 2.5
    assert (await call(p, mode, item="apple")).y == 2.5


def _odict() -> Any:
    return collections.OrderedDict(k=2)


def _defaultdict() -> Any:
    return collections.defaultdict(int, k=2)


class _MyDict(dict):  # type: ignore[type-arg]
    pass


@pytest.mark.parametrize(
    ("make", "edit"),
    [
        (_odict, lambda c: c.__setitem__("k", 5)),
        (_defaultdict, lambda c: c.__setitem__("k", 5)),
        (lambda: collections.Counter(k=2), lambda c: c.__setitem__("k", 5)),
        (lambda: _MyDict(k=2), lambda c: c.__setitem__("k", 5)),
        (lambda: collections.deque([2]), lambda c: c.__setitem__(0, 5)),
        (lambda: array.array("i", [2]), lambda c: c.__setitem__(0, 5)),
    ],
    ids=["OrderedDict", "defaultdict", "Counter", "dict-subclass", "deque", "array"],
)
async def test_containers_of_other_classes_are_keyed_by_content(mode: str, make: Any, edit: Any) -> None:
    """They were described as opaque objects: an in-place edit was a stale hit, in the file cache
    and in a batch journal too."""
    holder = make()
    key = next(iter(holder)) if isinstance(holder, dict) else 0

    def read(x: int) -> dict[str, int]:
        return {"y": x * holder[key]}

    before = stageflow.fingerprint(read, fresh=True)
    p = SequentialPipeline([CachedStage(Stage(read, writes=["y"]))])
    assert (await call(p, mode, x=3)).y == 6
    edit(holder)
    assert stageflow.fingerprint(read, fresh=True) != before
    assert (await call(p, mode, x=3)).y == 15


def test_a_named_tuple_setting_is_described_by_its_fields() -> None:
    point = collections.namedtuple("point", "x y")
    a, b = point(1, 2), point(1, 3)
    assert stageflow.fingerprint(lambda: a) != stageflow.fingerprint(lambda: b)


def test_untracked_takes_lists_dicts_and_sets_only() -> None:
    assert isinstance(stageflow.untracked({"a": 1}), dict)
    assert stageflow.untracked({3, 1}) == {1, 3}
    with pytest.raises(stageflow.ConfigurationError, match="takes a list, dict or set"):
        stageflow.untracked((1, 2))  # type: ignore[arg-type]
    with pytest.raises(
        stageflow.ConfigurationError, match="not a Counter: the copy would lose what the class adds"
    ):
        stageflow.untracked(collections.Counter())  # (a user found it silently turned into a dict)
    log = stageflow.untracked([1])
    assert stageflow.untracked(log) is log
    assert repr(stageflow.untracked({2})) == "{2}"


def test_an_untracked_log_keeps_the_fingerprint_and_a_batch_resumable(tmp_path: Path) -> None:
    log: list[int] = stageflow.untracked([])

    def step(x: int) -> dict[str, int]:
        log.append(x)
        return {"y": x}

    before = stageflow.fingerprint(step, fresh=True)
    log.extend(range(10))
    assert stageflow.fingerprint(step, fresh=True) == before
    program = SequentialPipeline([Stage(step, writes=["y"])])
    records = [{"id": str(i), "x": i} for i in range(3)]
    stageflow.run_batch(program, records, journal=tmp_path / "j")
    program(x=9)  # called by hand between runs: the untracked log is no change
    assert stageflow.run_batch(program, records, journal=tmp_path / "j").ran == 0


BIG = {f"k{i}": float(i) for i in range(5000)}


@pytest.mark.parametrize("how", ["in place", "rebound"])
async def test_a_table_beyond_the_walk_budget_is_still_keyed_by_its_content(mode: str, how: str) -> None:
    """A 5,000-entry dict was keyed by its length and a sample: an edit (in place, or even the table
    rebound to an edited copy) outside the sample was a stale hit."""
    global BIG

    def price(item: str) -> dict[str, float]:
        return {"y": BIG[item]}

    p = SequentialPipeline([CachedStage(Stage(price, writes=["y"]))])
    saved = BIG
    try:
        assert (await call(p, mode, item="k1234")).y == 1234.0
        assert (await call(p, mode, item="k1234")).y == 1234.0
        if how == "in place":
            BIG["k1234"] = 99.0
        else:
            BIG = {**BIG, "k1234": 99.0}
        assert (await call(p, mode, item="k1234")).y == 99.0
    finally:
        BIG = saved
        BIG["k1234"] = 1234.0


VALUE: Any = None


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("re.compile('a+')", "re.compile('b+')"),
        ("decimal.Decimal('1.5')", "decimal.Decimal('2.5')"),
        ("datetime.date(2024, 1, 1)", "datetime.date(2025, 1, 1)"),
        ("fractions.Fraction(1, 2)", "fractions.Fraction(1, 3)"),
        ("pathlib.PurePosixPath('/a')", "pathlib.PurePosixPath('/b')"),
        ("operator.itemgetter('a')", "operator.itemgetter('b')"),
        ("range(3)", "range(5)"),
    ],
)
def test_library_values_without_readable_state_are_described_by_their_text(old: str, new: str) -> None:
    """They were described by their class alone: a rebound regex or Decimal setting was a stale hit,
    and a resume after editing one in the source mixed results."""
    import datetime
    import decimal
    import fractions
    import operator
    import pathlib
    import re

    global VALUE
    env = {"re": re, "decimal": decimal, "datetime": datetime, "fractions": fractions}
    env.update(pathlib=pathlib, operator=operator)

    def read() -> Any:
        return VALUE

    try:
        VALUE = eval(old, env)
        before = stageflow.fingerprint(read, fresh=True)
        VALUE = eval(new, env)
        assert stageflow.fingerprint(read, fresh=True) != before
    finally:
        VALUE = None


def test_a_read_only_view_of_a_dict_changed_in_place_misses() -> None:
    import types

    backing = {"k": 2}
    view = types.MappingProxyType(backing)
    cached = CachedStage(Stage(lambda x: {"y": x * view["k"]}, writes=["y"]))
    assert cached(x=3)["y"] == 6
    backing["k"] = 5
    assert cached(x=3)["y"] == 15
