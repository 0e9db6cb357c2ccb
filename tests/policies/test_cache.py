"""Caching: CachedStage stats, true LRU, thread safety, content-addressed keys, traces, persistence."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import (
    CachedStage,
    CachePolicy,
    ConfigurationError,
    MemoryStore,
    SequentialPipeline,
    SQLiteStore,
    Stage,
    StageError,
    stage,
)
from stageflow.policies.cache import CacheWarning
from stageflow.testing import FakeLM, call


class Square:
    """A counting function stage body: ``{"y": x * x}``."""

    def __init__(self) -> None:
        self.seen: list[Any] = stageflow.untracked([])
        self._lock = threading.Lock()

    def __call__(self, x: int) -> dict[str, Any]:
        with self._lock:
            self.seen.append(x)
        return {"y": x * x}


def squares(cache_size: int = 1000, **kw: Any) -> tuple[CachedStage, Square, SequentialPipeline]:
    body = Square()
    cached = CachedStage(stage(body, reads=["x"], writes=["y"], name="square"), cache_size, **kw)
    return cached, body, SequentialPipeline([cached])


def kinds(result: Any) -> list[str]:
    return [e.kind for e in result.run.events]


# -- stats and LRU ---------------------------------------------------------------------------------


async def test_hits_misses_and_hit_rate(mode: str) -> None:
    cached, body, p = squares()
    ys = [(await call(p, mode, x=x)).y for x in (3, 3, 4, 3)]
    assert ys == [9, 9, 16, 9]
    assert body.seen == [3, 4]
    stats = cached.get_cache_stats()
    assert stats["hits"] == 2
    assert stats["misses"] == 2
    assert stats["hit_rate"] == pytest.approx(0.5)
    assert stats["size"] == 2


def test_empty_stats() -> None:
    cached, _, _ = squares()
    stats = cached.get_cache_stats()
    assert (stats["hits"], stats["misses"], stats["hit_rate"], stats["size"]) == (0, 0, 0.0, 0)


async def test_least_recently_used_entry_is_evicted(mode: str) -> None:
    cached, body, p = squares(cache_size=2)
    for x in (1, 2, 1, 3):  # insert a, b; use a; insert c -> b is the least recently used
        await call(p, mode, x=x)
    assert body.seen == [1, 2, 3]
    await call(p, mode, x=1)  # a was kept
    assert body.seen == [1, 2, 3]
    await call(p, mode, x=2)  # b was evicted
    assert body.seen == [1, 2, 3, 2]
    assert cached.get_cache_stats()["size"] == 2


def test_memory_store_is_a_true_lru() -> None:
    store = MemoryStore(2)
    store.set("a", 1)
    store.set("b", 2)
    assert store.get("a") == (True, 1)
    store.set("c", 3)
    assert store.get("b") == (False, None)
    assert store.get("a") == (True, 1)
    assert store.get("c") == (True, 3)
    store.set("a", 10)  # overwrite refreshes too
    store.set("d", 4)
    assert store.get("c") == (False, None)
    assert store.get("a") == (True, 10)


def test_clear_cache_drops_entries_and_stats() -> None:
    cached, body, p = squares()
    p(x=2)
    p(x=2)
    cached.clear_cache()
    assert cached.get_cache_stats()["size"] == 0
    p(x=2)
    assert body.seen == [2, 2]


def test_thread_safety_stats_add_up() -> None:
    cached, body, p = squares(cache_size=8)
    errors: list[BaseException] = []
    n_threads, per_thread = 16, 60
    barrier = threading.Barrier(n_threads)

    def worker(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                x = (t + i) % 12
                assert p(x=x).y == x * x
                assert cached(x=x)["y"] == x * x
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = cached.get_cache_stats()
    assert stats["hits"] + stats["misses"] == 2 * n_threads * per_thread
    assert stats["misses"] == len(body.seen)
    assert stats["size"] <= 8


# -- a hit skips the call ------------------------------------------------------------------------------


class CountingAdapter(dspy.ChatAdapter):
    def __init__(self) -> None:
        super().__init__()
        self.formats = 0
        self.parses = 0

    def format(self, signature: Any, demos: Any, inputs: Any) -> Any:
        self.formats += 1
        return super().format(signature, demos, inputs)

    def parse(self, signature: Any, completion: str) -> Any:
        self.parses += 1
        return super().parse(signature, completion)


async def test_a_hit_makes_no_lm_call_and_no_formatting(mode: str) -> None:
    lm = FakeLM({"answer": lambda i: "A:" + i["question"]})
    adapter = CountingAdapter()
    p = SequentialPipeline([CachedStage(dspy.Predict("question -> answer"))])
    with dspy.context(lm=lm, adapter=adapter):
        first = await call(p, mode, question="q")
        counts = (lm.calls, adapter.formats, adapter.parses)
        second = await call(p, mode, question="q")
    assert counts == (1, 1, 1)
    assert (lm.calls, adapter.formats, adapter.parses) == counts
    assert first.answer == second.answer == "A:q"
    assert "cache_hit" not in kinds(first)
    assert [(e.stage, e.kind) for e in second.run.events] == [("stages[0]", "cache_hit")]


async def test_cache_option_on_stage(mode: str) -> None:
    lm = FakeLM({"answer": "A"})
    p = SequentialPipeline(
        [dspy.Predict("question -> draft"), Stage(dspy.Predict("draft -> answer"), cache=True)]
    )
    with dspy.context(lm=lm):
        await call(p, mode, question="q")
        r = await call(p, mode, question="q")
    assert lm.calls == 3  # the uncached first stage runs twice
    assert [(e.stage, e.kind) for e in r.run.events] == [("stages[1]", "cache_hit")]


def test_cache_option_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s_true = Stage(lambda x: {"y": x}, writes=["y"], cache=True)
    assert isinstance(s_true.policy.cache, CachePolicy)
    assert s_true.policy.cache.memory.maxsize == 1000
    assert s_true.policy.cache.persistent is None
    s_int = Stage(lambda x: {"y": x}, writes=["y"], cache=100)
    assert s_int.policy.cache.memory.maxsize == 100
    monkeypatch.chdir(tmp_path)
    s_path = Stage(lambda x: {"y": x}, writes=["y"], cache="path.db")
    assert isinstance(s_path.policy.cache.persistent, SQLiteStore)
    assert (tmp_path / "path.db").exists()
    s_path.policy.cache.persistent.close()
    own = CachePolicy(MemoryStore(5))
    assert Stage(lambda x: {"y": x}, writes=["y"], cache=own).policy.cache is own
    assert Stage(lambda x: {"y": x}, writes=["y"], cache=False).policy is None


@pytest.mark.parametrize("bad", [0, -1, 2.5, object()])
def test_bad_cache_options_raise_configuration_error(bad: Any) -> None:
    with pytest.raises(ConfigurationError):
        Stage(lambda x: {"y": x}, writes=["y"], cache=bad)


def test_a_directory_as_cache_path_warns_and_caches_in_memory(tmp_path: Path) -> None:
    with pytest.warns(CacheWarning, match="it is a directory"):
        s = Stage(lambda x: {"y": x}, writes=["y"], cache=str(tmp_path))
    assert s.policy.cache.persistent.available is False
    assert SequentialPipeline([s])(x=1).y == 1


def test_bad_cache_size_raises_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        CachedStage(lambda x: {"y": x}, cache_size=0)


def test_errors_are_not_cached() -> None:
    calls: list[int] = stageflow.untracked([])

    def flaky(x: int) -> dict[str, Any]:
        calls.append(x)
        if len(calls) == 1:
            raise ValueError("first call fails")
        return {"y": x}

    p = SequentialPipeline([CachedStage(stage(flaky, writes=["y"]))])
    with pytest.raises(StageError):
        p(x=1)
    assert p(x=1).y == 1
    assert p(x=1).y == 1
    assert len(calls) == 2


def test_fallback_outputs_are_not_cached() -> None:
    n = stageflow.untracked({"calls": 0})

    def flaky(x: int) -> dict[str, Any]:
        n["calls"] += 1
        if n["calls"] == 1:
            raise ConnectionError("down")
        return {"y": "real"}

    p = SequentialPipeline([Stage(stage(flaky, writes=["y"]), cache=True, fallback={"y": "unknown"})])
    assert p(x=1).y == "unknown"
    assert p(x=1).y == "real"


def test_cached_stage_called_on_its_own() -> None:
    cached, body, _ = squares()
    assert cached(x=5)["y"] == 25
    assert cached(x=5)["y"] == 25
    assert body.seen == [5]
    assert cached.get_cache_stats()["hits"] == 1


# -- keys -------------------------------------------------------------------------------------------


def predict_pipeline() -> tuple[SequentialPipeline, Any, Any]:
    pred = dspy.Predict("question -> draft")
    other = dspy.Predict("draft -> answer")
    return SequentialPipeline([CachedStage(pred), other]), pred, other


def test_different_inputs_miss() -> None:
    lm = FakeLM({"draft": lambda i: "D:" + i["question"]})
    p, _, _ = predict_pipeline()
    with dspy.context(lm=lm):
        assert p(question="a").draft == "D:a"
        assert p(question="b").draft == "D:b"
        assert p(question="a").draft == "D:a"
    assert lm.log.count((("draft",), {"question": "a"})) == 1
    assert lm.log.count((("draft",), {"question": "b"})) == 1


def test_reprompting_the_stage_misses() -> None:
    lm = FakeLM({"draft": "d", "answer": "a"})
    p, pred, _ = predict_pipeline()
    with dspy.context(lm=lm):
        p(question="q")
        pred.signature = pred.signature.with_instructions("Write a short draft.")
        r = p(question="q")
    assert "cache_hit" not in kinds(r)
    assert [o for o, _ in lm.log].count(("draft",)) == 2


def test_adding_demos_misses() -> None:
    lm = FakeLM({"draft": "d", "answer": "a"})
    p, pred, _ = predict_pipeline()
    with dspy.context(lm=lm):
        p(question="q")
        pred.demos = [dspy.Example(question="x", draft="y")]
        r1 = p(question="q")
        pred.demos.append(dspy.Example(question="x2", draft="y2"))
        r2 = p(question="q")
    assert "cache_hit" not in kinds(r1)
    assert "cache_hit" not in kinds(r2)


def test_changing_the_predictors_own_lm_misses() -> None:
    lm = FakeLM({"draft": "d", "answer": "a"})
    p, pred, _ = predict_pipeline()
    with dspy.context(lm=lm):
        p(question="q")
        pred.lm = FakeLM({"draft": "other"}, model="fake/other")
        r = p(question="q")
    assert r.draft == "other"


def test_changing_an_unrelated_stage_still_hits() -> None:
    lm = FakeLM({"draft": "d", "answer": "a"})
    p, _, other = predict_pipeline()
    with dspy.context(lm=lm):
        p(question="q")
        other.signature = other.signature.with_instructions("Answer in French.")
        other.demos = [dspy.Example(draft="x", answer="y")]
        r = p(question="q")
    assert [(e.stage, e.kind) for e in r.run.events] == [("stages[0]", "cache_hit")]


def test_a_copied_program_shares_the_cache() -> None:
    lm = FakeLM({"draft": "d", "answer": "a"})
    p, _, _ = predict_pipeline()
    with dspy.context(lm=lm):
        p(question="q")
        r = p.deepcopy()(question="q")
    assert "cache_hit" in kinds(r)


def test_changing_the_context_lm_misses() -> None:
    lm_a = FakeLM({"draft": "from a", "answer": "x"}, model="fake/a")
    lm_b = FakeLM({"draft": "from b", "answer": "x"}, model="fake/b")
    p, _, _ = predict_pipeline()
    with dspy.context(lm=lm_a):
        assert p(question="q").draft == "from a"
    with dspy.context(lm=lm_b):
        assert p(question="q").draft == "from b"


def test_recompiling_twice_misses_each_time() -> None:
    lm = FakeLM({"draft": lambda i: "d", "answer": "a"})
    p, pred, _ = predict_pipeline()
    ex1, ex2, ex3 = (dspy.Example(question=f"x{i}", draft=f"y{i}") for i in range(3))
    with dspy.context(lm=lm):
        pred.demos = [ex1]
        p(question="q")
        pred.demos = [ex2]  # the first demos list is freed here...
        pred.demos = [ex3]  # ...and CPython hands its memory (and id) to this one
        r = p(question="q")
    assert "cache_hit" not in kinds(r)
    assert [fields for fields, _ in lm.log].count(("draft",)) == 2  # the cached stage ran both times


# -- traces ------------------------------------------------------------------------------------------


async def test_a_cached_stage_runs_while_traces_are_collected(mode: str) -> None:
    lm = FakeLM({"answer": "A"})
    pred = dspy.Predict("question -> answer")
    cached = CachedStage(pred)
    p = SequentialPipeline([cached])
    with dspy.context(lm=lm):
        await call(p, mode, question="q")
        with dspy.context(trace=[]):
            r = await call(p, mode, question="q")
            trace = list(dspy.settings.trace)
        after = await call(p, mode, question="q")
    assert lm.calls == 2
    assert "cache_hit" not in kinds(r)
    assert len(trace) == 1
    assert trace[0][0] is pred
    assert trace[0][1] == {"question": "q"}
    assert "cache_hit" in kinds(after)


def test_a_standalone_cached_stage_runs_while_traces_are_collected() -> None:
    lm = FakeLM({"answer": "A"})
    pred = dspy.Predict("question -> answer")
    cached = CachedStage(pred)
    with dspy.context(lm=lm):
        cached(question="q")
        with dspy.context(trace=[]):
            cached(question="q")
            trace = list(dspy.settings.trace)
    assert lm.calls == 2
    assert [t[0] for t in trace] == [pred]


def test_bootstrap_over_a_warm_cache_still_collects_demos() -> None:
    lm = FakeLM({"answer": "4"})
    program = SequentialPipeline([CachedStage(dspy.Predict("question -> answer"))])
    train = [dspy.Example(question=f"q{i}", answer="4").with_inputs("question") for i in range(3)]
    with dspy.context(lm=lm):
        for ex in train:
            program(question=ex.question)  # warm the cache
        opt = dspy.BootstrapFewShot(
            metric=lambda ex, pred, trace=None: pred.answer == ex.answer, max_labeled_demos=0
        )
        compiled = opt.compile(program, trainset=train)
    demos = dict(compiled.named_predictors())["stages[0].module"].demos
    assert len(demos) == 3


# -- persistence -------------------------------------------------------------------------------------


async def test_persistent_cache_hits_from_a_fresh_object(mode: str, tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    lm = FakeLM({"answer": "first"})
    cache = CachedStage(dspy.Predict("question -> answer"), persist_to=db)
    with dspy.context(lm=lm):
        assert (await call(SequentialPipeline([cache]), mode, question="q")).answer == "first"
    cache.cache.persistent.flush()

    lm2 = FakeLM({"answer": "first"})  # (the same script: the same key; its calls tell a hit)
    fresh = CachedStage(dspy.Predict("question -> answer"), persist_to=db)
    with dspy.context(lm=lm2):
        r = await call(SequentialPipeline([fresh]), mode, question="q")
        again = await call(SequentialPipeline([fresh]), mode, question="q")
    assert r.answer == again.answer == "first"
    assert lm2.calls == 0
    assert "cache_hit" in kinds(r)
    stats = fresh.get_cache_stats()
    assert stats["hits"] == 2
    assert stats["misses"] == 0
    assert stats["persistent"]["hits"] == 1  # the second hit came from memory
    cache.cache.persistent.close()
    fresh.cache.persistent.close()


def test_persistent_cache_misses_for_a_reprompted_stage(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    lm = FakeLM({"answer": "A"})
    first = CachedStage(dspy.Predict("question -> answer"), persist_to=db)
    with dspy.context(lm=lm):
        SequentialPipeline([first])(question="q")
        first.cache.persistent.flush()
        pred = dspy.Predict("question -> answer")
        pred.signature = pred.signature.with_instructions("Be brief.")
        SequentialPipeline([CachedStage(pred, persist_to=db)])(question="q")
    assert lm.calls == 2


def test_sqlite_store_roundtrip_and_len(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "sub" / "dir" / "s.db")
    store.set("k", {"y": [1, 2]})
    store.flush()
    assert len(store) == 1
    assert store.get("k") == (True, {"y": [1, 2]})
    assert store.get("nope") == (False, None)
    store.clear()
    assert len(store) == 0
    store.close()


def test_sqlite_store_unusable_path_warns_once_and_stores_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = SQLiteStore(blocker / "c.db")  # its folder is a file
        store.set("k", 1)
        assert store.get("k") == (False, None)
        assert len(store) == 0
    assert [str(w.message) for w in caught if issubclass(w.category, CacheWarning)] == [
        f"The cache database {str(blocker / 'c.db')!r} cannot be used ({store.error}); stage outputs are "
        "cached in memory only for the rest of this process. Delete or move the file, or pass another "
        "persist_to=/cache= path."
    ]
    assert store.stats()["available"] is False
    assert "a_file" in str(store.stats()["error"]) or store.stats()["error"]
    with pytest.raises(ConfigurationError) as info:
        SQLiteStore(42)  # type: ignore[arg-type]
    assert info.value.code == "bad_cache_path"
    with pytest.raises(ConfigurationError):
        SQLiteStore(tmp_path / "x.db", max_pending=0)


CHILD = textwrap.dedent(
    """
    import json, sys
    import dspy
    from stageflow import CachedStage, SequentialPipeline
    from stageflow.testing import FakeLM

    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    lm = FakeLM({"answer": "cached"})  # (the parent's script: the same key)
    cached = CachedStage(dspy.Predict("question -> answer"), persist_to=sys.argv[1])
    p = SequentialPipeline([cached])
    with dspy.context(lm=lm):
        old = p(question="from parent")
        new = p(question="from child")  # a miss, written at exit (no explicit flush)
    print(json.dumps({"old": old.answer, "new": new.answer, "calls": lm.calls,
                      "events": [e.kind for e in old.run.events]}))
    """
)


def test_persistent_cache_survives_a_real_new_process(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    lm = FakeLM({"answer": "cached"})
    parent = CachedStage(dspy.Predict("question -> answer"), persist_to=db)
    with dspy.context(lm=lm):
        SequentialPipeline([parent])(question="from parent")
    parent.cache.persistent.flush()

    proc = subprocess.run(
        [sys.executable, str(script), str(db)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"old": "cached", "new": "cached", "calls": 1, "events": ["cache_hit"]}

    # What the child wrote before it exited is visible to a fresh object here.
    fresh = CachedStage(dspy.Predict("question -> answer"), persist_to=db)
    with dspy.context(lm=lm):
        r = SequentialPipeline([fresh])(question="from child")
    assert r.answer == "cached"
    assert lm.calls == 1
    assert "cache_hit" in [e.kind for e in r.run.events]
    parent.cache.persistent.close()
    fresh.cache.persistent.close()


class Touchy:
    """A callable whose state raises when read from outside (so it cannot be fingerprinted)."""

    __slots__ = ("k",)

    def __init__(self) -> None:
        self.k = 2

    def __getattribute__(self, name: str) -> Any:
        if name == "k":
            raise RuntimeError("no peeking")
        return object.__getattribute__(self, name)

    def __call__(self, x: int) -> dict[str, int]:
        return {"y": x * object.__getattribute__(self, "k")}


async def test_a_stage_that_cannot_be_fingerprinted_runs_uncached_with_one_warning(mode: str) -> None:
    cached = CachedStage(Stage(Touchy(), reads=["x"], writes=["y"]))
    p = SequentialPipeline([cached])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ys = [(await call(p, mode, x=3)).y for _ in range(3)]
    assert ys == [6, 6, 6]
    messages = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    assert len(messages) == 1
    assert "could not fingerprint" in messages[0]
    assert "no peeking" in messages[0]
    assert cached.get_cache_stats()["uncached"] == 3
