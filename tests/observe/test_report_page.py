"""The HTML run report without a browser: spans, the stage table, escaping, the CLI, bad traces."""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import json
import re
from html import unescape
from pathlib import Path
from typing import Any

import dspy
import pytest
from observe_kit import HOSTILE, every_pattern, fake_lm, fn

import stageflow
from stageflow.cli import main
from stageflow.errors import ConfigurationError
from stageflow.observe.report import load_trace, render_report, write_report
from stageflow.observe.report.spans import build_spans, stage_key, stage_table, walk

USAGE = {
    "lm_calls": 1,
    "input_tokens": 120,
    "output_tokens": 30,
    "cost": 0.002,
    "cache_hits": 0,
    "retries": 1,
    "repairs": 0,
}


def traced(p: Any = None, **inputs: Any) -> stageflow.Tracer:
    p = p or every_pattern()
    with dspy.context(lm=fake_lm()), stageflow.trace() as tracer:
        p(**(inputs or {"question": "q"}))
    return tracer


def data_of(html: str) -> dict[str, Any]:
    """The page's data, with the spans' inputs and outputs unpacked into ``content``."""
    m = re.search(r'<script type="application/json" id="sf-data">(.*?)</script>', html, re.S)
    assert m is not None
    data: dict[str, Any] = json.loads(m.group(1))
    packed = re.search(r'<script [^>]*id="sf-content" data-encoding="gzip-base64">(.*?)</script>', html, re.S)
    if packed is not None:
        data["content"] = json.loads(gzip.decompress(base64.b64decode(packed.group(1))))
    else:
        plain = re.search(r'<script type="application/json" id="sf-content">(.*?)</script>', html, re.S)
        assert plain is not None
        data["content"] = json.loads(plain.group(1))
    return data


