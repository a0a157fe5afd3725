"""Re-embed images with an open_clip model (``ray job submit`` entry point).

Model flags: an open_clip model name plus either a pretrained tag (fetched
from the hub where there is a network) or a local checkpoint file; random
weights only with --random-weights (tests and demos). The output column
defaults to img_emb_<model>; --column img_emb --overwrite replaces img_emb in
place. Decoding runs in a separate CPU stage; the model runs on GPU actors
(fp16) when the cluster has GPUs, else on CPU threads. Every other flag is
``laion-ray backfill``'s (--batch-size, --where, --tag, ...).

Examples:
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- python jobs/reembed.py s3://bucket/laion.lance \\
        --model ViT-L-14 --pretrained openai --column img_emb --overwrite
    python jobs/reembed.py ./laion.lance --model ViT-B-32 --checkpoint /models/b32.safetensors \\
        --with-moderation --captions
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import _common


def main(argv: Sequence[str] | None = None) -> int:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--model", default="ViT-B-32", help="open_clip model name (or hf-hub:...)")
    flags.add_argument("--pretrained", help="pretrained tag, e.g. openai or laion2b_s34b_b79k")
    flags.add_argument("--checkpoint", help="local open_clip state_dict (.pt/.bin/.safetensors)")
    flags.add_argument("--random-weights", action="store_true", help="random init (tests only)")
    flags.add_argument("--column", help="output column (default img_emb_<model>)")
    flags.add_argument("--captions", action="store_true", help="also embed captions")
    flags.add_argument("--with-moderation", action="store_true", help="zero-shot labels too")
    flags.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    known, rest = flags.parse_known_args(sys.argv[1:] if argv is None else argv)
    model = {
        "model": known.model,
        "pretrained": known.pretrained,
        "checkpoint": known.checkpoint,
        "random_weights": known.random_weights,
        "device": known.device,
    }
    extra = _common.udf_params(
        "clip-embed", {**model, "column": known.column, "captions": known.captions}
    )
    if known.with_moderation:
        extra += ["--udf", "moderation-clip"]
        extra += _common.udf_params("moderation-clip", {**model, "embedding_column": known.column})
    return _common.run_command("backfill", rest, "--udf", "clip-embed", *extra)


if __name__ == "__main__":
    _common.finish(main())
