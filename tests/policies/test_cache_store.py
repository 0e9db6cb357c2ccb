"""The SQLite store: typed values across processes, the allowlist, stats, pickling."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest

from stageflow import CachedStage, SequentialPipeline, SQLiteStore, stage
from stageflow.policies.cache import CacheWarning

CHILD = textwrap.dedent(
    """
    import json, sys
    import pydantic
    from stageflow import CachedStage, SequentialPipeline, stage

    class Answer(pydantic.BaseModel):
        text: str
        tags: list[str]

    def annotated(x: str) -> Answer:
        return Answer(text=x.upper(), tags=[x])

    import stageflow

    class Tagged(stageflow.StageOutput):
        text: str = ""
        tags: list[str] = []

    class Tag(stageflow.StandardStage):  # the tutorial's shape: the output class is output_schema
        output_schema = Tagged

        def process(self, input_data):
            return {"content": input_data.content, "confidence": 1.0,
                    "text": input_data.content.upper(), "tags": [input_data.content]}

    how = sys.argv[2]
    if how == "annotated":
        cached = CachedStage(stage(annotated), persist_to=sys.argv[1])
    elif how == "declared":
        cached = CachedStage(stage(lambda x: Answer(text=x.upper(), tags=[x])), persist_to=sys.argv[1],
                             persist_types=[Answer])
    elif how == "standard":
        cached = CachedStage(Tag(), persist_to=sys.argv[1])
    elif how == "standard-stage-cache":
        cached = stageflow.Stage(Tag(), cache=sys.argv[1])
        runner = SequentialPipeline([cached])  # a Stage's policies apply in a pipeline
    else:
        cached = CachedStage(stage(lambda x: Answer(text=x.upper(), tags=[x])), persist_to=sys.argv[1])
    if how.startswith("standard"):
        out = (runner if how == "standard-stage-cache" else cached)(content="q")
        if how == "standard-stage-cache":
            store = cached.policy.cache.persistent
            store.flush()
            s = store.stats()
            print(json.dumps({"type": type(out).__name__, "text": out.text, "tags": out.tags,
                              "hits": s["hits"], "unknown": s["unknown_types"]}))
            raise SystemExit(0)
    else:
        out = cached(x="q")
    cached.cache.persistent.flush()
    stats = cached.get_cache_stats()
    print(json.dumps({"type": type(out).__name__, "text": out.text, "tags": out.tags,
                      "hits": stats["hits"], "unknown": stats["persistent"]["unknown_types"]}))
    """
)


def run_child(tmp_path: Path, db: Path, how: str) -> dict[str, Any]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.run(
        [sys.executable, str(script), str(db), how], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.integration
@pytest.mark.parametrize("how", ["annotated", "declared", "standard", "standard-stage-cache"])
def test_a_declared_model_class_is_read_back_by_a_fresh_process(tmp_path: Path, how: str) -> None:
    db = tmp_path / f"{how}.db"
    first = run_child(tmp_path, db, how)
    second = run_child(tmp_path, db, how)
    # a StandardStage's output_schema; through a pipeline, its Result
    kind = {"standard": "Tagged", "standard-stage-cache": "Result"}.get(how, "Answer")
    assert first == {"type": kind, "text": "Q", "tags": ["q"], "hits": 0, "unknown": 0}
    assert second == {"type": kind, "text": "Q", "tags": ["q"], "hits": 1, "unknown": 0}


@pytest.mark.integration
def test_an_undeclared_class_is_a_miss_in_a_fresh_process_never_an_import(tmp_path: Path) -> None:
    db = tmp_path / "undeclared.db"
    run_child(tmp_path, db, "undeclared")
    second = run_child(tmp_path, db, "undeclared")
    assert second == {"type": "Answer", "text": "Q", "tags": ["q"], "hits": 0, "unknown": 1}


def test_stats_report_the_health_of_the_file(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    store.set("a", [1])
    store.flush()
    assert store.get("a") == (True, [1])
    assert store.get("b") == (False, None)
    stats = store.stats()
    assert {
        k: stats[k] for k in ("hits", "misses", "available", "error", "pending", "written", "lost_writes")
    } == {
        "hits": 1,
        "misses": 1,
        "available": True,
        "error": None,
        "pending": 0,
        "written": 1,
        "lost_writes": 0,
    }
    store.close()
    store.set("c", 1)  # a closed store stores nothing and fails nothing
    assert store.get("c") == (False, None)


def test_a_value_the_format_cannot_store_stays_in_memory_with_one_warning(tmp_path: Path) -> None:
    class Handle:
        pass

    cached = CachedStage(stage(lambda x: {"h": Handle(), "x": x}), persist_to=tmp_path / "c.db")
    p = SequentialPipeline([cached])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            p(x=1)
            p(x=2)
    messages = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    assert len(messages) == 1
    assert "cached in memory only" in messages[0]
    assert "stages[0]" in messages[0]
    assert cached.cache_hits == 4
    assert len(cached.cache.persistent) == 0
    cached.cache.persistent.close()


def test_a_pickled_program_starts_with_an_empty_cache(tmp_path: Path) -> None:
    calls: list[int] = []
    cached = CachedStage(stage(lambda x: {"y": x}, writes=["y"]), cache_size=7)
    cached(x=1)
    copy = pickle.loads(pickle.dumps(cached.cache))
    assert copy.memory.maxsize == 7
    assert len(copy.memory) == 0
    assert calls == []
