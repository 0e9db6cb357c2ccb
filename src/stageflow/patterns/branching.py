"""Branching: a router stage picks which branch runs."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import dspy

from stageflow.engine.plan import Scope, StageEntry, build_entry, join_path
from stageflow.engine.runner import acall_stage, call_stage
from stageflow.errors import ConfigurationError, RoutingError
from stageflow.patterns.base import Pipeline, as_stage
from stageflow.stages import FunctionStage, Stage
from stageflow.state import RunInfo

__all__ = ["BranchingPipeline", "RouteDecision", "lm_router", "normalize_branch"]

ROUTE_FIELD = "branch"


def normalize_branch(name: Any) -> str:
    """Normalise a branch name: case, spaces, hyphens and stray punctuation.

    Examples:
        >>> normalize_branch("  Short-Answer. ")
        'short_answer'
        >>> normalize_branch("'Math'")
        'math'
    """
    text = str(name).strip().lower()
    text = re.sub(r"[\s\-]+", "_", text)
    text = re.sub(r"[^\w]", "", text)
    return re.sub(r"_+", "_", text).strip("_")


@dataclass(frozen=True)
class RouteDecision:
    """How a branching pipeline chose its branch.

    Attributes:
        raw: What the router returned in its ``branch`` field.
        normalized: ``raw`` after :func:`normalize_branch`.
        chosen: The branch that ran.
        used_default: ``True`` when ``raw`` named no branch and the default ran.
        outputs: Every field the router returned (``route_decision.task_type`` reads one of them, as
            the tutorial's ``route_decision.predictions`` did).
    """

    raw: Any
    normalized: str
    chosen: str
    used_default: bool
    outputs: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __getattr__(self, name: str) -> Any:
        outputs = self.__dict__.get("outputs") or {}
        if name in outputs:
            return outputs[name]
        raise AttributeError(f"RouteDecision has no attribute or router output {name!r}")

    @property
    def predictions(self) -> dict[str, Any]:
        """The router's output fields (the tutorial's ``route_decision.predictions``)."""
        return dict(self.outputs)


def lm_router(
    branches: Sequence[str] | Mapping[str, Any],
    inputs: str | Sequence[str] = "question",
    instructions: str | None = None,
) -> dspy.Predict:
    """Build a ``dspy.Predict`` router whose ``branch`` output is a ``Literal`` of the branch names.

    With a structured-output adapter (``JSONAdapter`` on a schema-capable LM) the model can only
    answer a valid branch; with any adapter DSPy checks the value against the ``Literal``.

    Examples:
        >>> r = lm_router(["math", "chat"])
        >>> r.signature.output_fields["branch"].annotation
        typing.Literal['math', 'chat']
    """
    names = [normalize_branch(b) for b in branches]
    if not names:
        raise ConfigurationError("lm_router needs at least one branch name.", code="no_branches")
    fields: dict[str, Any] = {}
    for name in [inputs] if isinstance(inputs, str) else list(inputs):
        fields[name] = (str, dspy.InputField())
    fields[ROUTE_FIELD] = (
        Literal[tuple(names)],
        dspy.OutputField(desc="the branch that should handle the input"),
    )
    text = instructions or f"Choose the branch that should handle the input. Branches: {', '.join(names)}."
    return dspy.Predict(dspy.make_signature(fields, text))


class BranchingPipeline(Pipeline):
    """Run a router, then the one branch its ``branch`` output names.

    Args:
        router_stage: A stage with a ``branch`` output: a predictor (see :func:`lm_router`), a module
            (the tutorial's ``TaskRouter`` returning ``dspy.Prediction(branch=..., task_type=...)``), or
            a function returning the branch name (or ``{"branch": ...}``), also inside
            ``Stage(fn, inputs=...)``. Rename another output with
            ``Stage(router, outputs={"category": "branch"})``. ``router=`` is an alias. Held as
            ``self.router`` (DSPy path ``router``).
        branches: ``{name: stage}``. Names are normalised (``"Short Answer"`` → ``short_answer``);
            DSPy paths are ``branches['short_answer']``.
        default: What runs when the router names no branch: a branch name, or a stage of its own.
            Without it an unknown branch raises :class:`RoutingError` listing the known ones.

    The result's ``branch`` field is the branch that ran; ``result.route_decision`` tells how it
    was chosen (and holds the router's other outputs); ``result.result`` is the branch's own output.
    Fields that later stages may read are those produced on every branch. Every field the router
    returns is in the state too, so branches can read e.g. ``task_type``.
    """

    _stageflow_content = (*Pipeline._stageflow_content, "_default_key")

    _stage_containers = ("branches",)

    def __init__(
        self,
        router_stage: Any = None,
        branches: Mapping[str, Any] | None = None,
        default: Any = None,
        *,
        router: Any = None,
        strict: bool | None = None,
    ) -> None:
        super().__init__(strict=strict)
        if router is not None and router_stage is not None:
            raise ConfigurationError(
                "BranchingPipeline: pass the router once, as router_stage= (or its alias router=).",
                field="router_stage",
                code="bad_option",
            )
        router = router_stage if router_stage is not None else router
        if router is None:
            raise ConfigurationError(
                "BranchingPipeline needs a router: BranchingPipeline(router_stage=..., branches={...}).",
                field="router_stage",
                code="no_router",
            )
        if not isinstance(branches, Mapping) or not branches:
            raise ConfigurationError(
                "BranchingPipeline needs a non-empty dict of branches, e.g. {'math': math_stage}.",
                code="no_branches",
            )
        router_stage = _route_field_declared(as_stage(router, "router"))
        self.router = router_stage
        normalized: dict[str, Any] = {}
        for name, b in branches.items():
            key = normalize_branch(name)
            if not key:
                raise ConfigurationError(
                    f"Branch name {name!r} is empty after normalisation.", code="bad_branch"
                )
            if key in normalized:
                raise ConfigurationError(
                    f"Branch names {name!r} and another one both normalise to {key!r}.",
                    code="duplicate_branch",
                    hint="give branches names that differ in more than case, spaces or hyphens",
                )
            normalized[key] = as_stage(b, f"branches['{key}']")
        self.branches = normalized
        self._default_key: str | None = None
        if isinstance(default, str):
            key = normalize_branch(default)
            if key not in normalized:
                raise ConfigurationError(
                    f"default={default!r} is not one of the branches {sorted(normalized)}.",
                    code="unknown_branch",
                    hint="pass the name of a branch, or a stage to run as the default",
                )
            self._default_key = key
        elif default is not None:
            self.default = as_stage(default, "default")
        self._router_entry = build_entry("router", None, self.router)
        outs = self._router_entry.ports.outputs
        if outs is not None and ROUTE_FIELD not in outs:
            raise ConfigurationError(
                f"The router ({self._router_entry.label}) has no '{ROUTE_FIELD}' output; its outputs are "
                f"{list(outs)}.",
                stage_path="router",
                field=ROUTE_FIELD,
                code="no_route_field",
                hint="rename the output that names the branch: "
                f"Stage(router, outputs={{'{outs[0] if outs else 'x'}': 'branch'}}), "
                f"or build one with stageflow.lm_router({sorted(normalized)})",
            )
        self._default_entry: StageEntry | None = None
        if default is not None and self._default_key is None:
            self._default_entry = build_entry("default", None, self.default)
        self._rebuild()
        self._built()

    def _rebuild(self) -> None:
        for key, b in list(self.branches.items()):
            wrapped = as_stage(b, f"branches['{key}']")
            if wrapped is not b or normalize_branch(key) != key:
                raise ConfigurationError(
                    f"BranchingPipeline: branches[{key!r}] must be a stage under a normalised name "
                    f"({normalize_branch(key)!r}); add branches when building the pipeline.",
                    field=str(key),
                    code="bad_branch",
                )
        if self._default_key is not None and self._default_key not in self.branches:
            raise ConfigurationError(
                f"BranchingPipeline: the default branch {self._default_key!r} was removed.",
                code="unknown_branch",
            )
        self._branch_entries = {k: build_entry("branches", k, v) for k, v in self.branches.items()}

    def _analyze(self, scope: Scope, prefix: str) -> None:
        self._refresh()
        scope.check(self._router_entry, prefix)
        scope.available.setdefault(ROUTE_FIELD, str)
        paths = list(self._branch_entries.values())
        if self._default_entry is not None:
            paths.append(self._default_entry)
        results = []
        for entry in paths:
            sub = scope.copy()
            sub.check(entry, prefix)
            results.append(sub)
        scope.narrow(results, [join_path(prefix, e.path) for e in paths])

    def _choose(self, state: dict[str, Any], run: RunInfo) -> StageEntry:
        raw = state.get(ROUTE_FIELD)
        empty = raw is None or (isinstance(raw, str) and not raw.strip())
        if empty and self._default_key is None and self._default_entry is None:
            raise RoutingError(
                f"The router ({self._router_entry.label}) returned no branch name (got {raw!r}). "
                f"Known branches: {sorted(self.branches)}.",
                stage_path="router",
                field=ROUTE_FIELD,
                code="empty_route",
                hint="make the router return one of the branch names, or pass default=...",
            )
        key = normalize_branch(raw) if raw is not None else ""
        entry = self._branch_entries.get(key)
        used_default = entry is None
        if entry is None:
            if self._default_key is not None:
                chosen = self._default_key
                entry = self._branch_entries[chosen]
            elif self._default_entry is not None:
                chosen, entry = "default", self._default_entry
            else:
                raise RoutingError(
                    f"The router chose branch {raw!r} (normalised {key!r}), which does not exist. "
                    f"Known branches: {sorted(self.branches)}.",
                    stage_path="router",
                    field=ROUTE_FIELD,
                    hint="pass default='<branch>' to BranchingPipeline, or constrain the router with "
                    "stageflow.lm_router([...])",
                )
        else:
            chosen = key
        state[ROUTE_FIELD] = chosen
        router_out = run.stage_outputs.get(self._router_entry.path)
        outputs = dict(router_out.items()) if router_out is not None and hasattr(router_out, "items") else {}
        outputs.setdefault(ROUTE_FIELD, raw)
        run.extras["route_decision"] = RouteDecision(raw, key, chosen, used_default, outputs)
        return entry

    def _run(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        call_stage(self, self._router_entry, state, run, hooks, prefix)
        entry = self._choose(state, run)
        run.extras["result"] = call_stage(self, entry, state, run, hooks, prefix)

    async def _arun(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        await acall_stage(self, self._router_entry, state, run, hooks, prefix)
        entry = self._choose(state, run)
        run.extras["result"] = await acall_stage(self, entry, state, run, hooks, prefix)


def _route_field_declared(router: Any) -> Any:
    """A plain function router returns the branch name itself: declare that its output is ``branch``
    (also when it is wrapped in ``Stage(fn, inputs=...)``)."""
    if isinstance(router, FunctionStage) and router.ports.outputs is None:
        router.ports = replace(router.ports, outputs=(ROUTE_FIELD,))
    elif (
        isinstance(router, Stage)
        and isinstance(router.module, FunctionStage)
        and router.inner_ports.outputs is None
    ):
        router.module.ports = replace(router.module.ports, outputs=(ROUTE_FIELD,))
        router.inner_ports = replace(router.inner_ports, outputs=(ROUTE_FIELD,))
        router.ports = router.renamed_ports(router.inner_ports)
    return router
