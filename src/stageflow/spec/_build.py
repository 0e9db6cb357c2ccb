"""Spec data → a stageflow pipeline (see :mod:`stageflow.spec` for the format).

Every built object is remembered with the key path it came from, so errors raised later (a contract
check naming ``stages[1].branches['math']``) can still point at a file line.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dspy

from stageflow.errors import StageflowError
from stageflow.patterns.base import Pipeline
from stageflow.patterns.branching import BranchingPipeline
from stageflow.patterns.ensemble import EnsemblePipeline, ResultAggregator
from stageflow.patterns.foreach import ForEach
from stageflow.patterns.iterative import IterativePipeline, QualityBasedStopping
from stageflow.patterns.parallel import ParallelPipeline, ResultMerger
from stageflow.patterns.sequential import SequentialPipeline
from stageflow.spec._components import ComponentRefError, check_module_names, resolve_component
from stageflow.spec._modules import MODULE_KINDS, TAG_ORIGIN, build_module
from stageflow.spec._paths import resolve_reference
from stageflow.spec._source import MAX_DEPTH, KeyPath, SpecError, SpecSource

__all__ = ["NODE_TYPES", "TAG_META", "TAG_NODE", "build"]

NODE_TYPES = ("module", "pipeline", "conditional", "iterative", "parallel", "foreach", "ensemble")
STAGE_KEYS = ("inputs", "outputs", "reads", "writes")
FANOUT_KEYS = ("max_concurrency", "on_error", "timeout")
TOP_KEYS = ("version", "name", "description", "inputs", "outputs", "root", "nodes")
KEYS = {
    "module": ("type", *MODULE_KINDS, "instructions", "args", "k", *STAGE_KEYS),
    "pipeline": ("type", "stages"),
    "conditional": ("type", "router", "branches", "default"),
    "iterative": ("type", "stages", "stopping_condition", "max_iterations", "on_limit"),
    "parallel": ("type", "groups", "merger", *FANOUT_KEYS),
    "foreach": ("type", "stage", "over", "item", "collect", *FANOUT_KEYS),
    "ensemble": ("type", "processors", "aggregator", "quorum", *FANOUT_KEYS),
}
STOPPING_KEYS = ("quality_threshold", "patience", "min_improvement", "score_field", "improvement_field")
MERGER_KEYS = ("on_clash", "separator")
AGGREGATOR_KEYS = ("strategy", "field", "confidence_field", "threshold")

# Attributes set on built objects (they survive deep copies, so compiled programs export too).
TAG_NODE = "_stageflow_node_name"  # the named node this object is
TAG_META = "_stageflow_spec_meta"  # top-level name/description/inputs/outputs, on the root


class _Builder:
    def __init__(
        self,
        src: SpecSource,
        nodes: Mapping[str, Any],
        allow_modules: Sequence[str],
        allow_paths: Sequence[Path] = (),
    ) -> None:
        self.src = src
        self.nodes = nodes
        self.allow = tuple(allow_modules)
        self.allow_paths = tuple(allow_paths)
        self.built: dict[str, Any] = {}
        self.building: list[str] = []
        self.depth = 0
        self.locations: dict[int, KeyPath] = {}
        self._keep: list[Any] = []  # keeps located objects alive so their ids stay unique

    # -- helpers -----------------------------------------------------------------------------
    def err(self, path: KeyPath, message: str, **kw: Any) -> SpecError:
        return self.src.error(path, message, **kw)

    @contextlib.contextmanager
    def guard(self, path: KeyPath) -> Iterator[None]:
        """Turn a stageflow error raised by a constructor into a located SpecError."""
        try:
            yield
        except SpecError:
            raise
        except StageflowError as exc:
            raise self.err(path, exc.message, code=exc.code, hint=exc.hint, field=exc.field) from exc
        except (TypeError, ValueError) as exc:  # e.g. QualityBasedStopping(quality_threshold="high")
            raise self.err(path, f"invalid value: {exc}", code="bad_value") from exc

    def located(self, obj: Any, path: KeyPath) -> Any:
        self.locations.setdefault(id(obj), path)
        self._keep.append(obj)
        return obj

    def check_keys(self, spec: Mapping[str, Any], allowed: Sequence[str], path: KeyPath, what: str) -> None:
        for key in spec:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                raise self.err(
                    (*path, key),
                    f"unknown key '{key}' in {what}.",
                    code="unknown_key",
                    hint=f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(allowed)}",
                )

    def typed(self, value: Any, kind: type | tuple[type, ...], path: KeyPath, what: str) -> Any:
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.err(path, f"expected {what}, got a boolean.", code="bad_value")
        if not isinstance(value, kind):
            raise self.err(
                path, f"expected {what}, got {type(value).__name__} {value!r:.60}.", code="bad_value"
            )
        return value

    def names(self, value: Any, path: KeyPath) -> list[str]:
        if (
            isinstance(value, str)
            or not isinstance(value, list)
            or not all(isinstance(v, str) for v in value)
        ):
            raise self.err(path, f"expected a list of field names, got {value!r:.60}.", code="bad_value")
        return list(value)

    def renames(self, value: Any, path: KeyPath) -> dict[str, str]:
        ok = isinstance(value, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        )
        if not ok:
            raise self.err(path, "expected a mapping {stage_field: state_field}.", code="bad_value")
        return dict(value)

    def path(self, value: Any, path: KeyPath, what: str) -> Path:
        """A file reference of the spec, resolved inside the spec's folder or an allowed one."""
        text = self.typed(value, str, path, what)
        reason = resolve_reference(text, self.src.base_dir, self.allow_paths)
        if isinstance(reason, Path):
            return reason
        raise self.err(
            path,
            f"the path {text!r} {reason}, outside the folder of the pipeline file ({self.src.base_dir}); "
            "a pipeline file may only read files inside its own folder.",
            code="path_outside_folder",
            hint="move the file into that folder, or if you trust this pipeline file, allow the other "
            "folder with --allow-path DIR (load_pipeline(..., allow_paths=[DIR]))",
        )

    def component(self, spec: Mapping[str, Any], path: KeyPath) -> Any:
        try:
            obj = resolve_component(spec["component"], self.allow)
        except ComponentRefError as exc:
            raise self.err((*path, "component"), str(exc), code=exc.code, hint=exc.hint) from exc
        if "args" in spec:
            args = spec["args"]
            if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
                raise self.err(
                    (*path, "args"), "args must be a mapping of keyword arguments.", code="bad_value"
                )
            return self._call(obj, dict(args), spec, (*path, "args"))
        if isinstance(obj, type):
            return self._call(obj, {}, spec, (*path, "component"))
        return copy.deepcopy(obj) if isinstance(obj, dspy.Module) else obj

    def _call(self, obj: Any, args: dict[str, Any], spec: Mapping[str, Any], path: KeyPath) -> Any:
        """Call a vetted component (a factory, or a class to instantiate) with the spec's ``args``."""
        try:
            return obj(**args)
        except KeyboardInterrupt:
            raise
        except StageflowError as exc:
            raise self.err(path, exc.message, code=exc.code, hint=exc.hint) from exc
        except BaseException as exc:  # SystemExit too: a factory must not end `stageflow validate` with 0
            raise self.err(
                path,
                f"calling the component '{spec['component']}' failed: {type(exc).__name__}: {exc}",
                code="component_failed",
            ) from exc

    def origin(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"component": spec["component"]}
        if "args" in spec:
            out["args"] = copy.deepcopy(dict(spec["args"]))
        return out

    # -- references and nodes ----------------------------------------------------------------
    def ref(self, value: Any, path: KeyPath) -> Any:
        if isinstance(value, str):
            return self.named(value, path)
        if isinstance(value, Mapping):
            return self.node(value, path)
        raise self.err(path, f"expected a node name or a node mapping, got {value!r:.60}.", code="bad_node")

    def named(self, name: str, path: KeyPath) -> Any:
        if name in self.built:
            return self.built[name]
        if name not in self.nodes:
            close = difflib.get_close_matches(name, list(self.nodes), n=1)
            raise self.err(
                path,
                f"refers to the node '{name}', which is not defined under 'nodes'. "
                f"Defined nodes: {sorted(self.nodes)}.",
                code="unknown_node",
                hint=f"did you mean '{close[0]}'?" if close else None,
            )
        if name in self.building:
            cycle = " -> ".join([*self.building[self.building.index(name) :], name])
            raise self.err(
                path, f"the nodes form a cycle: {cycle}.", code="cycle", hint="use an 'iterative' node"
            )
        self.building.append(name)
        try:
            obj = self.node(self.nodes[name], ("nodes", name))
        finally:
            self.building.pop()
        setattr(obj, TAG_NODE, name)
        self.built[name] = obj
        return obj

    def node(self, spec: Any, path: KeyPath) -> Any:
        if not isinstance(spec, Mapping):
            raise self.err(path, f"a node must be a mapping, got {spec!r:.60}.", code="bad_node")
        kind = spec.get("type", "module")
        if kind not in NODE_TYPES:
            raise self.err(
                (*path, "type"),
                f"unknown node type {kind!r}; expected one of {', '.join(NODE_TYPES)}.",
                code="bad_node",
            )
        self.check_keys(spec, KEYS[kind], path, f"a '{kind}' node")
        if self.depth >= MAX_DEPTH:
            raise self.err(
                path,
                f"the pipeline nests more than {MAX_DEPTH} levels of nodes.",
                code="too_deep",
                hint="a pipeline this deep is almost certainly generated by mistake; flatten it",
            )
        self.depth += 1
        try:
            with self.guard(path):
                obj = getattr(self, f"_{kind}")(spec, path)
        finally:
            self.depth -= 1
        return self.located(obj, path)

    def stage_list(self, value: Any, path: KeyPath, what: str) -> list[Any]:
        if not isinstance(value, list) or not value:
            raise self.err(path, f"{what} must be a non-empty list of nodes.", code="bad_node")
        return [self.ref(v, (*path, i)) for i, v in enumerate(value)]

    def fanout(self, spec: Mapping[str, Any], path: KeyPath) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "max_concurrency" in spec:
            out["max_concurrency"] = self.typed(
                spec["max_concurrency"], int, (*path, "max_concurrency"), "an int"
            )
        if "on_error" in spec:
            out["on_error"] = self.typed(spec["on_error"], str, (*path, "on_error"), "a string")
        if "timeout" in spec:
            timeout = self.typed(spec["timeout"], (int, float), (*path, "timeout"), "a number of seconds")
            if not (math.isfinite(timeout) and timeout > 0):
                raise self.err(
                    (*path, "timeout"), f"timeout must be a positive number of seconds, got {timeout}."
                )
            out["timeout"] = timeout
        return out

    def _module(self, spec: Mapping[str, Any], path: KeyPath) -> Any:
        return build_module(self, spec, path)

    def _pipeline(self, spec: Mapping[str, Any], path: KeyPath) -> Any:
        return SequentialPipeline(self.stage_list(spec.get("stages"), (*path, "stages"), "'stages'"))

    def _conditional(self, spec: Mapping[str, Any], path: KeyPath) -> Any:
        if "router" not in spec:
            raise self.err(path, "a conditional node needs a 'router' node.", code="bad_node")
        branches = spec.get("branches")
        if not isinstance(branches, Mapping) or not branches:
            raise self.err((*path, "branches"), "'branches' must be a non-empty mapping {name: node}.")
        router = self.ref(spec["router"], (*path, "router"))
        built = {str(k): self.ref(v, (*path, "branches", k)) for k, v in branches.items()}
        default = spec.get("default")
        if default is not None and not (isinstance(default, str) and default in branches):
            default = self.ref(default, (*path, "default"))
        return BranchingPipeline(router, built, default=default)

    def _iterative(self, spec: Mapping[str, Any], path: KeyPath) -> Any:
        stages = self.stage_list(spec.get("stages"), (*path, "stages"), "'stages'")
        where = (*path, "stopping_condition")
        cond_spec = spec.get("stopping_condition")
        if not isinstance(cond_spec, Mapping):
            raise self.err(
                where,
                "an iterative node needs stopping_condition: {quality_threshold: ...} "
                "or {component: 'pkg.mod:fn'}.",
                code="bad_node",
            )
        if "component" in cond_spec:
            self.check_keys(cond_spec, ("component", "args"), where, "stopping_condition")
            condition = self.component(cond_spec, where)
        else:
            self.check_keys(cond_spec, STOPPING_KEYS, where, "stopping_condition")
            condition = QualityBasedStopping(**cond_spec)
        pipeline = IterativePipeline(
            stages,
            condition,
            max_iterations=spec.get("max_iterations", 5),
            on_limit=spec.get("on_limit", "return"),
        )
        if "component" in cond_spec:
            setattr(pipeline, TAG_ORIGIN, {"stopping_condition": self.origin(cond_spec)})
        return pipeline

    def _parallel(self, spec: Mapping[str, Any], path: KeyPath) -> Any:
        groups = spec.get("groups")
        if not isinstance(groups, list) or not groups:
            raise self.err(
                (*path, "groups"), "'groups' must be a non-empty list (of nodes or lists of nodes)."
            )
        built = [
            self.stage_list(g, (*path, "groups", i), "a group")
            if isinstance(g, list)
            else [self.ref(g, (*path, "groups", i))]
            for i, g in enumerate(groups)
        ]
        merger = spec.get("merger", {})
        self.typed(merger, Mapping, (*path, "merger"), "a mapping {on_clash: ..., separator: ...}")
        self.check_keys(merger, MERGER_KEYS, (*path, "merger"), "merger")
        return ParallelPipeline(built, ResultMerger(**merger), **self.fanout(spec, path))

    def _foreach(self, spec: Mapping[str, Any], path: KeyPath) -> Any:
        if "stage" not in spec or "over" not in spec:
            raise self.err(
                path, "a foreach node needs 'stage' (a node) and 'over' (a list field).", code="bad_node"
            )
        over = self.typed(spec["over"], str, (*path, "over"), "a field name")
        item = spec.get("item")
        if item is not None:
            self.typed(item, str, (*path, "item"), "a field name")
        collect = spec.get("collect")
        if collect is not None and not isinstance(collect, str):
            collect = self.renames(collect, (*path, "collect"))
            if not collect:  # an empty mapping would collect nothing, silently
                raise self.err(
                    (*path, "collect"),
                    "collect is empty, so the foreach would keep none of its results.",
                    code="bad_value",
                    hint="name what to keep, e.g. collect: {fact: facts}, or leave collect out to keep "
                    "every output",
                )
        stage = self.ref(spec["stage"], (*path, "stage"))
        return ForEach(stage, over=over, item=item, collect=collect, **self.fanout(spec, path))

    def _ensemble(self, spec: Mapping[str, Any], path: KeyPath) -> Any:
        members = self.stage_list(spec.get("processors"), (*path, "processors"), "'processors'")
        where = (*path, "aggregator")
        agg = spec.get("aggregator", {})
        self.typed(agg, Mapping, where, "a mapping {strategy: ..., field: ...}")
        self.check_keys(agg, AGGREGATOR_KEYS, where, "aggregator")
        params = dict(agg)
        strategy = params.get("strategy")
        if isinstance(strategy, Mapping):
            self.check_keys(strategy, ("component", "args"), (*where, "strategy"), "strategy")
            params["strategy"] = self.component(strategy, (*where, "strategy"))
        quorum = spec.get("quorum")
        pipeline = EnsemblePipeline(
            members, ResultAggregator(**params), quorum=quorum, **self.fanout(spec, path)
        )
        if isinstance(strategy, Mapping):
            setattr(pipeline, TAG_ORIGIN, {"strategy": self.origin(strategy)})
        return pipeline


