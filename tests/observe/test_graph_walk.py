"""graph_of: every pattern drawn from the objects the engine runs, with the engine's stage paths."""

from __future__ import annotations

import json
from typing import Any

import dspy
import pytest
from observe_kit import Summarise, every_pattern, fake_lm, fn

import stageflow
from stageflow.errors import ConfigurationError
from stageflow.observe.graph import Graph, graph_of
from stageflow.observe.report.spans import stage_key


def by_path(g: Graph, path: str) -> Any:
    [node] = [n for n in g.nodes.values() if n.path == path]
    return node


def edges_from(g: Graph, nid: str) -> list[tuple[str, str, str]]:
    return [(e.target, e.label, e.kind) for e in g.edges if e.source == nid]


def only(g: Graph, kind: str) -> Any:
    [node] = [n for n in g.nodes.values() if n.kind == kind]
    return node


def test_every_traced_stage_is_a_node_of_the_graph() -> None:
    """The picture and the engine agree: each span's stage path (ForEach items as ``stage[*]``)
    is a node or a cluster of the graph, and the graph draws no stage that could not run."""
    p = every_pattern()
    g = graph_of(p)
    drawn = set(g.stage_paths()) | {c.path for c in g.clusters.values() if c.path}
    with dspy.context(lm=fake_lm()), stageflow.trace() as tracer:
        p(question="q")
    traced = {stage_key(e["stage"]) for e in tracer.events if e["event"] == "stage_start"}
    assert traced <= drawn, traced - drawn
    # Stages that did not run this time are alternatives (other branches, structures).
    not_run = set(g.stage_paths()) - traced
    assert all("branches['long']" in s or "structures['" in s for s in not_run), not_run
    assert json.loads(json.dumps(g.to_dict())) == g.to_dict()


def test_sequential_function_and_predictor_nodes() -> None:
    p = stageflow.SequentialPipeline(
        [
            fn("split", ["text"], ["words"]),
            dspy.Predict("words -> summary"),
            dspy.ChainOfThought("summary -> title"),
        ]
    )
    g = graph_of(p)
    split, predict, cot = by_path(g, "stages[0]"), by_path(g, "stages[1]"), by_path(g, "stages[2]")
    assert (split.label, split.kind, split.detail) == ("split()", "function", "text -> words")
    assert (predict.label, predict.kind, predict.detail) == ("Predict", "predict", "words -> summary")
    assert (cot.label, cot.detail) == ("ChainOfThought", "summary -> reasoning, title")
    start, end = only(g, "start"), only(g, "end")
    assert start.detail == "text"
    assert end.detail == "words, summary, reasoning, title"
    flow = [(g.nodes[e.source].label, g.nodes[e.target].label) for e in g.edges]
    assert flow == [
        ("split()", "Predict"),
        ("Predict", "ChainOfThought"),
        ("start", "split()"),
        ("ChainOfThought", "end"),
    ]


def test_branches_exactly_as_declared() -> None:
    p = stageflow.BranchingPipeline(
        fn("route", ["question"], ["branch"]),
        {"Math": fn("math", ["question"], ["answer"]), "chat": fn("chat", ["question"], ["answer"])},
        default=fn("fallback", ["question"], ["answer"]),
    )
    g = graph_of(p)
    decide = only(g, "decision")
    out = edges_from(g, decide.id)
    assert sorted((g.nodes[t].path, label, kind) for t, label, kind in out) == [
        ("branches['chat']", "chat", "branch"),
        ("branches['math']", "math", "branch"),
        ("default", "any other branch", "default"),
    ]
    assert edges_from(g, by_path(g, "router").id) == [(decide.id, "", "flow")]
    # Nothing but the router reaches a branch: no invented edges.
    branch_ids = {by_path(g, p).id for p in ("branches['math']", "branches['chat']", "default")}
    assert {e.source for e in g.edges if e.target in branch_ids} == {decide.id}


def test_default_that_names_a_branch_labels_that_edge() -> None:
    p = stageflow.BranchingPipeline(
        fn("route", ["q"], ["branch"]), {"a": fn("a", ["q"], ["x"]), "b": fn("b", ["q"], ["x"])}, default="b"
    )
    g = graph_of(p)
    labels = sorted(label for _, label, _ in edges_from(g, only(g, "decision").id))
    assert labels == ["a", "b (also the default)"]


