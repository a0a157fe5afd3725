"""``moderation-clip``: zero-shot labels from CLIP image embeddings.

The cosine between an image embedding (an existing column, or one computed by
``clip-embed`` in the same pass) and a few text prompts, embedded once per
actor with the same model, picks the label; a rule can force the ``NSFW`` flag.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laion_ray.clip_model import DEFAULT_MODEL, ModelSpec, default_embedding_column, embed_texts
from laion_ray.errors import LaionRayError
from laion_ray.udf import UDF, register
from laion_ray.udfs.clip import check_name, list_to_numpy

logger = logging.getLogger(__name__)

# Prompts are embedded once per actor: full precision costs nothing.
PROMPT_PRECISION = "fp32"
DEFAULT_PROMPTS: dict[str, str] = {
    "safe": "a safe photo",
    "nsfw": "an explicit nsfw photo",
    "violence": "a violent photo",
    "medical": "a medical photo",
}


# --- moderation ---------------------------------------------------------------------


class ClipModeration:
    """Actor: image embedding -> the label of the closest prompt, and its cosine.

    The prompts are embedded once, at construction; the model is then dropped,
    so a batch is one matrix product.
    """

    def __init__(
        self,
        *,
        device: str | None,
        prompts: Mapping[str, str | Sequence[str]],
        embedding_column: str,
        column: str,
        score_column: str,
        use_nsfw_flag: bool,
        nsfw_label: str,
        nsfw_threshold: float,
        **spec_params: Any,
    ) -> None:
        import torch

        # The prompts are embedded once, in fp32 whatever the device.
        spec = ModelSpec(**spec_params, precision=PROMPT_PRECISION)
        net, _, tokenizer, info = spec.load_in_actor(device=device)
        self.device = info["device"]  # where it ran, for the job report
        device = torch.device(self.device)
        self.labels = list(prompts)
        rows = []
        for label in self.labels:
            texts = prompts[label]
            texts = [texts] if isinstance(texts, str) else list(texts)
            mean = embed_texts(net, tokenizer, texts, device, None).mean(axis=0)  # ensemble
            rows.append(mean / np.linalg.norm(mean))
        self.text_emb = np.stack(rows).astype(np.float32)
        del net  # only the prompt embeddings are needed from here on
        self.embedding_column = embedding_column
        self.column = column
        self.score_column = score_column
        self.use_nsfw_flag = use_nsfw_flag
        self.nsfw_index = self.labels.index(nsfw_label) if use_nsfw_flag else None
        self.nsfw_threshold = nsfw_threshold

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """``(n, dim)`` embeddings -> ``(n, labels)`` cosines."""
        if embeddings.shape[1] != self.text_emb.shape[1]:
            raise LaionRayError(
                f"column {self.embedding_column!r} has {embeddings.shape[1]}-d embeddings "
                f"but the model's are {self.text_emb.shape[1]}-d; embed with the same model"
            )
        emb = embeddings.astype(np.float32)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        return (emb / np.where(norms > 0, norms, 1)) @ self.text_emb.T

    def _flagged(self, batch: pa.Table) -> np.ndarray:
        """NSFW flag per row: numeric >= threshold, or LAION's string ``"NSFW"``."""
        flag = batch["NSFW"]
        if pa.types.is_string(flag.type) or pa.types.is_large_string(flag.type):
            values = pc.fill_null(pc.utf8_upper(flag), "").to_numpy(zero_copy_only=False)
            return values == "NSFW"
        values = pc.cast(flag, pa.float64()).to_numpy(zero_copy_only=False)
        return np.nan_to_num(values, nan=-np.inf) >= self.nsfw_threshold

    def __call__(self, batch: pa.Table) -> pa.Table:
        emb, valid = list_to_numpy(batch[self.embedding_column], self.embedding_column)
        n = batch.num_rows
        sims = self.scores(emb) if len(emb) else np.zeros((0, len(self.labels)), np.float32)
        top = sims.argmax(axis=1) if len(emb) else np.zeros(0, np.int64)
        index = np.zeros(n, dtype=np.int64)
        score = np.zeros(n, dtype=np.float32)
        index[valid] = top
        score[valid] = sims[np.arange(len(top)), top]
        if self.use_nsfw_flag:
            forced = self._flagged(batch) & valid
            index[forced] = self.nsfw_index
            full = np.zeros((n, len(self.labels)), np.float32)
            full[valid] = sims
            score[forced] = full[forced, self.nsfw_index]
        labels = np.asarray(self.labels, dtype=object)[index]
        labels[~valid] = None
        mask = None if valid.all() else ~valid
        return pa.table(
            {
                self.column: pa.array(labels, pa.string()),
                self.score_column: pa.array(score, pa.float32(), mask=mask),
            }
        )


