"""Mermaid and DOT text: well-formed, every user text escaped, and rendered by the real tools."""

from __future__ import annotations

import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import dspy
import pytest
from observe_kit import HOSTILE, MERMAID_JS, artifacts_dir, every_pattern, fn, require

import stageflow
from stageflow.cli import main
from stageflow.observe.graph import Graph, dot_text, graph_of, mermaid_text, to_dot, to_mermaid

MM_TEXT = r'(?:[^"<#]|<br/>|#\d+;)*'
MM_NODE = re.compile(
    rf'^\s*n\d+(\(\["|\{{\{{"|\{{"|\[\["|\(\("|\("|>"|\[")({MM_TEXT})("\]\)|"\}}\}}|"\}}|"\]\]|"\)\)|"\)|"\])$'
)
MM_EDGE = re.compile(rf'^\s*n\d+ (-->|-\.->)(\|"({MM_TEXT})"\|)? n\d+$')
MM_SUB = re.compile(rf'^\s*subgraph c\d+\["({MM_TEXT})"\]$')
MM_OTHER = re.compile(
    r"^\s*(flowchart TD|direction (TB|LR)|end"
    r"|classDef sf_[a-z_]+ fill:#[0-9a-f]{6},stroke:#[0-9a-f]{6}|class (n\d+,)*n\d+ sf_[a-z_]+)$"
)


def hostile_pipeline() -> stageflow.SequentialPipeline:
    """Hostile text wherever users choose names: stage names, fields, structure and node names."""
    return stageflow.SequentialPipeline(
        [
            fn(HOSTILE, ["q"], ["x"]),  # field names must be identifiers (refused otherwise)
            stageflow.BranchingPipeline(
                fn("route", ["q"], ["branch"], "a"),
                {"a": fn(HOSTILE, ["q"], ["z"]), "b": fn("b", ["q"], ["z"])},
            ),
            stageflow.AdaptivePipeline(
                {HOSTILE: fn("c", ["q"], ["plan"])},
                fn("pick", ["q"], ["structure"], HOSTILE),
                structures={HOSTILE: [HOSTILE]},
            ),
            stageflow.HierarchicalPipeline(
                {
                    "root": {"type": "pipeline", "stages": [HOSTILE]},
                    HOSTILE: {"type": "module", "module": fn("d", ["q"], ["e"])},
                }
            ),
        ]
    )


def mm_decode(text: str) -> str:
    return re.sub(r"#(\d+);", lambda m: chr(int(m.group(1))), text.replace("<br/>", "\n"))


def mermaid_texts(source: str) -> list[str]:
    """Check every line against the grammar stageflow writes; return the decoded texts."""
    texts = []
    for line in source.splitlines():
        for pattern in (MM_NODE, MM_EDGE, MM_SUB):
            m = pattern.match(line)
            if m:
                texts.append(
                    mm_decode(
                        m.group(2) if pattern is MM_NODE else m.group(3 if pattern is MM_EDGE else 1) or ""
                    )
                )
                break
        else:
            assert MM_OTHER.match(line), f"unexpected Mermaid line: {line!r}"
    return texts


def test_mermaid_is_well_formed_and_keeps_hostile_text_literal() -> None:
    g = graph_of(hostile_pipeline())
    texts = mermaid_texts(to_mermaid(g))
    hostile_nodes = [n for n in g.nodes.values() if n.label == f"{HOSTILE}()"]
    assert len(hostile_nodes) == 2
    for n in hostile_nodes:
        assert f"{n.label}\n{n.detail}" in texts
    assert texts.count(f"{HOSTILE}()\nq -> x") == 1
    assert texts.count(HOSTILE) == 1  # the structure's edge label
    assert f"structures['{HOSTILE}']: SequentialPipeline" in texts


def test_mermaid_of_every_pattern_is_well_formed() -> None:
    p = every_pattern()
    text = p.to_mermaid()
    assert text == to_mermaid(p) == mermaid_text(graph_of(p))
    texts = mermaid_texts(text)
    assert "repeat (at most 3 iterations)" in texts
    lines = [line.strip() for line in text.splitlines()]
    assert sum(line.startswith("subgraph ") for line in lines) == lines.count("end") > 5


def dot_strings(source: str) -> list[str]:
    """Every quoted string of the DOT text, decoded as Graphviz shows it."""
    out = []
    for m in re.finditer(r'"((?:[^"\\]|\\.)*)"', source):
        raw = m.group(1)
        text = re.sub(r"\\(.)", lambda e: {"n": "\n", "\\": "\\", '"': '"'}[e.group(1)], raw)
        out.append(text.replace("&amp;", "&"))
    # Outside the strings, only identifiers, attributes and punctuation.
    rest = re.sub(r'"((?:[^"\\]|\\.)*)"', '""', source)
    assert re.fullmatch(r'[\w\s{}\[\]=,;:#>"\-.()/]*', rest), rest
    return out


def test_dot_escapes_quotes_backslashes_newlines_and_entities() -> None:
    g = graph_of(hostile_pipeline())
    strings = dot_strings(to_dot(g))
    assert f"{HOSTILE}()\nq -> x" in strings
    assert dot_text(g) == to_dot(g) == hostile_pipeline().to_dot()


