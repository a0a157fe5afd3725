"""Benchmarks of the scoring UDFs: ``embedding-head`` and ``clip-score``.

Line 1, ``head per core``: rows/s per CPU-second of one thread for the
aesthetic architecture (768->1024->128->64->16->1, LAION's layout with dropout
and no activation), laion-ray's ``embedding-head`` call (Arrow in, L2-normalise,
folded head, Arrow out) against a bare torch call of the same module on a numpy
matrix. Target >= 200k rows/s per core. The NSFW architecture (Linear+ReLU,
sigmoid: nothing to fold) is printed too.

Line 2, ``head end-to-end``: an ``embedding-head`` backfill over a Lance column
of 768-d embeddings (plan, read, compute, checkpoint parts, commit; the local
executor that ``auto`` picks for this job) in rows/s, against a bare torch loop
that reads the same column with a Lance scanner and runs the same module
(results kept in memory, nothing written). Target >= 0.8. Also against the
same loop running laion-ray's folded head, which isolates the engine's cost.

Line 3, ``clip-score``: a fused ``clip-embed`` + ``clip-score`` backfill against
``clip-embed`` alone on the same JPEGs (local Ray, random ViT-S-32 on the CPU):
the text tower's extra cost as a time ratio, plus the model-only ratio
(text tower on captions / image tower on pixels, in-process).

Run:
    python benchmarks/bench_scores.py --head-rows 100000 --clip-rows 256 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings

import numpy as np
import pyarrow as pa

EMB_DIM = 768
# The bare loop hands torch Arrow's read-only buffers, as a user would; nothing writes to them.
warnings.filterwarnings("ignore", "The given NumPy array is not writable")


def aesthetic_module():
    """The LAION improved-aesthetic-predictor layout, random weights."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(768, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    ).eval()


def nsfw_module():
    import torch

    torch.manual_seed(0)
    layers = []
    for a, b in ((768, 64), (64, 512), (512, 256)):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(256, 1), torch.nn.Sigmoid()).eval()


def embeddings(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, EMB_DIM)).astype(np.float32)


def as_column(x: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), EMB_DIM)


