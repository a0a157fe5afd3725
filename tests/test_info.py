"""``laion_ray.info`` and the ``laion-ray info`` subcommand on a real dataset."""

from __future__ import annotations

import json

import lance
import pytest

from laion_ray.cli import main
from laion_ray.errors import LaionRayError
from laion_ray.info import dataset_info, format_info
from laion_ray.sample import SCHEMA, write_sample


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """Three fragments, a delete (version 4), a tag on it, then a scalar index (version 5)."""
    path = str(tmp_path_factory.mktemp("info") / "laion.lance")
    write_sample(path, rows=30, fragments=3)
    ds = lance.dataset(path)
    ds.delete("key < 4")
    ds.tags.create("cleaned", ds.version)
    ds.create_scalar_index("key", "BTREE")
    return path


def test_dataset_info_fields(uri):
    info = dataset_info(uri)
    assert info["uri"] == uri
    assert info["version"] == 5
    assert info["rows"] == 26
    assert info["fragments"] == [
        {"id": 0, "rows": 6, "physical_rows": 10, "deleted": 4},
        {"id": 1, "rows": 10, "physical_rows": 10, "deleted": 0},
        {"id": 2, "rows": 10, "physical_rows": 10, "deleted": 0},
    ]
    assert [c["name"] for c in info["schema"]] == SCHEMA.names
    assert {"name": "image", "type": "large_binary"} in info["schema"]
    assert [v["version"] for v in info["versions"]] == [1, 2, 3, 4, 5]
    assert all(isinstance(v["timestamp"], str) for v in info["versions"])
    assert info["tags"] == {"cleaned": 4}
    assert info["indices"] == [
        {"name": "key_idx", "type": "BTree", "columns": ["key"], "rows_indexed": 26}
    ]
    assert json.loads(json.dumps(info)) == info


def test_format_info_is_aligned(uri):
    text = format_info(dataset_info(uri))
    lines = text.splitlines()
    assert lines[0].split() == ["uri", uri]
    assert "rows      26 (4 deleted)" in lines
    assert "cleaned" in text and "key_idx" in text and "BTree" in text
    header = next(i for i, line in enumerate(lines) if line.startswith("column"))
    type_col = lines[header].index("type")
    for line in lines[header + 1 : header + 1 + len(SCHEMA)]:
        assert line[type_col - 1] == " " and line[type_col] != " ", line


def test_missing_and_non_lance_paths(tmp_path):
    with pytest.raises(LaionRayError, match="no such path"):
        dataset_info(str(tmp_path / "missing.lance"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(LaionRayError, match="plain"):
        dataset_info(str(tmp_path / "plain"))


def test_cli_info_text(uri, capsys):
    assert main(["info", uri]) == 0
    out = capsys.readouterr().out
    assert "rows      26" in out and "fragments 3" in out


def test_cli_info_json(uri, capsys):
    assert main(["info", uri, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 26
    assert len(info["fragments"]) == 3
    assert info["tags"] == {"cleaned": 4}
