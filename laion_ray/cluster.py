"""Cluster-shaped resource planning, and a record of what ran where.

Resources come from the cluster, never from the driver's own hardware: under
``ray job submit`` the driver runs on a head node that usually has no GPU and
no CPUs for work. Capacity is what the cluster has now (``ray.cluster_resources``)
or, where larger, what the autoscaler can still add: the maximum over its node
types, as the autoscaler publishes them to the GCS (the same source Ray Data's
own autoscaling uses; a cluster without an autoscaler has none, and then the
current resources are the capacity).

The plan, per stage of a backfill:

- **Model stages** (every class UDF, built-in or user-written) get one GPU per
  actor whenever the cluster has or can add GPUs, and an actor pool of
  ``(1, GPU capacity)``. On a CPU-only cluster the pool scales with the CPUs:
  ``(1, CPU_MODEL_SHARE * CPUs)``, one actor per CPU. The device is picked
  inside the actor (:func:`actor_device`): an actor that got a GPU but finds no
  CUDA device falls back to the CPU with one warning.
- **Decode and other function stages** run as tasks up to the cluster's CPUs.
  When the model runs on GPUs, the job's CPU budget is capped at the model
  actors' own CPUs plus ``DECODE_CPUS_PER_GPU`` per GPU, so an autoscaling
  cluster is not asked for CPU nodes the GPUs cannot keep up with.
- **Where images decode** (``clip-embed``'s ``decode``): ``cpu`` keeps the
  decode tasks; ``device``, and ``auto`` when the model stage got GPUs in this
  plan, sends the bytes to the model actor, which decodes on its device
  (:func:`laion_ray.udfs.clip.decode_on_device`): the tasks then only read,
  check headers and write, ``DEVICE_DECODE_TASK_CPUS_PER_GPU`` per GPU, and
  ``DECODE_CPUS_PER_GPU`` and ``decode_cpus`` do not apply. Decided from the
  plan alone; each actor still picks its device itself.
- Overrides: ``gpus`` (``0`` forces CPU actors), ``max_actors``, ``device`` and
  ``decode_cpus``; an explicit ``concurrency`` of a UDF is kept as given.

What actually ran where (nodes, peak actors, each actor's device and decode) is
collected by a small named actor, :class:`PlacementLog`: every model actor
reports once at start (and again when its count of rows that fell back to the
host decoder changes), every task worker process once per stage, so it holds
O(actors + nodes) entries, never O(rows or units).

Examples:
    >>> cap = Capacity(cpus=96, gpus=8)
    >>> cap.worker_count()
    96
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from laion_ray.errors import LaionRayError
from laion_ray.udf import UDF

log = logging.getLogger(__name__)

# Decode CPUs to plan per GPU: the model's img/s over decode's img/s per core.
# Measured on an H200 (benchmarks/bench_gpu.py): ViT-B-32 in fp16 does 14,800-
# 16,200 img/s and the fast decode path 780-840 LAION-sized img/s per core, so
# an H200 needs ~19. cluster.yaml's g5 nodes carry A10Gs, taken as ~3,000 img/s
# (not measured: that is the GPU lent here), hence 4, the default. Pass
# ``decode_cpus`` / ``--decode-cpus`` for faster GPUs (19 x GPUs on H100/H200).
DECODE_CPUS_PER_GPU = 4.0
# Share of a CPU-only cluster's CPUs given to model actors (one actor per CPU);
# the rest is left to reads, decode and checkpoint writes. A CPU model is ~100x
# slower than its decode, so the model gets most of the CPUs.
CPU_MODEL_SHARE = 0.75
# Task CPUs per GPU when the model decodes on its device (decode=device): the
# reads of the encoded bytes, the header checks (a few us per image) and the
# checkpoint writes. An H200 embedding ViT-B/32 at ~15,000 img/s reads ~0.9 GB/s
# of LAION-sized JPEGs, hence 2 (not measured on a GPU yet: bench_gpu_e2e.py);
# the actor's own CPU launches the device work and does the host fallbacks.
DEVICE_DECODE_TASK_CPUS_PER_GPU = 2.0
PLACEMENT_NAMESPACE = "laion-ray"


@dataclasses.dataclass(frozen=True)
class Capacity:
    """What the cluster has, or can autoscale to.

    Attributes:
        cpus, gpus: Logical CPUs and GPUs, the larger of now and the
            autoscaler's maximum.
        cpus_now, gpus_now: What the alive nodes have now (None: same as above).
        nodes: Alive nodes now.
        autoscaler: Whether the autoscaler's node types were counted.
    """

    cpus: float
    gpus: float = 0.0
    cpus_now: float | None = None
    gpus_now: float | None = None
    nodes: int = 1
    autoscaler: bool = False

    @classmethod
    def of(
        cls, now: Mapping[str, float], most: Mapping[str, float] | None = None, nodes: int = 1
    ) -> Capacity:
        """Combine current resources with the autoscaler's maxima (if any)."""
        most = most or {}
        cpus_now, gpus_now = float(now.get("CPU", 0)), float(now.get("GPU", 0))
        return cls(
            cpus=max(cpus_now, float(most.get("CPU", 0))),
            gpus=max(gpus_now, float(most.get("GPU", 0))),
            cpus_now=cpus_now,
            gpus_now=gpus_now,
            nodes=nodes,
            autoscaler=bool(most),
        )

    def worker_count(self, workers: int | None = None) -> int:
        """Parallel CPU tasks to split work into: ``workers``, else one per CPU.

        A cluster that shows 0 CPUs now (a 0-CPU head before the autoscaler
        added workers, without node types to read) still gets one.
        """
        return workers or max(1, int(self.cpus))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def autoscaler_max_resources() -> dict[str, float] | None:
    """Max resources over the autoscaler's node types, or None without an autoscaler.

    Ray-internal API (``ray._private.state``), best effort: Ray Data reads the
    same. Any failure means "no autoscaler information".
    """
    try:
        import ray._private.state

        most = ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception as exc:  # internal API: absent or changed in this Ray
        log.debug("no autoscaler node types: %s", exc)
        return None
    # Unbounded node types report sys.maxsize: keep it finite for sizing.
    return {k: float(min(v, 1_000_000)) for k, v in (most or {}).items()} or None