def bare_torch(module, x: np.ndarray, batch: int = 65536) -> np.ndarray:
    """What one writes without laion-ray: normalise, call the module, collect."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            t = torch.nn.functional.normalize(torch.from_numpy(x[i : i + batch]), dim=-1)
            out.append(module(t)[:, 0].numpy())
    return np.concatenate(out)


def _best_cpu_rate(fn, rows: int, repeats: int) -> float:
    fn()  # warm up
    best = 0.0
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = max(best, rows / (time.process_time() - start))
    return best


def bench_head_per_core(rows: int, repeats: int, workdir: str) -> dict[str, float]:
    import torch

    from laion_ray.udf import resolve

    torch.set_num_threads(1)
    x = embeddings(rows)
    table = pa.table({"img_emb": as_column(x)})
    out = {}
    for name, module in (("aesthetic", aesthetic_module()), ("nsfw", nsfw_module())):
        path = os.path.join(workdir, f"{name}.pth")
        torch.save(module.state_dict(), path)
        (stage,) = resolve("embedding-head", preset=name, weights=path)
        call = stage.instantiate()
        got = call(table).column(0).to_numpy()
        np.testing.assert_allclose(got, bare_torch(module, x[:rows]), rtol=1e-3, atol=1e-5)
        out[f"{name}_udf"] = _best_cpu_rate(lambda call=call: call(table), rows, repeats)
        out[f"{name}_torch"] = _best_cpu_rate(
            lambda module=module: bare_torch(module, x), rows, repeats
        )
    return out


def bench_head_end_to_end(rows: int, repeats: int, workdir: str) -> dict[str, dict]:
    """Per preset: laion-ray backfill and bare loops over the same Lance column, best rows/s."""
    import lance
    import torch

    from laion_ray.backfill import backfill
    from laion_ray.udfs.embedding_head import load_head

    uri = os.path.join(workdir, "emb.lance")
    x = embeddings(rows, seed=1)
    lance.write_dataset(
        pa.table({"key": np.arange(rows, dtype=np.int64), "img_emb": as_column(x)}),
        uri,
        max_rows_per_file=max(rows // 8, 1),
    )

    def bare_loop(head) -> float:
        started = time.perf_counter()
        scanner = lance.dataset(uri).scanner(columns=["img_emb"], batch_size=65536)
        results = []
        for batch in scanner.to_batches():
            column = batch.column(0)
            emb = column.values.to_numpy().reshape(len(column), EMB_DIM)
            results.append(head(emb))
        assert sum(len(r) for r in results) == rows
        return rows / (time.perf_counter() - started)

    out: dict[str, dict] = {}
    for name, module in (("aesthetic", aesthetic_module()), ("nsfw", nsfw_module())):
        weights = os.path.join(workdir, f"{name}-e2e.pth")
        torch.save(module.state_dict(), weights)
        loops = {"torch": lambda emb, module=module: bare_torch(module, emb)}
        if name == "aesthetic":
            act = "none"
            loops["folded"] = load_head(weights, _sha(weights), None, 0, act, False, True, "cpu")
        best = dict.fromkeys(["laion_ray", *loops], 0.0)
        for i in range(repeats):
            for loop, head in loops.items():
                best[loop] = max(best[loop], bare_loop(head))
            params = {"preset": name, "weights": weights, "column": f"{name}_{i}"}
            report = backfill(uri, udfs=["embedding-head"], udf_params={"embedding-head": params})
            assert report.rows_processed == rows
            best["laion_ray"] = max(best["laion_ray"], rows / report.elapsed_s)
            best["executor"] = report.executor
        out[name] = best
    return out


def _sha(path: str) -> str:
    from laion_ray.udfs.embedding_head import file_sha256

    return file_sha256(path)


def bench_clip_score(rows: int, repeats: int, workdir: str) -> dict[str, float]:
    import lance

    from laion_ray.backfill import backfill
    from laion_ray.ray_env import ensure_ray
    from laion_ray.sample import sample_table

    table = sample_table(rows, seed=0, bad_fraction=0.0)
    model = {"model": "ViT-S-32", "random_weights": True}
    ensure_ray()
    times = {"embed": [], "fused": []}
    for i in range(repeats):
        for kind in ("embed", "fused"):
            uri = os.path.join(workdir, f"clip-{kind}-{i}.lance")
            lance.write_dataset(table, uri, max_rows_per_file=max(rows // 4, 1))
            udfs = ["clip-embed"] + (["clip-score"] if kind == "fused" else [])
            params = {"clip-embed": model, "clip-score": {**model, "column": "clip_score"}}
            started = time.perf_counter()
            report = backfill(uri, udfs=udfs, udf_params=params)
            times[kind].append(time.perf_counter() - started)
            assert report.rows_processed == rows and report.rows_failed == 0
    ratios = [f / e for f, e in zip(times["fused"], times["embed"], strict=True)]
    return {
        "embed_s": min(times["embed"]),
        "fused_s": min(times["fused"]),
        "ratio_best": min(times["fused"]) / min(times["embed"]),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        **_towers(table),
    }


def _towers(table: pa.Table, batch: int = 64) -> dict[str, float]:
    """In-process model-only cost: text tower on captions against image tower on pixels."""
    import torch

    from laion_ray.clip_model import clip_spec, embed_texts, load_clip
    from laion_ray.preprocess import PixelSpec, preprocess_images

    net, _, tokenizer, info = load_clip("ViT-S-32", allow_random=True)
    _, cfg = clip_spec("ViT-S-32")
    pixels = preprocess_images(
        table["image"].to_pylist()[:batch], PixelSpec.from_preprocess_cfg(cfg)
    )
    captions = table["caption"].to_pylist()[:batch]
    x = torch.from_numpy(pixels.copy()).permute(0, 3, 1, 2).float() / 255.0

    def image() -> None:
        with torch.inference_mode():
            net.encode_image(x)

    def text() -> None:
        embed_texts(net, tokenizer, captions, torch.device("cpu"), None)

    rates = {}
    for name, fn in (("image", image), ("text", text)):
        fn()
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - started)
        rates[name] = best
    return {"text_over_image": rates["text"] / rates["image"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-rows", type=int, default=100_000)
    parser.add_argument("--clip-rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-clip", action="store_true")
    parser.add_argument("--skip-head", action="store_true")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-scores-")
    try:
        if not args.skip_head:
            core = bench_head_per_core(min(args.head_rows, 100_000), args.repeats, workdir)
            print(
                f"head per core (aesthetic): laion-ray embedding-head {core['aesthetic_udf']:,.0f} "
                f"rows/s/core, bare torch module {core['aesthetic_torch']:,.0f} rows/s/core "
                f"(ratio {core['aesthetic_udf'] / core['aesthetic_torch']:.1f}); target >= 200,000"
            )
            print(
                f"head per core (nsfw): laion-ray embedding-head {core['nsfw_udf']:,.0f} rows/s/core, "
                f"bare torch module {core['nsfw_torch']:,.0f} rows/s/core "
                f"(ratio {core['nsfw_udf'] / core['nsfw_torch']:.2f})"
            )
            e2e = bench_head_end_to_end(args.head_rows, args.repeats, workdir)
            for name, r in e2e.items():
                folded = (
                    f"; bare loop with laion-ray's folded head {r['folded']:,.0f} rows/s -> "
                    f"laion-ray / folded loop = {r['laion_ray'] / r['folded']:.2f}"
                    if "folded" in r
                    else ""
                )
                print(
                    f"head end-to-end {name} ({args.head_rows:,} rows, {r['executor']} executor): "
                    f"laion-ray backfill {r['laion_ray']:,.0f} rows/s, bare torch loop "
                    f"{r['torch']:,.0f} rows/s -> laion-ray / torch = "
                    f"{r['laion_ray'] / r['torch']:.2f} (target >= 0.8){folded}"
                )
        if not args.skip_clip:
            clip = bench_clip_score(args.clip_rows, args.repeats, workdir)
            print(
                f"clip-score ({args.clip_rows} rows, random ViT-S-32, CPU): clip-embed alone "
                f"{clip['embed_s']:.1f}s, fused clip-embed + clip-score {clip['fused_s']:.1f}s "
                f"-> fused / alone = {clip['ratio_best']:.2f} (per repeat "
                f"{clip['ratio_min']:.2f}-{clip['ratio_max']:.2f}); model only: text tower / "
                f"image tower = {clip['text_over_image']:.2f}"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