def test_renderers_take_a_graph_dict_and_reject_bad_ones() -> None:
    g = graph_of(every_pattern())
    assert to_mermaid(g.to_dict()) == to_mermaid(g)
    assert to_dot(g.to_dict()) == to_dot(g)
    bad = g.to_dict()
    bad["clusters"][0]["layout"] = "diagonal"
    with pytest.raises(stageflow.ConfigurationError, match="layout"):
        to_dot(bad)


def test_unprintable_characters_and_lone_surrogates_are_replaced() -> None:
    g = Graph()
    c = g.add_cluster("P\x00\ud800", kind="sequential", path="")
    g.add_node("a\x07b\r\nc", kind="function", path="stages[0]", cluster=c)
    assert g.nodes["n1"].label == "a\ufffdb\nc"
    to_mermaid(g).encode("utf-8")
    to_dot(g).encode("utf-8")


# -- real tools -------------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("which", ["every_pattern", "hostile", "multihop"])
def test_graphviz_renders_the_dot(dot_binary: str, which: str) -> None:
    if which == "multihop":
        from stageflow.apps.multihop import build_program

        p: Any = build_program()
    else:
        p = every_pattern() if which == "every_pattern" else hostile_pipeline()
    done = subprocess.run([dot_binary, "-Tsvg"], input=p.to_dot().encode(), capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert b"Warning" not in done.stderr, done.stderr.decode()
    svg = ET.fromstring(done.stdout)
    texts = [t.text or "" for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    tooltips = {
        a.get("{http://www.w3.org/1999/xlink}title") for a in svg.iter("{http://www.w3.org/2000/svg}a")
    }
    assert set(graph_of(p).stage_paths()) <= tooltips
    if which == "hostile":
        assert HOSTILE.split("\n")[0] in texts  # literally, line by line
        assert f"{HOSTILE.split(chr(10))[1]}()" in texts
        assert not list(svg.iter("{http://www.w3.org/2000/svg}script"))
    (artifacts_dir() / f"graph-{which}.svg").write_bytes(done.stdout)


@pytest.mark.integration
def test_stageflow_graph_svg_and_missing_graphviz(
    dot_binary: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = Path(stageflow.__file__).parent / "examples" / "multihop.yaml"
    out = tmp_path / "multihop.svg"
    assert main(["graph", str(spec), "--format", "svg", "-o", str(out)]) == 0
    assert ET.fromstring(out.read_bytes()).tag == "{http://www.w3.org/2000/svg}svg"
    monkeypatch.setenv("PATH", str(tmp_path))  # no dot on PATH
    assert main(["graph", str(spec), "--format", "svg"]) == 2
    err = capsys.readouterr().err
    assert "needs Graphviz's 'dot' program" in err
    assert "apt-get install graphviz" in err


def test_stageflow_graph_text_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = Path(stageflow.__file__).parent / "examples" / "multihop.yaml"
    assert main(["graph", str(spec)]) == 0
    mermaid = capsys.readouterr().out
    assert mermaid.startswith("flowchart TD\n")
    mermaid_texts(mermaid)
    assert main(["graph", str(spec), "--format", "dot", "-o", str(tmp_path / "g.dot")]) == 0
    assert (tmp_path / "g.dot").read_text().startswith("digraph stageflow {")
    assert main(["graph", str(tmp_path / "missing.yaml")]) == 2
    assert main(["graph", str(spec), "-o", str(tmp_path / "no" / "dir.dot")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.integration
def test_mermaid_renders_in_a_browser_and_shows_hostile_text_as_text(browser_page: Any) -> None:
    """Mermaid's own bundle (from the npm registry, see .ci/run) parses what stageflow writes."""
    require(MERMAID_JS.is_file(), f"Mermaid's bundle at {MERMAID_JS} (.ci/run fetches it with npm pack)")
    page = browser_page
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.set_content("<html><body><div id=out></div></body></html>")
    page.add_script_tag(path=str(MERMAID_JS))
    results = []
    for source in (to_mermaid(hostile_pipeline()), to_mermaid(every_pattern())):
        results.append(
            page.evaluate(
                """async (src) => {
                    mermaid.initialize({startOnLoad: false, securityLevel: 'strict'});
                    const out = document.getElementById('out');
                    const r = await mermaid.render('g' + Math.floor(Math.random() * 1e9), src);
                    out.innerHTML = r.svg;
                    return {
                      labels: [...out.querySelectorAll('.nodeLabel, .edgeLabel')].map(e => e.textContent),
                      images: out.querySelectorAll('img').length,
                      scripts: out.querySelectorAll('script').length,
                    };
                }""",
                source,
            )
        )
    for result in results:
        assert result["images"] == result["scripts"] == 0
    # <br/> line breaks vanish from textContent; everything else is shown as written.
    shown = f"{HOSTILE}()q -> x".replace("\n", "")
    assert shown in results[0]["labels"]
    assert "repeat (at most 3 iterations)" in str(results[1])
    assert dialogs == []


def test_pipeline_methods_are_thin_wrappers() -> None:
    p = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    assert p.to_mermaid() == to_mermaid(p)
    assert p.to_dot() == to_dot(p)
