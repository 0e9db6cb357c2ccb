"""stageflow: multi-stage language-model programs on DSPy.

Names are resolved lazily (PEP 562), so ``import stageflow`` and ``stageflow --help`` stay
cheap; DSPy is imported the first time a name that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from stageflow._version import __version__

if TYPE_CHECKING:
    from stageflow.contracts import StageInput, StageOutput, StandardStage
    from stageflow.engine.concurrency import BranchOutcome, configure, get_config, limits
    from stageflow.engine.hooks import Hook, attach_hooks
    from stageflow.errors import (
        ConfigurationError,
        ContractError,
        LoopLimitError,
        PipelineError,
        RoutingError,
        StageError,
        StageflowError,
    )
    from stageflow.observe.pipelines import ProfilingPipeline, TracingPipeline
    from stageflow.observe.profiler import Profiler, profile
    from stageflow.observe.tracer import Tracer, trace
    from stageflow.patterns.adaptive import AdaptivePipeline, PipelineAdapter
    from stageflow.patterns.base import Pipeline
    from stageflow.patterns.branching import BranchingPipeline, RouteDecision, lm_router, normalize_branch
    from stageflow.patterns.ensemble import EnsemblePipeline, ResultAggregator
    from stageflow.patterns.foreach import ForEach
    from stageflow.patterns.hierarchical import HierarchicalPipeline
    from stageflow.patterns.iterative import IterativePipeline, QualityBasedStopping, StopDecision
    from stageflow.patterns.parallel import ParallelPipeline, ResultMerger
    from stageflow.patterns.sequential import SequentialPipeline
    from stageflow.stages import FunctionStage, Ports, Stage, describe, stage
    from stageflow.state import Result, RunInfo, StageRecord

__all__ = [
    "AdaptivePipeline",
    "BranchOutcome",
    "BranchingPipeline",
    "ConfigurationError",
    "ContractError",
    "EnsemblePipeline",
    "ForEach",
    "FunctionStage",
    "HierarchicalPipeline",
    "Hook",
    "IterativePipeline",
    "LoopLimitError",
    "ParallelPipeline",
    "Pipeline",
    "PipelineAdapter",
    "PipelineError",
    "Ports",
    "Profiler",
    "ProfilingPipeline",
    "QualityBasedStopping",
    "Result",
    "ResultAggregator",
    "ResultMerger",
    "RouteDecision",
    "RoutingError",
    "RunInfo",
    "SequentialPipeline",
    "Stage",
    "StageError",
    "StageInput",
    "StageOutput",
    "StageRecord",
    "StageflowError",
    "StandardStage",
    "StopDecision",
    "Tracer",
    "TracingPipeline",
    "attach_hooks",
    "configure",
    "describe",
    "get_config",
    "limits",
    "lm_router",
    "normalize_branch",
    "profile",
    "stage",
    "trace",
    "__version__",
]

_LOCATIONS: dict[str, str] = {
    "AdaptivePipeline": "stageflow.patterns.adaptive",
    "BranchOutcome": "stageflow.engine.concurrency",
    "BranchingPipeline": "stageflow.patterns.branching",
    "ConfigurationError": "stageflow.errors",
    "ContractError": "stageflow.errors",
    "EnsemblePipeline": "stageflow.patterns.ensemble",
    "ForEach": "stageflow.patterns.foreach",
    "FunctionStage": "stageflow.stages",
    "HierarchicalPipeline": "stageflow.patterns.hierarchical",
    "Hook": "stageflow.engine.hooks",
    "IterativePipeline": "stageflow.patterns.iterative",
    "LoopLimitError": "stageflow.errors",
    "ParallelPipeline": "stageflow.patterns.parallel",
    "Pipeline": "stageflow.patterns.base",
    "PipelineAdapter": "stageflow.patterns.adaptive",
    "PipelineError": "stageflow.errors",
    "Ports": "stageflow.stages",
    "Profiler": "stageflow.observe.profiler",
    "ProfilingPipeline": "stageflow.observe.pipelines",
    "QualityBasedStopping": "stageflow.patterns.iterative",
    "Result": "stageflow.state",
    "ResultAggregator": "stageflow.patterns.ensemble",
    "ResultMerger": "stageflow.patterns.parallel",
    "RouteDecision": "stageflow.patterns.branching",
    "RoutingError": "stageflow.errors",
    "RunInfo": "stageflow.state",
    "SequentialPipeline": "stageflow.patterns.sequential",
    "Stage": "stageflow.stages",
    "StageError": "stageflow.errors",
    "StageInput": "stageflow.contracts",
    "StageOutput": "stageflow.contracts",
    "StageRecord": "stageflow.state",
    "StageflowError": "stageflow.errors",
    "StandardStage": "stageflow.contracts",
    "StopDecision": "stageflow.patterns.iterative",
    "Tracer": "stageflow.observe.tracer",
    "TracingPipeline": "stageflow.observe.pipelines",
    "attach_hooks": "stageflow.engine.hooks",
    "configure": "stageflow.engine.concurrency",
    "describe": "stageflow.stages",
    "get_config": "stageflow.engine.concurrency",
    "limits": "stageflow.engine.concurrency",
    "lm_router": "stageflow.patterns.branching",
    "normalize_branch": "stageflow.patterns.branching",
    "profile": "stageflow.observe.profiler",
    "stage": "stageflow.stages",
    "trace": "stageflow.observe.tracer",
}


def __getattr__(name: str) -> Any:
    module = _LOCATIONS.get(name)
    if module is None:
        raise AttributeError(f"module 'stageflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
