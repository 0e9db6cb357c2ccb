"""A pipeline class of your own, cached on disk, hits whether or not it had run before it was wrapped.

Reproducer: a ``SequentialPipeline`` subclass tried on its own once, then wrapped in
``CachedStage(..., persist_to=db)``, missed every entry an earlier process had written for it: its
fingerprint took in the engine's bookkeeping (contract checks done, plan versions, memos), which
depends on what the process had run before.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

PROGRAM = """
import sys
import stageflow


class Mine(stageflow.SequentialPipeline):
    pass


def inc(x):
    return {"y": x + 1}


inner = Mine([stageflow.stage(inc, writes=["y"])])
if sys.argv[2] == "warm":
    assert inner(x=0).y == 1  # tried on its own first
outer = stageflow.SequentialPipeline([stageflow.CachedStage(inner, cache_size=10, persist_to=sys.argv[1])])
hits = []
for x in (1, 2):
    result = outer(x=x)
    assert result.y == x + 1
    hits.append(result.run.usage.total.cache_hits)
print(hits)
"""


def _run(script: Path, db: Path, how: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(script), str(db), how], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_warm_pipeline_hits_what_a_cold_process_stored(tmp_path: Path) -> None:
    script = tmp_path / "program.py"
    script.write_text(PROGRAM, encoding="utf-8")
    db = tmp_path / "cache.db"
    assert _run(script, db, "cold") == "[0, 0]"
    assert _run(script, db, "warm") == "[1, 1]"  # both answered from the file
    assert _run(script, db, "cold") == "[1, 1]"