def cluster_capacity() -> Capacity:
    """The connected cluster's capacity (Ray must be initialised)."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return Capacity.of(ray.cluster_resources(), autoscaler_max_resources(), nodes)


# --- planning -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Overrides:
    """Explicit choices that beat the cluster's shape.

    Attributes:
        gpus: GPUs for each model stage's pool; ``0`` runs model actors on CPUs.
        max_actors: Upper bound of each model stage's pool.
        device: ``cpu`` or ``cuda`` for every model stage.
        decode_cpus: CPU budget of the decode and other task stages.
    """

    gpus: int | None = None
    max_actors: int | None = None
    device: str | None = None
    decode_cpus: float | None = None

    def validate(self) -> Overrides:
        for name in ("gpus", "max_actors", "decode_cpus"):
            value = getattr(self, name)
            low = 0 if name == "gpus" else 1
            if value is not None and (not isinstance(value, int | float) or value < low):
                flag = "--" + name.replace("_", "-")
                raise LaionRayError(f"{flag} must be a number >= {low}, got {value!r}")
        if self.device is not None and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise LaionRayError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cpu" and self.gpus:
            raise LaionRayError(f"--device cpu contradicts --gpus {self.gpus}")
        return self


@dataclasses.dataclass(frozen=True)
class Plan:
    """Stages with their resources decided, and the job's CPU budget (None: no cap).

    Attributes:
        stages: The planned stages.
        cpu_limit: Ray Data's CPU budget for the whole pipeline.
        capacity: The cluster it was planned on.
        decode_cpus: CPU budget of the task stages (decode or, with
            ``decode=device``, reads and header checks).
        decode: Stage name -> its part in decoding: ``cpu`` (``clip-preprocess``
            decodes, ``clip-embed`` gets pixels), ``device`` (``clip-embed``
            decodes) or ``check`` (``clip-preprocess`` only checks headers).
    """

    stages: list[UDF]
    cpu_limit: float | None
    capacity: Capacity
    decode_cpus: float | None
    decode: dict[str, str] = dataclasses.field(default_factory=dict)


def _wants_gpu(stage: UDF, capacity: Capacity, overrides: Overrides) -> bool:
    device = overrides.device or stage.params.get("device")
    if overrides.gpus == 0 or device == "cpu" or stage.num_gpus == 0:
        return False
    explicit = bool(overrides.gpus or stage.num_gpus or (device or "").startswith("cuda"))
    return explicit or capacity.gpus >= 1


def plan_stages(stages: Sequence[UDF], capacity: Capacity, overrides: Overrides) -> Plan:
    """Resources of every stage from the cluster's shape and the overrides.

    Returns:
        A :class:`Plan`; function stages keep their per-task resources.
    """
    overrides.validate()
    planned: list[UDF] = []
    # Present capacity is shared out as each pool's initial size: nodes that are
    # up are paid for, and loading a model is slow, so they all start at once.
    # Consecutive model stages share one pool (see shares_actor).
    pools = max(1, len(actor_groups(stages, lambda s: _wants_gpu(s, capacity, overrides))))
    gpus_now = capacity.gpus if capacity.gpus_now is None else capacity.gpus_now
    cpus_now = capacity.cpus if capacity.cpus_now is None else capacity.cpus_now
    for stage in stages:
        if not stage.is_actor:
            planned.append(stage.with_options(num_gpus=stage.num_gpus or 0.0))
            continue
        changes: dict[str, Any] = {}
        if overrides.device and "device" in stage.params:
            changes["params"] = {"device": overrides.device}
        if _wants_gpu(stage, capacity, overrides):
            per_actor = stage.num_gpus or 1.0
            most = overrides.gpus or math.floor(capacity.gpus / per_actor)
            present = math.floor(gpus_now / per_actor)
        else:
            per_actor = 0.0
            most = math.floor(capacity.cpus * CPU_MODEL_SHARE)
            present = math.floor(cpus_now * CPU_MODEL_SHARE)
        most = max(1, overrides.max_actors or most)
        initial = min(most, max(1, present // pools))
        pool = stage.concurrency or ((1, most, initial) if most > 1 else 1)
        planned.append(stage.with_options(num_gpus=per_actor, concurrency=pool, **changes))
    planned, decode = plan_decode(planned)
    groups = actor_groups(planned)
    _fit_cpu_actors(planned, groups, cpus_now)
    gpu_actors = sum(_actors(planned[g[0]])[1] * _ask(planned, g, "num_gpus") for g in groups)
    actor_cpus = sum(_actors(planned[g[0]])[1] * _ask(planned, g, "num_cpus") for g in groups)
    decode_cpus = overrides.decode_cpus
    if gpu_actors and "device" in decode.values() and "cpu" not in decode.values():
        # No decode tasks: --decode-cpus and DECODE_CPUS_PER_GPU size those only.
        if decode_cpus is not None:
            log.warning(
                "--decode-cpus %g applies to decode=cpu; clip-embed decodes on its device here",
                decode_cpus,
            )
        decode_cpus = min(capacity.cpus, DEVICE_DECODE_TASK_CPUS_PER_GPU * gpu_actors) or None
    elif decode_cpus is None and gpu_actors:
        decode_cpus = min(capacity.cpus, DECODE_CPUS_PER_GPU * gpu_actors) or None
    cpu_limit = None
    if decode_cpus is not None:
        # Ray Data's CPU budget for the whole pipeline: reads, decode and
        # checkpoint writes share ``decode_cpus``; the model actors keep theirs.
        cpu_limit = decode_cpus + actor_cpus
    return Plan(planned, cpu_limit, capacity, decode_cpus, decode)


def plan_decode(stages: Sequence[UDF]) -> tuple[list[UDF], dict[str, str]]:
    """Where each ``clip-embed`` of a planned job decodes, from the plan alone.

    ``decode=cpu`` keeps the decode tasks. ``device`` decodes in the model actor;
    so does ``auto`` when the model stage got GPUs in this plan: the driver's
    hardware plays no part, and an actor that got a GPU but finds no CUDA device
    still decodes, on its CPU (:class:`~laion_ray.udfs.clip.ClipEmbedDecoding`).
    A decode stage whose pixels another stage reads too stays a decode stage.

    Returns:
        The stages (in the ``device`` shape where chosen) and :attr:`Plan.decode`.
    """
    from laion_ray.udfs.clip import DECODE_MODES, ClipEmbed, decode_on_device

    out, decode = list(stages), {}
    for i, pre in enumerate(stages):
        mode = pre.params.get("decode")
        if pre.is_actor or pre.name != "clip-preprocess" or mode not in DECODE_MODES:
            continue
        readers = [j for j, s in enumerate(stages) if set(pre.outputs) & set(s.inputs)]
        if len(readers) != 1 or stages[readers[0]].compute is not ClipEmbed:
            decode[pre.name] = "cpu"
            continue
        embed = stages[readers[0]]
        if mode == "device" or (mode == "auto" and embed.num_gpus):
            out[i], out[readers[0]] = decode_on_device(pre, embed)
            decode.update({pre.name: "check", embed.name: "device"})
        else:
            decode.update({pre.name: "cpu", embed.name: "cpu"})
    return out, decode


def shares_actor(a: UDF, b: UDF) -> bool:
    """Whether class stage ``b``, right after class stage ``a``, runs in ``a``'s actor.

    Model stages in a row (``clip-embed``, ``moderation-clip``, ``clip-score``)
    share one process per actor: one torch import and one device each, not one
    per stage. A stage whose pool differs (an explicit ``concurrency``) or that
    runs on the other kind of device gets actors of its own.
    """
    if a.concurrency is not None and b.concurrency is not None:
        return a.concurrency == b.concurrency and bool(a.num_gpus) == bool(b.num_gpus)
    return False


def actor_groups(stages: Sequence[UDF], wants_gpu: Any = None) -> list[list[int]]:
    """Indices of the class stages, in runs that share an actor pool.

    Planned stages group by :func:`shares_actor`; before planning (``concurrency``
    not set yet) they group by ``wants_gpu``, which only then is called.
    """
    groups: list[list[int]] = []
    previous: UDF | None = None
    for i, stage in enumerate(stages):
        if not stage.is_actor:
            previous = None
            continue
        if previous is not None and (
            shares_actor(previous, stage)
            if stage.concurrency is not None
            else previous.concurrency is None and wants_gpu(previous) == wants_gpu(stage)
        ):
            groups[-1].append(i)
        else:
            groups.append([i])
        previous = stage
    return groups


def _actors(stage: UDF) -> tuple[int, int]:
    """(initial, most) actors of a planned pool."""
    pool = stage.concurrency
    return (
        (pool, pool) if isinstance(pool, int) else (pool[2] if len(pool) > 2 else pool[0], pool[1])
    )


def _ask(planned: Sequence[UDF], group: Sequence[int], resource: str) -> float:
    """One shared actor's ask: its stages run one after the other in it."""
    return max(getattr(planned[i], resource) or 0.0 for i in group)


