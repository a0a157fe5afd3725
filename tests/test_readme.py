"""The README is executable: its Python blocks run as written, and its demo
command runs as written from the environment the tests run in (CI's fresh one)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from readme import README, blocks, setup_commands

from laion_ray.sample import write_sample

ROOT = README.parent
ROWS = 800  # enough for the README's reindex to train IVF_PQ


def _run(command: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    """Run as a user's shell would: a private local Ray, stderr interleaved with stdout."""
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def test_readme_has_the_two_setup_commands():
    commands = setup_commands()
    assert commands["demo"].endswith("laion-ray demo")
    assert commands["test"].startswith("python -m pip install -e '.[test]'")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m venv" in ci or "python3 -m venv" in ci
    assert "tests/readme.py test" in ci  # CI runs the README's own command


@pytest.mark.slow
def test_readme_python_blocks_run_as_written(tmp_path):
    """Each ```python block, in a fresh interpreter, against a generated sample."""
    write_sample(str(tmp_path / "laion.lance"), rows=ROWS, fragments=4, seed=1)
    keys = np.arange(ROWS, dtype=np.int64)
    pq.write_table(
        pa.table({"key": keys, "label": (keys % 3).astype(np.int64)}), tmp_path / "labels.parquet"
    )
    code = blocks("python")
    assert code, "README.md has no python block"
    printed = ""
    for i, block in enumerate(code):
        script = tmp_path / f"readme_block_{i}.py"
        script.write_text(block)
        proc = _run([sys.executable, str(script)], tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:]
        assert "Traceback" not in proc.stdout
        printed += proc.stdout

    # What the blocks promise happened, checked against the data. (The
    # reindex call's recall gate decides on its own whether the index swaps.)
    assert f"{ROWS} rows processed" in printed
    table = lance.dataset(str(tmp_path / "laion.lance")).to_table(
        columns=["caption", "caption_len", "width", "height", "aspect_ratio", "key", "label"]
    )
    assert table["caption_len"].equals(pc.utf8_length(table["caption"]).cast(pa.int64()))
    assert table["label"].to_pylist() == [k % 3 for k in table["key"].to_pylist()]
    assert table["aspect_ratio"].null_count == 0


# What Ray, Lance and Python print on their own; none of it may reach a quiet run.
THIRD_PARTY_SIGNS = (
    "WARN",
    "Warning",
    " INFO ",
    "(raylet)",
    "core_worker",
    "lance_",
    "fork-safe",
    "deprecated",
    "Progress bars",
    "DataContext",
    "Traceback",
    "Token authentication",
)


@pytest.mark.slow
def test_readme_demo_command_runs_as_written():
    """``python -m pip install -e . && laion-ray demo`` from the repository, as a user types it."""
    from laion_ray.history import job_history

    command = setup_commands()["demo"]
    demo_dir = ROOT / "laion-ray-demo"
    try:
        proc = _run(["bash", "-c", command], ROOT, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:]
        # pip speaks first; the demo's account starts at its own first line.
        out = proc.stdout[proc.stdout.index("laion-ray demo in") :]
        steps = ("sample", "backfill", "heads", "merge labels", "re-embed", "CLIP score")
        for step in (*steps, "near-duplicates", "IVF_PQ", "ANN search"):
            assert step in out, step
        assert "RANDOM WEIGHTS" in out
        for where in ("recall.png", "laion-ray info", "laion-ray history", "laion-ray errors"):
            assert where in out, where
        noise = [line for line in out.splitlines() if any(s in line for s in THIRD_PARTY_SIGNS)]
        assert not noise, noise

        uri = str(demo_dir / "laion.lance")
        ds = lance.dataset(uri)
        new_embedding = "img_emb_tiny_clip_random"  # clip-embed's column for the demo's model
        table = ds.to_table(
            columns=[
                "aspect_ratio",
                "moderation_label",
                new_embedding,
                "rating",
                "clip_score",
                "aesthetic_score",
                "nsfw_score",
                "is_duplicate",
            ]
        )
        assert table.num_rows == 1000
        assert table["moderation_label"].null_count == 0
        assert table["rating"].null_count == 0  # every key has a label
        # Null exactly where the sample injected bad images (1% of 1000).
        assert 0 < table[new_embedding].null_count <= 10
        assert table["clip_score"].null_count == table[new_embedding].null_count
        assert table["aesthetic_score"].null_count == 0  # over the card's stored img_emb
        nsfw = table["nsfw_score"].to_numpy(zero_copy_only=False)
        assert nsfw.min() >= 0 and nsfw.max() <= 1
        dups = table["is_duplicate"]
        # Every injected copy, plus byte-identical bad images that --exact groups by md5.
        assert dups.null_count == 0 and sum(dups.to_pylist()) >= round(1000 * 0.05)
        assert [i["name"] for i in ds.list_indices()] == ["img_emb_idx"]
        assert "rules-v1" in ds.tags.list()
        assert len(job_history(uri)) >= 5
        assert (demo_dir / "recall.png").stat().st_size > 0
    finally:
        shutil.rmtree(demo_dir, ignore_errors=True)
