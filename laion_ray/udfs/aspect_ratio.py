"""``aspect-ratio``: width / height and the seed card's ``is_high_res`` flag."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

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
    width = pc.cast(batch["width"], pa.float64())
    height = pc.cast(batch["height"], pa.float64())
    # Arrow kernels keep nulls as nulls: a null size gives nulls in both columns.
    valid = pc.and_(pc.greater(width, 0), pc.greater(height, 0))
    high_res = pc.and_(
        pc.greater_equal(width, HIGH_RES_MIN_SIDE), pc.greater_equal(height, HIGH_RES_MIN_SIDE)
    )
    return pa.table(
        {
            "aspect_ratio": pc.if_else(valid, pc.divide(width, height), None),
            "is_high_res": high_res,
        },
        schema=ASPECT_RATIO_SCHEMA,
    )


@register("aspect-ratio")
def make_aspect_ratio(**resources) -> list[UDF]:
    return [aspect_ratio.with_options(**resources)]
