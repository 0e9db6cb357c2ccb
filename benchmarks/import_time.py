"""Cold-start cost: fresh interpreters, median of N runs each, side by side.

Run: ``python benchmarks/import_time.py`` (prints a Markdown table).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

CASES = {
    "bare interpreter": "pass",
    "import stageflow (lazy: no DSPy)": "import stageflow",
    "import dspy": "import dspy",
    "import dspy + every stageflow module": (
        "import dspy, stageflow; [getattr(stageflow, n) for n in stageflow.__all__]"
    ),
}


def run(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return (time.perf_counter() - t0) * 1e3


def run_cli() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stageflow.cli", "--help"], check=True, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - t0) * 1e3


def main(reps: int = 15) -> None:
    times: dict[str, list[float]] = {k: [] for k in [*CASES, "stageflow --help"]}
    for _ in range(reps):
        for name, code in CASES.items():
            times[name].append(run(code))
        times["stageflow --help"].append(run_cli())
    med = {k: statistics.median(v) for k, v in times.items()}
    bare = med["bare interpreter"]
    print(f"# Import time (median of {reps} fresh interpreters, wall ms)\n")
    print("| command | wall ms | minus bare interpreter |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.0f} | {v - bare:.0f} |")
    diffs = [
        a - b
        for a, b in zip(times["import dspy + every stageflow module"], times["import dspy"], strict=True)
    ]
    own = statistics.median(diffs)
    print(f"\nstageflow's own modules on top of DSPy (median of paired differences): {own:.0f} ms")
    print("(target: < 100 ms)")


if __name__ == "__main__":
    main()
