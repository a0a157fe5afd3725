"""``aspect-ratio``: width / height and the seed card's ``is_high_res`` flag."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from laion_ray.udf import UDF, register, udf

HIGH_RES_MIN_SIDE = 512

ASPECT_RATIO_SCHEMA = pa.schema(
    [pa.field("aspect_ratio", pa.float64()), pa.field("is_high_res", pa.bool_())]
)


@udf(
    inputs=["width", "height"],
    outputs=ASPECT_RATIO_SCHEMA,
    name="aspect-ratio",
    batch_size=65536,
    row_errors=(),  # nulls, never raises, for bad sizes: any exception is a bug
)
def aspect_ratio(batch: pa.Table) -> pa.Table:
    """``aspect_ratio = width / height``; null, never inf, for zero or null sizes.

    ``is_high_res`` follows the card: ``width >= 512 AND height >= 512``.
    """
    width = batch["width"].to_numpy(zero_copy_only=False).astype(np.float64)
    height = batch["height"].to_numpy(zero_copy_only=False).astype(np.float64)
    known = ~(np.isnan(width) | np.isnan(height))
    valid = known & (width > 0) & (height > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = width / height
    high_res = (width >= HIGH_RES_MIN_SIDE) & (height >= HIGH_RES_MIN_SIDE)
    return pa.table(
        {
            "aspect_ratio": pa.array(ratio, mask=~valid),
            "is_high_res": pa.array(high_res, mask=~known),
        },
        schema=ASPECT_RATIO_SCHEMA,
    )


@register("aspect-ratio")
def make_aspect_ratio(**resources) -> list[UDF]:
    return [aspect_ratio.with_options(**resources)]