def test_loop_with_its_limit_and_one_edge_back() -> None:
    p = stageflow.IterativePipeline(
        [fn("draft", ["q"], ["d"]), fn("score", ["d"], ["quality_score"], 0.5)],
        stageflow.QualityBasedStopping(quality_threshold=0.9),
        max_iterations=7,
        on_limit="raise",
    )
    g = graph_of(p)
    [cluster] = [c for c in g.clusters.values() if c.kind == "iterative"]
    assert cluster.label == "IterativePipeline (at most 7 iterations)"
    cond = only(g, "condition")
    assert "QualityBasedStopping(quality_threshold=0.9" in cond.detail
    assert "raises LoopLimitError" in cond.detail
    loops = [e for e in g.edges if e.kind == "loop"]
    assert [(g.nodes[e.source].kind, g.nodes[e.target].path, e.label) for e in loops] == [
        ("condition", "stages[0]", "repeat (at most 7 iterations)")
    ]
    assert edges_from(g, cond.id)[-1] == (only(g, "end").id, "stop", "flow")


def test_parallel_groups_and_merges() -> None:
    p = stageflow.ParallelPipeline(
        [
            [fn("a", ["q"], ["x"]), fn("b", ["q"], ["y"]), fn("c", ["q"], ["z"])],
            fn("d", ["x", "y", "z"], ["w"]),
        ],
        stageflow.ResultMerger(on_clash="list"),
        max_concurrency=2,
    )
    g = graph_of(p)
    groups = [c for c in g.clusters.values() if c.kind == "group"]
    assert [(c.label, c.layout) for c in groups] == [("group 0", "row"), ("group 1", "row")]
    members = [[g.nodes[k].path for k in c.children] for c in groups]
    assert members == [["stages[0]", "stages[1]", "stages[2]"], ["stages[3]"]]
    merge = only(g, "merge")
    assert merge.detail == "on_clash=list"
    assert sorted(g.nodes[e.source].path for e in g.edges if e.target == merge.id) == [
        "stages[0]",
        "stages[1]",
        "stages[2]",
    ]
    assert edges_from(g, merge.id) == [(by_path(g, "stages[3]").id, "", "flow")]
    [cluster] = [c for c in g.clusters.values() if c.kind == "parallel"]
    assert "max_concurrency=2" in cluster.detail


def test_foreach_over_item_collect() -> None:
    p = stageflow.ForEach(
        fn("look", ["sub_question"], ["fact"]), over="sub_questions", collect="facts", on_error="skip"
    )
    g = graph_of(p)
    [cluster] = [c for c in g.clusters.values() if c.kind == "foreach"]
    assert cluster.label == "ForEach: each sub_question in sub_questions"
    assert cluster.detail.splitlines() == ["collect fact→facts", "on_error=skip"]
    assert by_path(g, "stage[*]").label == "look()"


def test_ensemble_members_and_aggregator() -> None:
    p = stageflow.EnsemblePipeline(
        [dspy.Predict("question -> answer"), fn("guess", ["question"], ["answer"])],
        stageflow.ResultAggregator("consensus", threshold=0.6),
        quorum=2,
    )
    g = graph_of(p)
    agg = only(g, "aggregate")
    assert agg.detail == "consensus on 'answer'"
    assert sorted(g.nodes[e.source].path for e in g.edges if e.target == agg.id) == [
        "processors[0]",
        "processors[1]",
    ]
    [cluster] = [c for c in g.clusters.values() if c.kind == "ensemble"]
    assert cluster.detail == "quorum 2"


def test_adaptive_structures_from_the_component_pool() -> None:
    pool = {"fast": fn("fast", ["question"], ["answer"]), "slow": fn("slow", ["question"], ["answer"])}
    g = graph_of(stageflow.AdaptivePipeline(pool))
    assert only(g, "adapter").label == "PipelineAdapter"
    decide = only(g, "decision")
    out = sorted((label, g.nodes[t].path) for t, label, _ in edges_from(g, decide.id))
    assert out == [
        ("complex", "structures['complex'].stages[0]"),
        ("multi_approach", "structures['multi_approach'].processors[0]"),
        ("multi_approach", "structures['multi_approach'].processors[1]"),
        ("simple", "structures['simple'].stages[0]"),
    ]
    assert sorted(g.stage_paths())[:3] == [
        "structures['complex'].stages[0]",
        "structures['complex'].stages[1]",
        "structures['multi_approach'].processors[0]",
    ]


