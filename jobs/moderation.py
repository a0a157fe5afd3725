"""Backfill ``moderation_label`` from NSFW/similarity thresholds (``ray job submit`` entry point).

Its own flags set the rule; every other flag is ``laion-ray backfill``'s.
Runs one ``backfill(uri, udfs=["moderation-rules"], udf_params=...)``.

Example:
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/moderation.py s3://bucket/laion.lance --nsfw-threshold 0.8 --tag mod-v2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import _common


def main(argv: Sequence[str] | None = None) -> int:
    rule = argparse.ArgumentParser(add_help=False)
    rule.add_argument("--nsfw-threshold", type=float, help="flag rows with NSFW above")
    rule.add_argument("--min-similarity", type=float, help="also flag rows with similarity below")
    rule.add_argument("--flagged-label")
    rule.add_argument("--ok-label")
    known, rest = rule.parse_known_args(sys.argv[1:] if argv is None else argv)
    params = _common.udf_params("moderation-rules", vars(known))
    return _common.run_command("backfill", rest, "--udf", "moderation-rules", *params)


if __name__ == "__main__":
    _common.finish(main())
