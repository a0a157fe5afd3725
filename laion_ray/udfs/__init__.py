"""Built-in UDFs. Importing this package registers them by name.

``clip`` imports torch and open_clip only when a model stage starts.
"""

from laion_ray.udfs import aspect_ratio, clip, moderation_clip, moderation_rules  # noqa: F401