def with_usage(doc: dict[str, Any], paths: set[str], usage: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    for e in doc["events"]:
        e.pop("usage", None)  # the engine's real usage is replaced by known numbers
        if e["event"] in ("stage_end", "stage_error") and stage_key(e["stage"]) in paths:
            e["usage"] = dict(usage)
    return doc


def test_spans_fold_nested_calls_and_match_without_span_ids() -> None:
    tracer = traced()
    roots, warnings = build_spans(tracer.events)
    assert warnings == []
    [_root] = roots
    flat = walk(roots)
    stage_starts = [e for e in tracer.events if e["event"] == "stage_start"]
    assert len(flat) == 1 + len(stage_starts)  # nested pipeline calls fold into their stage
    assert all(s.end is not None and s.end >= s.start for s in flat)
    foreach = next(s for s in flat if s.path == "stages[1]")
    assert [c.path for c in foreach.children] == [
        "stages[1].stage[0]",
        "stages[1].stage[1]",
        "stages[1].stage[2]",
    ]
    old = [{k: v for k, v in e.items() if k not in ("span", "parent")} for e in tracer.events]
    old_roots, old_warnings = build_spans(old)
    shape = [(s.depth, s.path, s.kind, s.status) for s in flat]
    assert [(s.depth, s.path, s.kind, s.status) for s in walk(old_roots)] == shape
    assert old_warnings == []


def test_unfinished_unmatched_and_unknown_events_are_reported() -> None:
    events = [
        {"event": "input", "stage": "", "span": 1, "parent": None, "t": 0.0},
        {"event": "stage_start", "stage": "stages[0]", "span": 2, "parent": 1, "t": 0.1},
        {"event": "stage_end", "stage": "stages[9]", "span": 99, "t": 0.2},
        {"event": "checkpoint", "stage": "", "t": 0.3},
    ]
    roots, warnings = build_spans(events)
    assert [s.status for s in walk(roots)] == ["running", "running"]
    assert warnings == [
        "2 span(s) never finished (the trace stops while they run)",
        "1 closing event(s) matched no open span",
        "1 event(s) of unknown kinds were ignored",
    ]


def test_stage_table_sums_usage_and_marks_missing_values() -> None:
    doc = with_usage(traced().to_dict(), {"stages[0]", "stages[1].stage[*].stages[1]"}, USAGE)
    doc["events"][-3].setdefault("usage", {"lm_calls": 1, "cost": None})  # one call without a price
    roots, _ = build_spans(doc["events"])
    rows, totals = stage_table(walk(roots))
    by_key = {r["key"]: r for r in rows}
    item = by_key["stages[1].stage[*].stages[1]"]
    assert item["calls"] == 3
    assert item["usage"] == {k: 3.0 * v for k, v in USAGE.items() if k != "cost"}
    assert item["cost"] == pytest.approx(0.006)
    assert not item["cost_partial"]
    assert by_key["stages[2]"]["usage"] is None
    assert by_key["stages[2]"]["cost"] is None
    assert totals["usage"]["input_tokens"] == 4 * 120
    assert totals["cost"] == pytest.approx(0.008)
    assert not by_key["stages[1]"]["leaf"]
    assert by_key["stages[0]"]["leaf"]


def test_page_is_self_contained_and_escapes_trace_text() -> None:
    p = stageflow.SequentialPipeline([fn(HOSTILE, ["x"], ["out"], HOSTILE)])
    html = render_report(traced(p, x="</script><script>alert(0)</script>"))
    assert html.count("<script") == 3  # the spans, their inputs and outputs, the code: nothing else
    assert html.count("</script>") == 3
    data = data_of(html)
    assert data["content"][1]["outputs"] == {"out": HOSTILE}
    assert data["content"][0]["inputs"] == {"x": "</script><script>alert(0)</script>"}
    assert "<img" not in html.split("<style>")[0] + html.split("</style>")[1].split('id="sf-data"')[0]
    for tag in re.findall(r"<(\w+)[\s>]", html):
        assert tag in {
            "html",
            "head",
            "meta",
            "title",
            "style",
            "body",
            "h1",
            "h2",
            "h3",
            "p",
            "div",
            "span",
            "b",
            "code",
            "table",
            "thead",
            "tr",
            "tbody",
            "button",
            "aside",
            "script",
            "svg",
            "defs",
            "marker",
            "path",
            "g",
            "rect",
            "text",
            "polygon",
            "circle",
        }, tag
    markup = re.sub(
        r'<script type="application/json" id="sf-(data|content)">.*?</script>', "", html, flags=re.S
    )
    assert not re.search(r"<[^>]*\s(src|href|on\w+)=", markup)


def test_content_security_policy_admits_exactly_the_page_script_and_style() -> None:
    html = render_report(traced())
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1)  # type: ignore[union-attr]
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)  # type: ignore[union-attr]
    style = re.search(r"<style>(.*?)</style>", html, re.S).group(1)  # type: ignore[union-attr]

    def digest(text: str) -> str:
        return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()

    assert csp.startswith("default-src 'none'; ")
    assert f"script-src 'sha256-{digest(script)}'" in csp
    assert f"style-src 'sha256-{digest(style)}'" in csp


def test_report_shows_graph_and_every_stage() -> None:
    tracer = traced()
    html = render_report(tracer)
    data = data_of(html)
    keys = {stage_key(e["stage"]) for e in tracer.events if e["event"] == "stage_start"}
    assert {r["key"] for r in data["stages"]} == keys | {"(pipeline call)"}
    drawn = {unescape(m) for m in re.findall(r'<g class="node k-\w+" data-path="([^"]*)"', html)}
    clusters = {c["path"] for c in tracer.graphs["g1"]["clusters"]}
    assert keys <= drawn | clusters
    assert len(drawn) > 20
    assert "<title>stageflow run: SequentialPipeline</title>" in html


