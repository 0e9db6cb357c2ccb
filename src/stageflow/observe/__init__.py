"""Observers that attach to any pipeline through the engine hooks (profiler, tracer), pictures of
pipelines (:mod:`stageflow.observe.graph`) and the HTML run report (:mod:`stageflow.observe.report`).

Names resolve lazily, so importing a submodule that needs no DSPy (the graph renderers, the report)
does not import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stageflow._lazy import lazy_attributes

if TYPE_CHECKING:
    from stageflow.observe.graph import graph_of, to_dot, to_mermaid
    from stageflow.observe.pipelines import ProfilingPipeline, TracingPipeline
    from stageflow.observe.profiler import Profiler, profile
    from stageflow.observe.report import write_report
    from stageflow.observe.tracer import Tracer, trace

__all__ = [
    "Profiler",
    "ProfilingPipeline",
    "Tracer",
    "TracingPipeline",
    "graph_of",
    "profile",
    "to_dot",
    "to_mermaid",
    "trace",
    "write_report",
]

_LOCATIONS = {
    "Profiler": "stageflow.observe.profiler",
    "ProfilingPipeline": "stageflow.observe.pipelines",
    "Tracer": "stageflow.observe.tracer",
    "TracingPipeline": "stageflow.observe.pipelines",
    "graph_of": "stageflow.observe.graph",
    "profile": "stageflow.observe.profiler",
    "to_dot": "stageflow.observe.graph",
    "to_mermaid": "stageflow.observe.graph",
    "trace": "stageflow.observe.tracer",
    "write_report": "stageflow.observe.report",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LOCATIONS, globals())