def _fit_cpu_actors(planned: list[UDF], groups: Sequence[Sequence[int]], cpus: float) -> None:
    """Scale down the CPU asks of CPU model actors that would start on too few CPUs.

    Every pool starts its actors at once and they hold their CPUs for the whole
    job. If together they took all the CPUs that are up, the read and decode
    tasks that feed them could never be scheduled, and Ray Data would wait
    forever (model pools on a 2-core laptop). So the starting actors get at
    most ``CPU_MODEL_SHARE`` of those CPUs; an actor asking a fraction of a CPU
    still runs (one torch thread, as with one CPU).
    """
    cpu_groups = [g for g in groups if not planned[g[0]].num_gpus]
    asked = sum(_actors(planned[g[0]])[0] * _ask(planned, g, "num_cpus") for g in cpu_groups)
    room = cpus * CPU_MODEL_SHARE
    if not cpus or asked <= room:
        return
    for group in cpu_groups:
        for i in group:
            planned[i] = planned[i].with_options(num_cpus=planned[i].num_cpus * room / asked)


def describe_plan(plan: Plan) -> list[dict[str, Any]]:
    """Requested resources per actor or task of every stage, for the report."""
    out = []
    for stage in plan.stages:
        entry: dict[str, Any] = {
            "stage": stage.name,
            "kind": "actors" if stage.is_actor else "tasks",
            "num_cpus": stage.num_cpus,
            "num_gpus": stage.num_gpus or 0.0,
        }
        if stage.name in plan.decode:
            entry["decode"] = plan.decode[stage.name]
        if stage.is_actor:
            pool = stage.concurrency
            entry["pool"] = list(pool[:2]) if isinstance(pool, tuple) else [pool, pool]
        elif plan.decode_cpus is not None:
            entry["cpu_budget"] = plan.decode_cpus
        out.append(entry)
    return out


