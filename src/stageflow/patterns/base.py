"""What every stageflow pipeline shares: it is a ``dspy.Module`` that runs through the engine.

A pattern subclass describes *what* runs:

- ``_analyze(scope, prefix)`` walks its stages through the contract :class:`Scope` along every
  possible path;
- ``_run(state, run, hooks, prefix)`` / ``_arun(...)`` run its stages with the engine's
  :func:`call_stage` / :func:`acall_stage`.

The base class does the rest: the contract check before any work (cached per set of input
names), the pipeline's own ports when it is nested as a stage, the result type, and the hooks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import dspy

from stageflow.engine.plan import Scope
from stageflow.engine.runner import aexecute, execute
from stageflow.errors import ConfigurationError, ContractError
from stageflow.stages import RESERVED_FIELD_NAMES, FunctionStage, Ports
from stageflow.state import Result, RunInfo

__all__ = ["Pipeline", "as_stage"]

# Bumped whenever any pipeline's structure changes (add_stage ...): cached contract checks and
# ports of every pipeline, including ones that hold the changed one, are then recomputed.
_STRUCTURE_VERSION = [0]


def as_stage(obj: Any, where: str = "stage") -> Any:
    """Accept a ``dspy.Module`` as is, wrap a plain callable in a :class:`FunctionStage`."""
    if isinstance(obj, type):
        raise ConfigurationError(
            f"{where}: got the class {obj.__name__}, not an instance.",
            code="not_a_stage",
            hint=f"pass an instance, e.g. {obj.__name__}(...)",
        )
    if isinstance(obj, dspy.Module):
        return obj
    if callable(obj):
        return FunctionStage(obj)
    raise ConfigurationError(
        f"{where}: {obj!r} is not a stage. Expected a dspy.Module (Predict, ChainOfThought, a custom "
        "module, a stageflow pipeline) or a function.",
        code="not_a_stage",
        hint="a signature string needs a predictor around it: dspy.Predict('question -> answer')",
    )


class Pipeline(dspy.Module):  # type: ignore[misc]
    """Base class of every stageflow architecture (see module docstring)."""

    _is_stageflow_pipeline = True
    _default_policy: Any = None

    def __init__(self) -> None:
        super().__init__()
        self._checked: dict[Any, tuple[str, ...]] = {}
        self._ports: Ports | None = None
        self._ports_version = -1

    # -- implemented by patterns -------------------------------------------------------------
    def _analyze(self, scope: Scope, prefix: str) -> None:
        raise NotImplementedError

    def _run(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        raise NotImplementedError

    async def _arun(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        raise NotImplementedError

    # -- hooks and results (overridden by observing conveniences) --------------------------------
    def _run_hooks(self) -> tuple[Any, ...]:
        """Hooks this pipeline activates for its own runs (and nested ones)."""
        return ()

    def _make_result(self, state: dict[str, Any], run: RunInfo, own_hooks: tuple[Any, ...] = ()) -> Result:
        """Build the result; ``own_hooks`` are the hooks :meth:`_run_hooks` gave this call."""
        return Result(state, run)

    def _structure_changed(self) -> None:
        """Forget cached contract checks and ports (call after adding or replacing stages)."""
        self._checked = {}
        self._ports = None
        self._merged_policies: dict[Any, Any] = {}
        _STRUCTURE_VERSION[0] += 1

    # -- policies ----------------------------------------------------------------------------
    def set_defaults(
        self,
        *,
        retry: Any = None,
        timeout: Any = None,
        repair: Any = None,
        fallback: Any = None,
        cache: Any = None,
    ) -> Pipeline:
        """Policies for every leaf stage that does not set its own of that kind: this pipeline's
        stages and those of pipelines nested in it (unless a nested pipeline sets its own defaults).

        Takes the same values as :class:`Stage` (``retry=RetryPolicy(...)`` or an attempt count,
        ``timeout=`` seconds or a ``TimeoutPolicy``, ``repair=True``, ``fallback=Fallback(default=...)``,
        ``cache=True``). Returns the pipeline, so calls can be chained.
        """
        from stageflow.policies.recovery import Fallback, make_policy

        if fallback is not None and not (isinstance(fallback, Fallback) and fallback.default is not None):
            raise ConfigurationError(
                "set_defaults(fallback=...) takes Fallback(default={...}); a fallback stage belongs to one "
                "stage: Stage(x, fallback=other_stage).",
                field="fallback",
                code="bad_option",
            )
        policy = make_policy(retry=retry, timeout=timeout, repair=repair, fallback=fallback, cache=cache)
        self._default_policy = None if policy.is_empty() else policy
        self._merged_policies = {}
        return self

    # -- contracts ---------------------------------------------------------------------------
    def check(self, inputs: Iterable[str] = ()) -> tuple[str, ...]:
        """Check the contracts for a call with these input names, without running anything.

        Returns the fields the result will have on every path. Raises :class:`ContractError`
        naming the stage path and field when a stage's input is not available on some path.

        Examples:
            >>> import dspy, stageflow
            >>> p = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
            >>> p.check(["question"])
            ('answer', 'question')
        """
        names = frozenset(inputs)
        key = (names, _STRUCTURE_VERSION[0])
        cached = self._checked.get(key)
        if cached is not None:
            return cached
        bad = sorted(names & RESERVED_FIELD_NAMES)
        if bad:
            raise ContractError(
                f"Input field '{bad[0]}' collides with a dspy.Prediction attribute, so result.{bad[0]} "
                "would not return it.",
                field=bad[0],
                code="reserved_field",
                hint=f"rename the input, e.g. {bad[0]}_value=...",
            )
        scope = Scope.start(sorted(names), strict=True, owner=self)
        self._analyze(scope, "")
        out = tuple(sorted(scope.available))
        self._checked[key] = out
        return out

    def _stageflow_ports(self) -> Ports:
        """This pipeline's inputs and outputs when it is used as a stage of another one."""
        if self._ports is None or self._ports_version != _STRUCTURE_VERSION[0]:
            self._ports_version = _STRUCTURE_VERSION[0]
            scope = Scope.start((), strict=False, owner=self)
            self._analyze(scope, "")
            self._ports = Ports(
                required=tuple(scope.missing),
                optional=tuple(f for f in scope.optional if f not in scope.missing),
                outputs=tuple(scope.available),
                types=dict(scope.available),
                required_by=dict(scope.missing),
                partial=dict(scope.partial),
            )
        return self._ports

    # -- calling ---------------------------------------------------------------------------------
    def _reject_positional(self, args: tuple[Any, ...]) -> None:
        if args:
            needed = list(self._stageflow_ports().required)
            example = ", ".join(f"{n}=..." for n in needed) or "field=..."
            raise ConfigurationError(
                f"{type(self).__name__} takes keyword arguments only; got {len(args)} positional.",
                code="positional_args",
                hint=f"call it as pipeline({example})",
            )

    def forward(self, *args: Any, **inputs: Any) -> Result:
        """Run the pipeline on ``inputs`` (the initial state); returns a :class:`Result`."""
        self._reject_positional(args)
        if (frozenset(inputs), _STRUCTURE_VERSION[0]) not in self._checked:
            self.check(inputs)
        return execute(self, inputs, self._run)

    async def aforward(self, *args: Any, **inputs: Any) -> Result:
        """Async twin of :meth:`forward` (call it as ``await pipeline.acall(...)``)."""
        self._reject_positional(args)
        if (frozenset(inputs), _STRUCTURE_VERSION[0]) not in self._checked:
            self.check(inputs)
        return await aexecute(self, inputs, self._arun)

    # -- pictures ----------------------------------------------------------------------------
    def to_mermaid(self) -> str:
        """This pipeline's structure as a Mermaid flowchart (see :mod:`stageflow.observe.graph`)."""
        from stageflow.observe.graph import to_mermaid

        return to_mermaid(self)

    def to_dot(self) -> str:
        """This pipeline's structure as Graphviz DOT (see :mod:`stageflow.observe.graph`)."""
        from stageflow.observe.graph import to_dot

        return to_dot(self)
