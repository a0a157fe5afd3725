"""``laion-ray demo --dir X`` deletes X only if the demo made it (its marker file) or --force."""

from __future__ import annotations

import pytest

from laion_ray.cli import main
from laion_ray.demo import MARKER, prepare_directory
from laion_ray.errors import LaionRayError


@pytest.fixture
def someones_files(tmp_path):
    """A directory a user keeps their own work in."""
    work = tmp_path / "work"
    (work / "thesis").mkdir(parents=True)
    (work / "notes.txt").write_text("not a demo")
    return work


def test_cli_refuses_a_directory_it_did_not_make(someones_files, capsys):
    assert main(["demo", "--dir", str(someones_files)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("laion-ray: error: --dir ")
    assert "not made by laion-ray demo" in err[0] and "--force" in err[0]
    assert (someones_files / "notes.txt").read_text() == "not a demo"
    assert (someones_files / "thesis").is_dir()


def test_force_deletes_it(someones_files):
    prepare_directory(str(someones_files), force=True)
    assert sorted(p.name for p in someones_files.iterdir()) == [MARKER]


class _DemoStarted(LaionRayError):
    """Raised where the demo's work would begin: its directory was accepted."""


def test_cli_force_deletes_it_and_the_demo_goes_on(someones_files, monkeypatch, capsys):
    """``demo --force`` through the CLI: the directory is emptied and the demo
    starts (stopped at its first steps, Ray's start and the sample, to stay cheap)."""
    import laion_ray.ray_env
    import laion_ray.sample

    def started(*args, **kwargs):
        raise _DemoStarted("the demo started")

    monkeypatch.setattr(laion_ray.ray_env, "ensure_ray", started)
    monkeypatch.setattr(laion_ray.sample, "write_sample", started)
    assert main(["demo", "--dir", str(someones_files), "--force"]) == 2
    captured = capsys.readouterr()
    assert "laion-ray: error: the demo started" in captured.err.splitlines()
    assert f"laion-ray demo in {someones_files}" in captured.out
    assert sorted(p.name for p in someones_files.iterdir()) == [MARKER]


def test_its_own_directory_is_recreated(tmp_path):
    demo = tmp_path / "demo"
    prepare_directory(str(demo))  # missing: made, with the marker
    assert (demo / MARKER).is_file()
    (demo / "laion.lance").mkdir()
    (demo / "recall.png").write_bytes(b"png")
    prepare_directory(str(demo))  # an earlier demo's: emptied
    assert sorted(p.name for p in demo.iterdir()) == [MARKER]


def test_an_empty_directory_is_used(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_directory(str(empty))
    assert sorted(p.name for p in empty.iterdir()) == [MARKER]


@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_path_that_is_not_a_directory_is_refused(tmp_path, kind):
    target = tmp_path / "real"
    target.mkdir()
    (target / MARKER).write_text("")
    path = tmp_path / "x"
    if kind == "file":
        path.write_text("data")
    else:
        path.symlink_to(target)
    with pytest.raises(LaionRayError, match="is not a directory"):
        prepare_directory(str(path), force=True)
    assert path.exists() and (target / MARKER).exists()