# --- the device, inside an actor ------------------------------------------------------

_fallback_warned = False


def assigned_gpus() -> list | None:
    """GPU ids Ray gave this worker; None outside a Ray worker."""
    if "ray" not in sys.modules:  # a Ray worker has imported it; a plain process needn't
        return None
    import ray

    if not ray.is_initialized():
        return None
    try:
        return list(ray.get_gpu_ids())
    except Exception:  # not a worker (a driver): no assignment
        return None


def actor_device(requested: str | None = None) -> str:
    """The device a model should use, decided where it runs.

    In a Ray worker: CUDA when Ray assigned a GPU (or ``cuda`` was requested)
    and torch sees one; a GPU assignment without a CUDA device falls back to
    the CPU with one warning per process. Outside Ray: this process's own
    hardware. ``cpu`` is always honoured.

    Raises:
        LaionRayError: ``cuda`` requested outside Ray where there is no CUDA.
    """
    global _fallback_warned
    import torch

    if requested == "cpu":
        return "cpu"
    cuda = torch.cuda.is_available()
    gpus = assigned_gpus()
    if gpus is None:
        if requested and not cuda:
            raise LaionRayError(f"device {requested!r} requested but CUDA is not available")
        return requested or ("cuda" if cuda else "cpu")
    if not gpus and not requested:
        return "cpu"
    if cuda:
        return requested or "cuda"
    if not _fallback_warned:
        _fallback_warned = True
        log.warning(
            "this actor got GPU resource(s) %s but finds no CUDA device: running on the CPU", gpus
        )
    return "cpu"


