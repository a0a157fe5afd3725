"""Re-embed images with an open_clip model (``ray job submit`` entry point).

Model options: an open_clip model name plus either a pretrained tag (fetched
from the hub where there is a network) or a local checkpoint file; random
weights only with --random-weights (for tests and demos). The output column
defaults to img_emb_<model>; --column img_emb --overwrite replaces img_emb in
place. Decoding runs in a separate CPU stage; the model runs on GPU actors
(fp16) when the cluster has GPUs, else on CPU threads.

Examples:
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- python jobs/reembed.py s3://bucket/laion.lance \\
        --model ViT-L-14 --pretrained openai --column img_emb --overwrite
    python jobs/reembed.py ./laion.lance --model ViT-B-32 --checkpoint /models/b32.safetensors \\
        --with-moderation --captions
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import _common

from laion_ray.backfill import backfill


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and run one ``backfill(uri, udfs=["clip-embed", ...], udf_params=...)``."""
    p = _common.parser(__doc__)
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name (or hf-hub:...)")
    p.add_argument("--pretrained", help="pretrained tag, e.g. openai or laion2b_s34b_b79k")
    p.add_argument("--checkpoint", help="local open_clip state_dict (.pt/.bin/.safetensors)")
    p.add_argument("--random-weights", action="store_true", help="random init (tests/demos only)")
    p.add_argument("--column", help="output column (default img_emb_<model>)")
    p.add_argument("--captions", action="store_true", help="also embed captions (text tower)")
    p.add_argument("--with-moderation", action="store_true", help="zero-shot labels, same pass")
    p.add_argument("--batch-size", type=int, help="images per model call")
    p.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    args = p.parse_args(argv)
    model = {
        "model": args.model,
        "pretrained": args.pretrained,
        "checkpoint": args.checkpoint,
        "random_weights": args.random_weights,
        "device": args.device,
    }
    embed = {**model, "column": args.column, "captions": args.captions}
    if args.batch_size:
        embed["batch_size"] = args.batch_size
    params = {"clip-embed": embed}
    udfs = ["clip-embed"]
    if args.with_moderation:
        udfs.append("moderation-clip")
        params["moderation-clip"] = {**model, "embedding_column": args.column}
    return _common.run(
        "reembed",
        args,
        lambda: backfill(args.uri, udfs=udfs, udf_params=params, **_common.backfill_options(args)),
    )


if __name__ == "__main__":
    sys.exit(main())
