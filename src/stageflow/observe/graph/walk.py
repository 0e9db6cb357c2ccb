"""``graph_of(pipeline)``: the :class:`Graph` of the objects a pipeline runs.

The walk reads the same attributes the engine runs from (``stages``, ``router``/``branches``/
``default``, ``max_iterations``, ``processors``/``aggregator``, ``structures``, ``nodes``, ...)
and uses the same stage paths, so a box in the picture is a span in a trace. Nothing is
invented: a router's edges are exactly its declared branches (and its default), a loop has one
edge back labelled with its limit, and the inside of a custom ``dspy.Module`` (whose control flow
is Python code) is listed, not guessed.

Examples:
    >>> import stageflow
    >>> p = stageflow.SequentialPipeline([
    ...     stageflow.stage(lambda text: {"words": text.split()}, writes=["words"], name="split"),
    ...     stageflow.stage(lambda words: {"n": len(words)}, writes=["n"], name="count"),
    ... ])
    >>> g = graph_of(p)
    >>> [(n.label, n.path) for n in g.nodes.values() if n.path is not None]
    [('split()', 'stages[0]'), ('count()', 'stages[1]')]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stageflow.observe.graph._text import (
    fanout_text,
    index_of,
    names,
    policy_text,
    short,
    signature_text,
)
from stageflow.observe.graph.model import Graph

__all__ = ["graph_of"]

_MAX_LISTED = 6  # predictors listed inside a custom module's box


@dataclass
class _Ends:
    """Where a drawn block is entered and left (``exits`` carry the label of the edge out)."""

    entries: list[str] = field(default_factory=list)
    exits: list[tuple[str, str]] = field(default_factory=list)


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


class _Walker:
    """Walks one pipeline into a :class:`Graph` (see the module docstring)."""

    def __init__(self) -> None:
        import dspy

        from stageflow.patterns import (
            adaptive,
            base,
            branching,
            ensemble,
            error_handling,
            foreach,
            hierarchical,
            iterative,
            parallel,
            sequential,
        )
        from stageflow.stages import FunctionStage, Stage

        self.dspy = dspy
        self.m = {
            "base": base,
            "adaptive": adaptive,
            "branching": branching,
            "ensemble": ensemble,
            "error_handling": error_handling,
            "foreach": foreach,
            "hierarchical": hierarchical,
            "iterative": iterative,
            "parallel": parallel,
            "sequential": sequential,
        }
        self.FunctionStage = FunctionStage
        self.Stage = Stage
        self.g = Graph()
        self.active: list[int] = []  # ids of pipelines being walked (a pipeline inside itself)

    # -- plumbing ---------------------------------------------------------------------------------
    def connect(self, exits: Sequence[tuple[str, str]], entries: Sequence[str], where: str) -> None:
        """Arrows from every exit to every entry; many-to-many goes through one join point drawn in
        cluster ``where``."""
        if len(exits) > 1 and len(entries) > 1:
            join = self.g.add_node("", kind="join", cluster=where)
            self.move_before(join, entries[0], where)
            for src, label in exits:
                self.g.add_edge(src, join, label)
            exits = [(join, "")]
        for src, label in exits:
            for dst in entries:
                self.g.add_edge(src, dst, label)

    def move_before(self, ident: str, entry: str, where: str) -> None:
        """Move ``ident`` among ``where``'s children to just before the one holding node ``entry``, so
        the children stay in run order (a join point is made after the blocks it joins are drawn)."""
        kids = self.g.clusters[where].children
        holder: str | None = entry
        while holder is not None and holder not in kids:
            node = self.g.nodes.get(holder)
            holder = node.cluster if node is not None else self.g.clusters[holder].parent
        if holder is not None and holder != ident:
            kids.remove(ident)
            kids.insert(kids.index(holder), ident)

    def chain(self, blocks: Iterable[_Ends], where: str) -> _Ends:
        """Blocks run one after another (an empty block passes through)."""
        out: _Ends | None = None
        for b in blocks:
            if not b.entries:
                continue
            if out is None:
                out = _Ends(list(b.entries), list(b.exits))
            else:
                self.connect(out.exits, b.entries, where)
                out.exits = list(b.exits)
        return out or _Ends()

    def row(self, parent: str, path: str) -> str:
        return self.g.add_cluster("", kind="layout", path=path, parent=parent, layout="row", visible=False)

    # -- dispatch ---------------------------------------------------------------------------------
    def sub(self, obj: Any, prefix: str, local: str, cluster: str | None, notes: Sequence[str] = ()) -> _Ends:
        """Draw ``obj``, held at ``local`` (``stages[2]``) by the pipeline at path ``prefix``."""
        return self.walk(obj, _join(prefix, local), cluster, notes, local)

    def walk(
        self, obj: Any, path: str, cluster: str | None, notes: Sequence[str] = (), local: str = ""
    ) -> _Ends:
        """Draw ``obj`` (held at stage path ``path``; ``local``: the last segment) inside ``cluster``."""
        notes = list(notes)
        while isinstance(obj, self.Stage):
            renames = [f"{k}←{v}" for k, v in obj.input_map.items()]
            renames += [f"{k}→{v}" for k, v in obj.output_map.items()]
            if renames:
                notes.append("renames: " + ", ".join(renames))
            notes += policy_text(obj.policy)
            fallback = getattr(obj, "fallback_stage", None)
            if fallback is not None:
                notes.append(f"fallback: {self.label_of(fallback)}")
            obj = obj.module
        if _is_pipeline(obj):
            if id(obj) in self.active:
                nid = self.g.add_node(
                    f"{type(obj).__name__} (contains itself)", kind="cycle", path=path, cluster=cluster
                )
                return _Ends([nid], [(nid, "")])
            self.active.append(id(obj))
            try:
                return self.pipeline(obj, path, cluster, notes, local)
            finally:
                self.active.pop()
        return self.leaf(obj, path, cluster, notes)

    def label_of(self, obj: Any) -> str:
        while isinstance(obj, self.Stage):
            obj = obj.module
        if isinstance(obj, self.FunctionStage):
            return f"{obj.stage_name}()"
        return type(obj).__name__

    def leaf(self, obj: Any, path: str, cluster: str | None, notes: list[str]) -> _Ends:
        dspy = self.dspy
        lines: list[str] = []
        if isinstance(obj, self.FunctionStage):
            kind, label = "function", f"{obj.stage_name}()"
            ports = obj.ports
            reads = names([*ports.required, *ports.optional]) or ("state" if ports.accepts_any else "")
            writes = "?" if ports.outputs is None else names(ports.outputs)
            lines.append(f"{reads} -> {writes}")
        elif isinstance(obj, dspy.Predict):
            kind, label = "predict", type(obj).__name__
            lines.append(signature_text(obj.signature))
        elif isinstance(obj, dspy.ChainOfThought) and isinstance(getattr(obj, "predict", None), dspy.Predict):
            kind, label = "predict", type(obj).__name__
            lines.append(signature_text(obj.predict.signature))
        elif isinstance(obj, dspy.Module):
            kind, label = "module", type(obj).__name__
            named = list(obj.named_predictors())
            for name, p in named[:_MAX_LISTED]:
                lines.append(f"{name}: {signature_text(p.signature)}")
            if len(named) > _MAX_LISTED:
                lines.append(f"… and {len(named) - _MAX_LISTED} more predictors")
        else:
            kind, label = "module", type(obj).__name__
        nid = self.g.add_node(label, kind=kind, path=path, detail="\n".join(lines + notes), cluster=cluster)
        return _Ends([nid], [(nid, "")])

    def pipeline(self, p: Any, path: str, cluster: str | None, notes: list[str], local: str) -> _Ends:
        m = self.m
        name = type(p).__name__
        heading = f"{local}: {name}" if local else name
        kinds: list[tuple[type, str, Any]] = [
            (m["error_handling"].ErrorHandlingPipeline, "error_handling", self.sequential),
            (m["sequential"].SequentialPipeline, "sequential", self.sequential),
            (m["branching"].BranchingPipeline, "branching", self.branching),
            (m["iterative"].IterativePipeline, "iterative", self.iterative),
            (m["parallel"].ParallelPipeline, "parallel", self.parallel),
            (m["foreach"].ForEach, "foreach", self.foreach),
            (m["ensemble"].EnsemblePipeline, "ensemble", self.ensemble),
            (m["adaptive"].AdaptivePipeline, "adaptive", self.adaptive),
            (m["hierarchical"].HierarchicalPipeline, "hierarchical", self.hierarchical),
        ]
        for cls, kind, draw in kinds:
            if isinstance(p, cls):
                detail = "\n".join(notes)
                cid = self.g.add_cluster(heading, kind=kind, path=path, parent=cluster, detail=detail)
                ends: _Ends = draw(p, path, cid)
                return ends
        # A pipeline subclass stageflow does not know: one box, its predictors listed.
        return self.leaf(p, path, cluster, notes)

    # -- patterns ---------------------------------------------------------------------------------
    def sequential(self, p: Any, path: str, cid: str) -> _Ends:
        recover = getattr(p, "recovery_strategies", {})
        non_critical = getattr(p, "non_critical", None)
        if non_critical:
            c = self.g.clusters[cid]
            extra = "non-critical: " + ", ".join(t.__name__ for t in non_critical)
            c.detail = f"{c.detail}\n{extra}" if c.detail else extra
        blocks = []
        n = len(p.stages)
        for i, s in enumerate(p.stages):
            notes = ["recovery strategy"] if (i in recover or i - n in recover) else []
            blocks.append(self.sub(s, path, f"stages[{i}]", cid, notes))
        return self.chain(blocks, cid)

    def branching(self, p: Any, path: str, cid: str) -> _Ends:
        router = self.sub(p.router, path, "router", cid)
        decide = self.g.add_node(
            "branch?", kind="decision", detail="the router's 'branch' field", cluster=cid
        )
        self.connect(router.exits, [decide], cid)
        row = self.row(cid, path)
        default_key = getattr(p, "_default_key", None)
        exits: list[tuple[str, str]] = []
        for key, stage in p.branches.items():
            b = self.sub(stage, path, f"branches['{key}']", row)
            label = f"{key} (also the default)" if key == default_key else key
            for entry in b.entries:
                self.g.add_edge(decide, entry, label, "branch")
            exits += b.exits
        default = getattr(p, "default", None)
        if default is not None:
            b = self.sub(default, path, "default", row)
            for entry in b.entries:
                self.g.add_edge(decide, entry, "any other branch", "default")
            exits += b.exits
        return _Ends(router.entries, exits)

    def iterative(self, p: Any, path: str, cid: str) -> _Ends:
        c = self.g.clusters[cid]
        c.label = f"{c.label} (at most {p.max_iterations} iterations)"
        body = self.chain((self.sub(s, path, f"stages[{i}]", cid) for i, s in enumerate(p.stages)), cid)
        limit = "raises LoopLimitError at the limit" if p.on_limit == "raise" else "returns at the limit"
        cond = self.g.add_node(
            "stop?", kind="condition", detail=f"{short(p.stopping_condition)}\n{limit}", cluster=cid
        )
        self.connect(body.exits, [cond], cid)
        for entry in body.entries:
            self.g.add_edge(cond, entry, f"repeat (at most {p.max_iterations} iterations)", "loop")
        return _Ends(body.entries, [(cond, "stop")])

    def parallel(self, p: Any, path: str, cid: str) -> _Ends:
        c = self.g.clusters[cid]
        c.detail = "\n".join(filter(None, [c.detail, fanout_text(p)]))
        blocks: list[_Ends] = []
        for g, group in enumerate(p._groups):
            gid = self.g.add_cluster(f"group {g}", kind="group", path=path, parent=cid, layout="row")
            members = [self.sub(p.stages[index_of(e.path)], path, e.path, gid) for e in group]
            entries = [e for b in members for e in b.entries]
            exits = [x for b in members for x in b.exits]
            if len(members) > 1:
                from stageflow.patterns.merger import merges_its_own_way

                merger = p.merger
                own = merges_its_own_way(merger)
                detail = f"{type(merger).__name__}.merge()" if own else f"on_clash={merger.on_clash}"
                merge = self.g.add_node("merge", kind="merge", detail=detail, cluster=cid)
                self.connect(exits, [merge], cid)
                exits = [(merge, "")]
            blocks.append(_Ends(entries, exits))
        return self.chain(blocks, cid)

    def foreach(self, p: Any, path: str, cid: str) -> _Ends:
        c = self.g.clusters[cid]
        c.label = f"{c.label}: each {p.item} in {p.over}"
        collect = ", ".join(f"{k}→{v}" for k, v in p.collect.items())
        c.detail = "\n".join(filter(None, [c.detail, f"collect {collect}", fanout_text(p)]))
        return self.sub(p.stage, path, "stage[*]", cid)

    def ensemble(self, p: Any, path: str, cid: str) -> _Ends:
        c = self.g.clusters[cid]
        quorum = f"quorum {p.quorum}" if p.quorum is not None else ""
        c.detail = "\n".join(filter(None, [c.detail, quorum, fanout_text(p)]))
        row = self.row(cid, path)
        members = [self.sub(s, path, f"processors[{i}]", row) for i, s in enumerate(p.processors)]
        from stageflow.patterns.ensemble import aggregates_its_own_way

        agg = p.aggregator
        own = aggregates_its_own_way(agg)
        if own is not None:
            detail = f"{type(agg).__name__}.{own}()"
        else:
            strategy = agg.strategy if isinstance(agg.strategy, str) else short(agg.strategy)
            detail = f"{strategy} on '{agg.field or 'answer'}'"
        node = self.g.add_node("aggregate", kind="aggregate", detail=detail, cluster=cid)
        self.connect([x for b in members for x in b.exits], [node], cid)
        return _Ends([e for b in members for e in b.entries], [(node, "")])

    def adaptive(self, p: Any, path: str, cid: str) -> _Ends:
        adapter_stage = getattr(p, "adapter_stage", None)
        if adapter_stage is not None:
            first = self.sub(adapter_stage, path, "adapter_stage", cid)
        else:
            a = self.g.add_node(
                type(p.adapter).__name__,
                kind="adapter",
                detail=f"analyses '{p.adapter.input_field}'",
                cluster=cid,
            )
            first = _Ends([a], [(a, "")])
        decide = self.g.add_node("structure?", kind="decision", cluster=cid)
        self.connect(first.exits, [decide], cid)
        row = self.row(cid, path)
        exits: list[tuple[str, str]] = []
        for key, s in p.structures.items():
            b = self.sub(s, path, f"structures['{key}']", row)
            for entry in b.entries:
                self.g.add_edge(decide, entry, key, "branch")
            exits += b.exits
        return _Ends(first.entries, exits)

    def hierarchical(self, p: Any, path: str, cid: str) -> _Ends:
        if "root" in p.nodes:
            return self.sub(p.nodes["root"], path, "nodes['root']", cid)
        # No root: a call names the node to run (stage_name=...).
        decide = self.g.add_node("stage_name?", kind="decision", cluster=cid)
        row = self.row(cid, path)
        exits: list[tuple[str, str]] = []
        for key, node in p.nodes.items():
            b = self.sub(node, path, f"nodes['{key}']", row)
            for entry in b.entries:
                self.g.add_edge(decide, entry, key, "branch")
            exits += b.exits
        return _Ends([decide], exits)


def _ports_text(obj: Any) -> tuple[str, str]:
    from stageflow.stages import describe

    try:
        ports = describe(obj)
    except Exception:  # a pipeline whose wiring does not check still gets a picture
        return "", ""
    return names(ports.required), names(ports.outputs or ())


def _is_pipeline(obj: Any) -> bool:
    from stageflow.engine.protocol import StageOwner  # imported when drawing: the engine loads DSPy

    return isinstance(obj, StageOwner)


def graph_of(pipeline: Any, *, title: str | None = None) -> Graph:
    """The :class:`Graph` of ``pipeline`` (any stageflow pipeline, ``Stage``, ``dspy.Module`` or
    function stage), from the objects it runs; nested pipelines are clusters, to any depth.

    The outermost pipeline gets a ``start`` node (its required inputs) and an ``end`` node (the
    fields it produces on every path).
    """
    from stageflow.patterns._cycles import refuse_cycle  # imported when drawing: it loads DSPy

    refuse_cycle(pipeline)  # a pipeline that contains itself cannot be drawn (nor run)
    w = _Walker()
    g = w.g
    name = type(pipeline).__name__
    g.title = name if title is None else title
    if not _is_pipeline(pipeline) and not isinstance(pipeline, w.Stage):
        from stageflow.patterns.base import as_stage

        pipeline = as_stage(pipeline)
    inputs, outputs = _ports_text(pipeline)
    outer = g.add_cluster("", kind="layout", visible=False)
    start = g.add_node("start", kind="start", detail=inputs, cluster=outer)
    body = w.walk(pipeline, "", outer)
    end = g.add_node("end", kind="end", detail=outputs, cluster=outer)
    w.connect([(start, "")], body.entries or [end], outer)
    if body.entries:
        w.connect(body.exits, [end], outer)
    return g