# --- what ran where -------------------------------------------------------------------


class PlacementLog:
    """Named Ray actor: each model actor's node and device, and task nodes per stage."""

    def __init__(self) -> None:
        # (stage, actor id) -> facts: stages that share an actor each report it.
        self.actors: dict[tuple[str, str], dict[str, Any]] = {}
        self.task_nodes: dict[str, set[str]] = {}
        self.peak: dict[str, int] = {}

    def actor_started(self, stage: str, actor_id: str, facts: dict[str, Any]) -> None:
        self.actors[(stage, actor_id)] = {"stage": stage, **facts}
        alive = sum(
            1 for name, aid in self.actors if name == stage and (aid == actor_id or _alive(aid))
        )
        self.peak[stage] = max(self.peak.get(stage, 0), alive)

    def actor_updated(self, stage: str, actor_id: str, facts: dict[str, Any]) -> None:
        """Facts that change while an actor runs (rows that fell back to the host decoder)."""
        self.actors.setdefault((stage, actor_id), {"stage": stage}).update(facts)

    def task_ran(self, stage: str, node: str) -> None:
        self.task_nodes.setdefault(stage, set()).add(node)

    def snapshot(self) -> dict[str, Any]:
        return {
            "actors": dict(self.actors),
            "task_nodes": {s: sorted(n) for s, n in self.task_nodes.items()},
            "peak": dict(self.peak),
        }


def _alive(actor_id: str) -> bool:
    """Whether an actor is not dead, from the GCS actor table (Ray-internal, best effort)."""
    try:
        import ray._private.state

        info = ray._private.state.state.actor_table(actor_id)
        return info.get("State") != "DEAD"
    except Exception:
        return True


def start_placement_log() -> tuple[str, Any]:
    """Create this run's :class:`PlacementLog` actor; returns its name and handle.

    The caller keeps the handle: the actor lives as long as it is referenced.
    """
    import ray

    name = f"placement-{uuid.uuid4().hex[:12]}"
    # Not waited for: a named actor's name is registered before .remote() returns,
    # so stages find it at once, and their calls queue until it has started.
    handle = (
        ray.remote(num_cpus=0)(PlacementLog)
        .options(name=name, namespace=PLACEMENT_NAMESPACE, max_restarts=0)
        .remote()
    )
    return name, handle


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def record_actor(placement: str, stage: UDF, instance: Any) -> None:
    """Called once by a model actor after building its UDF: node, device, GPUs.

    Informational: a failure is logged, never raised.
    """
    try:
        _record_actor(placement, stage, instance)
    except Exception as exc:
        log.warning("could not record the placement of a %s actor: %s", stage.name, exc)


