"""The public Python API: every documented name is its callable, however often
it is looked up, and ``import laion_ray`` pulls in neither Ray nor torch."""

from __future__ import annotations

import json
import subprocess
import sys

PUBLIC = [
    "backfill",
    "merge",
    "reindex",
    "search",
    "materialize",
    "dedup",
    "udf",
    "register",
    "UDF",
]

PROBE = """
import json, sys
import laion_ray
first = {n: getattr(laion_ray, n) for n in NAMES}
heavy = sorted(m for m in ("ray", "torch", "open_clip") if m in sys.modules)
# Importing the implementation modules must not rebind the public names.
import laion_ray.backfill, laion_ray.merge, laion_ray.search, laion_ray.materialize, laion_ray.udf, laion_ray.dedup
from laion_ray.merge import source
from laion_ray import udf
second = {n: getattr(laion_ray, n) for n in NAMES}
print(json.dumps({
    "heavy": heavy,
    "same": all(first[n] is second[n] for n in NAMES),
    "kinds": {n: type(second[n]).__name__ for n in NAMES},
    "udf_is_decorator": udf is laion_ray.udf and callable(udf),
    "all": sorted(laion_ray.__all__),
}))
"""


def test_public_names_are_stable_callables_and_import_is_light():
    code = f"NAMES = {PUBLIC!r}\n{PROBE}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["heavy"] == []
    assert result["same"]
    assert result["udf_is_decorator"]
    for name, kind in result["kinds"].items():
        expected = "type" if name == "UDF" else "function"
        assert kind == expected, (name, kind)
    assert set(PUBLIC) <= set(result["all"])


def test_readme_udf_decorator_example_builds_a_udf():
    import pyarrow as pa
    import pyarrow.compute as pc

    import laion_ray
    from laion_ray import udf

    @udf(inputs=["caption"], outputs=pa.schema([("caption_len", pa.int64())]), num_cpus=0.25)
    def caption_len(batch: pa.Table) -> pa.Table:
        return pa.table({"caption_len": pc.utf8_length(batch["caption"])})

    assert isinstance(caption_len, laion_ray.UDF)
    assert caption_len.name == "caption-len"
    out = caption_len.instantiate()(pa.table({"caption": ["ab", "xyz"]}))
    assert out["caption_len"].to_pylist() == [2, 3]
