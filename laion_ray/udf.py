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

import collections.abc
import dataclasses
import importlib
import inspect
import json
import sys
import types
import typing
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
    """Register a factory under ``name`` for ``--udf name``.

    The factory's keyword parameters, with their annotations, are what
    ``--param name.KEY=VALUE`` may set (see :func:`udf_parameters`); a
    ``**resources`` catch-all takes the UDF's resource options
    (:data:`RESOURCE_OPTIONS`), as the built-ins pass it to ``with_options``.
    """

    def wrap(factory: Callable[..., list[UDF]]) -> Callable[..., list[UDF]]:
        _REGISTRY[name] = factory
        return factory

    return wrap


def registered_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def _target(spec: str) -> Any:
    """What a UDF name stands for: a registered factory, or the ``module:attr`` object.

    Raises:
        LaionRayError: the name is unknown or cannot be imported.
    """
    _load_builtins()
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise LaionRayError(f"cannot import UDF {spec!r}: {exc}") from exc
    raise LaionRayError(f"unknown UDF {spec!r}; known: {', '.join(registered_names())}")


def resolve(spec: str | UDF, **params: Any) -> list[UDF]:
    """Turn a registry name, ``package.module:Name`` or a UDF into stages.

    Raises:
        LaionRayError: the name is unknown or the import target is not a UDF.
    """
    if isinstance(spec, UDF):
        return [spec.with_options(params=params) if params else spec]
    target = _target(spec)
    if spec in _REGISTRY:
        try:
            return target(**params)
        except TypeError as exc:
            raise LaionRayError(f"bad parameters for UDF {spec!r}: {exc}") from exc
    if isinstance(target, UDF):
        return resolve(target, **params)
    if callable(target):
        stages = target(**params)
        if isinstance(stages, UDF):
            return [stages]
        if isinstance(stages, list) and all(isinstance(s, UDF) for s in stages):
            return stages
    raise LaionRayError(f"{spec!r} is neither a UDF nor a factory returning UDFs")


# --- parameters: what --param may set, and its strings as the declared types --------

#: What a factory's ``**resources`` catch-all takes: the UDF's resource options.
RESOURCE_OPTIONS = ("num_cpus", "num_gpus", "batch_size", "concurrency")
#: The one spelling of None on the command line, for a parameter that admits it
#: (``none`` stays a string: ``embedding-head.activation=none`` means "no activation").
NULL = "null"


@dataclasses.dataclass(frozen=True)
class Parameters:
    """The parameters one UDF of a job declares, from its signature.

    Attributes:
        udf: The UDF as the job names it (``--udf``).
        types: Parameter name -> annotation (``inspect.Parameter.empty`` when
            it has none: its value stays the string given).
        any_name: The compute function takes ``**kwargs``: names beyond
            ``types`` are accepted too, as strings.
    """

    udf: str
    types: Mapping[str, Any]
    any_name: bool = False

    def describe(self) -> str:
        """``name: type, ...`` on one line (``name`` alone when unannotated)."""
        items = [
            name if t is inspect.Parameter.empty else f"{name}: {_type_name(t)}"
            for name, t in self.types.items()
        ]
        if self.any_name:
            items.append("any other name (as a string)")
        return ", ".join(items) or "none"

    def check_names(self, names: Sequence[str]) -> None:
        """Raise ``LaionRayError`` naming the first parameter the UDF does not declare."""
        for name in names:
            if name not in self.types and not self.any_name:
                raise LaionRayError(
                    f"--param {self.udf}.{name}: {self.udf} has no parameter {name!r}; "
                    f"its parameters: {self.describe()}"
                )

    def convert(self, raw: Mapping[str, str]) -> dict[str, Any]:
        """Command-line strings as the declared types (see :func:`convert_value`)."""
        self.check_names(list(raw))
        out = {}
        for name, text in raw.items():
            annotation = self.types.get(name, inspect.Parameter.empty)
            try:
                out[name] = convert_value(annotation, text)
            except ValueError as exc:
                raise LaionRayError(
                    f"--param {self.udf}.{name}={text!r}: expected {_type_name(annotation)}, "
                    f"{exc}; {self.udf} parameters: {self.describe()}"
                ) from exc
        return out


def udf_parameters(spec: str | UDF) -> Parameters:
    """What ``--param`` may set on ``spec``, read with ``inspect.signature``.

    - a registered name, or a factory given as ``module:factory``: the
      factory's parameters (its ``**resources``: :data:`RESOURCE_OPTIONS`);
    - a UDF object (given, or ``module:Name``): its compute function's
      parameters after the batch, or its class's ``__init__`` parameters.

    Raises:
        LaionRayError: ``spec`` is unknown, or cannot be imported.
    """
    name = spec if isinstance(spec, str) else spec.name
    target = spec if isinstance(spec, UDF) else _target(spec)
    if isinstance(target, UDF):
        fn, skip_batch = target.compute, not inspect.isclass(target.compute)
        types_, var_keyword = _keyword_parameters(fn, skip_first=skip_batch)
        return Parameters(name, types_, any_name=var_keyword)
    if not callable(target):
        raise LaionRayError(f"{name!r} is neither a UDF nor a factory returning UDFs")
    types_, var_keyword = _keyword_parameters(target, skip_first=False)
    if var_keyword:
        hints = typing.get_type_hints(UDF)
        types_ = {**types_, **{r: hints[r] for r in RESOURCE_OPTIONS if r not in types_}}
    return Parameters(name, types_)


