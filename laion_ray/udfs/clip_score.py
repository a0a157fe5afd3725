"""``clip-score``: the CLIP image–caption cosine, LAION's ``similarity``.

The image side is an embedding column: one that ``clip-embed`` makes earlier in
the same run (``--udf clip-embed --udf clip-score``: each image is decoded and
embedded once, each caption embedded once, by this stage), or one that it
stored before. Either way the column's producer must be ``clip-embed`` with the
same model and weights; anything else (LAION's own ``img_emb``, another model)
is refused before any work, because a cosine across two models' spaces is
meaningless. The caption side is the same model's text tower.

Examples:
    >>> stages = make_clip_score(model="ViT-B-32", pretrained="laion2b_s34b_b79k")  # doctest: +SKIP
    >>> stages[0].inputs  # doctest: +SKIP
    ('img_emb_vit_b_32', 'caption')
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import pyarrow as pa

from laion_ray.clip_model import (
    DEFAULT_MODEL,
    ModelSpec,
    check_device,
    default_embedding_column,
    embed_texts,
)
from laion_ray.engine.commit import UDF_METADATA
from laion_ray.errors import LaionRayError
from laion_ray.udf import UDF, register
from laion_ray.udfs.clip import check_name, list_to_numpy

logger = logging.getLogger(__name__)


class ClipScore:
    """Actor: image embeddings and captions -> float64 cosine.

    Loads the model once; only its text tower runs. A null embedding or a null
    or blank caption gives a null score.
    """

    def __init__(
        self,
        *,
        device: str | None,
        num_threads: int | None,
        embedding_column: str,
        caption_column: str,
        column: str,
        **spec_params: Any,
    ) -> None:
        import torch

        spec = ModelSpec(**spec_params)
        self.net, _, self.tokenizer, info = spec.load_in_actor(
            device=device, num_threads=num_threads
        )
        self.device = torch.device(info["device"])
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(info["precision"])
        self.dim = info["embed_dim"]
        self.model = spec.model
        self.embedding_column = embedding_column
        self.caption_column = caption_column
        self.column = column

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        emb, has_emb = list_to_numpy(batch[self.embedding_column], self.embedding_column)
        if emb.shape[1] not in (0, self.dim):
            raise LaionRayError(
                f"column {self.embedding_column!r} has {emb.shape[1]}-d embeddings but "
                f"{self.model} embeds in {self.dim}-d; clip-score needs the same model's embeddings"
            )
        captions = batch[self.caption_column].to_pylist()
        has_caption = np.array([bool(c and c.strip()) for c in captions], dtype=bool)
        ok = has_emb & has_caption
        score = np.zeros(n, dtype=np.float64)
        if ok.any():
            images = np.zeros((n, self.dim), dtype=np.float64)
            images[has_emb] = emb
            images = images[ok]
            # Stored embeddings are unit vectors already; normalise anyway so a
            # column written by a float16 cast or a user still gives a cosine.
            images /= np.maximum(np.linalg.norm(images, axis=1, keepdims=True), 1e-12)
            texts = [captions[i] for i in np.flatnonzero(ok)]
            text = embed_texts(self.net, self.tokenizer, texts, self.device, self.dtype)
            score[ok] = np.einsum("ij,ij->i", images, text.astype(np.float64))
        mask = None if ok.all() else ~ok
        return pa.table({self.column: pa.array(score, pa.float64(), mask=mask)})


def check_embedding_producer(
    schema: pa.Schema, *, embedding_column: str, embed_dim: int, model: dict[str, Any]
) -> None:
    """Refuse an embedding column that ``clip-embed`` with ``model`` did not make.

    Args:
        schema: The stage's input fields, with producer metadata (stored, or
            the key of the stage that makes the column earlier in the run).
        embedding_column: The image-embedding input.
        embed_dim: The model's embedding width.
        model: The model's identity (:meth:`ModelSpec.identity`: the weights,
            plus ``seed`` for random weights).

    Raises:
        LaionRayError: the column has another width, no producer metadata, or
            another producer or model; the message says what to run instead.
    """
    field = schema.field(embedding_column)
    kind = field.type
    if not (pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind)) or not (
        pa.types.is_floating(kind.value_type)
    ):
        raise LaionRayError(
            f"clip-score: column {embedding_column!r} must be a list of floats, got {kind}"
        )
    if pa.types.is_fixed_size_list(kind) and kind.list_size != embed_dim:
        raise LaionRayError(
            f"clip-score: column {embedding_column!r} holds {kind.list_size}-d embeddings but "
            f"{model['model']} embeds in {embed_dim}-d"
        )
    wanted = ", ".join(f"{k}={v!r}" for k, v in model.items())
    remedy = (
        "run clip-embed with the same model in the same pass (--udf clip-embed "
        "--udf clip-score), or set embedding_column to a column it wrote"
    )
    key = (field.metadata or {}).get(UDF_METADATA)
    if key is None:
        raise LaionRayError(
            f"clip-score: column {embedding_column!r} has no laion-ray producer metadata, so "
            f"the model that made it is unknown and its cosine with {wanted} caption "
            f"embeddings could mean nothing; {remedy}"
        )
    name, _, params = UDF.parse_key(key.decode())
    made_by = {k: params.get(k) for k in model}
    if name != "clip-embed" or made_by != model:
        producer = ", ".join(f"{k}={v!r}" for k, v in made_by.items())
        raise LaionRayError(
            f"clip-score: column {embedding_column!r} was made by {name} with {producer}, "
            f"not by clip-embed with {wanted}; {remedy}"
        )


@register("clip-score")
def make_clip_score(
    *,
    model: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    random_weights: bool = False,
    seed: int = 0,
    embedding_column: str | None = None,
    caption_column: str = "caption",
    column: str = "similarity",
    batch_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    num_threads: int | None = None,
    **resources: Any,
) -> list[UDF]:
    """The cosine between image embeddings and caption embeddings of one CLIP model.

    Args:
        model, pretrained, checkpoint, random_weights, seed: The CLIP model, as
            for ``clip-embed``; it must be the model that made ``embedding_column``.
        embedding_column: Image embeddings; default the column ``clip-embed``
            writes for ``model``. Made earlier in the same run, or stored by an
            earlier ``clip-embed`` run of the same model (checked before any work).
        caption_column: The captions.
        column: Output, float64. The default ``similarity`` is the card's column
            and needs ``--overwrite``; any other name makes a new column.
        batch_size: Rows per model call; default 256 on CUDA, 64 on CPU.
        device, precision, num_threads: As for ``clip-embed``.
        **resources: Overrides for the stage (``num_cpus``, ``concurrency``...).

    Returns:
        ``[clip-score]``.

    Raises:
        LaionRayError: a bad argument, unknown model or tag, missing checkpoint,
            or no weights named without ``random_weights``.
    """
    spec = ModelSpec(model, pretrained, checkpoint, random_weights, seed, precision).checked()
    embed_dim, _ = spec.config()
    embedding_column = check_name(
        embedding_column or default_embedding_column(spec.model), "embedding_column"
    )
    caption_column = check_name(caption_column, "caption_column")
    column = check_name(column, "column")
    if column in (embedding_column, caption_column):
        raise LaionRayError(f"clip-score would overwrite its own input {column!r}")
    spec.check_precision(check_device(device))
    if batch_size is None:
        batch_size = 64 if device == "cpu" else 256
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LaionRayError(f"batch_size must be a positive integer, got {batch_size!r}")
    identity = spec.identity()
    params = {
        **spec.params(),
        "device": device,
        "num_threads": num_threads,
        "embedding_column": embedding_column,
        "caption_column": caption_column,
        "column": column,
    }
    validate = functools.partial(
        check_embedding_producer,
        embedding_column=embedding_column,
        embed_dim=embed_dim,
        model=identity,
    )
    return [
        UDF(
            name="clip-score",
            version="1",
            inputs=(embedding_column, caption_column),
            output_schema=pa.schema([pa.field(column, pa.float64())]),
            compute=ClipScore,
            params=params,
            batch_size=batch_size,
            validate=validate,
            # Captions are short work next to clip-embed's image actor: half a
            # CPU, like moderation-clip; GPUs and pool size are the planner's.
            num_cpus=0.5,
        ).with_options(**resources)
    ]
