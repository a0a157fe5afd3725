"""``clip-embed``: open_clip image (and caption) embeddings, in two stages.

Where the images are decoded is the ``decode`` parameter: ``cpu``, ``device``
or ``auto`` (the default). The planner (:func:`laion_ray.cluster.plan_stages`)
picks the pipeline's shape from the plan, never from the driver's hardware:
``auto`` decodes on the device when the model stage gets GPUs from the cluster.

``decode=cpu``, decoding scales on CPUs apart from the model:

1. ``clip-preprocess`` (function task): image bytes -> ``_clip_pixels_<h>x<w>``,
   uint8 pixels resized and cropped like open_clip's ``preprocess`` (see
   :mod:`laion_ray.preprocess`). Its identity holds only the geometry (and the
   decode mode), not the model, so two CLIP UDFs with the same image size in
   one run decode once.
2. ``clip-embed`` (actor; one GPU when the cluster has GPUs, else one CPU; the
   pool is sized from the cluster by :mod:`laion_ray.cluster`): normalises the
   pixels on the model's device and writes L2-normalised float32 embeddings,
   and optionally caption embeddings.

``decode=device``, the model's device decodes (an H200 embeds ViT-B/32 faster
than ~19 CPUs decode):

1. ``clip-preprocess`` (function task, next to the read) only reads each
   image's header (:func:`laion_ray.preprocess.decode_route`): it refuses what
   the header shows to be bad, and names the decoder for the rest in a small
   ``_clip_decode_route`` column.
2. ``clip-embed`` (:class:`ClipEmbedDecoding`) gets the bytes, decodes, resizes
   and normalises them on its device (:mod:`laion_ray.device_decode`), in
   chunks, so that the decode of one chunk overlaps the model on the last. An
   actor with no CUDA device decodes on its CPU: with the same torch code for
   ``decode=device``, with the ``decode=cpu`` decoder for ``auto``.

Either way a corrupt image is a row error, ``moderation-clip`` and
``clip-score`` in the same run read ``clip-embed``'s embeddings (one decode),
and the job report says what decoded, per actor, and how many rows fell back
to the host decoder.

Model loading lives in :mod:`laion_ray.clip_model`; torch is imported lazily.

Examples:
    >>> stages = make_clip_embed(model="ViT-B-32", pretrained="laion2b_s34b_b79k")  # doctest: +SKIP
    >>> [s.name for s in stages]  # doctest: +SKIP
    ['clip-preprocess', 'clip-embed']
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laion_ray.clip_model import (
    DEFAULT_MODEL,
    ModelSpec,
    autocast,
    check_device,
    default_embedding_column,
    embed_texts,
    model_slug,
    pixel_column,
    unit_float32,
)
from laion_ray.errors import LaionRayError
from laion_ray.preprocess import (
    ImageDecodeError,
    PixelSpec,
    decode_route,
    preprocess_images,
)
from laion_ray.udf import UDF, register

logger = logging.getLogger(__name__)

# Rows per preprocess task. Fixed (not the model's batch size) so the stage is
# identical, and so run once, for every CLIP UDF of a run with the same image size.
PREPROCESS_BATCH_SIZE = 256
DECODE_MODES = ("cpu", "device", "auto")
# decode=device: each row's decoder, from the header check to the model actor.
ROUTE_COLUMN = "_clip_decode_route"
# decode=device: model batches per actor call. The decode of one overlaps the
# model on the one before; more chunks leave less of the decode exposed.
DEVICE_CALL_CHUNKS = 4
# The first chunk of a call is this fraction of a model batch: its decode is the
# one nothing overlaps.
FIRST_CHUNK_FRACTION = 8


# --- arrow helpers ----------------------------------------------------------------


def _embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def fixed_list(values: np.ndarray, valid: np.ndarray, dim: int) -> pa.Array:
    """``(n_valid, dim)`` values scattered into ``len(valid)`` rows, null where invalid."""
    n = len(valid)
    full = np.zeros((n, dim), dtype=np.float32)
    full[valid] = values
    mask = None if valid.all() else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), dim, mask=mask)


def valid_mask(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.is_valid(column).to_numpy(zero_copy_only=False), dtype=bool)


def list_to_numpy(column: pa.ChunkedArray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Valid rows of a (fixed-size or variable) list column as a 2-D array, and the mask."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = valid_mask(array)
    kind = array.type
    if not (
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    ):
        raise LaionRayError(f"column {name!r} must be a list of numbers, got {array.type}")
    present = array.filter(pa.array(valid)) if not valid.all() else array
    n = len(present)
    flat = present.flatten().to_numpy(zero_copy_only=False)
    if n and flat.size % n:
        raise LaionRayError(f"column {name!r} has lists of different lengths")
    return flat.reshape(n, -1 if n else 0), valid


# --- stage 1: preprocess ----------------------------------------------------------


def clip_preprocess(
    batch: pa.Table,
    *,
    size: Sequence[int],
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
    fill_color: int = 0,
    decode: str = "cpu",
) -> pa.Table:
    """``image`` bytes -> uint8 pixels (``fixed_size_list<uint8, h*w*3>``, HWC order).

    ``decode`` is the user's choice, planned as this stage (``cpu``, or ``auto``
    where the model has no GPU); it does not change the pixels.

    Raises:
        ImageDecodeError: on the first image that cannot be decoded; the engine
            bisects the batch to find it.
    """
    spec = PixelSpec(tuple(size), resize_mode, interpolation, fill_color)
    pixels = preprocess_images(batch["image"].to_pylist(), spec)
    array = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), spec.num_values)
    return pa.Table.from_arrays([array], names=[pixel_column(spec)])


def clip_decode_check(batch: pa.Table, **params: Any) -> pa.Table:
    """``image`` bytes -> each row's decoder (int8, see :func:`decode_route`), for
    ``decode=device``; ``params`` are the stage's (geometry and mode), unused.

    Raises:
        ImageDecodeError: on the first image whose header is already bad; the
            engine bisects the batch to find it.
    """
    routes = [decode_route(data) for data in batch["image"].to_pylist()]
    return pa.table({ROUTE_COLUMN: pa.array(routes, pa.int8())})


def preprocess_stage(spec: PixelSpec, decode: str = "auto", **resources: Any) -> UDF:
    """The decode stage: equal for every model with the same geometry and decode mode.

    Planned as the decode itself (:func:`clip_preprocess`) or, where the model
    decodes on its device, as the header check (:func:`decode_on_device`).
    """
    field = pa.field(pixel_column(spec), pa.list_(pa.uint8(), spec.num_values))
    return UDF(
        name="clip-preprocess",
        version="1",
        inputs=("image",),
        output_schema=pa.schema([field]),
        compute=clip_preprocess,
        params={**spec.as_params(), "decode": decode},
        batch_size=PREPROCESS_BATCH_SIZE,
        row_errors=(ImageDecodeError,),  # only undecodable images are bad rows
    ).with_options(**resources)


def decode_on_device(pre: UDF, embed: UDF) -> tuple[UDF, UDF]:
    """The ``decode=device`` shape of a planned ``[clip-preprocess, clip-embed]`` pair.

    ``clip-preprocess`` keeps its name, key and resources (its error column
    records the rows whose header is bad, in both shapes) but only checks
    headers; ``clip-embed`` reads the bytes and the route, and decodes.

    Raises:
        ValueError: ``embed`` is not a ``clip-embed`` stage fed by ``pre``.
    """
    pixels = pre.outputs[0]
    if embed.compute is not ClipEmbed or embed.params.get("pixel_column") != pixels:
        raise ValueError(f"{embed.name} does not read {pre.name}'s pixels")
    check = pre.with_options(
        compute=clip_decode_check,
        output_schema=pa.schema([pa.field(ROUTE_COLUMN, pa.int8())]),
    )
    inputs = tuple(c for c in embed.inputs if c != pixels)
    decoding = embed.with_options(
        compute=ClipEmbedDecoding,
        inputs=("image", ROUTE_COLUMN, *inputs),
        # The actor's call holds DEVICE_CALL_CHUNKS model batches (see chunk_bounds).
        batch_size=embed.batch_size * DEVICE_CALL_CHUNKS,
        params={
            "image_input": "image",
            "route_column": ROUTE_COLUMN,
            "decode": pre.params.get("decode", "auto"),
            "model_batch": embed.batch_size,
        },
        # The actor decodes: a corrupt image is a bad row, anything else systemic.
        row_errors=(ImageDecodeError,),
    )
    return check, decoding


def chunk_bounds(rows: int, model_batch: int) -> list[tuple[int, int]]:
    """``(start, end)`` of the model batches of one ``decode=device`` call.

    The first is small (1/:data:`FIRST_CHUNK_FRACTION` of a batch): nothing runs
    on the device while it decodes. Each later one decodes while the model
    works on the one before.

    Examples:
        >>> chunk_bounds(1024, 256)
        [(0, 32), (32, 288), (288, 544), (544, 800), (800, 1024)]
    """
    if rows <= 0:
        return []
    first = min(rows, max(1, model_batch // FIRST_CHUNK_FRACTION))
    starts = [0, *range(first, rows, max(1, model_batch))]
    return list(zip(starts, [*starts[1:], rows], strict=True))


# --- stage 2: the model -----------------------------------------------------------


class ClipEmbed:
    """Actor: pixels (and captions) -> L2-normalised float32 embeddings.

    Constructed once per actor with the stage's ``params``; loads the model then.
    Rows with null pixels or captions (normally skipped by the engine) give nulls.
    """

    def __init__(
        self,
        *,
        device: str | None,
        num_threads: int | None,
        pixel_column: str,
        size: Sequence[int],
        column: str,
        caption_input: str | None = None,
        caption_column: str | None = None,
        **spec_params: Any,
    ) -> None:
        import torch

        spec = ModelSpec(**spec_params)
        self.net, _, self.tokenizer, self.info = spec.load_in_actor(
            device=device, num_threads=num_threads
        )
        cfg = self.info["preprocess_cfg"]
        loaded = PixelSpec.from_preprocess_cfg(cfg).size
        if loaded != tuple(size):
            raise LaionRayError(
                f"model {spec.model!r} expects {loaded} pixels but the stage was planned for {size}"
            )
        self.device = torch.device(self.info["device"])
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.info["precision"])
        self.mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1)
        self.size = tuple(size)
        self.dim = self.info["embed_dim"]
        self.pixel_column = pixel_column
        self.column = column
        self.caption_input = caption_input
        self.caption_column = caption_column

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """``(n, h, w, 3)`` uint8 -> ``(n, dim)`` float32; normalised on the device."""
        import torch

        if not pixels.flags.writeable:
            pixels = pixels.copy()  # torch wants writable memory; 150 KB per image
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(self.mean).div_(self.std)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            return unit_float32(self.net.encode_image(x))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Captions -> ``(n, dim)`` float32."""
        return embed_texts(self.net, self.tokenizer, texts, self.device, self.dtype)

    def placement_facts(self) -> dict[str, Any]:
        """What this actor reports for the job report (:func:`laion_ray.cluster.record_actor`)."""
        return {"decode": "cpu", "decode_in": "tasks"}

    def image_embeddings(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """``(valid rows, dim)`` embeddings and the ``(rows,)`` valid mask."""
        h, w = self.size
        flat, valid = list_to_numpy(batch[self.pixel_column], self.pixel_column)
        pixels = flat.reshape(-1, h, w, 3)
        emb = self.embed_pixels(pixels) if len(pixels) else np.zeros((0, self.dim), np.float32)
        return emb, valid

    def __call__(self, batch: pa.Table) -> pa.Table:
        emb, valid = self.image_embeddings(batch)
        columns = {self.column: fixed_list(emb, valid, self.dim)}
        if self.caption_input is not None:
            captions = batch[self.caption_input]
            cap_valid = valid_mask(captions)
            texts = [t for t in captions.to_pylist() if t is not None]
            cap = self.embed_texts(texts) if texts else np.zeros((0, self.dim), np.float32)
            columns[self.caption_column] = fixed_list(cap, cap_valid, self.dim)
        return pa.table(columns)


class ClipEmbedDecoding(ClipEmbed):
    """Actor for ``decode=device``: image bytes (and captions) -> embeddings.

    Decodes on its own device (:class:`laion_ray.device_decode.DevicePreprocess`)
    in chunks (:func:`chunk_bounds`): the device decode of chunk ``k + 1`` and
    the host fallback of its odd rows run while the model, already queued,
    works on chunk ``k``; the embeddings come back in one transfer at the end.
    Without a CUDA device it decodes on its CPU: with the same torch code for
    ``decode="device"``, with the ``decode=cpu`` decoder for ``"auto"``.

    A corrupt image raises :class:`ImageDecodeError` (the engine bisects the
    batch to the row); the results of the failing call are kept by content, so
    the bisection's calls neither decode nor embed the batch again.
    """

    def __init__(
        self,
        *,
        image_input: str,
        route_column: str,
        decode: str,
        model_batch: int,
        **stage_params: Any,
    ) -> None:
        from laion_ray.device_decode import DevicePreprocess

        super().__init__(**stage_params)
        self.image_input = image_input
        self.route_column = route_column
        self.model_batch = int(model_batch)
        on_device = self.device.type == "cuda" or decode == "device"
        self.decode_mode = "device" if on_device else "cpu"
        self.preprocess = DevicePreprocess(
            self.info["preprocess_cfg"], self.device, device_decoder=on_device
        )
        self.fallback_rows = 0
        self._reported_fallback = 0
        self._report: Callable[[dict[str, Any]], None] | None = None
        # Results of the last call that met a bad image, by image bytes.
        self._memo: dict[bytes, np.ndarray | str] | None = None

    def placement_facts(self) -> dict[str, Any]:
        return {
            "decode": self.decode_mode,
            "decode_in": "actor",
            "decode_fallback_rows": self.fallback_rows,
        }

    def set_placement_reporter(self, report: Callable[[dict[str, Any]], None]) -> None:
        """Called by :func:`laion_ray.cluster.record_actor`: how to update the facts."""
        self._report = report

    def image_embeddings(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        images = batch[self.image_input].to_pylist()
        routes = batch[self.route_column].to_numpy(zero_copy_only=False)
        memo = self._memo
        if memo is None or not all(image in memo for image in images):
            self._memo = None
            emb, errors = self._embed_images(images, routes)
            self._report_fallback()
            if not errors:
                return emb, np.ones(len(images), dtype=bool)
            memo = self._memo = {image: errors.get(i, emb[i]) for i, image in enumerate(images)}
        results = [memo[image] for image in images]
        bad = [r for r in results if isinstance(r, str)]
        if bad:
            if len(images) == 1:
                raise ImageDecodeError(bad[0])
            raise ImageDecodeError(f"{len(bad)} of {len(images)} images do not decode: {bad[0]}")
        return np.stack(results), np.ones(len(images), dtype=bool)

    def _embed_images(
        self, images: list[bytes], routes: np.ndarray
    ) -> tuple[np.ndarray, dict[int, str]]:
        """``(rows, dim)`` embeddings (zeros where a row failed) and the failures."""
        import torch

        n = len(images)
        ok = np.zeros(n, dtype=bool)
        errors: dict[int, str] = {}
        features = []
        with torch.inference_mode():
            for start, end in chunk_bounds(n, self.model_batch):
                prepared = self.preprocess(images[start:end], routes[start:end])
                ok[start:end] = prepared.ok
                errors.update({start + i: message for i, message in prepared.errors.items()})
                self.fallback_rows += prepared.fallback
                if len(prepared.pixels):
                    with autocast(self.device, self.dtype):
                        # Queued, not waited for: the next chunk decodes meanwhile.
                        features.append(self.net.encode_image(prepared.pixels))
            emb = np.zeros((n, self.dim), dtype=np.float32)
            if features:
                emb[ok] = unit_float32(torch.cat(features))
        return emb, errors

    def _report_fallback(self) -> None:
        # Synchronous, and only when the count changed (a rare row kind): an
        # actor may be stopped right after its last batch, with no later call.
        if self._report is None or self.fallback_rows == self._reported_fallback:
            return
        self._reported_fallback = self.fallback_rows
        self._report({"decode_fallback_rows": self.fallback_rows})


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise LaionRayError(f"{what} must be a non-empty column name, got {value!r}")
    return value


@register("clip-embed")
def make_clip_embed(
    *,
    model: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    random_weights: bool = False,
    column: str | None = None,
    captions: bool = False,
    caption_column: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    seed: int = 0,
    num_threads: int | None = None,
    decode: Literal["cpu", "device", "auto"] = "auto",
    **resources: Any,
) -> list[UDF]:
    """Image (and caption) embeddings with an open_clip model.

    Args:
        model: open_clip name, ``hf-hub:org/repo`` or ``local-dir:/path``.
        pretrained: Pretrained tag, fetched from the hub or its cache.
        checkpoint: Local open_clip state_dict (``.pt``/``.bin``/``.safetensors``);
            must be readable on every worker node.
        random_weights: Allow random weights (testing only; logs a warning).
        column: Output column; default ``img_emb_<model>`` (``column="img_emb"``
            overwrites LAION's column in place).
        captions: Also embed ``caption`` into ``caption_column``.
        caption_column: Default ``caption_emb_<model>``.
        batch_size: Rows per model call; default 32 with ``device="cpu"``, else 256.
        device: ``cpu``/``cuda``; default: each actor uses the GPU Ray gave it,
            the CPU otherwise (see :func:`laion_ray.cluster.actor_device`).
        precision: Autocast dtype ``fp32``/``fp16``/``bf16``; default fp16 on
            CUDA, fp32 on CPU (also for a GPU actor that fell back to the CPU).
        seed: Seed of random weights.
        num_threads: torch threads per CPU actor.
        decode: Where images are decoded: ``cpu`` (decode tasks feed the model
            uint8 pixels), ``device`` (the model actor decodes on its own device:
            nvJPEG on CUDA, the same torch code on a CPU; odd images on its host),
            or ``auto``: ``device`` where the planner gives the model stage GPUs,
            ``cpu`` otherwise, and ``cpu`` in an actor that finds no CUDA device.
        **resources: Overrides for the model stage (``num_cpus``, ``num_gpus``,
            ``concurrency``...); by default the planner sizes them from the cluster.

    Returns:
        ``[clip-preprocess, clip-embed]`` (in the ``decode=cpu`` shape; the
        planner turns it into the ``device`` shape, :func:`decode_on_device`).

    Raises:
        LaionRayError: a bad argument, unknown model or tag, missing checkpoint,
            or no weights named without ``random_weights``.
    """
    if decode not in DECODE_MODES:
        raise LaionRayError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    weights = ModelSpec(model, pretrained, checkpoint, random_weights, seed, precision).checked()
    embed_dim, cfg = weights.config()
    spec = PixelSpec.from_preprocess_cfg(cfg)
    column = check_name(column or default_embedding_column(weights.model), "column")
    if captions:
        caption_column = check_name(
            caption_column or f"caption_emb_{model_slug(weights.model)}", "caption_column"
        )
        if caption_column == column:
            raise LaionRayError(f"caption_column and column are both {column!r}")
    weights.check_precision(check_device(device))
    if batch_size is None:
        batch_size = 32 if device == "cpu" else 256
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LaionRayError(f"batch_size must be a positive integer, got {batch_size!r}")

    fields = [pa.field(column, _embedding_type(embed_dim))]
    inputs = [pixel_column(spec)]
    if captions:
        fields.append(pa.field(caption_column, _embedding_type(embed_dim)))
        inputs.append("caption")
    params = {
        **weights.params(),
        "device": device,
        "num_threads": num_threads,
        "pixel_column": pixel_column(spec),
        "size": list(spec.size),
        "column": column,
        "caption_input": "caption" if captions else None,
        "caption_column": caption_column if captions else None,
    }
    embed = UDF(
        name="clip-embed",
        version="1",
        inputs=tuple(inputs),
        output_schema=pa.schema(fields),
        compute=ClipEmbed,
        params=params,
        batch_size=batch_size,
        row_errors=(),  # pixels of a decoded image always embed: any exception is systemic
        num_cpus=1.0,
    ).with_options(**resources)
    return [preprocess_stage(spec, decode), embed]