def typed_params(
    udfs: Sequence[str | UDF], raw: Mapping[str, Mapping[str, str]]
) -> dict[str, dict[str, Any]]:
    """``--param`` strings per UDF of the job, converted by each UDF's declared types.

    Args:
        udfs: The job's UDFs, as ``--udf`` names them.
        raw: UDF name -> parameter name -> the string given.

    Raises:
        LaionRayError: a UDF not in the job, an unknown parameter name, or a
            value that does not convert (one line, naming the UDF's parameters).
    """
    _check_in_job(udfs, raw)
    by_name = {(u if isinstance(u, str) else u.name): u for u in udfs}
    return {name: udf_parameters(by_name[name]).convert(values) for name, values in raw.items()}


def check_params(udfs: Sequence[str | UDF], params: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse a parameter that a UDF of the job does not declare.

    The Python API's check: its values are already typed, so they are not
    converted, and one parameter dict may serve several jobs (entries for UDFs
    not in this one are left alone; the CLI refuses those, see :func:`typed_params`).
    """
    for u in udfs:
        name = u if isinstance(u, str) else u.name
        if params.get(name):
            udf_parameters(u).check_names(list(params[name]))


def _check_in_job(udfs: Sequence[str | UDF], params: Mapping[str, Any]) -> None:
    names = [u if isinstance(u, str) else u.name for u in udfs]
    for name, values in params.items():
        if name not in names:
            keys = ", ".join(f"{name}.{k}" for k in values) or name
            raise LaionRayError(
                f"--param {keys}: UDF {name!r} is not in this job (its UDFs: {', '.join(names)})"
            )


def convert_value(annotation: Any, text: str) -> Any:
    """One command-line string as ``annotation`` says.

    ``str`` keeps it, ``int``/``float`` parse it, ``bool`` takes
    ``true/false/1/0/yes/no`` (any case), ``X | None`` also takes ``null``,
    ``Literal[...]`` one of its choices, and containers (``list``, ``tuple``,
    ``Mapping``, ``Sequence``...) a JSON value of their shape, checked. An
    unannotated (or ``Any``) parameter keeps the string. Validation is
    pydantic's (lax mode: strings are parsed, never guessed from JSON).

    Raises:
        ValueError: the text does not convert; the message says why.
    """
    if annotation is inspect.Parameter.empty or annotation is Any:
        return text
    if text.strip().lower() == NULL and _admits_none(annotation):
        return None
    for choice in _literal_choices(annotation):
        if not isinstance(choice, str) and str(choice) == text.strip():
            return choice  # Literal[1, 2]: the text of a non-string choice
    value: Any = text
    if _has_container(annotation):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            if not any(m is str for m in _union_members(annotation)):
                raise ValueError(f"a JSON value, not {text!r} ({exc.msg})") from exc
            # a union with str (str | list[str]) takes the text itself
    from pydantic import PydanticSchemaGenerationError, TypeAdapter, ValidationError

    try:
        adapter = TypeAdapter(annotation)
    except PydanticSchemaGenerationError as exc:
        raise ValueError("a type that cannot be given on the command line") from exc
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"]
        raise ValueError(reason[:1].lower() + reason[1:]) from exc


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _admits_none(annotation: Any) -> bool:
    return any(m is type(None) or m is None for m in _union_members(annotation))


def _literal_choices(annotation: Any) -> list[Any]:
    return [
        c
        for m in _union_members(annotation)
        if typing.get_origin(m) is typing.Literal
        for c in typing.get_args(m)
    ]


def _has_container(annotation: Any) -> bool:
    for member in _union_members(annotation):
        origin = typing.get_origin(member) or member
        if (
            isinstance(origin, type)
            and issubclass(origin, collections.abc.Collection)
            and not issubclass(origin, (str, bytes))
        ):
            return True
    return False


def _type_name(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return "a string (unannotated)"
    return inspect.formatannotation(annotation)


def _keyword_parameters(fn: Callable[..., Any], *, skip_first: bool) -> tuple[dict[str, Any], bool]:
    """``({name: annotation}, takes **kwargs)`` of the parameters a keyword can set."""
    params = list(_signature(fn).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if skip_first and params and params[0].kind in positional:
        params = params[1:]  # the batch
    settable = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return (
        {p.name: p.annotation for p in params if p.kind in settable},
        any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params),
    )


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    """``fn``'s signature with its annotations evaluated (``from __future__ import
    annotations`` makes them strings); one that does not evaluate counts as absent."""
    try:
        return inspect.signature(fn, eval_str=True)
    except Exception:  # a name only imported under TYPE_CHECKING, say: evaluate one by one
        signature = inspect.signature(fn)
    owner = fn.__init__ if inspect.isclass(fn) else fn
    namespace = getattr(owner, "__globals__", None) or vars(sys.modules[fn.__module__])
    params = []
    for p in signature.parameters.values():
        annotation = p.annotation
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, dict(namespace))  # noqa: S307 - the UDF's own code
            except Exception:
                annotation = inspect.Parameter.empty
        params.append(p.replace(annotation=annotation))
    return signature.replace(parameters=params)


def format_param(value: Any) -> str:
    """A typed value as ``--param`` text that :func:`convert_value` reads back as it is.

    ``None`` -> ``null``, bools -> ``true``/``false``, containers -> JSON,
    everything else its ``str``.
    """
    if value is None:
        return NULL
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def _load_builtins() -> None:
    # Importing the package registers the built-in UDFs; the heavy ones import
    # torch lazily, so this stays cheap.
    importlib.import_module("laion_ray.udfs")
