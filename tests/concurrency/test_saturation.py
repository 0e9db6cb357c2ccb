"""Nested fan-outs on a saturated thread pool must not deadlock (run in child processes, so a deadlock
cannot hang this test run: each child gives up after a few seconds and exits)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Outer ForEach over 4 groups; each group runs an inner fan-out; the pool has only 2 threads.
CHILD = """
import os, sys, threading
import stageflow
from stageflow import EnsemblePipeline, ForEach

kind = sys.argv[1]
stageflow.configure(max_threads=2)
if kind == "quorum":
    member = lambda: stageflow.stage(lambda xs: {"answer": "a"}, writes=["answer"])
    inner = EnsemblePipeline([member() for _ in range(3)], quorum=2)
    collect = {"answer": "answers"}
else:
    options = {"collect": {}, "fail_fast": {"on_error": "fail_fast"}, "timeout": {"timeout": 5.0}}[kind]
    leaf = stageflow.stage(lambda x: {"y": x}, writes=["y"])
    inner = ForEach(leaf, over="xs", item="x", collect="ys", **options)
    collect = {"ys": "answers"}
outer = ForEach(inner, over="groups", item="xs", collect=collect)
done = []
groups = [["a", "b"], ["c", "d"], ["e", "f"], ["g", "h"]]
t = threading.Thread(target=lambda: done.append(outer(groups=groups).answers), daemon=True)
t.start()
t.join(2.0)
print(repr(done[0]) if done else "DEADLOCK", flush=True)
os._exit(0)
"""

KINDS = ["collect", "fail_fast", "timeout", "quorum"]


@pytest.fixture(scope="module")
def outcomes() -> dict[str, str]:
    children = {
        kind: subprocess.Popen(
            [sys.executable, "-c", CHILD, kind], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for kind in KINDS
    }
    results: dict[str, str] = {}
    for kind, child in children.items():
        try:
            out, err = child.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
        results[kind] = out.strip() or f"no output; stderr: {err[-500:]}"
    return results


def test_nested_collect_fan_outs_complete_on_a_two_thread_pool(outcomes: dict[str, str]) -> None:
    assert outcomes["collect"] == "[['a', 'b'], ['c', 'd'], ['e', 'f'], ['g', 'h']]"


@pytest.mark.parametrize("kind", ["fail_fast", "timeout"])
def test_nested_foreach_with_early_stop_options_completes_on_a_two_thread_pool(
    outcomes: dict[str, str], kind: str
) -> None:
    assert outcomes[kind] == "[['a', 'b'], ['c', 'd'], ['e', 'f'], ['g', 'h']]"


def test_nested_quorum_ensemble_completes_on_a_two_thread_pool(outcomes: dict[str, str]) -> None:
    assert outcomes["quorum"] == "['a', 'a', 'a', 'a']"
