"""Pictures of pipelines: a graph model built from the objects a pipeline runs, drawn as Mermaid
or Graphviz DOT (and as inline SVG in the HTML run report).

``graph_of(pipeline)`` returns a :class:`Graph` (``to_dict()`` is JSON); ``to_mermaid(pipeline)``
and ``to_dot(pipeline)`` render it; ``pipeline.to_mermaid()`` / ``pipeline.to_dot()`` do the same.
Importing this package does not import DSPy; walking a pipeline does (the pipeline already has).
"""

from stageflow.observe.graph.model import Cluster, Edge, Graph, Node
from stageflow.observe.graph.render import as_graph, dot_text, mermaid_text, render_svg, to_dot, to_mermaid
from stageflow.observe.graph.walk import graph_of

__all__ = [
    "Cluster",
    "Edge",
    "Graph",
    "Node",
    "as_graph",
    "dot_text",
    "graph_of",
    "mermaid_text",
    "render_svg",
    "to_dot",
    "to_mermaid",
]
