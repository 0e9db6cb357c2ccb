"""stageflow: multi-stage language-model programs on DSPy.

Names are resolved lazily (PEP 562), so ``import stageflow`` and ``stageflow --help`` stay
cheap; DSPy is imported the first time a name that needs it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stageflow._lazy import lazy_attributes
from stageflow._version import __version__

if TYPE_CHECKING:
    from stageflow._untracked import untracked
    from stageflow.budgets import BudgetLedger, Degrade, LMBudget, RateLimiter, budget, rate_limit
    from stageflow.contracts import StageInput, StageOutput, StandardStage
    from stageflow.engine.concurrency import BranchOutcome, limits
    from stageflow.engine.config import configure, get_config
    from stageflow.engine.hooks import Hook, attach_hooks
    from stageflow.errors import (
        BudgetExceeded,
        ConfigurationError,
        ContractError,
        LoopLimitError,
        LowConfidenceError,
        PipelineError,
        RoutingError,
        StageError,
        StageflowError,
        StageTimeoutError,
    )
    from stageflow.fingerprinting import fingerprint
    from stageflow.observe.otel import instrument_otel, uninstrument_otel
    from stageflow.observe.pipelines import ProfilingPipeline, TracingPipeline
    from stageflow.observe.profiler import Profiler, profile
    from stageflow.observe.tracer import Tracer, trace
    from stageflow.patterns.adaptive import AdaptivePipeline, PipelineAdapter
    from stageflow.patterns.base import Pipeline
    from stageflow.patterns.branching import BranchingPipeline, RouteDecision, lm_router, normalize_branch
    from stageflow.patterns.ensemble import EnsemblePipeline, ResultAggregator
    from stageflow.patterns.error_handling import ErrorHandlingPipeline
    from stageflow.patterns.foreach import ForEach
    from stageflow.patterns.hierarchical import HierarchicalPipeline
    from stageflow.patterns.iterative import IterativePipeline, QualityBasedStopping, StopDecision
    from stageflow.patterns.parallel import ParallelPipeline, ResultMerger
    from stageflow.patterns.sequential import SequentialPipeline
    from stageflow.policies.cache import CachePolicy, MemoryStore
    from stageflow.policies.cached_stage import CachedStage
    from stageflow.policies.fusion import StageFusion, fuse
    from stageflow.policies.lazy import LazyResult, LazyStage
    from stageflow.policies.recovery import Fallback, PolicyEvent, RepairPolicy, RetryPolicy, TimeoutPolicy
    from stageflow.policies.stores import SQLiteStore
    from stageflow.runtime.batch import run_batch
    from stageflow.runtime.journal import JournalError
    from stageflow.runtime.summary import BatchInterrupted, BatchSummary
    from stageflow.spec import load_pipeline, to_spec
    from stageflow.stages import FunctionStage, Ports, Stage, describe, stage
    from stageflow.state import Result, RunInfo, StageRecord

__all__ = [
    "AdaptivePipeline",
    "BatchInterrupted",
    "BatchSummary",
    "BranchOutcome",
    "BranchingPipeline",
    "BudgetExceeded",
    "BudgetLedger",
    "CachePolicy",
    "CachedStage",
    "ConfigurationError",
    "ContractError",
    "Degrade",
    "EnsemblePipeline",
    "ErrorHandlingPipeline",
    "Fallback",
    "ForEach",
    "FunctionStage",
    "HierarchicalPipeline",
    "Hook",
    "IterativePipeline",
    "JournalError",
    "LMBudget",
    "LazyResult",
    "LazyStage",
    "LoopLimitError",
    "LowConfidenceError",
    "MemoryStore",
    "ParallelPipeline",
    "Pipeline",
    "PipelineAdapter",
    "PipelineError",
    "PolicyEvent",
    "Ports",
    "Profiler",
    "ProfilingPipeline",
    "QualityBasedStopping",
    "RateLimiter",
    "RepairPolicy",
    "Result",
    "ResultAggregator",
    "ResultMerger",
    "RetryPolicy",
    "RouteDecision",
    "RoutingError",
    "RunInfo",
    "SQLiteStore",
    "SequentialPipeline",
    "Stage",
    "StageError",
    "StageFusion",
    "StageInput",
    "StageOutput",
    "StageRecord",
    "StageTimeoutError",
    "StageflowError",
    "StandardStage",
    "StopDecision",
    "TimeoutPolicy",
    "Tracer",
    "TracingPipeline",
    "attach_hooks",
    "budget",
    "configure",
    "describe",
    "fingerprint",
    "fuse",
    "get_config",
    "instrument_otel",
    "limits",
    "lm_router",
    "load_pipeline",
    "normalize_branch",
    "profile",
    "rate_limit",
    "run_batch",
    "stage",
    "to_spec",
    "trace",
    "uninstrument_otel",
    "untracked",
    "__version__",
]

_LOCATIONS: dict[str, str] = {
    "AdaptivePipeline": "stageflow.patterns.adaptive",
    "BatchInterrupted": "stageflow.runtime.summary",
    "BatchSummary": "stageflow.runtime.summary",
    "JournalError": "stageflow.runtime.journal",
    "BranchOutcome": "stageflow.engine.concurrency",
    "BranchingPipeline": "stageflow.patterns.branching",
    "BudgetExceeded": "stageflow.errors",
    "BudgetLedger": "stageflow.budgets",
    "CachePolicy": "stageflow.policies.cache",
    "CachedStage": "stageflow.policies.cached_stage",
    "ConfigurationError": "stageflow.errors",
    "ContractError": "stageflow.errors",
    "Degrade": "stageflow.budgets",
    "EnsemblePipeline": "stageflow.patterns.ensemble",
    "ErrorHandlingPipeline": "stageflow.patterns.error_handling",
    "Fallback": "stageflow.policies.recovery",
    "ForEach": "stageflow.patterns.foreach",
    "FunctionStage": "stageflow.stages",
    "HierarchicalPipeline": "stageflow.patterns.hierarchical",
    "Hook": "stageflow.engine.hooks",
    "IterativePipeline": "stageflow.patterns.iterative",
    "LMBudget": "stageflow.budgets",
    "LazyResult": "stageflow.policies.lazy",
    "LazyStage": "stageflow.policies.lazy",
    "LoopLimitError": "stageflow.errors",
    "LowConfidenceError": "stageflow.errors",
    "MemoryStore": "stageflow.policies.cache",
    "ParallelPipeline": "stageflow.patterns.parallel",
    "Pipeline": "stageflow.patterns.base",
    "PipelineAdapter": "stageflow.patterns.adaptive",
    "PipelineError": "stageflow.errors",
    "PolicyEvent": "stageflow.policies.recovery",
    "Ports": "stageflow.stages",
    "Profiler": "stageflow.observe.profiler",
    "ProfilingPipeline": "stageflow.observe.pipelines",
    "QualityBasedStopping": "stageflow.patterns.iterative",
    "RateLimiter": "stageflow.budgets",
    "RepairPolicy": "stageflow.policies.recovery",
    "Result": "stageflow.state",
    "ResultAggregator": "stageflow.patterns.ensemble",
    "ResultMerger": "stageflow.patterns.parallel",
    "RetryPolicy": "stageflow.policies.recovery",
    "RouteDecision": "stageflow.patterns.branching",
    "RoutingError": "stageflow.errors",
    "RunInfo": "stageflow.state",
    "SQLiteStore": "stageflow.policies.stores",
    "SequentialPipeline": "stageflow.patterns.sequential",
    "Stage": "stageflow.stages",
    "StageError": "stageflow.errors",
    "StageFusion": "stageflow.policies.fusion",
    "StageInput": "stageflow.contracts",
    "StageOutput": "stageflow.contracts",
    "StageRecord": "stageflow.state",
    "StageTimeoutError": "stageflow.errors",
    "StageflowError": "stageflow.errors",
    "StandardStage": "stageflow.contracts",
    "StopDecision": "stageflow.patterns.iterative",
    "TimeoutPolicy": "stageflow.policies.recovery",
    "Tracer": "stageflow.observe.tracer",
    "TracingPipeline": "stageflow.observe.pipelines",
    "attach_hooks": "stageflow.engine.hooks",
    "budget": "stageflow.budgets",
    "configure": "stageflow.engine.config",
    "describe": "stageflow.stages",
    "fingerprint": "stageflow.fingerprinting",
    "fuse": "stageflow.policies.fusion",
    "get_config": "stageflow.engine.config",
    "instrument_otel": "stageflow.observe.otel",
    "limits": "stageflow.engine.concurrency",
    "lm_router": "stageflow.patterns.branching",
    "load_pipeline": "stageflow.spec",
    "normalize_branch": "stageflow.patterns.branching",
    "profile": "stageflow.observe.profiler",
    "rate_limit": "stageflow.budgets",
    "run_batch": "stageflow.runtime.batch",
    "stage": "stageflow.stages",
    "to_spec": "stageflow.spec",
    "trace": "stageflow.observe.tracer",
    "uninstrument_otel": "stageflow.observe.otel",
    "untracked": "stageflow._untracked",
}


__getattr__, __dir__ = lazy_attributes("stageflow", _LOCATIONS, globals())
