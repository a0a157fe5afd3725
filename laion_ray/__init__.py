"""laion-ray: backfill, re-embed and re-index LAION-style Lance tables on Ray."""

__version__ = "0.1.0"
