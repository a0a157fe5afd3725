"""CLI error handling: one ``laion-ray: error:`` line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from laion_ray.cli import main
from laion_ray.sample import write_sample


def _assert_one_error_line(stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("laion-ray: error:"), stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture
def non_lance_dir(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("not a dataset")
    return str(tmp_path / "plain")


def test_info_missing_path(tmp_path, capsys):
    missing = str(tmp_path / "nope.lance")
    assert main(["info", missing]) == 2
    _assert_one_error_line(capsys.readouterr().err, missing)


def test_info_non_lance_directory(non_lance_dir, capsys):
    assert main(["info", non_lance_dir]) == 2
    _assert_one_error_line(capsys.readouterr().err, non_lance_dir)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["sample", "OUT", "--rows", "abc"], "abc"),
        (["sample", "OUT", "--bad-fraction", "lots"], "lots"),
        (["frobnicate"], "frobnicate"),
        ([], "command"),
        (["info"], "uri"),
    ],
)
def test_bad_arguments(argv, needle, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    _assert_one_error_line(captured.err, needle)
    assert captured.out == ""


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--rows", "0"], "rows"),
        (["--rows", "3", "--fragments", "4"], "fragments"),
        (["--bad-fraction", "2"], "bad_fraction"),
    ],
)
def test_sample_out_of_range(tmp_path, flags, needle, capsys):
    assert main(["sample", str(tmp_path / "s.lance"), *flags]) == 2
    _assert_one_error_line(capsys.readouterr().err, needle)


def test_sample_existing_destination(tmp_path, capsys):
    out = str(tmp_path / "s.lance")
    write_sample(out, rows=2, fragments=1)
    assert main(["sample", out, "--rows", "2", "--fragments", "1"]) == 2
    _assert_one_error_line(capsys.readouterr().err, "already exists", out)


def test_sample_success(tmp_path, capsys):
    out = str(tmp_path / "s.lance")
    assert main(["sample", out, "--rows", "16", "--fragments", "2", "--bad-fraction", "0.5"]) == 0
    captured = capsys.readouterr()
    assert "16 rows in 2 fragments" in captured.out and "8 bad images" in captured.out


def test_subprocess_missing_path_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "laion_ray.cli", "info", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    _assert_one_error_line(proc.stderr, "/nonexistent")
    assert proc.stdout == ""


@pytest.mark.slow
def test_demo_runs_every_step_on_local_ray_and_says_its_weights_are_random(
    tmp_path, ray_session, capsys
):
    import lance

    from laion_ray.history import job_history

    directory = tmp_path / "demo"
    assert main(["demo", "--dir", str(directory), "--rows", "600"]) == 0
    out = capsys.readouterr().out
    steps = ("sample", "backfill", "re-embed", "merge labels", "near-duplicates", "IVF_PQ")
    for step in (*steps, "ANN search"):
        assert step in out, step
    assert "RANDOM WEIGHTS" in out
    ds = lance.dataset(str(directory / "laion.lance"))
    table = ds.to_table(columns=["aspect_ratio", "moderation_label", "img_emb", "aesthetic_score"])
    assert table.num_rows == 600
    assert table["moderation_label"].null_count == 0
    assert table["aesthetic_score"].null_count == 0  # every key has a label
    dups = ds.to_table(columns=["is_duplicate"])["is_duplicate"]
    assert dups.null_count == 0 and sum(dups.to_pylist()) == round(600 * 0.05)
    assert table["img_emb"].null_count < 600 * 0.05  # only the injected bad images
    assert [i["name"] for i in ds.list_indices()] == ["img_emb_idx"]
    assert "rules-v1" in ds.tags.list()
    assert len(job_history(str(directory / "laion.lance"))) >= 3
