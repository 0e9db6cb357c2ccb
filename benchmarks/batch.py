"""Batch throughput, side by side in one run, plus the journal's cost and the time to resume.

1,000 records × a 3-stage pipeline, each stage a fake LM call with 20 ms latency, 32 records in
flight: ideal wall = 1000 × 3 × 20 ms / 32 = 1.875 s (533 records/s). Variants:

- stageflow ``run_batch`` (local: worker threads), with its SQLite journal;
- stageflow ``run_batch`` on the process backend (2 forked worker processes × 16 records), same journal;
- stageflow ``run_batch`` on Ray (a local 2-CPU cluster, 2 actors × 16 slots), same journal;
- DSPy ``Module.batch(num_threads=32)`` over the same three ``Predict`` stages and fake LM;
- LangGraph ``.batch(max_concurrency=32)``: three nodes, each a LangChain fake chat-model call
  (``prompt | FakeListChatModel(sleep=0.02) | parser``), when langgraph is installed;
- an asyncio reference (``Semaphore(32)``, three ``asyncio.sleep(0.02)`` per record): the floor;
- a thread reference: 32 threads calling the same pipeline, no journal, no runner (the floor for
  ``run_batch``'s design: what DSPy's per-call CPU leaves on this machine);
- the design ``run_batch`` did not take: 32 asyncio tasks awaiting ``pipeline.acall`` (no journal).

The stageflow and DSPy rows run real ``dspy.Predict`` stages on ``stageflow.testing.FakeLM`` (the
real adapter and LM path, no network). Rows marked "sleep stages" replace every LM call by a 20 ms
sleep, to show the runner's own cost apart from DSPy's per-call CPU.

Run: ``python benchmarks/batch.py [--reps 3] [--no-ray] [--latency 0.005]`` (peers: ``make bench-peers``).
A shorter ``--latency`` makes DSPy's CPU per call the limit (where worker processes pay off).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import dspy

import stageflow
from stageflow.runtime import ProcessBackend
from stageflow.runtime.outcome import Outcome, Usage
from stageflow.runtime.writer import JournalWriter
from stageflow.testing import FakeLM

N, STAGES, LAT, CONC = 1000, 3, 0.02, 32
IDEAL = N * STAGES * LAT / CONC


def fake_lm() -> FakeLM:
    return FakeLM({"answer": "ok", "a1": "x", "a2": "y"}, latency=LAT)


def predict_pipeline() -> stageflow.SequentialPipeline:
    return stageflow.SequentialPipeline(
        [dspy.Predict("question -> a1"), dspy.Predict("a1 -> a2"), dspy.Predict("a2 -> answer")]
    )


def sleep_pipeline() -> stageflow.SequentialPipeline:
    def step(x: int) -> dict[str, int]:
        time.sleep(LAT)
        return {"x": x + 1}

    return stageflow.SequentialPipeline([stageflow.stage(step, writes=["x"]) for _ in range(STAGES)])


class ThreePredict(dspy.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.stages = [dspy.Predict("question -> a1"), dspy.Predict("a1 -> a2"), dspy.Predict("a2 -> answer")]

    def forward(self, question: str) -> Any:
        a1 = self.stages[0](question=question).a1
        a2 = self.stages[1](a1=a1).a2
        return self.stages[2](a2=a2)


def thread_reference(program: Any, lm: Any, questions: list[dict[str, Any]]) -> None:
    """The floor for threads: ``CONC`` threads calling the pipeline, nothing else."""
    it = iter(questions)
    lock = threading.Lock()

    def worker() -> None:
        with dspy.context(lm=lm):
            while True:
                with lock:
                    rec = next(it, None)
                if rec is None:
                    return
                program(question=rec["question"])

    threads = [threading.Thread(target=worker) for _ in range(CONC)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def make_lm_for_ray() -> FakeLM:  # built inside each Ray worker (FakeLM holds a lock)
    return fake_lm()


def variants(tmp: Path, use_ray: bool, chunk: int = 4) -> dict[str, Callable[[], Any]]:
    out: dict[str, Callable[[], Any]] = {}
    questions = [{"id": i, "question": f"q{i}"} for i in range(N)]
    xs = [{"id": i, "x": i} for i in range(N)]
    lm = fake_lm()
    counter = iter(range(10**9))

    def journal() -> Path:
        return tmp / f"j{next(counter)}.sqlite"

    async def ref() -> None:
        sem = asyncio.Semaphore(CONC)

        async def one() -> None:
            async with sem:
                for _ in range(STAGES):
                    await asyncio.sleep(LAT)

        await asyncio.gather(*(one() for _ in range(N)))

    out["asyncio reference (sleep stages)"] = lambda: asyncio.run(ref())
    program, sleepy = predict_pipeline(), sleep_pipeline()
    out["stageflow run_batch, local"] = lambda: stageflow.run_batch(
        program, questions, lm=lm, journal=journal(), concurrency=CONC, progress=False
    )

    async def tasks() -> None:  # the design run_batch did not take: asyncio tasks + acall
        it = iter(questions)

        async def worker() -> None:
            for rec in it:
                with dspy.track_usage():
                    await program.acall(question=rec["question"])

        with dspy.context(lm=lm, disable_history=True):
            await asyncio.gather(*(worker() for _ in range(CONC)))

    out["alternative: asyncio tasks × pipeline.acall (no journal)"] = lambda: asyncio.run(tasks())

    out["thread reference: 32 threads × pipeline call (no journal)"] = lambda: thread_reference(
        program, lm, questions
    )
    out["stageflow run_batch, processes (2 workers)"] = lambda: stageflow.run_batch(
        program,
        questions,
        lm=lm,
        journal=journal(),
        concurrency=CONC,
        progress=False,
        backend=ProcessBackend(processes=2),
    )
    out["stageflow run_batch, local (sleep stages)"] = lambda: stageflow.run_batch(
        sleepy, xs, journal=journal(), concurrency=CONC, progress=False
    )
    if use_ray:
        from stageflow.runtime import RayBackend

        ray_backend = RayBackend(actors=2, slots=16, chunk=chunk)
        out["stageflow run_batch, Ray 2 actors × 16 slots"] = lambda: stageflow.run_batch(
            program, questions, lm=make_lm_for_ray, journal=journal(), backend=ray_backend, progress=False
        )
    module = ThreePredict()
    examples = [dspy.Example(question=f"q{i}").with_inputs("question") for i in range(N)]

    def dspy_batch() -> Any:
        with dspy.context(lm=lm):
            return module.batch(examples, num_threads=CONC, disable_progress_bar=True)

    out["DSPy Module.batch(num_threads=32)"] = dspy_batch
    out.update(peer_variants())
    return out


class PeerState(TypedDict):
    text: str


def peer_variants() -> dict[str, Callable[[], Any]]:
    try:
        from langchain_core.language_models.fake_chat_models import FakeListChatModel
        from langchain_core.output_parsers import StrOutputParser
        from langchain_core.prompts import ChatPromptTemplate
        from langgraph.graph import END, START, StateGraph
    except ImportError:
        print("note: langgraph / langchain-core not installed: LangGraph row skipped (make bench-peers)")
        return {}
    chain = (
        ChatPromptTemplate.from_messages([("system", "Answer."), ("user", "{text}")])
        | FakeListChatModel(responses=["ok"], sleep=LAT)
        | StrOutputParser()
    )

    def node(state: PeerState) -> dict[str, str]:
        return {"text": chain.invoke({"text": state["text"]})}

    def sleep_node(state: PeerState) -> dict[str, str]:
        time.sleep(LAT)
        return {"text": state["text"]}

    def build(fn: Any) -> Any:
        g = StateGraph(PeerState)
        prev = START
        for i in range(STAGES):
            g.add_node(f"n{i}", fn)
            g.add_edge(prev, f"n{i}")
            prev = f"n{i}"
        g.add_edge(prev, END)
        return g.compile()

    graph, sleepy = build(node), build(sleep_node)
    inputs = [{"text": f"q{i}"} for i in range(N)]
    return {
        "LangGraph .batch(max_concurrency=32)": lambda: graph.batch(inputs, {"max_concurrency": CONC}),
        "LangGraph .batch(max_concurrency=32) (sleep stages)": lambda: sleepy.batch(
            inputs, {"max_concurrency": CONC}
        ),
    }


def journal_cost(tmp: Path, records: int = 10_000, threads: int = CONC) -> tuple[float, float, float]:
    """Journal work per record (a start committed with the previous result, as the runner does), from
    ``threads`` threads: ``(wall µs per record, process CPU µs per record, operations per commit)``."""
    from stageflow.runtime.journal import Journal

    path = tmp / "cost.sqlite"
    with Journal(path) as j:
        j.con.executemany(
            "INSERT INTO records (key, seq, id_json, input_hash) VALUES (?, ?, ?, 'h')",
            [(str(i), i, json.dumps(i)) for i in range(records)],
        )
    writer = JournalWriter(path, 1)
    outcome = Outcome(True, {"answer": "a short answer", "score": 0.5}, None, Usage(3, 400, 20), 0.06)
    seqs = iter(range(records))
    lock = threading.Lock()

    def work() -> None:  # as the batch runner does: a result goes with the worker's next start
        done: list[tuple[int, Outcome]] = []
        while True:
            with lock:
                seq = next(seqs, None)
            if seq is None:
                for s, o in done:
                    writer.finish(s, o)
                return
            writer.start([seq], done)
            done = [(seq, outcome)]

    w0, c0 = time.perf_counter(), time.process_time()
    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    writer.close()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return wall / records * 1e6, cpu / records * 1e6, 2 * records / max(1, writer.commits)


def resume_skip(tmp: Path, records: int = 10_000) -> tuple[float, float]:
    """Seconds to resume a finished 10,000-record journal (read input, check, skip, write output),
    and the first run's seconds (an instant one-stage pipeline)."""
    data = tmp / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"r{i}", "text": f"record {i}"}) + "\n" for i in range(records))
    )
    pipe = stageflow.SequentialPipeline(
        [stageflow.stage(lambda text: {"n": len(text)}, writes=["n"], blocking=False)]
    )
    kw: dict[str, Any] = {"journal": tmp / "skip.sqlite", "output": tmp / "out.jsonl", "progress": False}
    t0 = time.perf_counter()
    stageflow.run_batch(pipe, data, concurrency=CONC, **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = stageflow.run_batch(pipe, data, concurrency=CONC, **kw)
    skip = time.perf_counter() - t0
    assert summary.ran == 0
    assert summary.skipped == records
    return skip, first


def main() -> None:
    global LAT, IDEAL
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument(
        "--only", default="", help="run only variants whose name contains one of these comma-separated texts"
    )
    parser.add_argument("--chunk", type=int, default=4, help="records per Ray call")
    parser.add_argument("--latency", type=float, default=LAT, help="seconds per LM call (0.02)")
    args = parser.parse_args()
    LAT, IDEAL = args.latency, N * STAGES * args.latency / CONC
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    use_ray = not args.no_ray
    if use_ray:
        try:
            import ray
        except ImportError:
            print("note: ray not installed: Ray row skipped (pip install 'stageflow[ray]')")
            use_ray = False
        else:
            os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), *sys.path])
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        wanted = [w for w in args.only.split(",") if w] or [""]
        vs = {k: v for k, v in variants(tmp, use_ray, args.chunk).items() if any(w in k for w in wanted)}
        for fn in vs.values():  # warm-up: imports, pools, Ray workers
            fn()
        wall: dict[str, list[float]] = {k: [] for k in vs}
        cpu: dict[str, list[float]] = {k: [] for k in vs}
        setup: dict[str, list[float]] = {k: [] for k in vs}
        names = list(vs)
        for r in range(args.reps):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                w0, c0 = time.perf_counter(), time.process_time()
                result = vs[name]()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
                setup[name].append(getattr(result, "setup_time", 0.0))
        jw, jc, per_commit = journal_cost(tmp)
        skip, first = resume_skip(tmp)
    load = os.getloadavg()
    print(f"# Batch: {N} records × {STAGES} stages × {LAT * 1e3:.0f} ms, {CONC} in flight")
    print(f"ideal {IDEAL:.3f} s = {N / IDEAL:.0f} records/s; medians of {args.reps} rotated repetitions;")
    print(
        f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min) on {os.cpu_count()} CPUs\n"
    )
    print(
        "| variant | wall s | records/s | ratio to ideal | of which setup s | ratio to ideal after setup "
        "| driver CPU µs per stage call |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in vs:
        w = statistics.median(wall[name])
        s = statistics.median(setup[name])
        c = statistics.median(cpu[name]) / (N * STAGES) * 1e6
        after = f"{IDEAL / (w - s):.2f}" if s else "–"
        print(f"| {name} | {w:.2f} | {N / w:.0f} | {IDEAL / w:.2f} | {s:.2f} | {after} | {c:.0f} |")
    print("\n| measure | value | target |")
    print("|---|---|---|")
    print(f"| journal cost per record: caller wall (32 threads) | {jw:.0f} µs | ≤ 500 µs |")
    print(f"| journal cost per record: process CPU (commits included) | {jc:.0f} µs | ≤ 500 µs |")
    print(f"| journal operations per commit (group commit) | {per_commit:.1f} | |")
    print(
        f"| resume a finished 10,000-record journal (scan, check, skip, write output) | {skip:.2f} s "
        "| < 1 s |"
    )
    print(f"| first run of those 10,000 records (instant stage) | {first:.2f} s | |")
    if use_ray:
        import ray

        ray.shutdown()


if __name__ == "__main__":
    main()
