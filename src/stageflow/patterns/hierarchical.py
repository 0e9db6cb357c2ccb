"""Hierarchical: a tree of pipelines defined as data, built and checked at construction.

A structure is a dict of named nodes; a node refers to others by name or holds them inline::

    {
        "root":     {"type": "pipeline", "stages": ["classify", "answer"]},
        "classify": {"type": "module", "module": dspy.Predict("question -> branch: str")},
        "answer":   {"type": "conditional", "router": "classify_fn",
                     "branches": {"math": "solve", "chat": {"type": "module", "module": chat}}},
        ...
    }

Node types:

- ``module``: ``module`` is a module object or a function; optional ``inputs``/``outputs``/
  ``reads``/``writes`` as for :class:`Stage`. A saved program is loaded with ``state``: the path of a
  JSON state file (``program.save("qa.json")``), loaded into a copy of ``module`` (an object, or a
  class called without arguments): ``{"type": "module", "module": QA, "state": "qa.json"}``. A
  program saved whole with ``program.save(dir, save_program=True)`` is a cloudpickle file, and
  unpickling it can run any code: ``module: "dir"`` (or a ``.pkl`` state) loads only with
  ``HierarchicalPipeline(..., allow_pickle=True)``.
- ``pipeline``: ``stages`` is a list of node names or inline nodes (a :class:`SequentialPipeline`).
- ``conditional``: ``router`` and ``branches`` (``{label: node}``), optional ``default``
  (a :class:`BranchingPipeline`).
- ``iterative``: ``stages``, ``stopping_condition`` and ``max_iterations`` (an
  :class:`IterativePipeline`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dspy

from stageflow.engine.plan import Scope, StageEntry, build_entry
from stageflow.engine.runner import acall_stage, aexecute, call_stage, execute
from stageflow.errors import ConfigurationError
from stageflow.patterns.base import CheckResult, Pipeline, as_stage
from stageflow.patterns.branching import BranchingPipeline
from stageflow.patterns.iterative import IterativePipeline
from stageflow.patterns.sequential import SequentialPipeline
from stageflow.stages import Stage
from stageflow.state import Result, RunInfo

__all__ = ["HierarchicalPipeline"]

NODE_TYPES = ("module", "pipeline", "conditional", "iterative")
_STAGE_KEYS = ("inputs", "outputs", "reads", "writes")


def _load_saved(target: Any, state: Any, where: str, allow_pickle: bool = False) -> Any:
    """A ``module`` node's saved program: JSON state loaded into a copy of ``target``, or (opt-in) a pickle.

    ``target`` is a path (a whole program saved with ``save_program=True``: cloudpickle) or, with
    ``state``, the module object or class the saved state is loaded into.
    """
    path = Path(state if state is not None else target)
    if not path.exists():
        raise ConfigurationError(
            f"{where}: no saved program at {str(path)!r}.",
            code="missing_program",
            hint="save one with program.save('program.json') and give it as 'state', or pass the module "
            "object",
        )
    pickled = path.suffix == ".pkl" or (state is None and path.is_dir())
    if pickled and not allow_pickle:
        raise ConfigurationError(
            f"{where}: {str(path)!r} is a pickled program; unpickling a file can run any code it holds, "
            "so pickled programs load only when you opt in.",
            code="pickle_not_allowed",
            hint="if you trust the file, pass HierarchicalPipeline(..., allow_pickle=True); better, save the "
            "state as JSON (program.save('program.json')) and give {'type': 'module', 'module': YourProgram, "
            "'state': 'program.json'}",
        )
    if state is None and not path.is_dir():
        raise ConfigurationError(
            f"{where}: {str(path)!r} holds a program's state, not the program: it needs a module to load "
            "into.",
            code="bad_program",
            hint="give the module (or its class) and the file as 'state': "
            "{'type': 'module', 'module': YourProgram, 'state': '...json'}",
        )
    try:
        if state is None:
            loaded = dspy.load(str(path), allow_pickle=True)
        else:
            loaded = target() if isinstance(target, type) else copy.deepcopy(target)
            loaded.load(str(path), allow_pickle=allow_pickle)
    except ConfigurationError:
        raise
    except Exception as e:
        raise ConfigurationError(
            f"{where}: could not load the saved program at {str(path)!r}: {type(e).__name__}: {e}",
            code="bad_program",
        ) from e
    if not isinstance(loaded, dspy.Module):
        raise ConfigurationError(
            f"{where}: the saved program at {str(path)!r} is a {type(loaded).__name__}, not a dspy.Module.",
            code="bad_program",
        )
    return loaded


class _Builder:
    """Builds nodes once each (shared by name), detecting unknown names and cycles."""

    def __init__(self, structure: Mapping[str, Any], allow_pickle: bool = False) -> None:
        self.structure = structure
        self.allow_pickle = allow_pickle
        self.built: dict[str, Any] = {}
        self.building: list[str] = []

    def ref(self, ref: Any, where: str) -> Any:
        if isinstance(ref, str):
            return self.named(ref, where)
        if isinstance(ref, Mapping):
            return self.node(ref, where)
        return as_stage(ref, where)

    def named(self, name: str, where: str) -> Any:
        if name in self.built:
            return self.built[name]
        if name not in self.structure:
            raise ConfigurationError(
                f"{where} refers to node {name!r}, which the structure does not define. "
                f"Defined nodes: {sorted(self.structure)}.",
                field=name,
                code="unknown_node",
            )
        if name in self.building:
            cycle = " -> ".join([*self.building[self.building.index(name) :], name])
            raise ConfigurationError(
                f"The structure has a cycle: {cycle}.",
                field=name,
                code="cycle",
                hint="use a node of type 'iterative' for loops",
            )
        self.building.append(name)
        try:
            module = self.node(self.structure[name], f"node {name!r}")
        finally:
            self.building.pop()
        self.built[name] = module
        return module

    def node(self, spec: Any, where: str) -> Any:
        if not isinstance(spec, Mapping):
            return as_stage(spec, where)
        kind = spec.get("type")
        if kind not in NODE_TYPES:
            raise ConfigurationError(
                f"{where}: unknown node type {kind!r}; expected one of {list(NODE_TYPES)}.",
                field="type",
                code="bad_node",
            )
        if kind == "module":
            if "module" not in spec:
                raise ConfigurationError(
                    f"{where}: a 'module' node needs a 'module' key.", field="module", code="bad_node"
                )
            target, state = spec["module"], spec.get("state")
            saved = state is not None or isinstance(target, str | Path)
            module = (
                _load_saved(target, state, where, self.allow_pickle) if saved else as_stage(target, where)
            )
            extra = {k: spec[k] for k in _STAGE_KEYS if k in spec}
            return Stage(module, **extra) if extra else module
        if kind == "pipeline":
            stages = spec.get("stages")
            if not isinstance(stages, Sequence) or isinstance(stages, str) or not stages:
                raise ConfigurationError(
                    f"{where}: a 'pipeline' node needs a non-empty 'stages' list.",
                    field="stages",
                    code="bad_node",
                )
            return SequentialPipeline([self.ref(s, f"{where} stages[{i}]") for i, s in enumerate(stages)])
        if kind == "conditional":
            router = spec.get("router", spec.get("condition"))
            branches = spec.get("branches")
            if router is None or not isinstance(branches, Mapping):
                raise ConfigurationError(
                    f"{where}: a 'conditional' node needs 'router' and a 'branches' dict.",
                    field="router" if router is None else "branches",
                    code="bad_node",
                )
            default = spec.get("default")
            if default is not None and not (isinstance(default, str) and default in branches):
                default = self.ref(default, f"{where} default")
            return BranchingPipeline(
                self.ref(router, f"{where} router"),
                {k: self.ref(v, f"{where} branches[{k!r}]") for k, v in branches.items()},
                default=default,
            )
        stages = spec.get("stages") or []
        return IterativePipeline(
            [self.ref(s, f"{where} stages[{i}]") for i, s in enumerate(stages)],
            spec.get("stopping_condition"),  # validated by IterativePipeline
            max_iterations=spec.get("max_iterations", 5),
            on_limit=spec.get("on_limit", "return"),
        )


class HierarchicalPipeline(Pipeline):
    """Nested pipelines built from a definition (see the module docstring for the format).

    Args:
        structure: ``{node_name: node}``; must contain ``root`` unless you only call other nodes.
        inputs: Optional input names for ``root``: the whole tree is then contract-checked at
            construction, before any call.
        allow_pickle: Let ``module`` nodes load pickled programs (``save_program=True`` directories,
            ``.pkl`` states). Unpickling runs code from the file: only for files you trust.
        strict: Strict contracts (see :class:`~stageflow.Pipeline`).

    Every node is built once and held in the flat dict ``self.nodes``, so DSPy sees each predictor
    exactly once (``nodes['root'].stages[0]``, ...). Call ``pipeline(stage_name="root", **inputs)``
    to run a node (``root`` by default).
    """

    def __init__(
        self,
        structure: Mapping[str, Any],
        *,
        inputs: Sequence[str] | None = None,
        allow_pickle: bool = False,
        strict: bool | None = None,
    ) -> None:
        super().__init__(strict=strict)
        if not isinstance(structure, Mapping) or not structure:
            raise ConfigurationError(
                "HierarchicalPipeline needs a non-empty dict of nodes.", code="bad_structure"
            )
        builder = _Builder(structure, allow_pickle)
        for name in structure:
            builder.named(name, "structure")
        self.nodes = {name: builder.built[name] for name in structure}
        self._rebuild()
        for entry in self._node_entries.values():
            _ = entry.ports  # every node's wiring was checked when its ports were computed
        if inputs is not None:
            self.check(inputs)

    def _rebuild(self) -> None:
        # (also when a node's predictor got a signature with other fields: Pipeline.stageflow_replanned)
        self._node_entries = {name: build_entry("nodes", name, m) for name, m in self.nodes.items()}

    @property
    def structure(self) -> dict[str, Any]:
        """The built nodes by name (the tutorial's ``self.structure``; held as ``self.nodes``)."""
        return dict(self.nodes)

    def _entry(self, stage_name: str) -> StageEntry:
        entry = self._node_entries.get(stage_name)
        if entry is None:
            raise ConfigurationError(
                f"No node named {stage_name!r}. Nodes: {sorted(self._node_entries)}.",
                field="stage_name",
                code="unknown_node",
            )
        return entry

    def check(self, inputs: Iterable[str] = (), stage_name: str = "root") -> CheckResult:
        """Check the contracts of node ``stage_name`` for a call with these input names."""
        entry = self._entry(stage_name)
        return self._check(frozenset(inputs), stage_name, lambda scope, prefix: scope.check(entry, prefix))

    def _analyze(self, scope: Scope, prefix: str) -> None:
        scope.check(self._entry("root"), prefix)

    def forward(self, *args: Any, stage_name: str = "root", **inputs: Any) -> Result:
        """Run node ``stage_name`` (default ``root``) on ``inputs``."""
        if args:
            self._reject_positional(args)
        entry = self._entry(stage_name)
        if not self._is_checked(frozenset(inputs), stage_name):
            self.check(inputs, stage_name)

        def body(state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
            call_stage(self, entry, state, run, hooks, prefix)

        return execute(self, inputs, body)

    async def aforward(self, *args: Any, stage_name: str = "root", **inputs: Any) -> Result:
        """Async twin of :meth:`forward`."""
        if args:
            self._reject_positional(args)
        entry = self._entry(stage_name)
        if not self._is_checked(frozenset(inputs), stage_name):
            self.check(inputs, stage_name)

        async def body(state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
            await acall_stage(self, entry, state, run, hooks, prefix)

        return await aexecute(self, inputs, body)
