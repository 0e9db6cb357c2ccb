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
from stageflow.policies.transient import is_timeout

__all__ = [
    "Fallback",
    "PolicyEvent",
    "RepairPolicy",
    "RetryPolicy",
    "StagePolicy",
    "TimeoutPolicy",
    "is_repairable",
    "is_retryable",
    "is_timeout",
    "retry_after",
]
