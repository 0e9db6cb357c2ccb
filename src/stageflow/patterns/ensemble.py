"""Ensemble: members answer the same input concurrently; an aggregator picks the result."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from stageflow.budgets._state import GATES
from stageflow.engine.boundary import private_state
from stageflow.engine.concurrency import BranchOutcome, FailurePolicy
from stageflow.engine.plan import Scope, StageEntry, build_entry, join_path
from stageflow.errors import ConfigurationError, ContractError, PipelineError
from stageflow.patterns._fanout import (
    Branch,
    BranchResult,
    absorb,
    arun_branches,
    check_fanout_options,
    fanout_options,
    raise_all_failed,
    run_branches,
    usage_kept,
)
from stageflow.patterns._fields import Produced, call_yours, result_fields, returned_fields
from stageflow.patterns.base import Pipeline, as_stage
from stageflow.policies.recovery import PolicyEvent
from stageflow.state import RunInfo

__all__ = [
    "EnsemblePipeline",
    "ResultAggregator",
    "aggregates_its_own_way",
    "check_confidence",
    "normalize_answer",
]

STRATEGIES = ("weighted_voting", "best_confidence", "consensus", "majority")


def normalize_answer(value: Any) -> str:
    """Normalise an answer for voting: case, punctuation, articles and spacing.

    Articles are dropped only around other words, so a one-letter answer keeps its identity
    (``"A"``, ``"An"`` and ``"B"`` are three different answers).

    Examples:
        >>> normalize_answer("  The Eiffel-Tower! ")
        'eiffel tower'
        >>> [normalize_answer(x) for x in ("A", "An", "a.", "B")]
        ['a', 'an', 'a', 'b']
    """
    text = " ".join(re.sub(r"[^\w\s]", " ", str(value).lower()).split())
    stripped = " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())
    return stripped or text


#: Confidence of a member that reports none (the tutorial's ``getattr(output, 'confidence', 0.5)``).
DEFAULT_CONFIDENCE = 0.5
#: The answer fields voted on when ``field`` is not given, in order of preference.
ANSWER_FIELDS = ("answer", "content")


def _confidence(fields: Mapping[str, Any], key: str) -> float:
    """A member's confidence (already checked by :func:`check_confidence`)."""
    if key not in fields:
        return DEFAULT_CONFIDENCE
    return float(fields[key])


def check_confidence(fields: Mapping[str, Any], key: str, member: str) -> None:
    """Refuse a confidence that cannot weigh a vote honestly.

    A confidence is a number from 0 to 1 (a numeric string such as ``"0.8"``, which an untyped DSPy
    output field gives, counts as that number). NaN, infinities, negatives, values above 1,
    booleans and text such as ``"high"`` are a :class:`ContractError` naming the member: clamping
    or zeroing them would silently change who wins and report full agreement.

    Examples:
        >>> check_confidence({"confidence": "0.8"}, "confidence", "processors[0]")
        >>> check_confidence({"confidence": -5}, "confidence", "processors[2]")
        Traceback (most recent call last):
        ...
        stageflow.errors.ContractError: Ensemble member 'processors[2]' reported confidence -5, ...
    """
    if key not in fields:
        return
    value = fields[key]
    c: float | None = None
    if not isinstance(value, bool):
        try:
            c = float(value)
        except (TypeError, ValueError):
            c = None
    if c is not None and math.isfinite(c) and 0.0 <= c <= 1.0:
        return
    raise ContractError(
        f"Ensemble member '{member}' reported {key} {value!r}, which is not a number from 0 to 1; "
        "its vote cannot be weighed.",
        stage_path=member,
        field=key,
        code="bad_confidence",
        hint=f"make the member return '{key}' as a float in [0, 1] (a probability), or aggregate "
        "with ResultAggregator('majority', confidence_field='<another field>') to ignore it",
    )


def _fields_of(item: Any) -> dict[str, Any] | None:
    """A member's output fields, from a dict, a ``dspy.Prediction``, a pydantic model, or the tutorial's
    ``{"processor_id", "result", "success"}`` records (``None`` for a failed record)."""
    if isinstance(item, Mapping) and "success" in item and ("result" in item or "error" in item):
        if not item.get("success"):
            return None
        item = item.get("result")
    return result_fields(item)


