"""Adaptive: analyse the input, choose a structure of components, run it.

As in the architecture tutorial, an adapter has two methods: ``analyze_input(input_data)`` returns
characteristics of the call's inputs, and ``select_structure(analysis, component_pool)`` returns
the structure to run — a list of component names (run in order), ``{"ensemble": [names]}`` (run
together, aggregated), or the name of one of the adapter's ``structure_patterns``. Any object with
those two methods is an adapter; :class:`PipelineAdapter` is the tutorial's default and can be
subclassed. An LM stage can be the adapter too (any stage that writes ``structure``).

Structures the adapter declares (``structure_patterns``) are built once, at construction, and
contract-checked on every path; a structure only an overridden ``select_structure`` can return is
built on first use, checked then, and reused.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from stageflow.engine.plan import Scope, StageEntry, build_entry, join_path
from stageflow.engine.runner import acall_stage, call_stage
from stageflow.errors import ConfigurationError, RoutingError
from stageflow.patterns.base import Pipeline, as_stage
from stageflow.patterns.ensemble import EnsemblePipeline
from stageflow.patterns.sequential import SequentialPipeline
from stageflow.policies.recovery import PolicyEvent
from stageflow.state import RunInfo

__all__ = ["AdaptivePipeline", "PipelineAdapter"]

#: The tutorial's structures, by the tutorial's component names.
DEFAULT_PATTERNS: dict[str, list[str]] = {
    "simple": ["processor_a"],
    "complex": ["preprocessor", "processor_a", "postprocessor"],
    "multi_approach": ["processor_a", "processor_b", "aggregator"],
}
_INPUT_FIELDS = ("content", "question", "text", "query", "input")


class PipelineAdapter:
    """The tutorial's adapter: analyse the text of the input, pick one of three structures.

    Args:
        structure_patterns: ``{name: [component names] | {"ensemble": [names]}}``. Default: the
            tutorial's ``simple`` / ``complex`` / ``multi_approach`` over its component names
            (``processor_a``, ``preprocessor``, ``postprocessor``, ``processor_b``, ``aggregator``);
            with a component pool that lacks those names, ``simple`` is the first component,
            ``complex`` every component in order and ``multi_approach`` every component as an
            ensemble. With some of the tutorial's names, as in the tutorial, a structure's names that
            are not in the pool are left out (each run records them in ``skipped_components``).
        input_field: The input to analyse (default: the first of ``content``, ``question``,
            ``text``, ``query``, ``input`` that the call has).
        choose: ``(analysis) -> structure name``, replacing the tutorial's rules.
        structures: An alias of ``structure_patterns``.

    Examples:
        >>> a = PipelineAdapter()
        >>> short = a.analyze_input({"content": "Why is the sky blue?"})
        >>> short["type"], a.select_structure(short, {})  # short and simple comes first
        ('complex_reasoning', ['processor_a'])
        >>> long = a.analyze_input({"content": "Why is the sky blue? " * 15})  # 75 words
        >>> long["length"], a.select_structure(long, {})
        (75, ['processor_a', 'processor_b', 'aggregator'])
    """

    def __init__(
        self,
        structure_patterns: Mapping[str, Any] | None = None,
        *,
        input_field: str | None = None,
        choose: Callable[[dict[str, Any]], str] | None = None,
        structures: Mapping[str, Any] | None = None,
    ) -> None:
        if structure_patterns is not None and structures is not None:
            raise ConfigurationError(
                "PipelineAdapter: pass structure_patterns= or its alias structures=, not both.",
                field="structure_patterns",
                code="bad_option",
            )
        given = structure_patterns if structure_patterns is not None else structures
        self.structure_patterns: dict[str, Any] = dict(given) if given is not None else dict(DEFAULT_PATTERNS)
        self.uses_default_patterns = given is None
        self.input_field = input_field
        self._choose = choose

    # -- the tutorial's two methods ------------------------------------------------------------
    def analyze_input(self, input_data: Mapping[str, Any]) -> dict[str, Any]:
        """``{"length": words, "complexity": 0..1, "type": ...}``; the type is ``complex_reasoning``,
        ``question`` or ``statement``."""
        text = str(self._text(input_data) or "")
        return {
            "length": len(text.split()),
            "complexity": self._compute_complexity(text),
            "type": self._classify_input_type(text),
        }

    def select_structure(self, analysis: Mapping[str, Any], component_pool: Mapping[str, Any]) -> Any:
        """The structure for this analysis: the tutorial's rules (short and simple → ``simple``,
        reasoning → ``multi_approach``, otherwise ``complex``), or ``choose(analysis)``."""
        if self._choose is not None:
            name = self._choose(dict(analysis))
        elif analysis.get("length", 0) < 50 and analysis.get("complexity", 0.0) < 0.3:
            name = "simple"
        elif analysis.get("type") == "complex_reasoning":
            name = "multi_approach"
        else:
            name = "complex"
        patterns = self.patterns_for(list(component_pool)) if component_pool else self.structure_patterns
        if name not in patterns:
            raise RoutingError(
                f"The adapter chose structure {name!r}, which is not one of its structure_patterns "
                f"{sorted(patterns)}.",
                field="structure",
                code="unknown_structure",
            )
        return patterns[name]

    # -- helpers (the tutorial's, without numpy) ----------------------------------------------------
    def _text(self, input_data: Mapping[str, Any]) -> Any:
        if self.input_field is not None:
            return input_data.get(self.input_field, "")
        for name in _INPUT_FIELDS:
            if name in input_data:
                return input_data[name]
        return next((v for v in input_data.values() if isinstance(v, str)), "")

    @staticmethod
    def _compute_complexity(text: str) -> float:
        """Word length, punctuation and nesting, scaled to 0..1."""
        words = text.split()
        avg_word_length = sum(len(w) for w in words) / len(words) if words else 0.0
        punctuation = text.count(".") + text.count(",") + text.count(";")
        nested = text.count("(") + text.count("[")
        complexity = avg_word_length * 0.2 + punctuation * 0.3 + nested * 0.5
        return min(complexity / 10, 1.0)

    @staticmethod
    def _classify_input_type(text: str) -> str:
        low = text.lower()
        if any(re.search(rf"\b{w}\b", low) for w in ("why", "how", "explain", "analyze")):
            return "complex_reasoning"
        if "?" in text:
            return "question"
        return "statement"

    def patterns_for(self, pool: Sequence[str]) -> dict[str, Any]:
        """The structures over a pool with these names (see ``structure_patterns``)."""
        tutorial_names = {n for names in DEFAULT_PATTERNS.values() for n in names}
        if self.uses_default_patterns and not tutorial_names & set(pool):
            return {"simple": [pool[0]], "complex": list(pool), "multi_approach": {"ensemble": list(pool)}}
        return dict(self.structure_patterns)


def _key(structure: Any) -> str:
    """A stable name for a structure (its pattern name, or the components it runs)."""
    if isinstance(structure, Mapping) and "ensemble" in structure:
        return "ensemble(" + ",".join(map(str, structure["ensemble"])) + ")"
    return "+".join(map(str, structure))


class AdaptivePipeline(Pipeline):
    """Choose a structure per input, from a pool of components.

    Args:
        component_pool: ``{name: stage}``; held in the flat dict ``self.components`` so every
            component is visible to DSPy optimizers exactly once (``component_pool`` is an alias).
        adapter: A :class:`PipelineAdapter` (default), any object with ``analyze_input`` and
            ``select_structure``, or a stage (e.g. a ``dspy.Predict``) that writes a ``structure``
            field naming one of ``structures``.
        structures: Structure definitions for a stage adapter (``{name: [component names]}``).
        strict: Strict contracts (see :class:`~stageflow.Pipeline`).

    Result details: ``used_structure`` (what the adapter selected), ``structure_name``,
    ``input_analysis`` and ``result`` (the chosen structure's own result).
    """

    _stage_containers = ("components", "structures")

    def __init__(
        self,
        component_pool: Mapping[str, Any],
        adapter: Any = None,
        *,
        structures: Mapping[str, Any] | None = None,
        strict: bool | None = None,
    ) -> None:
        super().__init__(strict=strict)
        if not isinstance(component_pool, Mapping) or not component_pool:
            raise ConfigurationError(
                "AdaptivePipeline needs a non-empty dict component_pool.", code="bad_stages"
            )
        self.components = {str(k): as_stage(v, f"components['{k}']") for k, v in component_pool.items()}
        self._adapter_entry: StageEntry | None = None
        self._lock = threading.Lock()
        self._skipped: dict[str, list[Any]] = {}
        if adapter is None:
            adapter = PipelineAdapter(structures)
        if hasattr(adapter, "analyze_input") and hasattr(adapter, "select_structure"):
            self.adapter = adapter
            patterns = adapter.patterns_for(list(self.components)) if hasattr(adapter, "patterns_for") else {}
            if not patterns and isinstance(getattr(adapter, "structure_patterns", None), Mapping):
                patterns = dict(adapter.structure_patterns)
            # Known in advance only when the selection is the default adapter's own rule.
            self._dynamic = type(adapter).select_structure is not PipelineAdapter.select_structure
            self._lenient = self._dynamic or bool(getattr(adapter, "uses_default_patterns", False))
        else:
            self.adapter_stage = as_stage(adapter, "adapter")
            self._adapter_entry = build_entry("adapter_stage", None, self.adapter_stage)
            if structures is None:
                raise ConfigurationError(
                    "An LM/stage adapter needs structures={name: [component names]}.",
                    field="structures",
                    code="bad_option",
                )
            patterns = dict(structures)
            self._dynamic = False
            self._lenient = False
        self._patterns = patterns
        self.structures = {name: self._build(name, spec) for name, spec in patterns.items()}
        self._by_content = {_key(spec): name for name, spec in patterns.items()}
        self._rebuild()
        self._built()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_lock", None)  # (a copy or unpickled pipeline gets a lock of its own)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__["_lock"] = threading.Lock()

    @property
    def component_pool(self) -> dict[str, Any]:
        """The components (the tutorial's name for ``self.components``)."""
        return self.components

    def _rebuild(self) -> None:
        self._entries = {key: build_entry("structures", key, s) for key, s in self.structures.items()}

    def _component(self, name: Any, structure: str) -> Any:
        if name not in self.components:
            raise ConfigurationError(
                f"Structure {structure!r} names component {name!r}; the pool has {sorted(self.components)}.",
                field=str(name),
                code="unknown_component",
            )
        return self.components[name]

    def _names_in(self, names: Sequence[Any], structure: str) -> list[Any]:
        """The components a structure names; names not in the pool are left out (recorded) when the
        structure comes from the tutorial's default patterns or a custom ``select_structure``, and
        refused otherwise (a structure written for this pool should not misspell it)."""
        missing = [c for c in names if c not in self.components]
        if missing and not self._lenient:
            self._component(missing[0], structure)  # raises, naming the component
        present = [c for c in names if c in self.components]
        if not present:
            raise ConfigurationError(
                f"Structure {structure!r} names {list(names)}, none of which is in the pool "
                f"{sorted(self.components)}.",
                field=structure,
                code="unknown_component",
            )
        if missing:
            self._skipped[structure] = missing
        return present

    def _build(self, name: str, spec: Any) -> Pipeline:
        if isinstance(spec, Mapping) and "ensemble" in spec:
            members = [self.components[c] for c in self._names_in(spec["ensemble"], name)]
            return EnsemblePipeline(members, spec.get("aggregator"))
        if isinstance(spec, Sequence) and not isinstance(spec, str) and spec:
            return SequentialPipeline([self.components[c] for c in self._names_in(spec, name)])
        raise ConfigurationError(
            f"Structure {name!r}: expected a non-empty list of component names or {{'ensemble': [...]}}, "
            f"got {spec!r}.",
            field=name,
            code="bad_structure",
        )

    def _analyze(self, scope: Scope, prefix: str) -> None:
        base = scope.copy()
        if self._adapter_entry is not None:
            base.check(self._adapter_entry, prefix)
        if self._dynamic:
            # The adapter may pick any structure: each is checked when it is chosen. Every input a
            # component may need is passed in when the caller has it; outputs are known only then.
            for entry in self._entries.values():
                sub = base.copy()
                sub.strict = False
                sub.check(entry, prefix)
            for name, component in self.components.items():
                ports = build_entry("components", name, component).ports
                for f in (*ports.required, *ports.optional):
                    if f not in scope.available:
                        scope.optional.setdefault(f, join_path(prefix, f"components['{name}']"))
            scope.opaque.append(prefix or "adaptive")
            return
        results = []
        for entry in self._entries.values():
            sub = base.copy()
            sub.check(entry, prefix)
            results.append(sub)
        scope.narrow(results, [join_path(prefix, e.path) for e in self._entries.values()])

    def _entry_for(self, structure: Any) -> StageEntry:
        if isinstance(structure, str):
            name = structure if structure in self._patterns else None
            key = structure
        else:
            key = _key(structure)
            name = self._by_content.get(key)
        entry = self._entries.get(name or key)
        if entry is not None:
            return entry
        if isinstance(structure, str) or not self._dynamic:
            raise RoutingError(
                f"The adapter chose structure {structure!r}, which does not exist. Structures: "
                f"{sorted(self._patterns)}.",
                field="structure",
                code="unknown_structure",
            )
        with self._lock:  # a structure only a custom select_structure returns: built once, then reused
            if key not in self._entries:
                self.structures[key] = self._build(key, structure)
                self._by_content[key] = key
                self._rebuild()
                self._built()
            return self._entries[key]

    @property
    def current_structure(self) -> Any:
        """The structure the adapter selected for the latest call (the tutorial's attribute; each
        call's own is ``result.used_structure``); ``None`` before the first call."""
        return getattr(self, "_current", None)

    def _pick(self, state: dict[str, Any], run: RunInfo) -> StageEntry:
        if self._adapter_entry is None:
            analysis = self.adapter.analyze_input(dict(state))
            structure = self.adapter.select_structure(analysis, self.components)
        else:
            analysis = {"structure": state.get("structure")}
            structure = str(state.get("structure") or "").strip()
        entry = self._entry_for(structure)
        self._current = structure  # one reference swap: safe under concurrent calls
        run.extras["used_structure"] = structure
        run.extras["structure_name"] = str(entry.key)
        run.extras["input_analysis"] = analysis
        skipped = self._skipped.get(str(entry.key))
        if skipped:
            run.extras["skipped_components"] = list(skipped)
            run.events.append(
                PolicyEvent(
                    str(entry.key),
                    "components_skipped",
                    error=f"not in the component pool: {skipped}",
                    detail={"structure": entry.key, "skipped": list(skipped)},
                )
            )
        return entry

    def _run(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        if self._adapter_entry is not None:
            call_stage(self, self._adapter_entry, state, run, hooks, prefix)
        entry = self._pick(state, run)
        run.extras["result"] = call_stage(self, entry, state, run, hooks, prefix)

    async def _arun(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        if self._adapter_entry is not None:
            await acall_stage(self, self._adapter_entry, state, run, hooks, prefix)
        entry = self._pick(state, run)
        run.extras["result"] = await acall_stage(self, entry, state, run, hooks, prefix)