def build(
    src: SpecSource, allow_modules: Sequence[str], allow_paths: Sequence[Path] = ()
) -> tuple[Pipeline, dict[int, KeyPath]]:
    """Build the pipeline described by ``src.data``; returns it and the object → key path map."""
    data = src.data
    try:
        allow_modules = check_module_names(allow_modules)
    except ComponentRefError as exc:
        raise SpecError(str(exc), file=src.file, code=exc.code, hint=exc.hint) from exc
    b = _Builder(src, {}, allow_modules, allow_paths)
    b.check_keys(data, TOP_KEYS, (), "the pipeline file")
    for key in ("name", "description"):
        if key in data:
            b.typed(data[key], str, (key,), "a string")
    if data.get("version", 1) != 1:
        raise src.error(
            ("version",), f"unsupported version {data['version']!r}; this stageflow reads version 1."
        )
    nodes = data.get("nodes", {})
    if not isinstance(nodes, Mapping) or not all(isinstance(k, str) for k in nodes):
        raise src.error(("nodes",), "'nodes' must be a mapping {name: node}.")
    b.nodes = nodes
    if "root" in data:
        root = b.ref(data["root"], ("root",))
    elif "root" in nodes:
        root = b.named("root", ("nodes",))
    else:
        raise src.error((), "no root node: add 'root:' or a node named 'root' under 'nodes'.", code="no_root")
    unused = [n for n in nodes if n not in b.built]
    if unused:
        raise src.error(
            ("nodes", unused[0]), f"the node '{unused[0]}' is defined but never used.", code="unused_node"
        )
    if not isinstance(root, Pipeline):
        root = SequentialPipeline([root])
    meta = {k: copy.deepcopy(data[k]) for k in ("name", "description", "inputs", "outputs") if k in data}
    for key in ("inputs", "outputs"):
        if key in meta:
            meta[key] = b.names(meta[key], (key,))
    setattr(root, TAG_META, meta)
    return root, dict(b.locations)