class ResultAggregator:
    """Combine ensemble members' outputs.

    Args:
        strategy: ``"weighted_voting"`` (default: answers that normalise alike vote together,
            weighted by confidence), ``"best_confidence"``, ``"consensus"`` (the plurality answer if
            its share of votes reaches ``threshold``; ``result.consensus`` tells whether it did),
            ``"majority"`` (head count over normalised answers), or any callable
            ``(list_of_member_field_dicts) -> dict`` of fields.
        field: The answer field that votes. Default: ``answer`` or ``content`` (the tutorial's), the
            first one the members produce.
        confidence_field: Where members report confidence (default ``confidence``; a member that
            reports none counts 0.5, as in the tutorial). A reported confidence must be a number
            from 0 to 1: NaN, negative, above 1 or non-numeric values are a :class:`ContractError`
            naming the member, never clamped (see :func:`check_confidence`).
        threshold: Agreement needed for ``consensus`` (share of votes, 0–1).
        normalize: How answers are compared (default :func:`normalize_answer`).

    Examples:
        >>> agg = ResultAggregator()
        >>> agg.aggregate([{"content": "Paris", "confidence": 0.9}, {"content": "paris", "confidence": 0.6},
        ...                {"content": "Rome", "confidence": 0.5}])
        {'content': 'Paris', 'confidence': 0.75}
    """

    def __init__(
        self,
        strategy: str | Callable[[list[dict[str, Any]]], dict[str, Any]] = "weighted_voting",
        field: str | None = None,
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
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
            raise ConfigurationError(
                f"ResultAggregator: threshold must be a number from 0 to 1, got {threshold!r}.",
                field="threshold",
                code="bad_option",
            )
        self.strategy = strategy
        self.field = field
        self.confidence_field = confidence_field
        self.threshold = threshold
        self.normalize = normalize

    def __repr__(self) -> str:
        return f"ResultAggregator(strategy={self.strategy!r}, field={self.field!r})"

    def produces(self, member_fields: set[str] | None) -> set[str] | None:
        """The fields the aggregate has, given the fields every member produces (``None``: unknown)."""
        if callable(self.strategy) or member_fields is None:
            return None
        if self.strategy in ("weighted_voting", "consensus"):
            return member_fields | {self.confidence_field}
        return set(member_fields)

    def answer_field(self, members: Sequence[Mapping[str, Any]]) -> str:
        """The field that votes: ``field``, else ``answer`` or ``content``, whichever members produce."""
        if self.field is not None:
            return self.field
        for name in ANSWER_FIELDS:
            if any(name in m for m in members):
                return name
        return ANSWER_FIELDS[0]

    def votes(self, members: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Normalised answer → total weight."""
        field = self.answer_field(members)
        tally: dict[str, float] = {}
        weighted = self.strategy == "weighted_voting"
        for m in members:
            if field not in m:
                continue
            key = self.normalize(m[field])
            tally[key] = tally.get(key, 0.0) + (_confidence(m, self.confidence_field) if weighted else 1.0)
        return tally

    def aggregate(self, results: Sequence[Any]) -> dict[str, Any]:
        """The aggregated fields (the tutorial's call): ``results`` may be member field dicts,
        ``dspy.Prediction`` objects, or the tutorial's ``{"processor_id", "result", "success"}`` records
        (failed ones are left out). Returns e.g. ``{"content": ..., "confidence": ...}``."""
        members = [f for f in (_fields_of(r) for r in results) if f is not None]
        if not members:
            raise PipelineError("All processors failed: nothing to aggregate.", code="all_failed")
        return self.combine(members)[0]

    def combine(
        self, members: Sequence[dict[str, Any]], names: Sequence[str] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return ``(fields, details)``: the winning fields and how they were chosen.

        ``names`` name the members in errors (their stage paths; default ``member 0``, ...). A
        built-in strategy refuses a confidence that is not a number from 0 to 1
        (see :func:`check_confidence`).
        """
        if not callable(self.strategy):
            for i, m in enumerate(members):
                check_confidence(m, self.confidence_field, names[i] if names else f"member {i}")
        if callable(self.strategy):
            fields = self.strategy(list(members))
            if not isinstance(fields, Mapping):
                raise PipelineError(
                    f"The aggregation strategy {self.strategy!r} returned {type(fields).__name__}; it must "
                    "return a dict of fields.",
                    code="bad_aggregate",
                )
            return dict(fields), {"strategy": getattr(self.strategy, "__name__", "callable")}
        if self.strategy == "best_confidence":
            best = max(members, key=lambda m: _confidence(m, self.confidence_field))
            return dict(best), {
                "strategy": "best_confidence",
                "confidence": _confidence(best, self.confidence_field),
            }
        field = self.answer_field(members)
        tally = self.votes(members)
        if not tally:
            raise PipelineError(
                f"No ensemble member produced '{field}'. Members produced: "
                f"{sorted({k for m in members for k in m})}.",
                field=field,
                code="no_votes",
                hint="pass ResultAggregator(field='<the answer field>')",
            )
        top = max(tally, key=lambda k: tally[k])  # ties: the earliest member's answer (dict order)
        total = sum(tally.values()) or 1.0
        agreement = tally[top] / total
        group = [m for m in members if field in m and self.normalize(m[field]) == top]
        best = max(group, key=lambda m: _confidence(m, self.confidence_field))
        fields = dict(best)
        details: dict[str, Any] = {"strategy": self.strategy, "votes": tally, "agreement": agreement}
        if self.strategy == "majority":
            return fields, details
        fields[self.confidence_field] = agreement
        if self.strategy == "consensus":
            details["consensus"] = agreement >= self.threshold
        return fields, details


def _record(i: int, r: BranchResult) -> dict[str, Any]:
    """One member's record, in the tutorial's shape (``processor_id``, ``result``, ``success``, and
    ``error`` as text only when it failed: code written for it tests ``'error' in record``), plus
    stageflow's ``member``, ``status``, ``ok``, ``fields``, ``elapsed`` and the ``exception``."""
    o = r.outcome
    record: dict[str, Any] = {
        "processor_id": i,
        "member": r.branch.entry.path,
        "status": o.status,
        "success": o.ok,
        "ok": o.ok,
        "result": o.value if o.ok else None,
        "fields": r.produced,
        "elapsed": o.elapsed,
    }
    if o.error is not None:
        record["error"] = f"{type(o.error).__name__}: {o.error}"
        record["exception"] = o.error
    return record


class EnsemblePipeline(Pipeline):
    """Run every member on the same input concurrently and aggregate their answers.

    Args:
        processors: The members (held in the flat list ``self.processors``; the same objects run on
            every call, so optimizers see their traces).
        aggregator: A :class:`ResultAggregator` (default: confidence-weighted voting on ``answer`` or
            ``content``).
        quorum: Stop as soon as this many successful members agree (normalised answers) and abandon
            the rest (async members are cancelled).
        max_concurrency, on_error, timeout: as for every fan-out (``on_error="collect"`` by default:
            the aggregate is over the members that succeeded; each failure is in
            ``individual_results`` and a ``member_failed`` event).
        strict: Strict contracts (see :class:`~stageflow.Pipeline`).

    The result's fields are exactly what the strategy produces: the winning member's fields, plus
    ``confidence`` (the agreement) for ``weighted_voting`` and ``consensus``. Result details:
    ``aggregated_result`` (those fields), ``individual_results`` (per member, in the tutorial's
    shape: ``processor_id``, ``result``, ``success``, and for a failed member ``error`` — as text,
    ``"Type: message"`` — plus ``status``, ``fields`` and, when it failed, ``exception``, the error),
    ``votes``, ``agreement`` and, for ``consensus``, ``consensus``.
    """

    _stage_containers = ("processors",)

    def __init__(
        self,
        processors: Iterable[Any],
        aggregator: Any = None,
        *,
        quorum: int | None = None,
        max_concurrency: int | None = None,
        on_error: FailurePolicy = "collect",
        timeout: float | None = None,
        strict: bool | None = None,
    ) -> None:
        super().__init__(strict=strict)
        check_fanout_options(max_concurrency, on_error, timeout, "EnsemblePipeline")
        if isinstance(processors, str | bytes) or not isinstance(processors, Iterable):
            raise ConfigurationError(
                f"EnsemblePipeline takes a list of processors, got {type(processors).__name__}.",
                code="bad_stages",
            )
        self.processors = [as_stage(p, f"processors[{i}]") for i, p in enumerate(processors)]
        if not self.processors:
            raise ConfigurationError("EnsemblePipeline needs at least one processor.", code="bad_stages")
        if quorum is not None and (
            isinstance(quorum, bool) or not isinstance(quorum, int) or not 1 <= quorum <= len(self.processors)
        ):
            raise ConfigurationError(
                f"quorum must be an int from 1 to {len(self.processors)}, got {quorum!r}.",
                field="quorum",
                code="bad_option",
            )
        own = None if aggregator is None else aggregates_its_own_way(aggregator)
        if (own is None and aggregator is not None and not isinstance(aggregator, ResultAggregator)) or (
            own is not None and not callable(getattr(aggregator, own, None))
        ):
            raise ConfigurationError(
                f"EnsemblePipeline: aggregator must be a ResultAggregator (or an object with an "
                f"aggregate(results) or combine(members) method), got {aggregator!r}.",
                field="aggregator",
                code="bad_option",
                hint="ResultAggregator(strategy=...) (a callable strategy takes your own function)",
            )
        if (
            quorum is not None
            and aggregator is not None
            and not all(callable(getattr(aggregator, name, None)) for name in ("answer_field", "normalize"))
        ):
            raise ConfigurationError(
                f"EnsemblePipeline: quorum= needs a ResultAggregator (it counts agreeing answers as the "
                f"aggregator compares them: answer_field(), normalize()), got {aggregator!r}.",
                field="quorum",
                code="bad_option",
            )
        self.aggregator = ResultAggregator() if aggregator is None else aggregator
        self.quorum = quorum
        self.max_concurrency = max_concurrency
        self.on_error = on_error
        self.timeout = timeout
        self._rebuild()
        self._built()

    def _rebuild(self) -> None:
        for i, p in enumerate(self.processors):
            wrapped = as_stage(p, f"processors[{i}]")
            if wrapped is not p:
                list.__setitem__(self.processors, i, wrapped)
        if not self.processors:
            raise ConfigurationError("EnsemblePipeline needs at least one processor.", code="bad_stages")
        self._entries: tuple[StageEntry, ...] = tuple(
            build_entry("processors", i, p) for i, p in enumerate(self.processors)
        )

    def _analyze(self, scope: Scope, prefix: str) -> None:
        self._refresh()
        outs: list[set[str]] = []
        opaque = False
        for entry in self._entries:
            sub = scope.copy()
            sub.check(entry, prefix)
            outs.append(set(sub.available) - set(scope.available))
            opaque = opaque or len(sub.opaque) > len(scope.opaque)
            scope.opaque.extend(p for p in sub.opaque if p not in scope.opaque)
        # Exactly the fields the aggregation strategy produces from what every member produces (not
        # known for an aggregation of your own).
        produces = None if aggregates_its_own_way(self.aggregator) else self.aggregator.produces
        produced = None if produces is None else produces(None if opaque else set.intersection(*outs))
        if produced is None:
            scope.opaque.append(prefix or "ensemble")
            return
        for f in produced:
            scope.available.setdefault(f, None)
            scope.origin.setdefault(f, prefix or "ensemble")

    def _quorum(self, results_ref: list[Branch]) -> Callable[[list[BranchOutcome]], bool] | None:
        if self.quorum is None:
            return None
        agg, k = self.aggregator, self.quorum

        def field_of(produced: list[dict[str, Any]]) -> str:
            return agg.answer_field(produced)

        def reached(outcomes: list[BranchOutcome]) -> bool:
            counts: dict[str, int] = {}
            field = field_of([results_ref[o.index].state for o in outcomes if o.ok])
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

    def _finish(
        self, state: dict[str, Any], run: RunInfo, results: Sequence[BranchResult], prefix: str
    ) -> None:
        absorb(run, results)
        run.extras["individual_results"] = [_record(i, r) for i, r in enumerate(results)]
        for r in results:
            if not r.outcome.ok and r.outcome.status in ("error", "timeout"):
                error = r.outcome.error
                run.events.append(
                    PolicyEvent(
                        join_path(prefix, r.branch.entry.path),
                        "member_failed",
                        error=f"{type(error).__name__}: {error}",
                        detail={"status": r.outcome.status},
                    )
                )
        ok = [r for r in results if r.outcome.ok]
        if not ok:
            raise_all_failed("EnsemblePipeline: every member failed", results)
        produced = [r.produced for r in ok]
        own = aggregates_its_own_way(self.aggregator)
        agg = self.aggregator
        what = f"EnsemblePipeline: {type(agg).__name__}.{own}()"
        if own == "aggregate":
            # The tutorial's call: aggregator.aggregate(successful_results), its records (copies).
            records = [
                {**rec, "result": Produced(**private_state(r.produced or {}))}
                for rec, r in zip(run.extras["individual_results"], results, strict=True)
                if rec["success"]
            ]
            fields = returned_fields(
                call_yours(agg.aggregate, records, what, "aggregate_failed"), what, "bad_aggregate"
            )
            details: dict[str, Any] = {"strategy": f"{type(agg).__name__}.aggregate"}
        elif own == "combine":  # your combine(members), as documented: (fields, details) or fields
            members = [private_state(p) for p in produced]  # (copies: what you change stays there)
            fields, details = _combined(call_yours(agg.combine, members, what, "aggregate_failed"), what)
        else:
            names = [join_path(prefix, r.branch.entry.path) for r in ok]
            try:
                fields, details = agg.combine(produced, names)
            except ContractError as e:
                e.path_is_full = True  # the members' names are full paths already
                raise
        state.update(fields)
        run.extras.update(details)
        run.extras["aggregated_result"] = dict(fields)

    def _branches(self, state: dict[str, Any], run: RunInfo, prefix: str) -> list[Branch]:
        entries = self._entries
        if GATES[0]:  # a degraded LM budget may start fewer members
            from stageflow.budgets.scope import members_allowed

            entries = entries[: members_allowed(len(entries), prefix, run.events)]
        return [Branch(e, private_state(state)) for e in entries]

    def _run(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        branches = self._branches(state, run, prefix)
        with usage_kept(run, branches):
            results = run_branches(
                self, branches, hooks, prefix, **fanout_options(self), until=self._quorum(branches)
            )
        self._finish(state, run, results, prefix)

    async def _arun(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...], prefix: str) -> None:
        branches = self._branches(state, run, prefix)
        with usage_kept(run, branches):
            results = await arun_branches(
                self, branches, hooks, prefix, **fanout_options(self), until=self._quorum(branches)
            )
        self._finish(state, run, results, prefix)


def aggregates_its_own_way(aggregator: Any) -> str | None:
    """Which method of yours aggregates: ``"aggregate"`` for a :class:`ResultAggregator` subclass
    that overrides ``aggregate`` (the tutorial's ``def aggregate(self, results)``) or another object
    with an ``aggregate`` method and no ``combine``; ``"combine"`` for a subclass that overrides only
    ``combine``, or another object with ``combine(members)``; ``None`` when stageflow's strategies
    decide. An ensemble calls ``aggregate`` as the tutorial's does, with the successful members'
    records (``processor_id``, ``result`` — a :class:`~stageflow.patterns._fields.Produced` copy of
    the member's fields — ``success``...), and ``combine`` with the members' field dicts; what they
    return is the ensemble's fields.

    Examples:
        >>> class First(ResultAggregator):
        ...     def aggregate(self, results):
        ...         return dict(results[0]["result"])
        >>> aggregates_its_own_way(First()), aggregates_its_own_way(ResultAggregator())
        ('aggregate', None)
    """
    cls = type(aggregator)
    if isinstance(aggregator, ResultAggregator):
        if cls.aggregate is not ResultAggregator.aggregate:
            return "aggregate"
        return "combine" if cls.combine is not ResultAggregator.combine else None
    if getattr(aggregator, "combine", None) is not None:
        return "combine"
    return "aggregate" if getattr(aggregator, "aggregate", None) is not None else None


def _combined(out: Any, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a ``combine`` of yours returned, as ``(fields, details)``: that pair, or the fields alone."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        return returned_fields(out[0], what, "bad_aggregate"), dict(out[1])
    return returned_fields(out, what, "bad_aggregate"), {}
