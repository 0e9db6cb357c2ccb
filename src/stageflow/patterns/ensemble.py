"""Ensemble: members answer the same input concurrently; an aggregator picks the result."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from stageflow.engine.boundary import private_state
from stageflow.engine.concurrency import BranchOutcome, FailurePolicy
from stageflow.engine.plan import Scope, StageEntry, build_entry
from stageflow.errors import ConfigurationError, PipelineError
from stageflow.patterns._fanout import (
    Branch,
    BranchResult,
    absorb,
    arun_branches,
    check_fanout_options,
    fanout_options,
    raise_all_failed,
    run_branches,
)
from stageflow.patterns.base import Pipeline, as_stage
from stageflow.state import RunInfo

__all__ = ["EnsemblePipeline", "ResultAggregator", "normalize_answer"]

STRATEGIES = ("weighted_voting", "best_confidence", "consensus", "majority")


def normalize_answer(value: Any) -> str:
    """Normalise an answer for voting: case, punctuation, articles and spacing.

    Examples:
        >>> normalize_answer("  The Eiffel-Tower! ")
        'eiffel tower'
    """
    text = str(value).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _confidence(fields: dict[str, Any], key: str) -> float:
    try:
        c = float(fields.get(key, 1.0))
    except (TypeError, ValueError):
        return 0.0
    return min(max(c, 0.0), 1.0)


class ResultAggregator:
    """Combine ensemble members' outputs.

    Args:
        strategy: ``"weighted_voting"`` (default: answers that normalise alike vote together,
            weighted by confidence), ``"best_confidence"``, ``"consensus"`` (the plurality answer if
            its share of votes reaches ``threshold``; ``result.consensus`` tells whether it did),
            ``"majority"`` (``dspy.majority`` over the answers), or any callable
            ``(list_of_member_field_dicts) -> dict`` of fields.
        field: The answer field that votes (default ``answer``).
        confidence_field: Where members report confidence (default ``confidence``; 1.0 if absent).
        threshold: Agreement needed for ``consensus`` (share of votes, 0–1).
    """

    def __init__(
        self,
        strategy: str | Callable[[list[dict[str, Any]]], dict[str, Any]] = "weighted_voting",
        field: str = "answer",
        confidence_field: str = "confidence",
        threshold: float = 0.5,
        normalize: Callable[[Any], str] = normalize_answer,
    ) -> None:
        if not callable(strategy) and strategy not in STRATEGIES:
            raise ConfigurationError(
                f"ResultAggregator: unknown strategy {strategy!r}; use one of "
                f"{list(STRATEGIES)} or a callable.",
                field="strategy",
                code="bad_option",
            )
        self.strategy = strategy
        self.field = field
        self.confidence_field = confidence_field
        self.threshold = threshold
        self.normalize = normalize

    def __repr__(self) -> str:
        return f"ResultAggregator(strategy={self.strategy!r}, field={self.field!r})"

    def votes(self, members: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Normalised answer → total weight."""
        tally: dict[str, float] = {}
        weighted = self.strategy == "weighted_voting"
        for m in members:
            if self.field not in m:
                continue
            key = self.normalize(m[self.field])
            tally[key] = tally.get(key, 0.0) + (_confidence(m, self.confidence_field) if weighted else 1.0)
        return tally

    def aggregate(self, members: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return ``(fields, details)``: the winning fields and how they were chosen."""
        if callable(self.strategy):
            return dict(self.strategy(list(members))), {
                "strategy": getattr(self.strategy, "__name__", "callable")
            }
        if self.strategy == "best_confidence":
            best = max(members, key=lambda m: _confidence(m, self.confidence_field))
            return dict(best), {
                "strategy": "best_confidence",
                "confidence": _confidence(best, self.confidence_field),
            }
        if self.strategy == "majority":
            import dspy

            preds = [dspy.Prediction(**m) for m in members if self.field in m]
            winner = dspy.majority(preds, field=self.field)
            value = winner[self.field]
            chosen = next(m for m in members if m.get(self.field) == value)
            return dict(chosen), {"strategy": "majority"}
        tally = self.votes(members)
        if not tally:
            raise PipelineError(
                f"No ensemble member produced '{self.field}'.", field=self.field, code="no_votes"
            )
        top = max(tally, key=lambda k: tally[k])  # ties: the earliest member's answer (dict order)
        total = sum(tally.values()) or 1.0
        agreement = tally[top] / total
        group = [m for m in members if self.field in m and self.normalize(m[self.field]) == top]
        best = max(group, key=lambda m: _confidence(m, self.confidence_field))
        fields = dict(best)
        fields[self.confidence_field] = agreement
        details: dict[str, Any] = {"strategy": self.strategy, "votes": tally, "agreement": agreement}
        if self.strategy == "consensus":
            details["consensus"] = agreement >= self.threshold
        return fields, details


class EnsemblePipeline(Pipeline):
    """Run every member on the same input concurrently and aggregate their answers.

    Args:
        processors: The members (held in the flat list ``self.processors``; the same objects run on
            every call, so optimizers see their traces).
        aggregator: A :class:`ResultAggregator` (default: confidence-weighted voting on ``answer``).
        quorum: Stop as soon as this many successful members agree (normalised answers) and abandon
            the rest (async members are cancelled).
        max_concurrency, on_error, timeout: as for every fan-out.

    Result details: ``individual_results`` (each member's status, fields or error), ``votes``,
    ``agreement`` and, for ``consensus``, ``consensus``.
    """

    def __init__(
        self,
        processors: Iterable[Any],
        aggregator: ResultAggregator | None = None,
        *,
        quorum: int | None = None,
        max_concurrency: int | None = None,
        on_error: FailurePolicy = "collect",
        timeout: float | None = None,
    ) -> None:
        super().__init__()
        check_fanout_options(max_concurrency, on_error, timeout, "EnsemblePipeline")
        self.processors = [as_stage(p, f"processors[{i}]") for i, p in enumerate(processors)]
        if not self.processors:
            raise ConfigurationError("EnsemblePipeline needs at least one processor.", code="bad_stages")
        if quorum is not None and (not isinstance(quorum, int) or not 1 <= quorum <= len(self.processors)):
            raise ConfigurationError(
                f"quorum must be an int from 1 to {len(self.processors)}, got {quorum!r}.",
                field="quorum",
                code="bad_option",
            )
        self.aggregator = aggregator or ResultAggregator()
        self.quorum = quorum
        self.max_concurrency = max_concurrency
        self.on_error = on_error
        self.timeout = timeout
        self._entries: tuple[StageEntry, ...] = tuple(
            build_entry("processors", i, p) for i, p in enumerate(self.processors)
        )

    def _analyze(self, scope: Scope, prefix: str) -> None:
        outs: list[set[str]] = []
        for entry in self._entries:
            sub = scope.copy()
            sub.check(entry, prefix)
            outs.append(set(sub.available) - set(scope.available))
            scope.opaque.extend(p for p in sub.opaque if p not in scope.opaque)
        for f in set.intersection(*outs) | {self.aggregator.confidence_field}:
            scope.available.setdefault(f, None)
            scope.origin.setdefault(f, prefix or "ensemble")

    def _quorum(self, results_ref: list[Branch]) -> Callable[[list[BranchOutcome]], bool] | None:
        if self.quorum is None:
            return None
        agg, k, field = self.aggregator, self.quorum, self.aggregator.field

        def reached(outcomes: list[BranchOutcome]) -> bool:
            counts: dict[str, int] = {}
            for o in outcomes:
                if o.ok:
                    value = results_ref[o.index].state.get(field)
                    if value is not None:
                        key = agg.normalize(value)
                        counts[key] = counts.get(key, 0) + 1
                        if counts[key] >= k:
                            return True
            return False

        return reached

    def _finish(self, state: dict[str, Any], run: RunInfo, results: list[BranchResult]) -> None:
        absorb(run, results)
        run.extras["individual_results"] = [
            {
                "member": r.branch.entry.path,
                "status": r.outcome.status,
                "ok": r.outcome.ok,
                "fields": r.produced,
                "error": r.outcome.error,
                "elapsed": r.outcome.elapsed,
            }
            for r in results
        ]
        ok = [r.produced for r in results if r.outcome.ok]
        if not ok:
            raise_all_failed("EnsemblePipeline: every member failed", results)
        fields, details = self.aggregator.aggregate(ok)
        state.update(fields)
        run.extras.update(details)

    def _branches(self, state: dict[str, Any]) -> list[Branch]:
        return [Branch(e, private_state(state)) for e in self._entries]

    def _run(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        branches = self._branches(state)
        results = run_branches(
            self,
            branches,
            hooks,
            prefix,
            **fanout_options(self),
            until=self._quorum(branches),
        )
        self._finish(state, run, results)

    async def _arun(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        branches = self._branches(state)
        results = await arun_branches(
            self,
            branches,
            hooks,
            prefix,
            **fanout_options(self),
            until=self._quorum(branches),
        )
        self._finish(state, run, results)
