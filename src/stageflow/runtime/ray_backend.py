"""The Ray backend: records run in actors on a Ray cluster; the journal stays with the driver.

Each actor builds the program once — from the pipeline file (or saved program directory), or
from the pickled program object — configures DSPy in its own process (LM, adapter, answer-cache
settings, stageflow's concurrency budget) and runs ``slots`` records at once on its threads
(a threaded actor: on DSPy 3.4.1 that costs less CPU per Predict than an async actor). The driver
sends records in chunks of ``chunk`` (fewer Ray calls: the driver's CPU per record falls about in
proportion) and keeps the same journal and output as a local run, so resume and exactly-once hold
across backends; outputs, errors and usage come back to it.

Install with ``pip install 'stageflow[ray]'``. Without an address a local single-node cluster is
started (and stopped at the end); with ``address=`` (``--ray-address``) the run joins an existing
cluster. If ``ray.init(...)`` was already called, that connection is used as is. On a multi-node
cluster, modules named by ``allow_modules`` and the program's own code must be importable on the
workers, and a pipeline file path must exist there (or pass the program object).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stageflow.errors import ConfigurationError
from stageflow.runtime.outcome import Outcome, run_record
from stageflow.runtime.records import Record

__all__ = ["RayBackend"]

_SEND_HINT = (
    "make it picklable (give resources a __reduce__/__deepcopy__ that rebuilds them), build the program "
    "inside each worker from a pipeline file (pass its path instead of the object), or pass lm= as a model "
    "string or a factory function"
)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigurationError(
            "the Ray backend needs Ray, which is not installed.",
            code="missing_dependency",
            hint="pip install 'stageflow[ray]'",
        ) from exc
    return ray


@dataclass
class RayBackend:
    """Options of the Ray backend (``run_batch(..., backend=RayBackend(...))``; ``"ray"`` = defaults).

    Attributes:
        address: A cluster address (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); ``None``: the
            existing ``ray.init`` connection, else a new local single-node cluster.
        actors: Worker actors; default: the cluster's CPUs / ``num_cpus`` (at most ``concurrency``).
        slots: Records each actor runs at once; default: ``ceil(concurrency / actors)``.
        chunk: Records per call from the driver to an actor (at most ``slots``).
        num_cpus: CPUs each actor reserves.
        init_options: More ``ray.init`` arguments when this backend connects (e.g. ``runtime_env``).
    """

    address: str | None = None
    actors: int | None = None
    slots: int | None = None
    chunk: int = 4
    num_cpus: float = 1.0
    init_options: dict[str, Any] = field(default_factory=dict)

    def executor(
        self,
        source: Any,
        program: Any,
        lm: Any,
        adapter: Any,
        allow_modules: Sequence[str],
        concurrency: int,
        max_concurrency: int | None,
    ) -> RayExecutor:
        """Start the actors for one run (called by :func:`stageflow.run_batch`)."""
        spec = _worker_spec(source, program, lm, adapter, allow_modules)
        return RayExecutor(self, spec, concurrency, max_concurrency)


def _worker_spec(
    source: Any, program: Any, lm: Any, adapter: Any, allow_modules: Sequence[str]
) -> dict[str, Any]:
    """What every actor needs to build the program and its DSPy settings (all picklable)."""
    from stageflow.runtime.sendable import pickle_for_workers

    spec: dict[str, Any] = {"allow_modules": list(allow_modules)}
    if isinstance(source, str | os.PathLike):
        spec["program_path"] = str(Path(source).resolve())
    else:
        spec["program_pickle"] = pickle_for_workers(program, "program", _SEND_HINT)
    import dspy

    if lm is None:
        lm = dspy.settings.lm  # what the driver runs with; sent along
    if adapter is None:
        adapter = dspy.settings.adapter
    spec["lm"] = lm if isinstance(lm, str) or lm is None else pickle_for_workers(lm, "LM", _SEND_HINT)
    spec["adapter"] = None if adapter is None else pickle_for_workers(adapter, "adapter", _SEND_HINT)
    cache = getattr(dspy, "cache", None)
    spec["cache"] = {
        "enable_disk_cache": bool(getattr(cache, "enable_disk_cache", True)),
        "enable_memory_cache": bool(getattr(cache, "enable_memory_cache", True)),
    }
    return spec


class BatchWorker:
    """A Ray actor (wrapped with ``ray.remote`` at run time): builds the program once, runs chunks."""

    def __init__(self, spec: dict[str, Any], slots: int, max_concurrency: int | None) -> None:
        import dspy
        from ray import cloudpickle

        from stageflow.engine.concurrency import configure
        from stageflow.runtime.program import load_program, run_settings

        if "program_path" in spec:
            self.program = load_program(spec["program_path"], spec["allow_modules"])
        else:
            self.program = cloudpickle.loads(spec["program_pickle"])
        lm = spec["lm"]
        lm = cloudpickle.loads(lm) if isinstance(lm, bytes) else lm
        adapter = spec["adapter"]
        adapter = cloudpickle.loads(adapter) if isinstance(adapter, bytes) else adapter
        dspy.configure_cache(**spec["cache"])
        dspy.configure(**run_settings(lm, adapter))
        if max_concurrency is not None:
            configure(max_concurrency=max_concurrency)
        self.pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="stageflow-batch")

    def ready(self) -> int:
        return os.getpid()

    def _one(self, inputs: dict[str, Any]) -> Outcome:
        return run_record(self.program, inputs)  # (outputs as JSON text: nothing unpicklable travels back)

    def run(self, chunk: list[dict[str, Any]]) -> list[Outcome]:
        return list(self.pool.map(self._one, chunk))


class RayExecutor:
    """Driver side: the actors of one run; worker threads call them chunk by chunk."""

    name = "ray"

    def __init__(
        self, options: RayBackend, spec: dict[str, Any], concurrency: int, max_concurrency: int | None
    ) -> None:
        ray = self.ray = _import_ray()
        self.started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.WARNING,
            }
            kwargs.update(options.init_options)
            ray.init(address=options.address, **kwargs)
            self.started = True
        self.actors: list[Any] = []
        try:
            cpus = float(ray.cluster_resources().get("CPU", 1))
            n = options.actors or max(1, min(concurrency, int(cpus // options.num_cpus) or 1))
            if n * options.num_cpus > cpus:
                raise ConfigurationError(
                    f"{n} Ray actors with num_cpus={options.num_cpus} each need "
                    f"{n * options.num_cpus:g} CPUs; the cluster has {cpus:g}.",
                    field="actors",
                    code="bad_option",
                    hint="ask for fewer actors, or a smaller num_cpus per actor "
                    "(e.g. RayBackend(num_cpus=0.5))",
                )
            slots = options.slots or max(1, math.ceil(concurrency / n))
            self.chunk = max(1, min(options.chunk, slots))
            calls = max(1, math.ceil(slots / self.chunk))
            per_actor = None if max_concurrency is None else max(1, max_concurrency // n)
            remote = ray.remote(BatchWorker).options(
                num_cpus=options.num_cpus, max_concurrency=calls, max_restarts=3, max_task_retries=0
            )
            self.actors = [remote.remote(spec, slots, per_actor) for _ in range(n)]
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        self.workers = n * calls
        self.slots = slots

    def _wait_ready(self) -> None:
        ray = self.ray
        try:
            ray.get([a.ready.remote() for a in self.actors], timeout=300)
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc
            raise ConfigurationError(
                f"the Ray workers could not build the program: {type(cause).__name__}: {cause}",
                code="worker_setup_failed",
                hint="check that stageflow, the program's modules and its files are available on the workers",
            ) from exc

    def thread_scope(self, worker: int) -> Any:
        import contextlib

        return contextlib.nullcontext()

    def run(self, worker: int, records: list[Record]) -> list[Outcome]:
        actor = self.actors[worker % len(self.actors)]
        outcomes: list[Outcome] = self.ray.get(actor.run.remote([r.inputs for r in records]))
        return outcomes

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # already gone
                continue
        self.actors = []
        if self.started:
            self.ray.shutdown()
            self.started = False
