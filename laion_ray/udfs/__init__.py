"""Built-in UDFs. Importing this package registers them by name."""

from laion_ray.udfs import aspect_ratio, moderation_rules  # noqa: F401