def _record_actor(placement: str, stage: UDF, instance: Any) -> None:
    import ray

    gpus = assigned_gpus() or []
    device = getattr(instance, "device", None)
    facts = {
        "node": _node_id(),
        "device": str(device) if device is not None else ("gpu" if gpus else "cpu"),
        "gpu_ids": [str(g) for g in gpus],
    }
    facts["cpu_fallback"] = bool(gpus) and facts["device"] == "cpu"
    if hasattr(instance, "placement_facts"):  # e.g. where clip-embed decodes
        facts.update(instance.placement_facts())
    handle = ray.get_actor(placement, namespace=PLACEMENT_NAMESPACE)
    actor_id = ray.get_runtime_context().get_actor_id() or uuid.uuid4().hex
    ray.get(handle.actor_started.remote(stage.name, actor_id, facts))
    if hasattr(instance, "set_placement_reporter"):
        instance.set_placement_reporter(_ActorReporter(handle, stage.name, actor_id))


class _ActorReporter:
    """Sends an actor's changed facts to the placement log; informational, like the rest."""

    def __init__(self, handle: Any, stage: str, actor_id: str) -> None:
        self.handle, self.stage, self.actor_id = handle, stage, actor_id
        self.failed = False

    def __call__(self, facts: dict[str, Any]) -> None:
        if self.failed:
            return
        import ray

        try:
            ray.get(self.handle.actor_updated.remote(self.stage, self.actor_id, facts), timeout=30)
        except Exception as exc:
            self.failed = True  # one warning; the job goes on without the updates
            log.warning("could not update the placement of a %s actor: %s", self.stage, exc)


_tasks_recorded: set[tuple[str, str]] = set()


def record_task(placement: str, stage_names: Sequence[str]) -> None:
    """Called by task stages; reports each (stage, node) once per worker process.

    Informational: a failure is logged, never raised.
    """
    try:
        _record_task(placement, stage_names)
    except Exception as exc:
        log.warning("could not record where %s ran: %s", ", ".join(stage_names), exc)


def _record_task(placement: str, stage_names: Sequence[str]) -> None:
    import ray

    node = _node_id()
    todo = [s for s in stage_names if (placement + s, node) not in _tasks_recorded]
    if not todo:
        return
    handle = ray.get_actor(placement, namespace=PLACEMENT_NAMESPACE)
    ray.get([handle.task_ran.remote(s, node) for s in todo])
    _tasks_recorded.update((placement + s, node) for s in todo)


