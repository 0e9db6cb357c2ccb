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
    from stageflow.patterns.base import Pipeline
    from stageflow.patterns.branching import BranchingPipeline, RouteDecision, lm_router, normalize_branch
    from stageflow.patterns.hierarchical import HierarchicalPipeline
    from stageflow.patterns.iterative import IterativePipeline, QualityBasedStopping, StopDecision
    from stageflow.patterns.sequential import SequentialPipeline
    from stageflow.stages import FunctionStage, Ports, Stage, describe, stage
    from stageflow.state import Result, RunInfo, StageRecord

__all__ = [
    "BranchingPipeline",
    "ConfigurationError",
    "ContractError",
    "FunctionStage",
    "HierarchicalPipeline",
    "Hook",
    "IterativePipeline",
    "LoopLimitError",
    "Pipeline",
    "PipelineError",
    "Ports",
    "Profiler",
    "ProfilingPipeline",
    "QualityBasedStopping",
    "Result",
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
    "__version__",
    "attach_hooks",
    "describe",
    "lm_router",
    "normalize_branch",
    "profile",
    "stage",
    "trace",
]

_LOCATIONS: dict[str, str] = {
    "BranchingPipeline": "stageflow.patterns.branching",
    "ConfigurationError": "stageflow.errors",
    "ContractError": "stageflow.errors",
    "FunctionStage": "stageflow.stages",
    "HierarchicalPipeline": "stageflow.patterns.hierarchical",
    "Hook": "stageflow.engine.hooks",
    "IterativePipeline": "stageflow.patterns.iterative",
    "LoopLimitError": "stageflow.errors",
    "Pipeline": "stageflow.patterns.base",
    "PipelineError": "stageflow.errors",
    "Ports": "stageflow.stages",
    "Profiler": "stageflow.observe.profiler",
    "ProfilingPipeline": "stageflow.observe.pipelines",
    "QualityBasedStopping": "stageflow.patterns.iterative",
    "Result": "stageflow.state",
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
    "describe": "stageflow.stages",
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