def _check_prompts(prompts: Any) -> dict[str, str | list[str]]:
    if not isinstance(prompts, Mapping) or not prompts:
        raise LaionRayError(
            f"prompts must be a non-empty {{label: prompt}} mapping, got {prompts!r}"
        )
    out: dict[str, str | list[str]] = {}
    for label, text in prompts.items():
        texts = [text] if isinstance(text, str) else text
        if (
            not isinstance(label, str)
            or not label
            or not isinstance(texts, Sequence)
            or not texts
            or not all(isinstance(t, str) and t for t in texts)
        ):
            raise LaionRayError(
                f"bad prompt {label!r}: {text!r} (want a string or list of strings)"
            )
        out[label] = text if isinstance(text, str) else list(text)
    return out


@register("moderation-clip")
def make_moderation_clip(
    *,
    model: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    random_weights: bool = False,
    embedding_column: str | None = None,
    prompts: Mapping[str, str | Sequence[str]] | None = None,
    column: str = "moderation_clip_label",
    score_column: str = "moderation_clip_score",
    use_nsfw_flag: bool = False,
    nsfw_label: str = "nsfw",
    nsfw_threshold: float = 0.5,
    device: str | None = None,
    seed: int = 0,
    batch_size: int = 4096,
    **resources: Any,
) -> list[UDF]:
    """Zero-shot moderation label from an image-embedding column.

    Args:
        model, pretrained, checkpoint, random_weights, seed: The CLIP model whose
            text tower embeds the prompts; it must be the model that made
            ``embedding_column``.
        embedding_column: Image embeddings to label; default the column
            ``clip-embed`` writes for ``model`` (run both in one pass), or an
            existing column such as ``img_emb``.
        prompts: ``{label: prompt or [prompts]}``; several prompts are averaged.
            Default :data:`DEFAULT_PROMPTS`.
        column, score_column: Outputs: the label (string) and its cosine (float32).
            Not ``moderation_label``, which ``moderation-rules`` writes.
        use_nsfw_flag: Rows whose ``NSFW`` flag is set (``>= nsfw_threshold``, or
            the string ``"NSFW"``) get ``nsfw_label`` whatever the cosines say.
        nsfw_label: The label forced by the flag; must be one of ``prompts``.
        device: Device that embeds the prompts (default: the actor's GPU if Ray
            gave it one, else the CPU). Like every class UDF, the actor pool
            is sized from the cluster (:mod:`laion_ray.cluster`); pass
            ``num_gpus=0`` to keep it off the GPUs.

    Returns:
        ``[moderation-clip]``.
    """
    spec = ModelSpec(model, pretrained, checkpoint, random_weights, seed).checked()
    spec.config()  # unknown model or tag fails here, not in an actor
    prompts = _check_prompts(DEFAULT_PROMPTS if prompts is None else prompts)
    embedding_column = check_name(
        embedding_column or default_embedding_column(spec.model), "embedding_column"
    )
    column, score_column = check_name(column, "column"), check_name(score_column, "score_column")
    if column == score_column:
        raise LaionRayError(f"column and score_column are both {column!r}")
    if use_nsfw_flag and nsfw_label not in prompts:
        raise LaionRayError(f"nsfw_label {nsfw_label!r} is not a prompt label: {list(prompts)}")
    params = {
        **spec.params(precision=False),  # fixed: PROMPT_PRECISION
        "device": device,
        "prompts": prompts,
        "embedding_column": embedding_column,
        "column": column,
        "score_column": score_column,
        "use_nsfw_flag": bool(use_nsfw_flag),
        "nsfw_label": nsfw_label,
        "nsfw_threshold": float(nsfw_threshold),
    }
    schema = pa.schema([pa.field(column, pa.string()), pa.field(score_column, pa.float32())])
    inputs = [embedding_column] + (["NSFW"] if use_nsfw_flag else [])
    return [
        UDF(
            name="moderation-clip",
            version="1",
            inputs=tuple(inputs),
            output_schema=schema,
            compute=ClipModeration,
            params=params,
            num_cpus=0.5,
            batch_size=batch_size,
            row_errors=(),  # null embeddings give null labels: any exception is a bug
        ).with_options(**resources)
    ]