def placement_report(
    plan: Plan, placement: str | None, task_nodes: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Planned resources joined with what ran where, one dict per stage.

    Without a ``placement`` log (function stages run inside the read tasks),
    task stages ran on ``task_nodes``, the nodes of the read tasks.
    """
    seen = {"actors": {}, "task_nodes": {}, "peak": {}}
    if placement is not None:
        import ray

        try:
            handle = ray.get_actor(placement, namespace=PLACEMENT_NAMESPACE)
            seen = ray.get(handle.snapshot.remote(), timeout=30)
        except Exception as exc:  # the log is informational: never fail a job on it
            log.debug("placement log unavailable: %s", exc)
    out = []
    for entry in describe_plan(plan):
        name = entry["stage"]
        if entry["kind"] == "actors":
            actors = [a for a in seen["actors"].values() if a["stage"] == name]
            devices: dict[str, int] = {}
            for a in actors:
                if "device" in a:
                    devices[a["device"]] = devices.get(a["device"], 0) + 1
            entry.update(
                actors_started=len(actors),
                peak_actors=seen["peak"].get(name, 0),
                nodes=sorted({a["node"] for a in actors if "node" in a}),
                devices=devices,
                cpu_fallback=sum(a.get("cpu_fallback", False) for a in actors),
            )
            decoders = [_decode_label(a) for a in actors if "decode" in a]
            if decoders:
                entry["decode_ran"] = {d: decoders.count(d) for d in sorted(set(decoders))}
                entry["decode_fallback_rows"] = sum(
                    int(a.get("decode_fallback_rows", 0)) for a in actors
                )
        else:
            entry["nodes"] = seen["task_nodes"].get(name, []) or sorted(task_nodes)
        out.append(entry)
    return out


def _decode_label(actor: Mapping[str, Any]) -> str:
    """Where one actor's images were decoded, in words."""
    if actor["decode"] == "device":
        return f"on its device ({actor.get('device', '?')})"
    if actor.get("decode_in") == "actor":
        return "on its CPU (no CUDA device)"
    return "in the decode tasks"


def format_stages(stages: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per stage: what it asked for and where it ran."""
    lines = []
    for s in stages:
        ask = f"{s['num_cpus']:g} CPU" + (f" + {s['num_gpus']:g} GPU" if s["num_gpus"] else "")
        nodes = s.get("nodes", [])
        where = f"on {len(nodes)} node(s) {','.join(n[:8] for n in nodes)}, " if nodes else ""
        if s["kind"] == "actors":
            devices = ", ".join(f"{d} x{n}" for d, n in sorted(s.get("devices", {}).items()))
            peak = f"{s['peak_actors']} actor(s) at peak " if "peak_actors" in s else "actors "
            line = (
                f"  {s['stage']}: {peak}(pool {s['pool'][0]}..{s['pool'][1]}), {ask} each, "
                f"{where}" + (f"device {devices}" if devices else "")
            ).rstrip(", ")
            if s.get("cpu_fallback"):
                line += f" ({s['cpu_fallback']} got a GPU but no CUDA device: ran on CPU)"
            line += _decode_words(s)
        else:
            budget = f", {s['cpu_budget']:g} CPUs budget" if "cpu_budget" in s else ""
            line = f"  {s['stage']}: tasks, {ask} each{budget}, {where}".rstrip(", ")
            if s.get("decode") == "check":
                line += "; header checks only: the model stage decodes on its device"
        lines.append(line.rstrip())
    return lines


def _amount(value: float, unit: str) -> str:
    """``2 CPUs``, ``1 CPU``, ``0.25 CPU``, ``0 GPUs``."""
    return f"{value:g} {unit}" + ("s" if value == 0 or value > 1 else "")


def format_plan(plan: Plan) -> str:
    """The resource plan as one line of prose, for the log (``--report`` keeps the dicts).

    Example: ``cluster: 2 CPUs, 0 GPUs, 1 node · clip-preprocess: tasks of 0.25 CPU,
    2 CPUs in all · clip-embed: 1 actor of 1 CPU``.
    """
    cap = plan.capacity
    cpus_now = cap.cpus if cap.cpus_now is None else cap.cpus_now
    gpus_now = cap.gpus if cap.gpus_now is None else cap.gpus_now
    head = (
        f"cluster: {_amount(cpus_now, 'CPU')}, {_amount(gpus_now, 'GPU')}, "
        f"{_amount(cap.nodes, 'node')}"
    )
    if (cap.cpus, cap.gpus) != (cpus_now, gpus_now):
        head += f" (autoscales to {_amount(cap.cpus, 'CPU')}, {_amount(cap.gpus, 'GPU')})"
    parts = [head]
    for s in describe_plan(plan):
        ask = _amount(s["num_cpus"], "CPU") + (
            f" + {_amount(s['num_gpus'], 'GPU')}" if s["num_gpus"] else ""
        )
        if s["kind"] == "actors":
            low, high = s["pool"]
            count = f"{low}" if low == high else f"{low}..{high}"
            parts.append(f"{s['stage']}: {count} actor{'s' if high > 1 else ''} of {ask}")
        else:
            budget = f", {_amount(s['cpu_budget'], 'CPU')} in all" if "cpu_budget" in s else ""
            parts.append(f"{s['stage']}: tasks of {ask}{budget}")
    return " · ".join(parts)


def _decode_words(stage: Mapping[str, Any]) -> str:
    """``; decoded on its device (cuda) x2, 3 rows fell back to the host decoder``."""
    ran = stage.get("decode_ran")
    if not ran:
        return f"; decode planned {stage['decode']}" if "decode" in stage else ""
    words = ", ".join(f"{label} x{n}" for label, n in ran.items())
    fallback = stage.get("decode_fallback_rows", 0)
    rows = f", {fallback} row(s) fell back to the host decoder" if fallback else ""
    return f"; decoded {words}{rows}"
