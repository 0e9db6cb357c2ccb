"""Pipeline → spec data (:func:`to_spec`), the inverse of building.

Works for pipelines loaded from spec files (including compiled copies of them) and for hand-built
pipelines made of the spec's building blocks: ``dspy.Predict`` / ``dspy.ChainOfThought`` with
signature-string-expressible fields, the stageflow patterns, and stages loaded as components. Values
equal to a constructor default are left out, so the output is the canonical form of the file.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import dspy
from pydantic_core import PydanticUndefined

from stageflow.errors import ConfigurationError
from stageflow.patterns.branching import BranchingPipeline
from stageflow.patterns.ensemble import EnsemblePipeline, ResultAggregator
from stageflow.patterns.foreach import ForEach, _default_item
from stageflow.patterns.iterative import IterativePipeline, QualityBasedStopping
from stageflow.patterns.parallel import ParallelPipeline, ResultMerger
from stageflow.patterns.sequential import SequentialPipeline
from stageflow.spec._build import TAG_META, TAG_NODE
from stageflow.spec._modules import MODULE_KINDS, TAG_DECL, TAG_ORIGIN
from stageflow.stages import Stage, stage_label

__all__ = ["signature_text", "to_spec"]

_FANOUT_DEFAULTS = {"max_concurrency": None, "on_error": "collect", "timeout": None}


def _type_text(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def signature_text(signature: Any, drop: tuple[str, ...] = ()) -> str:
    """A DSPy signature as a string with types: ``"question -> sub_questions: list[str]"``."""

    def field(name: str, info: Any) -> str:
        return name if info.annotation is str else f"{name}: {_type_text(info.annotation)}"

    ins = ", ".join(field(n, f) for n, f in signature.input_fields.items())
    outs = ", ".join(field(n, f) for n, f in signature.output_fields.items() if n not in drop)
    return f"{ins} -> {outs}"


def _non_defaults(obj: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    return {k: getattr(obj, k) for k, d in defaults.items() if getattr(obj, k) != d}


class _Exporter:
    def __init__(self) -> None:
        self.named: dict[str, Any] = {}

    def fail(self, obj: Any, where: str, why: str) -> ConfigurationError:
        return ConfigurationError(
            f"to_spec cannot describe {where or 'the root'} ({stage_label(obj)}): {why}.",
            stage_path=where or None,
            code="not_expressible",
            hint="build that stage from the spec's blocks (predict, chain_of_thought, patterns), or load "
            "it as a component ({component: 'pkg.mod:name'}) so the file can name it",
        )

    def ref(self, obj: Any, where: str) -> Any:
        name = getattr(obj, TAG_NODE, None)
        if not isinstance(name, str):
            return self.body(obj, where)
        if name not in self.named:
            self.named[name] = None  # reserve the name (and its position) before descending
            self.named[name] = self.body(obj, where)
        return name

    def body(self, obj: Any, where: str) -> dict[str, Any]:
        origin = getattr(obj, TAG_ORIGIN, None)
        if isinstance(origin, dict) and any(k in origin for k in MODULE_KINDS):
            return copy.deepcopy(origin)  # a component (even one that returned a pipeline), bm25, lm_router
        if isinstance(obj, Stage):
            out = self.module(obj.module, where)
            out.update({k: dict(v) for k, v in (("inputs", obj.input_map), ("outputs", obj.output_map)) if v})
            out.update(copy.deepcopy(getattr(obj, TAG_DECL, {})))
            return out
        kind = type(obj)
        if kind is SequentialPipeline:
            return {"type": "pipeline", "stages": self.refs(obj.stages, where, "stages")}
        if kind is BranchingPipeline:
            return self.conditional(obj, where)
        if kind is IterativePipeline:
            return self.iterative(obj, where)
        if kind is ParallelPipeline:
            return self.parallel(obj, where)
        if kind is ForEach:
            return self.foreach(obj, where)
        if kind is EnsemblePipeline:
            return self.ensemble(obj, where)
        return self.module(obj, where)

    def refs(self, items: list[Any], where: str, attr: str) -> list[Any]:
        return [self.ref(s, f"{where}.{attr}[{i}]".lstrip(".")) for i, s in enumerate(items)]

    def module(self, obj: Any, where: str) -> dict[str, Any]:
        origin = getattr(obj, TAG_ORIGIN, None)
        if isinstance(origin, dict) and any(k in origin for k in MODULE_KINDS):
            return copy.deepcopy(origin)
        if isinstance(obj, dspy.ChainOfThought) and isinstance(getattr(obj, "predict", None), dspy.Predict):
            self.check_defaults(obj, obj.predict.signature, where)
            return self.predictor("chain_of_thought", obj.predict.signature, ("reasoning",))
        if type(obj) is dspy.Predict:
            self.check_defaults(obj, obj.signature, where)
            return self.predictor("predict", obj.signature, ())
        raise self.fail(obj, where, "it is not a spec building block")

    def check_defaults(self, obj: Any, signature: Any, where: str) -> None:
        """A signature string cannot carry an input's default (DSPy fills it in, the contract lets it
        be left out): written without it, the file's pipeline would need that input."""
        for name, info in signature.input_fields.items():
            if info.default is not PydanticUndefined:  # (a default_factory DSPy never uses: required)
                raise self.fail(
                    obj, where, f"its input '{name}' has a default, which a signature string cannot carry"
                )

    def predictor(self, key: str, signature: Any, drop: tuple[str, ...]) -> dict[str, Any]:
        text = signature_text(signature, drop)
        out: dict[str, Any] = {key: text}
        if signature.instructions != dspy.Signature(text).instructions:
            out["instructions"] = signature.instructions
        return out

    def fanout(self, obj: Any) -> dict[str, Any]:
        defaults = dict(_FANOUT_DEFAULTS)
        defaults["on_error"] = inspect.signature(type(obj).__init__).parameters["on_error"].default
        return _non_defaults(obj, defaults)

    def conditional(self, obj: BranchingPipeline, where: str) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "conditional", "router": self.ref(obj.router, f"{where}.router")}
        out["branches"] = {k: self.ref(v, f"{where}.branches['{k}']") for k, v in obj.branches.items()}
        if obj._default_key is not None:
            out["default"] = obj._default_key
        elif hasattr(obj, "default"):
            out["default"] = self.ref(obj.default, f"{where}.default")
        return out

    def iterative(self, obj: IterativePipeline, where: str) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "iterative", "stages": self.refs(obj.stages, where, "stages")}
        cond = obj.stopping_condition
        origin = getattr(obj, TAG_ORIGIN, {})
        if "stopping_condition" in origin:
            out["stopping_condition"] = copy.deepcopy(origin["stopping_condition"])
        elif type(cond) is QualityBasedStopping:
            defaults = {"quality_threshold": 0.9, "patience": 2, "min_improvement": 0.01}
            params = _non_defaults(
                cond, {**defaults, "score_field": "quality_score", "improvement_field": "improvement"}
            )
            out["stopping_condition"] = params
        else:
            raise self.fail(obj, where, f"its stopping condition {cond!r} is not a spec building block")
        if obj.max_iterations != 5:
            out["max_iterations"] = obj.max_iterations
        if obj.on_limit != "return":
            out["on_limit"] = obj.on_limit
        return out

    def parallel(self, obj: ParallelPipeline, where: str) -> dict[str, Any]:
        groups: list[Any] = []
        for group in obj._groups:
            refs = [self.ref(obj.stages[int(e.key or 0)], f"{where}.{e.path}".lstrip(".")) for e in group]
            groups.append(refs if len(refs) > 1 else refs[0])
        out: dict[str, Any] = {"type": "parallel", "groups": groups}
        if type(obj.merger) is not ResultMerger:
            raise self.fail(
                obj,
                where,
                f"its merger is code of yours ({type(obj.merger).__name__}), which a file cannot hold",
            )
        merger = _non_defaults(obj.merger, {"on_clash": "error", "separator": "\n"})
        if merger:
            out["merger"] = merger
        return {**out, **self.fanout(obj)}

    def foreach(self, obj: ForEach, where: str) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "foreach", "stage": self.ref(obj.stage, f"{where}.stage".lstrip("."))}
        out["over"] = obj.over
        if obj.item != _default_item(obj.over, obj._entry.ports):
            out["item"] = obj.item
        outputs = obj._entry.ports.outputs or ()
        default = {o: f"{o}s" if not o.endswith("s") else f"{o}_list" for o in outputs}
        if obj.collect != default:
            out["collect"] = next(iter(obj.collect.values())) if len(outputs) == 1 else dict(obj.collect)
        return {**out, **self.fanout(obj)}

    def ensemble(self, obj: EnsemblePipeline, where: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "ensemble",
            "processors": self.refs(obj.processors, where, "processors"),
        }
        agg = obj.aggregator
        if type(agg) is not ResultAggregator:
            raise self.fail(
                obj,
                where,
                f"its aggregator is code of yours ({type(agg).__name__}), which a file cannot hold",
            )
        defaults = {"field": None, "confidence_field": "confidence", "threshold": 0.5}
        params = _non_defaults(agg, defaults)
        origin = getattr(obj, TAG_ORIGIN, {})
        if "strategy" in origin:
            params = {"strategy": copy.deepcopy(origin["strategy"]), **params}
        elif callable(agg.strategy):
            raise self.fail(obj, where, "its aggregation strategy is a Python function")
        elif agg.strategy != "weighted_voting":
            params = {"strategy": agg.strategy, **params}
        if params:
            out["aggregator"] = params
        if obj.quorum is not None:
            out["quorum"] = obj.quorum
        return {**out, **self.fanout(obj)}


def to_spec(pipeline: Any) -> dict[str, Any]:
    """Describe ``pipeline`` as spec data (a dict ready for YAML/JSON; see :mod:`stageflow.spec`).

    Raises:
        ConfigurationError: ``code="not_expressible"`` for a stage the format cannot name (a plain
            Python function or custom module that was not loaded as a component).
    """
    meta: dict[str, Any] = copy.deepcopy(getattr(pipeline, TAG_META, {}))
    exporter = _Exporter()
    root_name = getattr(pipeline, TAG_NODE, None)
    out: dict[str, Any] = {"version": 1}
    out.update({k: meta[k] for k in ("name", "description", "inputs", "outputs") if k in meta})
    if isinstance(root_name, str) and root_name != "root":
        out["root"] = exporter.ref(pipeline, "")
    else:
        exporter.named["root"] = None
        exporter.named["root"] = exporter.body(pipeline, "")
    out["nodes"] = exporter.named
    return out
