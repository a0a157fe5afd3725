"""The UDF interface: what is computed, apart from where and how it runs.

A UDF is a function (run as stateless Ray tasks) or a class (run as a Ray Data
actor pool, so a model loads once per actor). Either way it maps a
``pyarrow.Table`` holding its ``inputs`` to a table with exactly its
``output_schema``, one row per input row.

Examples:
    >>> import pyarrow as pa, pyarrow.compute as pc
    >>> @udf(inputs=["width"], outputs=pa.schema([("w2", pa.int64())]))
    ... def double_width(batch: pa.Table) -> pa.Table:
    ...     return pa.table({"w2": pc.multiply(batch["width"], 2)})
    >>> double_width.name
    'double-width'
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from laion_ray.errors import LaionRayError
from laion_ray.storage import mask_secrets

# Columns whose name starts with this are passed between the stages of one run
# and never written to the dataset (e.g. decoded pixels).
INTERMEDIATE_PREFIX = "_"
# Default CPUs of a function UDF; reads and checkpoint writes ask the same, so
# Ray Data fuses read -> functions -> write into one task, and fractional CPUs
# keep read tasks from starving next to model actors on small machines.
TASK_CPUS = 0.25


@dataclasses.dataclass(frozen=True)
class UDF:
    """A column computation and what it needs to run.

    Attributes:
        name: Registry name, e.g. ``aspect-ratio``.
        version: Bumped when the maths changes, so old checkpoints are not reused.
        inputs: Columns read from the dataset or produced by an earlier UDF.
        output_schema: The exact columns produced, checked on the first batch.
        compute: A function ``f(table) -> table``, or a class whose instances are
            such callables; ``params`` are its keyword arguments.
        params: Parameters that change the result (part of the checkpoint key).
        num_cpus, num_gpus: Per task or per actor; fractional CPUs keep read
            tasks from starving on small machines. ``num_gpus=None`` lets the
            planner (:mod:`laion_ray.cluster`) decide: a class gets one GPU per
            actor when the cluster has or can add GPUs, a function none; ``0``
            keeps a class on CPUs.
        batch_size: Rows per call.
        concurrency: Actor-pool size (``int`` or ``(min, max)``); tasks ignore it.
            None lets the planner size the pool from the cluster.
        row_errors: Exception types that mark one bad row (null plus an error
            record). Anything else stops the job, and some types always do:
            see ``laion_ray.engine.stages.SYSTEMIC_ERRORS``. The default, any
            ``Exception``, keeps user UDFs working; built-ins name their own
            (e.g. ``ImageDecodeError``).
        validate: Optional plan-time check of the input fields as the stage will
            get them (type, and producer metadata: the dataset's, or the key of
            the stage that makes the column earlier in the run); raises
            ``LaionRayError`` before any work, e.g. on an embedding made by
            another model. Not part of the key.
    """

    name: str
    version: str
    inputs: tuple[str, ...]
    output_schema: pa.Schema
    compute: Callable[..., Any]
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_cpus: float = TASK_CPUS
    num_gpus: float | None = None
    batch_size: int = 4096
    concurrency: int | tuple[int, int] | None = None
    row_errors: tuple[type[BaseException], ...] = (Exception,)
    validate: Callable[[pa.Schema], None] | None = None

    @property
    def is_actor(self) -> bool:
        return inspect.isclass(self.compute)

    @property
    def outputs(self) -> list[str]:
        return self.output_schema.names

    @property
    def stored_outputs(self) -> list[str]:
        return [n for n in self.outputs if not n.startswith(INTERMEDIATE_PREFIX)]

    @property
    def key(self) -> str:
        """Identity of the computation: name, version and parameters.

        It is stored (column metadata, commit properties, the history), so the
        values of secret parameters (``api_key``, ``token``, ...) are masked:
        a rotated credential is the same computation.
        """
        params = json.dumps(mask_secrets(dict(self.params)), sort_keys=True, default=str)
        return f"{self.name}@{self.version}:{params}"

    @staticmethod
    def parse_key(key: str) -> tuple[str, str, dict[str, Any]]:
        """``name@version:{params}`` (see :attr:`key`) -> ``(name, version, params)``.

        Raises:
            LaionRayError: ``key`` is not a UDF key.
        """
        head, colon, params = key.partition(":")
        name, at, version = head.partition("@")
        try:
            parsed = json.loads(params) if colon and at else None
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise LaionRayError(f"not a laion-ray UDF key: {key[:200]!r}")
        return name, version, parsed

    def with_options(self, **changes: Any) -> UDF:
        """Copy with other resources or parameters (``params`` are merged)."""
        if "params" in changes:
            changes["params"] = {**self.params, **changes["params"]}
        return dataclasses.replace(self, **changes)

    def instantiate(self) -> Callable[[pa.Table], pa.Table]:
        """The callable that maps a batch; a class is constructed here, once."""
        if self.is_actor:
            return self.compute(**self.params)
        if self.params:
            return lambda batch: self.compute(batch, **self.params)
        return self.compute


def udf(
    *,
    inputs: Sequence[str],
    outputs: pa.Schema,
    name: str | None = None,
    version: str = "1",
    num_cpus: float = TASK_CPUS,
    num_gpus: float | None = None,
    batch_size: int = 4096,
    concurrency: int | tuple[int, int] | None = None,
    row_errors: Sequence[type[BaseException]] = (Exception,),
) -> Callable[[Callable[..., Any]], UDF]:
    """Declare a function or class as a :class:`UDF`."""

    def wrap(compute: Callable[..., Any]) -> UDF:
        return UDF(
            name=name or compute.__name__.strip("_").replace("_", "-").lower(),
            version=version,
            inputs=tuple(inputs),
            output_schema=outputs,
            compute=compute,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            batch_size=batch_size,
            concurrency=concurrency,
            row_errors=tuple(row_errors),
        )

    return wrap


# name -> factory(**params) -> list of UDF stages. A factory may return several
# stages (e.g. a CPU decode stage feeding a model stage); equal stages requested
# by different UDFs of one run are run once.
_REGISTRY: dict[str, Callable[..., list[UDF]]] = {}


def register(name: str) -> Callable[[Callable[..., list[UDF]]], Callable[..., list[UDF]]]:
    """Register a factory under ``name`` for ``--udf name``."""

    def wrap(factory: Callable[..., list[UDF]]) -> Callable[..., list[UDF]]:
        _REGISTRY[name] = factory
        return factory

    return wrap


def registered_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def resolve(spec: str | UDF, **params: Any) -> list[UDF]:
    """Turn a registry name, ``package.module:Name`` or a UDF into stages.

    Raises:
        LaionRayError: the name is unknown or the import target is not a UDF.
    """
    if isinstance(spec, UDF):
        return [spec.with_options(params=params) if params else spec]
    _load_builtins()
    if spec in _REGISTRY:
        try:
            return _REGISTRY[spec](**params)
        except TypeError as exc:
            raise LaionRayError(f"bad parameters for UDF {spec!r}: {exc}") from exc
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            target = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise LaionRayError(f"cannot import UDF {spec!r}: {exc}") from exc
        if isinstance(target, UDF):
            return resolve(target, **params)
        if callable(target):
            stages = target(**params)
            if isinstance(stages, UDF):
                return [stages]
            if isinstance(stages, list) and all(isinstance(s, UDF) for s in stages):
                return stages
        raise LaionRayError(f"{spec!r} is neither a UDF nor a factory returning UDFs")
    raise LaionRayError(f"unknown UDF {spec!r}; known: {', '.join(registered_names())}")


def _load_builtins() -> None:
    # Importing the package registers the built-in UDFs; the heavy ones import
    # torch lazily, so this stays cheap.
    importlib.import_module("laion_ray.udfs")
