"""What a stage-cache miss adds around a real ``dspy.Predict``, counted in CPU instructions.

Timing a ~20 µs difference on top of a ~200 µs call is at the mercy of a busy machine (the paired
A/B in ``cache.py`` moves by ±10 µs between runs on 2 shared cores). Instruction counts do not:
this script runs the same pipeline with and without ``Stage(..., cache=64)`` under Valgrind's
callgrind, takes the difference between 400 and 100 calls (so start-up cancels out), and converts
instructions to microseconds with the uncached call's own rate, timed natively in the same run.

Run: ``PYTHONPATH=src python benchmarks/cache_miss_instructions.py`` (needs ``valgrind``;
Debian: ``apt-get install valgrind``). Takes ~1 minute.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile

from _harness import machine_note

_CHILD = r"""
import itertools, sys
import dspy, stageflow
from stageflow.testing import FakeLM

variant, calls = sys.argv[1], int(sys.argv[2])
dspy.configure(lm=FakeLM({"answer": "a"}))
predict = dspy.Predict("question -> answer")
stage = predict if variant == "plain" else stageflow.Stage(predict, cache=64)
pipeline = stageflow.SequentialPipeline([stage])
fresh = itertools.count()
for _ in range(200 + calls):  # 200 warm-up calls; every question is new, so every call misses
    pipeline(question=f"q{next(fresh)}")
"""

_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def _instructions(script: str, variant: str, calls: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        tool = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        proc = subprocess.run(
            [*tool, sys.executable, script, variant, str(calls)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
            check=True,
        )
    found = _COLLECTED.search(proc.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no instruction count:\n{proc.stderr[-2000:]}")
    return int(found.group(1))


def _per_call(script: str, variant: str) -> float:
    return (_instructions(script, variant, 400) - _instructions(script, variant, 100)) / 300


def _child_cpu(script: str, calls: int) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, script, "plain", str(calls)], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def _native_us_per_call(script: str) -> float:
    """CPU µs per uncached call, natively: (3,100 calls − 100 calls) / 3,000, best of three."""
    return min((_child_cpu(script, 3100) - _child_cpu(script, 100)) / 3000 * 1e6 for _ in range(3))


def main() -> None:
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(_CHILD)
        script = f.name
    try:
        plain = _per_call(script, "plain")
        cached = _per_call(script, "cached")
        us_plain = _native_us_per_call(script)
    finally:
        os.unlink(script)
    rate = plain / us_plain  # instructions per µs on this machine, for this workload
    print(machine_note())
    print("| variant | instructions per call | ≈ µs per call |")
    print("|---|---|---|")
    print(f"| uncached Predict in a pipeline | {plain / 1e3:,.1f} K | {us_plain:.1f} |")
    print(f"| Stage(Predict, cache=64), every call a miss | {cached / 1e3:,.1f} K | {cached / rate:.1f} |")
    added = cached - plain
    print(f"| **a miss adds** | {added / 1e3:,.1f} K | **{added / rate:.1f}** (target ≤ 20) |")


if __name__ == "__main__":
    main()
