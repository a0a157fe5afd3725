"""``moderation-rules``: the seed card's label rule as a real UDF.

The card's SQL (``CASE WHEN "NSFW" > 0.5 ...``) is refused by pylance, so the
rule lives here, with thresholds that may also use ``similarity``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from laion_ray.udf import UDF, register

MODERATION_RULES_SCHEMA = pa.schema([pa.field("moderation_label", pa.string())])


def moderation_rules(
    batch: pa.Table,
    *,
    nsfw_threshold: float = 0.5,
    min_similarity: float | None = None,
    nsfw_score_threshold: float | None = None,
    flagged_label: str = "review",
    ok_label: str = "ok",
) -> pa.Table:
    """Label ``flagged_label`` when ``NSFW > nsfw_threshold`` (or, if
    ``min_similarity`` is set, when ``similarity < min_similarity``; or, if
    ``nsfw_score_threshold`` is set, when the ``embedding-head`` NSFW score
    ``nsfw_score > nsfw_score_threshold``), else ``ok_label``.

    A null ``NSFW`` gives a null label: an unknown flag is not "ok". A row that
    ``nsfw_score`` flags is flagged whatever ``NSFW`` says; a null score flags nothing.
    """
    nsfw = batch["NSFW"].to_numpy(zero_copy_only=False).astype(np.float64)
    unknown = np.isnan(nsfw)
    flagged = np.nan_to_num(nsfw) > nsfw_threshold
    if min_similarity is not None:
        sim = batch["similarity"].to_numpy(zero_copy_only=False).astype(np.float64)
        flagged |= np.nan_to_num(sim, nan=np.inf) < min_similarity
    if nsfw_score_threshold is not None:
        score = batch["nsfw_score"].to_numpy(zero_copy_only=False).astype(np.float64)
        by_score = np.nan_to_num(score, nan=-np.inf) > nsfw_score_threshold
        flagged |= by_score
        unknown &= ~by_score
    labels = np.where(flagged, flagged_label, ok_label).astype(object)
    labels[unknown] = None
    return pa.table({"moderation_label": pa.array(labels, pa.string())})


@register("moderation-rules")
def make_moderation_rules(
    *,
    nsfw_threshold: float = 0.5,
    min_similarity: float | None = None,
    nsfw_score_threshold: float | None = None,
    flagged_label: str = "review",
    ok_label: str = "ok",
    **resources,
) -> list[UDF]:
    params = {
        "nsfw_threshold": float(nsfw_threshold),
        "min_similarity": None if min_similarity is None else float(min_similarity),
        "flagged_label": flagged_label,
        "ok_label": ok_label,
    }
    inputs = ["NSFW"] + (["similarity"] if min_similarity is not None else [])
    if nsfw_score_threshold is not None:
        # Only when set, so the key (and stored columns' producer) of runs
        # without it stays what it was.
        params["nsfw_score_threshold"] = float(nsfw_score_threshold)
        inputs.append("nsfw_score")
    return [
        UDF(
            name="moderation-rules",
            version="1",
            inputs=tuple(inputs),
            output_schema=MODERATION_RULES_SCHEMA,
            compute=moderation_rules,
            params=params,
            batch_size=65536,
            row_errors=(),  # a null flag gives a null label: any exception is a bug
        ).with_options(**resources)
    ]
