"""HTML run report at scale: size and time to render in Chromium, for traces up to 30,000 spans.

Run: ``python benchmarks/report_scale.py`` (needs Debian's ``chromium`` and ``pip install playwright``;
prints a Markdown table; numbers go to BENCHMARKS.md). Targets: a 10,000-span trace gives a report
under 5 MB that renders in under 2 s.

The traced program has the multi-hop QA shape, decompose → ForEach(retrieve → extract) → synthesize,
with function stages standing in for the model: each item retrieves two real passages of the shipped
multi-hop corpus (314 passages, about 250 characters each) and extracts a fact from them, and usage is
recorded on the model stages, so every column of the report is filled. Each ForEach item gives 3 spans
(the item and its two stages), so N items give 3N + 4 spans.

Measured per size, median of 3 fresh page loads in one browser:
- trace JSON and report file sizes, and ``write_report`` time in Python;
- load → rendered: navigation start to the end of the report's script (graph, table and timeline
  built), from the page's own ``performance.now()``; → painted: to the second animation frame after
  that (on screen); → unpacked: until the spans' inputs and outputs are readable (for large traces
  they are gzip-compressed in the page and unpacked after the first paint);
- expand all: from clicking "Expand all" (every span as a row) to the frame that shows it.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stageflow
from _harness import machine_note
from stageflow.observe.report import write_report

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CORPUS = Path(stageflow.__file__).parent / "apps" / "multihop" / "data" / "corpus.jsonl"
PASSAGES = [json.loads(line)["text"] for line in CORPUS.read_text(encoding="utf-8").splitlines() if line]
SIZES = (1_000, 3_333, 10_000, 30_000)  # spans, about
USAGE = {
    "lm_calls": 1,
    "input_tokens": 412,
    "output_tokens": 38,
    "cost": 0.00021,
    "cache_hits": 0,
    "retries": 0,
    "repairs": 0,
}


def retrieve(sub_question: str) -> dict[str, list[str]]:
    i = int(sub_question.rsplit(" ", 1)[1].rstrip(")"))
    return {"passages": [PASSAGES[(7 * i) % len(PASSAGES)], PASSAGES[(7 * i + 3) % len(PASSAGES)]]}


def extract(sub_question: str, passages: list[str]) -> dict[str, str]:
    return {"fact": passages[0].split(". ")[0]}


def program() -> stageflow.SequentialPipeline:
    per_item = stageflow.SequentialPipeline(
        [
            stageflow.stage(retrieve, writes=["passages"], name="retrieve"),
            stageflow.stage(extract, writes=["fact"], name="extract"),
        ]
    )
    return stageflow.SequentialPipeline(
        [
            stageflow.stage(
                lambda question, n: {"sub_questions": [f"{question} (part {i})" for i in range(n)]},
                writes=["sub_questions"],
                name="decompose",
            ),
            stageflow.ForEach(per_item, over="sub_questions", item="sub_question", collect={"fact": "facts"}),
            stageflow.stage(
                lambda facts: {"answer": f"{len(facts)} facts"}, writes=["answer"], name="synthesize"
            ),
        ]
    )


def trace_of(spans: int) -> dict[str, Any]:
    items = max(1, (spans - 4) // 3)
    with stageflow.trace() as tracer:
        program()(question="In which city was the inventor of the telephone born?", n=items)
    doc = tracer.to_dict()
    model_stages = (".stages[1]", "stages[0]", "stages[2]")  # extract, decompose, synthesize
    for e in doc["events"]:
        if e["event"] == "stage_end" and e["stage"].endswith(model_stages):
            e["usage"] = dict(USAGE)
    return doc


def browser_times(page: Any, path: Path) -> tuple[float, ...]:
    page.goto(path.as_uri())
    page.wait_for_function(
        "window.__sfPaintedAt !== undefined && window.__sfContentAt !== undefined", timeout=120_000
    )
    times = page.evaluate("[window.__sfRenderedAt, window.__sfPaintedAt, window.__sfContentAt]")
    expand = page.evaluate(
        """() => new Promise(resolve => {
            const t0 = performance.now();
            document.getElementById('expand-all').click();
            requestAnimationFrame(() => requestAnimationFrame(() => resolve(performance.now() - t0)));
        })"""
    )
    page.goto("about:blank")  # tear this page down now, not during the next measurement
    page.wait_for_timeout(200)
    return (*times, expand)


def main() -> None:
    from playwright.sync_api import sync_playwright

    rows = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(Path(tmp) / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS
        )
        page = context.new_page()
        requests: list[str] = []

        def route(r: Any) -> None:
            requests.append(r.request.url)
            r.continue_() if r.request.url.startswith("file:") else r.abort()

        page.route("**/*", route)
        for size in SIZES:
            doc = trace_of(size)
            trace_path = Path(tmp) / f"trace-{size}.json"
            trace_path.write_text(json.dumps(doc), encoding="utf-8")
            t0 = time.perf_counter()
            html_path = write_report(doc, Path(tmp) / f"report-{size}.html")
            python_s = time.perf_counter() - t0
            spans = sum(1 for e in doc["events"] if e["event"] == "stage_start") + 1
            runs = [browser_times(page, html_path) for _ in range(3)]
            medians = [statistics.median(r[k] for r in runs) for k in range(4)]
            sizes = (trace_path.stat().st_size / 1e6, html_path.stat().st_size / 1e6)
            rows.append((spans, *sizes, python_s, *medians))
        context.close()
    assert all(u.startswith("file:") for u in requests), "the report made a network request"
    print(f"# HTML run report at scale ({machine_note()})\n")
    print(
        "| spans | trace JSON MB | report MB | write_report s | Chromium load → rendered ms "
        "| → painted ms | → inputs/outputs unpacked ms | expand all ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for spans, trace_mb, report_mb, python_s, rendered, painted, content, expand in rows:
        print(
            f"| {spans:,} | {trace_mb:.2f} | {report_mb:.2f} | {python_s:.2f} | {rendered:.0f} "
            f"| {painted:.0f} | {content:.0f} | {expand:.0f} |"
        )
    ten = next(r for r in rows if r[0] >= 10_000)
    print()
    print("| measure (10,000-span trace) | value | target |")
    print("|---|---|---|")
    print(f"| report size | {ten[2]:.2f} MB | < 5 MB |")
    print(f"| Chromium load → painted | {ten[5] / 1000:.2f} s | < 2 s |")
    print(f"| Chromium load → inputs and outputs unpacked | {ten[6] / 1000:.2f} s | |")
    print(f"| report size / trace JSON size | {ten[2] / ten[1]:.2f}× | |")
    others = sum(1 for u in requests if not u.startswith("file:"))
    print(f"| requests other than the report file | {others} | 0 |")


if __name__ == "__main__":
    main()
