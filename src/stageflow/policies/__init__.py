"""Policies that attach to any stage through the engine: recovery, caching, fusion, laziness."""

from stageflow.policies.recovery import (
    Fallback,
    PolicyEvent,
    RepairPolicy,
    RetryPolicy,
    StagePolicy,
    TimeoutPolicy,
    is_repairable,
    is_retryable,
    retry_after,
)

__all__ = [
    "Fallback",
    "PolicyEvent",
    "RepairPolicy",
    "RetryPolicy",
    "StagePolicy",
    "TimeoutPolicy",
    "is_repairable",
    "is_retryable",
    "retry_after",
]
