"""The HTML run report in a real browser (Debian's Chromium driven by Playwright).

The page must load with no console error and no request but its own file, show every stage of a
known trace, show trace text as text, and render the usage columns the trace carries. Screenshots
go to ``build/test-artifacts/`` (or ``$STAGEFLOW_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import dspy
import pytest
from observe_kit import HOSTILE, artifacts_dir, every_pattern, fake_lm, fn

import stageflow
from stageflow.cli import main
from stageflow.observe.report import page as page_module
from stageflow.observe.report.page import COLLAPSE_OVER
from stageflow.observe.report.spans import stage_key

pytestmark = pytest.mark.integration

USAGE = {
    "lm_calls": 1,
    "input_tokens": 1200,
    "output_tokens": 30,
    "cost": 0.0125,
    "cache_hits": 1,
    "retries": 2,
    "repairs": 0,
}


class Watched:
    """A page plus everything it tried: requests, console messages, page errors, dialogs."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.requests: list[str] = []
        self.console: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.route("**/*", self._route)
        page.on("console", lambda m: self.console.append((m.type, m.text)))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

    def _route(self, route: Any) -> None:
        self.requests.append(route.request.url)
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            route.abort()

    def open(self, path: Path) -> None:
        self.page.goto(path.resolve().as_uri())
        self.page.wait_for_function("document.body.dataset.rendered === '1'", timeout=30_000)
        self.page.wait_for_function("document.body.dataset.content === '1'", timeout=30_000)

    def assert_clean(self, path: Path) -> None:
        assert self.requests == [path.resolve().as_uri()]
        assert [c for c in self.console if c[0] in ("error", "warning")] == []
        assert self.errors == []
        assert self.dialogs == []


def known_trace(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """Every pattern, one stage whose name and output are hostile, usage on some stages."""
    p = every_pattern()
    p.add_stage(fn(HOSTILE, ["answer"], ["shown"], "</script><script>alert(1)</script>"))
    with dspy.context(lm=fake_lm()), stageflow.trace() as tracer:
        p(question="q")
    doc = copy.deepcopy(tracer.to_dict())
    for e in doc["events"]:
        e.pop("usage", None)  # the engine's real usage is replaced by known numbers below
        if e["event"] == "stage_end" and stage_key(e["stage"]) in (
            "stages[0]",
            "stages[1].stage[*].stages[1]",
        ):
            e["usage"] = dict(USAGE)
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path, doc


@pytest.mark.parametrize("packed", [False, True], ids=["json", "gzip"])
def test_report_loads_offline_shows_every_stage_and_escapes_everything(
    browser_page: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, packed: bool
) -> None:
    if packed:  # inputs and outputs compressed, as for large traces
        monkeypatch.setattr(page_module, "CONTENT_INLINE_LIMIT", 0)
    trace_path, doc = known_trace(tmp_path)
    html_path = tmp_path / "report.html"
    assert main(["report", str(trace_path), "-o", str(html_path)]) == 0
    w = Watched(browser_page)
    w.open(html_path)
    page = w.page
    starts = [e for e in doc["events"] if e["event"] in ("stage_start", "input") and e.get("parent") is None]
    stage_spans = [e for e in doc["events"] if e["event"] == "stage_start"]
    keys = {stage_key(e["stage"]) for e in stage_spans}
    # The table: one row per stage key, plus the pipeline call.
    shown_keys = set(
        page.eval_on_selector_all("#stage-rows tr[data-key]", "rs => rs.map(r => r.dataset.key)")
    )
    assert shown_keys == keys | {"(pipeline call)"}
    # The timeline: every span is a row (small trace: all expanded).
    titles = page.eval_on_selector_all("#tl-rows .row .name", "ns => ns.map(n => n.title.split(' · ')[0])")
    assert sorted(titles) == sorted([e["stage"] for e in stage_spans] + ["(pipeline call)"] * len(starts))
    # The graph: a node for each leaf stage key.
    drawn = set(
        page.eval_on_selector_all(
            "svg.graph .node[data-path]", "ns => ns.map(n => n.getAttribute('data-path'))"
        )
    )
    assert {k for k in keys if "stage[*]" not in k or k.count(".") > 1} - drawn <= {
        "stages[1]",
        "stages[2]",
        "stages[3]",
        "stages[4]",
        "stages[5]",
        "stages[6]",
        "stages[7]",
        "stages[8]",
        "stages[1].stage[*]",
        "stages[5].structures['simple']",
        "stages[8].nodes['root']",
    }
    # Usage columns where the trace has them, a dash where it has not.
    cells = page.eval_on_selector_all(
        "#stage-rows tr[data-key]",
        "rs => Object.fromEntries(rs.map(r => [r.dataset.key, [...r.cells].map(c => c.textContent)]))",
    )
    header = page.eval_on_selector_all("#stage-head th", "hs => hs.map(h => h.textContent)")
    col = {name: i for i, name in enumerate(header)}
    item = cells["stages[1].stage[*].stages[1]"]
    assert (item[col["calls"]], item[col["in tokens"]], item[col["cost"]], item[col["retries"]]) == (
        "3",
        "3,600",
        "$0.0375",
        "6",
    )
    assert cells["stages[2]"][col["LM calls"]] == "–"
    assert cells["stages[2]"][col["cost"]] == "–"
    total = page.eval_on_selector_all("#stage-rows tr.total td", "ts => ts.map(t => t.textContent)")
    assert total[col["in tokens"]] == "4,800"
    assert total[col["cost"]] == "$0.0500"
    # The hostile stage: its output is shown as text in the details panel.
    hostile_row = page.locator("#tl-rows .row", has_text=HOSTILE.split("\n")[0][:20])
    hostile_row.first.click()
    outputs = page.text_content("#details pre.outputs")
    assert json.loads(outputs or "") == {"shown": "</script><script>alert(1)</script>"}
    assert page.eval_on_selector_all("#details script, #details img", "es => es.length") == 0
    # Clicking a graph node finds the stage in the table.
    page.click("svg.graph .node[data-path='stages[0]']")
    assert page.get_attribute("#stage-rows tr.hl", "data-key") == "stages[0]"
    page.screenshot(path=str(artifacts_dir() / f"report-{'gzip' if packed else 'json'}.png"), full_page=True)
    w.assert_clean(html_path)


def test_large_traces_start_collapsed_and_expand(browser_page: Any, tmp_path: Path) -> None:
    n = COLLAPSE_OVER + 100
    p = stageflow.SequentialPipeline(
        [
            stageflow.stage(lambda n: {"xs": list(range(n))}, writes=["xs"], name="make"),
            stageflow.ForEach(fn("each", ["x"], ["y"]), over="xs", item="x", collect={"y": "ys"}),
        ]
    )
    with stageflow.trace() as tracer:
        p(n=n)
    html_path = tracer.save_report(tmp_path / "big.html")
    w = Watched(browser_page)
    w.open(html_path)
    rows = "document.querySelectorAll('#tl-rows .row').length"
    assert w.page.evaluate(rows) == 3  # the call, make, the ForEach (collapsed, n items inside)
    assert f"({n} inside)" in (w.page.text_content("#tl-rows") or "")
    w.page.click("#tl-rows .row:nth-child(3) .tog")
    assert w.page.evaluate(rows) == 3 + n
    w.page.click("#collapse-all")
    w.page.click("#expand-all")
    assert w.page.evaluate(rows) == 3 + n
    w.assert_clean(html_path)