def test_adaptive_with_a_stage_as_adapter() -> None:
    p = stageflow.AdaptivePipeline(
        {"a": fn("a", ["question"], ["answer"])},
        fn("pick", ["question"], ["structure"], "only"),
        structures={"only": ["a"]},
    )
    g = graph_of(p)
    assert by_path(g, "adapter_stage").label == "pick()"
    assert edges_from(g, only(g, "decision").id) == [
        (by_path(g, "structures['only'].stages[0]").id, "only", "branch")
    ]


def test_hierarchical_draws_the_root_and_without_root_every_node() -> None:
    with_root = stageflow.HierarchicalPipeline(
        {
            "root": {"type": "pipeline", "stages": ["a"]},
            "a": {"type": "module", "module": fn("a", ["q"], ["x"])},
        }
    )
    assert graph_of(with_root).stage_paths() == ["nodes['root'].stages[0]"]
    no_root = stageflow.HierarchicalPipeline(
        {"one": {"type": "module", "module": fn("one", ["q"], ["x"])}, "two": fn("two", ["q"], ["y"])}
    )
    g = graph_of(no_root)
    decide = only(g, "decision")
    assert decide.label == "stage_name?"
    assert sorted(label for _, label, _ in edges_from(g, decide.id)) == ["one", "two"]


def test_error_handling_and_stage_wrappers() -> None:
    p = stageflow.ErrorHandlingPipeline(
        [
            stageflow.Stage(
                fn("fetch", ["url"], ["page"]), inputs={"url": "link"}, outputs={"page": "html"}, retry=3
            ),
            fn("parse", ["html"], ["doc"]),
        ],
        {1: lambda e, s: s},
    )
    g = graph_of(p)
    [cluster] = [c for c in g.clusters.values() if c.kind == "error_handling"]
    assert cluster.detail == "non-critical: TimeoutError, LowConfidenceError"
    fetch = by_path(g, "stages[0]")
    assert fetch.detail.splitlines() == ["url -> page", "renames: url←link, page→html", "policies: retry"]
    assert by_path(g, "stages[1]").detail.splitlines() == ["html -> doc", "recovery strategy"]


def test_custom_module_lists_its_predictors_without_guessing_their_order() -> None:
    g = graph_of(stageflow.SequentialPipeline([stageflow.Stage(Summarise(), inputs={"text": "doc"})]))
    node = by_path(g, "stages[0]")
    assert (node.label, node.kind) == ("Summarise", "module")
    assert node.detail.splitlines() == [
        "draft: text -> draft",
        "polish.predict: draft -> reasoning, summary",
        "renames: text←doc",
    ]


def test_nesting_to_any_depth_and_a_pipeline_inside_itself() -> None:
    p: Any = fn("leaf", ["x"], ["y"])
    for _ in range(60):
        p = stageflow.SequentialPipeline([p])
    g = graph_of(p)
    assert g.stage_paths() == [".".join(["stages[0]"] * 60)]
    assert sum(1 for c in g.clusters.values() if c.kind == "sequential") == 60
    loop = stageflow.SequentialPipeline([fn("a", ["x"], ["y"])])
    loop.stages.append(loop)  # never runnable: the picture refuses it too, at once (issue 9)
    with pytest.raises(stageflow.ConfigurationError, match="contains itself at 'stages\\[1\\]'"):
        graph_of(loop)


def test_a_single_stage_or_function_gets_a_picture_too() -> None:
    assert graph_of(dspy.Predict("q -> a")).stage_paths() == [""]
    assert graph_of(lambda q: {"a": q}).nodes["n2"].label == "<lambda>()"


def test_graph_round_trips_through_json_and_rejects_malformed_dicts() -> None:
    g = graph_of(every_pattern())
    again = Graph.from_dict(json.loads(json.dumps(g.to_dict())))
    assert again.to_dict() == g.to_dict()
    bad = g.to_dict()
    bad["edges"][0]["target"] = 'n1"];evil'
    with pytest.raises(ConfigurationError, match="names an unknown node"):
        Graph.from_dict(bad)
    bad = g.to_dict()
    bad["nodes"][0]["id"] = 'x"]'
    with pytest.raises(ConfigurationError, match="not of the form"):
        Graph.from_dict(bad)
    with pytest.raises(ConfigurationError, match="version"):
        Graph.from_dict({"version": 99})
