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
    flagged_label: str = "review",
    ok_label: str = "ok",
) -> pa.Table:
    """Label ``flagged_label`` when ``NSFW > nsfw_threshold`` (or, if
    ``min_similarity`` is set, when ``similarity < min_similarity``), else ``ok_label``.

    A null ``NSFW`` gives a null label: an unknown flag is not "ok".
    """
    nsfw = batch["NSFW"].to_numpy(zero_copy_only=False).astype(np.float64)
    unknown = np.isnan(nsfw)
    flagged = np.nan_to_num(nsfw) > nsfw_threshold
    if min_similarity is not None:
        sim = batch["similarity"].to_numpy(zero_copy_only=False).astype(np.float64)
        flagged |= np.nan_to_num(sim, nan=np.inf) < min_similarity
    labels = np.where(flagged, flagged_label, ok_label).astype(object)
    labels[unknown] = None
    return pa.table({"moderation_label": pa.array(labels, pa.string())})


@register("moderation-rules")
def make_moderation_rules(
    *,
    nsfw_threshold: float = 0.5,
    min_similarity: float | None = None,
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
