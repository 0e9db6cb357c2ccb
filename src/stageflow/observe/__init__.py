"""Observers that attach to any pipeline through the engine hooks: profiler and tracer."""

from stageflow.observe.pipelines import ProfilingPipeline, TracingPipeline
from stageflow.observe.profiler import Profiler, profile
from stageflow.observe.tracer import Tracer, trace

__all__ = ["Profiler", "ProfilingPipeline", "Tracer", "TracingPipeline", "profile", "trace"]
