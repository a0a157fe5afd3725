"""Built-in UDFs. Importing this package registers them by name.

``clip`` imports torch and open_clip only when a model stage starts.
"""

from laion_ray.udfs import (  # noqa: F401
    aspect_ratio,
    clip,
    clip_score,
    embedding_head,
    moderation_clip,
    moderation_rules,
)
