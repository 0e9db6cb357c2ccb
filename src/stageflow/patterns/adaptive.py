"""Adaptive: analyse the input, choose a structure, run it.

The default :class:`PipelineAdapter` analyses a question (length, a complexity score, the
question type) and picks one of three structures built from the component pool:

- ``simple``: the first component alone;
- ``complex``: every component in order (a :class:`SequentialPipeline`);
- ``multi_approach``: every component on the same input, aggregated (an
  :class:`EnsemblePipeline`).

Pass ``structures={"name": [component names] | {"ensemble": [names]}}`` to define your own, a
``choose`` function, or an LM stage as the adapter (any stage that writes ``structure``).
Structures are built once, at construction, and reused by every call.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from stageflow.engine.plan import Scope, StageEntry, build_entry, join_path
from stageflow.engine.runner import acall_stage, call_stage
from stageflow.errors import ConfigurationError, RoutingError
from stageflow.patterns.base import Pipeline, as_stage
from stageflow.patterns.ensemble import EnsemblePipeline
from stageflow.patterns.sequential import SequentialPipeline
from stageflow.state import RunInfo

__all__ = ["AdaptivePipeline", "PipelineAdapter"]

_TYPES = (
    ("comparison", r"\b(compare|versus|vs\.?|difference|better|worse|which of)\b"),
    ("calculation", r"\b(how many|how much|calculate|sum|total|\d+\s*[-+*/x]\s*\d+)\b"),
    ("explanation", r"^(why|how)\b"),
    ("factual", r"^(who|what|when|where|which)\b"),
)


class PipelineAdapter:
    """Analyse the input and pick a structure (the default adapter; see the module docstring).

    Args:
        input_field: The field to analyse (default ``question``).
        structures: ``{name: [component names]}`` (sequential) or ``{name: {"ensemble": [names]}}``.
            Default: ``simple`` / ``complex`` / ``multi_approach`` over the pool.
        choose: ``(analysis) -> structure name``; default: comparisons → ``multi_approach``,
            complexity ≥ ``complexity_threshold`` → ``complex``, else ``simple``.
        complexity_threshold: See ``choose``.
    """

    def __init__(
        self,
        input_field: str = "question",
        structures: Mapping[str, Any] | None = None,
        choose: Callable[[dict[str, Any]], str] | None = None,
        complexity_threshold: float = 0.5,
    ) -> None:
        self.input_field = input_field
        self.structures = dict(structures) if structures is not None else None
        self._choose = choose
        self.complexity_threshold = complexity_threshold

    def analyze(self, text: Any) -> dict[str, Any]:
        """Length (words), a 0–1 complexity score and the question type."""
        s = str(text or "").strip()
        words = s.split()
        low = s.lower()
        qtype = next((name for name, pat in _TYPES if re.search(pat, low)), "other")
        clauses = len(re.findall(r"\b(and|or|but|because|which|that|while|if)\b|[,;]", low))
        complexity = min(
            1.0, len(words) / 40 + clauses * 0.15 + (0.2 if qtype in ("comparison", "explanation") else 0.0)
        )
        return {"length": len(words), "complexity": round(complexity, 3), "question_type": qtype}

    def choose(self, analysis: dict[str, Any]) -> str:
        """The structure for this analysis."""
        if self._choose is not None:
            return self._choose(analysis)
        if analysis["question_type"] == "comparison":
            return "multi_approach"
        return "complex" if analysis["complexity"] >= self.complexity_threshold else "simple"

    def structure_specs(self, pool: Sequence[str]) -> dict[str, Any]:
        """The structures to build over a pool with these component names."""
        if self.structures is not None:
            return self.structures
        return {"simple": [pool[0]], "complex": list(pool), "multi_approach": {"ensemble": list(pool)}}


class AdaptivePipeline(Pipeline):
    """Choose a structure per input, from a pool of components.

    Args:
        component_pool: ``{name: stage}``; held in the flat dict ``self.components`` so every
            component is visible to DSPy optimizers exactly once.
        adapter: A :class:`PipelineAdapter` (default), or a stage (e.g. a ``dspy.Predict``) that
            writes a ``structure`` field naming one of the structures (build the structures with
            ``structures=``).
        structures: Structure definitions when the adapter is a stage (see :class:`PipelineAdapter`).

    Result details: ``used_structure`` and ``input_analysis``.
    """

    def __init__(
        self,
        component_pool: Mapping[str, Any],
        adapter: PipelineAdapter | Any = None,
        *,
        structures: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(component_pool, Mapping) or not component_pool:
            raise ConfigurationError(
                "AdaptivePipeline needs a non-empty dict component_pool.", code="bad_stages"
            )
        self.components = {k: as_stage(v, f"components['{k}']") for k, v in component_pool.items()}
        adapter = adapter if adapter is not None else PipelineAdapter(structures=structures)
        self._adapter_entry: StageEntry | None = None
        if isinstance(adapter, PipelineAdapter):
            self.adapter = adapter
            specs = adapter.structure_specs(list(self.components))
        else:
            self.adapter_stage = as_stage(adapter, "adapter")
            self._adapter_entry = build_entry("adapter_stage", None, self.adapter_stage)
            if structures is None:
                raise ConfigurationError(
                    "An LM/stage adapter needs structures={name: [component names]}.",
                    field="structures",
                    code="bad_option",
                )
            specs = dict(structures)
        self.structures = {name: self._build(name, spec) for name, spec in specs.items()}
        self._entries = {name: build_entry("structures", name, s) for name, s in self.structures.items()}

    def _component(self, name: str, structure: str) -> Any:
        if name not in self.components:
            raise ConfigurationError(
                f"Structure {structure!r} names component {name!r}; the pool has {sorted(self.components)}.",
                field=name,
                code="unknown_component",
            )
        return self.components[name]

    def _build(self, name: str, spec: Any) -> Pipeline:
        if isinstance(spec, Mapping) and "ensemble" in spec:
            return EnsemblePipeline(
                [self._component(c, name) for c in spec["ensemble"]], spec.get("aggregator")
            )
        if isinstance(spec, Sequence) and not isinstance(spec, str):
            return SequentialPipeline([self._component(c, name) for c in spec])
        raise ConfigurationError(
            f"Structure {name!r}: expected a list of component names or {{'ensemble': [...]}}.",
            field=name,
            code="bad_structure",
        )

    def _analyze(self, scope: Scope, prefix: str) -> None:
        base = scope.copy()
        if self._adapter_entry is not None:
            base.check(self._adapter_entry, prefix)
        results = []
        for entry in self._entries.values():
            sub = base.copy()
            sub.check(entry, prefix)
            results.append(sub)
        scope.narrow(results, [join_path(prefix, e.path) for e in self._entries.values()])

    def _pick(self, state: dict[str, Any], run: RunInfo) -> StageEntry:
        if self._adapter_entry is None:
            analysis = self.adapter.analyze(state.get(self.adapter.input_field))
            name = self.adapter.choose(analysis)
        else:
            analysis = {"structure": state.get("structure")}
            name = str(state.get("structure") or "").strip()
        entry = self._entries.get(name)
        if entry is None:
            raise RoutingError(
                f"The adapter chose structure {name!r}, which does not exist. Structures: "
                f"{sorted(self._entries)}.",
                field="structure",
                code="unknown_structure",
            )
        run.extras["used_structure"] = name
        run.extras["input_analysis"] = analysis
        return entry

    def _run(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        if self._adapter_entry is not None:
            call_stage(self, self._adapter_entry, state, run, hooks, prefix)
        call_stage(self, self._pick(state, run), state, run, hooks, prefix)

    async def _arun(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        if self._adapter_entry is not None:
            await acall_stage(self, self._adapter_entry, state, run, hooks, prefix)
        await acall_stage(self, self._pick(state, run), state, run, hooks, prefix)