def test_write_report_from_tracer_dict_path_and_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tracer = traced()
    trace_path = tracer.save(tmp_path / "trace.json")
    a = write_report(tracer, tmp_path / "a.html")
    b = write_report(tracer.to_dict(), tmp_path / "b.html", title="Mine")
    c = write_report(trace_path, tmp_path / "c.html")
    assert "<title>Mine</title>" in b.read_text(encoding="utf-8")
    assert data_of(a.read_text())["stages"] == data_of(c.read_text())["stages"]
    assert main(["report", str(trace_path)]) == 0
    assert (tmp_path / "trace.html").is_file()
    assert "wrote" in capsys.readouterr().err
    assert main(["report", str(trace_path), "-o", str(tmp_path / "out.html"), "--title", "T"]) == 0
    assert "<title>T</title>" in (tmp_path / "out.html").read_text(encoding="utf-8")
    html_named = tracer.save(tmp_path / "trace.html")
    assert main(["report", str(html_named)]) == 2  # would overwrite its own input
    assert "would overwrite the trace" in capsys.readouterr().err
    assert json.loads(html_named.read_text(encoding="utf-8"))["version"] == 2
    (tmp_path / "dir.html").mkdir()
    for target in (tmp_path / "dir.html", tmp_path / "missing" / "r.html"):
        with pytest.raises(ConfigurationError) as info:  # a clear error, not an IsADirectoryError
            tracer.save_report(target)
        assert info.value.code == "bad_output"
    assert list((tmp_path / "dir.html").iterdir()) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "is not valid JSON"),
        (b"\xff\xfe", "is not UTF-8"),
        (b'{"events": 3}', "has no 'events' list"),
        (b'{"events": [1]}', "event 0 is not an event object"),
        (b'{"events": [{"event": "input", "stage": "", "t": "soon"}]}', "non-numeric time"),
        (b'{"events": [], "graphs": []}', "'graphs' is not an object"),
    ],
)
def test_bad_trace_files_are_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ConfigurationError, match=message):
        load_trace(path)
    assert main(["report", str(path), "-o", str(tmp_path / "r.html")]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "r.html").exists()


def test_a_bad_graph_is_a_warning_not_a_failure() -> None:
    doc = traced().to_dict()
    doc["graphs"]["g1"] = {"version": 1, "nodes": "nope"}
    html = render_report(doc)
    assert "graph &#x27;g1&#x27; could not be drawn" in html or "graph 'g1' could not be drawn" in html
    assert "stages[0]" in html


def test_old_traces_and_bare_event_lists_still_render(tmp_path: Path) -> None:
    events = [{k: v for k, v in e.items() if k not in ("span", "parent", "graph")} for e in traced().events]
    (tmp_path / "old.json").write_text(json.dumps({"events": events}), encoding="utf-8")
    html = write_report(tmp_path / "old.json", tmp_path / "old.html").read_text(encoding="utf-8")
    assert "This trace has no pipeline graph" in html
    assert len(data_of(html)["spans"]) == len(data_of(render_report(events))["spans"]) > 20


def test_report_imports_no_dspy() -> None:
    import subprocess
    import sys

    code = "import sys, stageflow.observe.report as r; print('dspy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_large_inputs_and_outputs_are_compressed_losslessly(monkeypatch: pytest.MonkeyPatch) -> None:
    from stageflow.observe.report import page

    tracer = traced()
    plain = data_of(render_report(tracer))
    monkeypatch.setattr(page, "CONTENT_INLINE_LIMIT", 0)
    html = render_report(tracer)
    assert 'data-encoding="gzip-base64"' in html
    assert re.search(r'id="sf-content" data-encoding="gzip-base64">[A-Za-z0-9+/=]+</script>', html)
    assert data_of(html)["content"] == plain["content"]


def test_calls_of_different_pipelines_get_their_own_rows() -> None:
    first = stageflow.SequentialPipeline([fn("one", ["x"], ["y"])])
    second = stageflow.SequentialPipeline([fn("two", ["x"], ["z"]), fn("three", ["z"], ["w"])])
    with stageflow.trace() as tracer:
        first(x=1)
        second(x=1)
        first(x=2)
    html = render_report(tracer)
    rows = {r["key"]: r for r in data_of(html)["stages"]}
    assert set(rows) == {
        "#1 (pipeline call)",
        "#1 stages[0]",
        "#2 (pipeline call)",
        "#2 stages[0]",
        "#2 stages[1]",
    }
    assert (rows["#1 stages[0]"]["calls"], rows["#1 stages[0]"]["type"]) == (2, "one()")
    assert (rows["#2 stages[0]"]["calls"], rows["#2 stages[0]"]["type"]) == (1, "two()")
    assert "<h3>#1 SequentialPipeline · 2 calls</h3>" in html
    assert "<h3>#2 SequentialPipeline · 1 call</h3>" in html
    assert set(re.findall(r'data-path="(#\d [^"]*)"', html)) == {
        "#1 stages[0]",
        "#2 stages[0]",
        "#2 stages[1]",
    }
