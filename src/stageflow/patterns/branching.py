"""Branching: a router stage picks which branch runs."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import dspy

from stageflow.engine.plan import Scope, StageEntry, build_entry, join_path
from stageflow.engine.runner import acall_stage, call_stage
from stageflow.errors import ConfigurationError, RoutingError
from stageflow.patterns.base import Pipeline, as_stage
from stageflow.stages import FunctionStage
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
    """

    raw: Any
    normalized: str
    chosen: str
    used_default: bool


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
        router: A stage with a ``branch`` output: a predictor (see :func:`lm_router`), a module, or a
            function returning the branch name (or ``{"branch": ...}``). Rename another output with
            ``Stage(router, outputs={"category": "branch"})``.
        branches: ``{name: stage}``. Names are normalised (``"Short Answer"`` → ``short_answer``);
            DSPy paths are ``branches['short_answer']``.
        default: What runs when the router names no branch: a branch name, or a stage of its own.
            Without it an unknown branch raises :class:`RoutingError` listing the known ones.

    The result's ``branch`` field is the branch that ran; ``result.route_decision`` tells how it
    was chosen. Fields that later stages may read are those produced on every branch.
    """

    def __init__(self, router: Any, branches: Mapping[str, Any], default: Any = None) -> None:
        super().__init__()
        if not isinstance(branches, Mapping) or not branches:
            raise ConfigurationError(
                "BranchingPipeline needs a non-empty dict of branches, e.g. {'math': math_stage}.",
                code="no_branches",
            )
        router_stage = as_stage(router, "router")
        if isinstance(router_stage, FunctionStage) and router_stage.ports.outputs is None:
            # A plain function router returns the branch name itself.
            router_stage.ports = replace(router_stage.ports, outputs=(ROUTE_FIELD,))
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
        self._branch_entries = {k: build_entry("branches", k, v) for k, v in normalized.items()}
        self._default_entry: StageEntry | None = None
        if default is not None and self._default_key is None:
            self._default_entry = build_entry("default", None, self.default)

    def _analyze(self, scope: Scope, prefix: str) -> None:
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
        run.extras["route_decision"] = RouteDecision(raw, key, chosen, used_default)
        return entry

    def _run(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        call_stage(self, self._router_entry, state, run, hooks, prefix)
        call_stage(self, self._choose(state, run), state, run, hooks, prefix)

    async def _arun(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        await acall_stage(self, self._router_entry, state, run, hooks, prefix)
        await acall_stage(self, self._choose(state, run), state, run, hooks, prefix)
