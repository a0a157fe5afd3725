"""``clip-embed``: open_clip image (and caption) embeddings, in two stages.

Decoding scales on CPUs apart from the model:

1. ``clip-preprocess`` (function task): image bytes -> ``_clip_pixels_<h>x<w>``,
   uint8 pixels resized and cropped like open_clip's ``preprocess`` (see
   :mod:`laion_ray.preprocess`). Its identity holds only the geometry, not the
   model, so two CLIP UDFs with the same image size in one run decode once.
2. ``clip-embed`` (actor; one GPU when the cluster has GPUs, else one CPU; the
   pool is sized from the cluster by :mod:`laion_ray.cluster`): normalises the pixels on the
   model's device and writes L2-normalised float32 embeddings, and optionally
   caption embeddings.

Model loading lives in :mod:`laion_ray.clip_model`; torch is imported lazily.

Examples:
    >>> stages = make_clip_embed(model="ViT-B-32", pretrained="laion2b_s34b_b79k")  # doctest: +SKIP
    >>> [s.name for s in stages]  # doctest: +SKIP
    ['clip-preprocess', 'clip-embed']
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

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
from laion_ray.preprocess import ImageDecodeError, PixelSpec, preprocess_images
from laion_ray.udf import UDF, register

logger = logging.getLogger(__name__)

# Rows per preprocess task. Fixed (not the model's batch size) so the stage is
# identical, and so run once, for every CLIP UDF of a run with the same image size.
PREPROCESS_BATCH_SIZE = 256


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
) -> pa.Table:
    """``image`` bytes -> uint8 pixels (``fixed_size_list<uint8, h*w*3>``, HWC order).

    Raises:
        ImageDecodeError: on the first image that cannot be decoded; the engine
            bisects the batch to find it.
    """
    spec = PixelSpec(tuple(size), resize_mode, interpolation, fill_color)
    pixels = preprocess_images(batch["image"].to_pylist(), spec)
    array = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), spec.num_values)
    return pa.Table.from_arrays([array], names=[pixel_column(spec)])


def preprocess_stage(spec: PixelSpec, **resources: Any) -> UDF:
    """The decode stage: equal for every model with the same geometry."""
    field = pa.field(pixel_column(spec), pa.list_(pa.uint8(), spec.num_values))
    return UDF(
        name="clip-preprocess",
        version="1",
        inputs=("image",),
        output_schema=pa.schema([field]),
        compute=clip_preprocess,
        params=spec.as_params(),
        batch_size=PREPROCESS_BATCH_SIZE,
        row_errors=(ImageDecodeError,),  # only undecodable images are bad rows
    ).with_options(**resources)


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

    def __call__(self, batch: pa.Table) -> pa.Table:
        h, w = self.size
        flat, valid = list_to_numpy(batch[self.pixel_column], self.pixel_column)
        pixels = flat.reshape(-1, h, w, 3)
        emb = self.embed_pixels(pixels) if len(pixels) else np.zeros((0, self.dim), np.float32)
        columns = {self.column: fixed_list(emb, valid, self.dim)}
        if self.caption_input is not None:
            captions = batch[self.caption_input]
            cap_valid = valid_mask(captions)
            texts = [t for t in captions.to_pylist() if t is not None]
            cap = self.embed_texts(texts) if texts else np.zeros((0, self.dim), np.float32)
            columns[self.caption_column] = fixed_list(cap, cap_valid, self.dim)
        return pa.table(columns)


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
        **resources: Overrides for the model stage (``num_cpus``, ``num_gpus``,
            ``concurrency``...); by default the planner sizes them from the cluster.

    Returns:
        ``[clip-preprocess, clip-embed]``.

    Raises:
        LaionRayError: a bad argument, unknown model or tag, missing checkpoint,
            or no weights named without ``random_weights``.
    """
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
    return [preprocess_stage(spec), embed]
