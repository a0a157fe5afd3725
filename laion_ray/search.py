"""ANN search over the vector index, by row, by ``.npy`` vector or by CLIP text.

Mirrors the dataset card's ``scanner(nearest=...)`` recipe; ``where`` is a
prefilter, as in the card's "Curate" example.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from laion_ray.errors import LaionRayError
from laion_ray.filters import check_filter, to_lance_sql
from laion_ray.ivf import vector_dim
from laion_ray.recall import SEARCH_NPROBES, SEARCH_REFINE_FACTOR
from laion_ray.storage import open_dataset

log = logging.getLogger(__name__)


def _text_vector(text: str, model: str | None) -> np.ndarray:
    """Encode ``text`` with the project's CLIP loader (imported lazily)."""
    if not model:
        raise LaionRayError("--text needs --model NAME[:PRETRAINED or checkpoint path]")
    try:
        from laion_ray.clip_model import load_clip
    except ImportError as exc:
        raise LaionRayError(
            f"--text needs laion_ray.udfs.clip to load {model!r}, which is not available"
        ) from exc
    name, _, source = model.partition(":")
    is_path = source.endswith((".pt", ".bin", ".safetensors")) or "/" in source
    try:
        net, _, tokenizer, _ = load_clip(
            name,
            pretrained=None if is_path else (source or None),
            checkpoint=source if is_path else None,
            device="cpu",  # one query: not worth a GPU round-trip
        )
        import torch

        with torch.no_grad():
            vec = net.encode_text(tokenizer([text])).float().numpy()
        # LAION img_emb vectors are unit-norm; match them.
        vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
    except LaionRayError:
        raise
    except Exception as exc:  # any loader failure means "cannot load offline"
        raise LaionRayError(f"cannot load CLIP model {model!r} offline: {exc}") from exc
    return np.asarray(vec, dtype=np.float32).reshape(-1)


def query_vector(
    ds, column: str, *, row: int | None, vector, text: str | None, model: str | None
) -> np.ndarray:
    """Resolve exactly one of ``row`` / ``vector`` / ``text`` into a query vector."""
    given = [
        n for n, v in (("--row", row), ("--vector", vector), ("--text", text)) if v is not None
    ]
    if len(given) != 1:
        raise LaionRayError(f"give exactly one of --row, --vector, --text (got {given or 'none'})")
    dim = vector_dim(ds, column)
    if row is not None:
        n = ds.count_rows()
        if not 0 <= row < n:
            raise LaionRayError(f"--row {row} is out of range: the dataset has {n} rows")
        q = ds.take([row], columns=[column]).column(column)[0].values
        q = q.to_numpy(zero_copy_only=False).astype(np.float32)
    elif vector is not None:
        if isinstance(vector, str):
            try:
                vector = np.load(vector)
            except (OSError, ValueError) as exc:
                raise LaionRayError(f"cannot read --vector {vector!r}: {exc}") from exc
        q = np.asarray(vector, dtype=np.float32)
        if q.ndim == 2 and q.shape[0] == 1:
            q = q[0]
    else:
        q = _text_vector(text, model)
    if q.ndim != 1 or q.shape[0] != dim:
        raise LaionRayError(f"query vector has shape {q.shape}, but {column!r} is {dim}-d")
    if np.isnan(q).any():
        raise LaionRayError("query vector contains NaN")
    return q


def search(
    uri: str,
    *,
    row: int | None = None,
    vector: str | np.ndarray | None = None,
    text: str | None = None,
    model: str | None = None,
    k: int = 10,
    where: str | None = None,
    nprobes: int = SEARCH_NPROBES,
    refine_factor: int | None = SEARCH_REFINE_FACTOR,
    columns: Sequence[str] = ("caption", "url", "similarity"),
    column: str = "img_emb",
    storage_options: Mapping[str, str] | None = None,
) -> list[dict]:
    """Nearest neighbours of a row, a vector or a text, with optional prefilter.

    Args:
        uri: Lance dataset URI.
        row: Use the vector of this row (offset) as the query.
        vector: A ``.npy`` path or an array holding one query vector.
        text: Encode this text with CLIP ``model``.
        model: ``NAME[:PRETRAINED or checkpoint path]`` for ``text``.
        k: Number of neighbours.
        where: SQL filter applied before the vector search, in the one filter
            language of every command (:mod:`laion_ray.filters`): ``"NSFW"`` and
            `` `NSFW` `` name a column, ``'text'`` is a string.
        nprobes: IVF partitions probed; default the dataset card's query's (16),
            the setting ``reindex`` gates at.
        refine_factor: Re-rank ``k * refine_factor`` candidates exactly; default
            the card's 30; ``None`` for no re-ranking.
        columns: Columns returned with each hit (plus ``_distance``).
        column: Vector column.
        storage_options: Object-store options for Lance.

    Returns:
        One dict per hit, nearest first.

    Examples:
        >>> search("./laion.lance", row=42, where='"NSFW" = 0')  # doctest: +SKIP
    """
    if not isinstance(k, int) or k < 1:
        raise LaionRayError(f"--k must be a positive integer, got {k!r}")
    if not isinstance(nprobes, int) or nprobes < 1:
        raise LaionRayError(f"--nprobes must be a positive integer, got {nprobes!r}")
    if refine_factor is not None and (not isinstance(refine_factor, int) or refine_factor < 1):
        raise LaionRayError(f"--refine-factor must be a positive integer, got {refine_factor!r}")
    ds = open_dataset(uri, storage_options=storage_options)
    missing = [c for c in columns if c not in ds.schema.names]
    if missing:
        raise LaionRayError(f"no column(s) {missing} in {uri}")
    q = query_vector(ds, column, row=row, vector=vector, text=text, model=model)
    nearest = {"column": column, "q": q, "k": k, "nprobes": nprobes}
    if refine_factor is not None:
        nearest["refine_factor"] = refine_factor
    lance_where = to_lance_sql(where)
    check_filter(ds, lance_where, given=where)
    try:
        table = ds.to_table(
            nearest=nearest,
            columns=[*columns, "_distance"],
            filter=lance_where,
            prefilter=lance_where is not None,
        )
    except (ValueError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LaionRayError(f"search failed (where={where!r}): {first}") from exc
    return table.to_pylist()


def format_hits(hits: Sequence[Mapping[str, object]]) -> str:
    """One line per hit: similarity | distance | caption | url, as in the card."""
    lines = []
    for h in hits:
        sim = h.get("similarity")
        sim_s = f"{sim:.3f}" if isinstance(sim, float) else str(sim)
        caption = str(h.get("caption", ""))[:80]
        lines.append(
            f"{sim_s} | d={h.get('_distance', float('nan')):.3f} | {caption} | {h.get('url', '')}"
        )
    return "\n".join(lines)
