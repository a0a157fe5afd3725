"""Write a small LAION-shaped Lance dataset with real JPEG bytes.

The table follows the LAION-1M dataset card column for column, so every job can
be tested end to end without downloading anything. Content is a pure function of
``(seed, key)``: the same seed gives identical bytes in every column whatever the
fragment count, and rows made by :func:`sample_table` with a ``start_key`` can be
appended to a sample without clashing keys.

With ``duplicates`` some rows are near-duplicates of others, as about 30% of
LAION-2B is: an exact byte copy, a re-encoded, a resized or a lightly cropped
copy of an earlier row's image, whose embedding is the source's plus a little
noise (cosine 0.97-0.999 to the source). The report records the true groups.

Examples:
    >>> report = write_sample("/tmp/laion.lance", rows=1000, fragments=4, bad_fraction=0.01)
    >>> report.summary()  # doctest: +SKIP
    'wrote 1000 rows in 4 fragments to /tmp/laion.lance (seed 0, 10 bad images) in 2.1s'
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import lance
import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFilter

from laion_ray.errors import LaionRayError
from laion_ray.storage import is_local, resolve_storage_options

__all__ = [
    "BAD_KINDS",
    "CORRUPT_KINDS",
    "DUPLICATE_KINDS",
    "EMB_DIM",
    "SCHEMA",
    "SampleReport",
    "duplicate_plan",
    "sample_embeddings",
    "sample_table",
    "write_sample",
]

EMB_DIM = 768

#: Column order and types of the LAION-1M card (``lance-format/laion-1m``).
SCHEMA = pa.schema(
    [
        ("key", pa.int64()),
        ("image", pa.large_binary()),
        ("image_path", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("NSFW", pa.int64()),
        ("LICENSE", pa.string()),
        ("similarity", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("exif", pa.string()),
        ("md5", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("img_emb", pa.list_(pa.float32(), EMB_DIM)),
    ]
)

#: Every kind of bad image a crawl produces, in the order they are injected.
BAD_KINDS = ("truncated", "empty", "null", "not_image", "png", "grayscale", "cmyk", "bomb")
#: Kinds that no decoder can turn into an RGB image; the others are merely unusual.
CORRUPT_KINDS = frozenset({"truncated", "empty", "null", "not_image", "bomb"})

#: How injected near-duplicates copy their source image, cycled in key order, with
#: the per-dimension noise added to the source's embedding (cosine to the source
#: about 1 / sqrt(1 + 768 * noise^2): 0.999, 0.994, 0.986, 0.976).
DUPLICATE_KINDS = ("exact", "reencode", "resize", "crop")
_DUP_NOISE = {"exact": 0.0015, "reencode": 0.004, "resize": 0.006, "crop": 0.008}

# Header claim of the "bomb" image: 268M pixels is over PIL's error limit
# (2 * MAX_IMAGE_PIXELS = 179M), yet a decoder without a bomb check (simplejpeg
# touches the whole output buffer) only wastes ~0.8 GB on it. A 60000x60000 claim
# made simplejpeg use 10 GB, enough to take down a worker on a small node.
BOMB_SIZE = 16384
JPEG_QUALITY = 85

# Row parameters are drawn per aligned block of keys so that a row depends only on
# (seed, key), not on how the caller splits rows into fragments or tables.
_BLOCK = 512
_TEXTURE_SIDE = 640  # largest image side + 1; crops come from these
_N_TEXTURES = 8
_N_CLUSTERS = 32
_CLUSTER_SPREAD = 0.022  # per-dimension noise; gives ~0.6 cosine to the centroid

# Seed-sequence prefixes keep the independent random streams apart.
_STREAM_TEXTURES, _STREAM_BLOCK, _STREAM_BAD, _STREAM_CENTROIDS, _STREAM_DUP = 0, 1, 2, 3, 4

# One subject per embedding cluster so captions and embeddings agree.
_SUBJECTS = (
    "dog", "cat", "vintage car", "mountain lake", "city skyline", "bowl of ramen",
    "wedding dress", "running shoe", "oak tree", "sailboat", "living room", "coffee mug",
    "red rose", "bicycle", "birthday cake", "leather sofa", "beach sunset", "horse",
    "pizza", "office chair", "lighthouse", "snowy forest", "guitar", "wristwatch",
    "kitchen", "butterfly", "castle", "backpack", "desert road", "teapot", "parrot", "laptop",
)  # fmt: skip
_STYLES = (
    "a photo of a", "close-up of a", "an illustration of a", "stock image of a",
    "a watercolor painting of a", "product shot of a", "a blurry photo of a", "vector art of a",
)  # fmt: skip
_ADJECTIVES = (
    "red", "small", "beautiful", "old", "modern", "bright", "dark", "colorful",
    "minimalist", "rustic", "shiny", "cute",
)  # fmt: skip
_SETTINGS = (
    "", "on a white background", "at night", "in the rain", "on a wooden table",
    "in a field", "near the sea", "in a studio", "for sale", "in winter",
)  # fmt: skip
_DOMAINS = (
    "i.pinimg.com", "cdn.shopify.com", "images.example-shop.com", "upload.wikimedia.org",
    "live.staticflickr.com", "media.istockphoto.com", "i.etsystatic.com", "img.blogspot.com",
)  # fmt: skip
_LICENSES = ("?", "?", "?", "?", "cc-by", "cc-by-sa", "cc-by-nc", "cc0")
_CAMERAS = (("Canon", "EOS 5D"), ("NIKON", "D750"), ("Apple", "iPhone 12"), ("SONY", "ILCE-7M3"))
_NOT_IMAGE_BODIES = (
    b"<!DOCTYPE html><html><head><title>404 Not Found</title></head>"
    b"<body><h1>Not Found</h1><p>The requested URL was not found.</p></body></html>",
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message></Error>",
)
_ERROR_MESSAGES = {
    "truncated": "image truncated: received {got} of {total} bytes",
    "empty": "empty response body",
    "null": "download failed: no image bytes",
    "not_image": "response is not an image ({what})",
    "png": "image is PNG, not JPEG",
    "grayscale": "image has a single channel (mode L)",
    "cmyk": "image is CMYK",
    "bomb": f"header claims {BOMB_SIZE}x{BOMB_SIZE} pixels (decompression bomb)",
}


@dataclass
class SampleReport:
    """What :func:`write_sample` wrote.

    Attributes:
        uri: Dataset written.
        rows: Rows written.
        fragments: Fragments written.
        seed: Seed used.
        bad_keys: Bad-image kind -> keys of the rows given that kind.
        duplicate_groups: Source key -> keys of its injected near-duplicates
            (the true duplicate groups are ``[source, *copies]``).
        elapsed: Wall-clock seconds taken.
    """

    uri: str
    rows: int
    fragments: int
    seed: int
    bad_keys: dict[str, list[int]] = field(default_factory=dict)
    duplicate_groups: dict[int, list[int]] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def num_bad(self) -> int:
        return sum(len(keys) for keys in self.bad_keys.values())

    @property
    def num_duplicates(self) -> int:
        return sum(len(keys) for keys in self.duplicate_groups.values())

    def summary(self) -> str:
        """One human-readable line."""
        return (
            f"wrote {self.rows} rows in {self.fragments} fragments to {self.uri} "
            f"(seed {self.seed}, {self.num_bad} bad images, {self.num_duplicates} "
            f"near-duplicates in {len(self.duplicate_groups)} groups) in {self.elapsed:.1f}s"
        )


def write_sample(
    uri: str,
    *,
    rows: int,
    fragments: int,
    seed: int = 0,
    bad_fraction: float = 0.0,
    duplicates: float = 0.0,
    storage_options: Mapping[str, str] | None = None,
) -> SampleReport:
    """Write a LAION-shaped Lance dataset of ``rows`` rows in exactly ``fragments`` fragments.

    Rows are spread evenly (fragment sizes differ by at most one); one append per
    fragment keeps memory bounded by one fragment's worth of generation blocks.

    Args:
        uri: Dataset URI to create; it must not exist.
        rows: Number of rows, at least 1. Keys are ``0 .. rows - 1``.
        fragments: Number of fragments, between 1 and ``rows``.
        seed: Non-negative seed; the same seed gives identical bytes in every column.
        bad_fraction: Share of rows (0..1) given bad images, cycling through
            :data:`BAD_KINDS`; any positive value gives at least one bad row.
        duplicates: Share of rows (0..1) made near-duplicates of other rows,
            cycling through :data:`DUPLICATE_KINDS`; the report's
            ``duplicate_groups`` holds the true groups.
        storage_options: Object-store options passed to Lance.

    Returns:
        A :class:`SampleReport`, including the keys of every injected bad image.

    Raises:
        LaionRayError: An argument is out of range or ``uri`` already exists.
    """
    _validate(rows=rows, seed=seed, bad_fraction=bad_fraction, duplicates=duplicates)
    if not 1 <= fragments <= rows:
        raise LaionRayError(f"fragments must be between 1 and rows ({rows}), got {fragments}")
    options = resolve_storage_options(storage_options)
    if _exists(uri, options):
        raise LaionRayError(f"destination already exists: {uri}")

    start = time.perf_counter()
    plan = _bad_plan(rows, seed, bad_fraction, start_key=0)
    dups = _dup_plan(rows, seed, duplicates, start_key=0, bad=plan)
    base, extra = divmod(rows, fragments)
    offset = 0
    for i in range(fragments):
        n = base + (i < extra)
        reader = pa.RecordBatchReader.from_batches(
            SCHEMA, _batches(offset, n, seed=seed, plan=plan, dups=dups)
        )
        lance.write_dataset(
            reader,
            uri,
            schema=SCHEMA,
            mode="create" if i == 0 else "append",
            max_rows_per_file=max(n, 1),  # one file per append -> one fragment
            storage_options=options,
        )
        offset += n
    return SampleReport(
        uri=uri,
        rows=rows,
        fragments=fragments,
        seed=seed,
        bad_keys=_keys_by_kind(plan),
        duplicate_groups=_groups(dups),
        elapsed=time.perf_counter() - start,
    )


def sample_table(
    rows: int,
    seed: int = 0,
    bad_fraction: float = 0.0,
    start_key: int = 0,
    duplicates: float = 0.0,
) -> pa.Table:
    """Generate sample rows in memory, e.g. to append to a dataset in a test.

    A row with key ``k`` is identical to the row with key ``k`` written by
    :func:`write_sample` with the same seed (bad-image and duplicate injection
    aside, which are planned over the rows requested). Near-duplicates copy any
    key below ``start_key + rows``, so appended rows can duplicate rows already
    in the dataset; :func:`duplicate_plan` tells which.

    Args:
        rows: Number of rows, at least 1.
        seed: Non-negative seed.
        bad_fraction: Share of rows (0..1) given bad images.
        start_key: First key; keys are ``start_key .. start_key + rows - 1``.
        duplicates: Share of rows (0..1) made near-duplicates of other rows.

    Returns:
        A table with schema :data:`SCHEMA`.
    """
    _validate(rows=rows, seed=seed, bad_fraction=bad_fraction, duplicates=duplicates)
    if start_key < 0:
        raise LaionRayError(f"start_key must be >= 0, got {start_key}")
    plan = _bad_plan(rows, seed, bad_fraction, start_key=start_key)
    dups = _dup_plan(rows, seed, duplicates, start_key=start_key, bad=plan)
    batches = _batches(start_key, rows, seed=seed, plan=plan, dups=dups)
    return pa.Table.from_batches(list(batches), SCHEMA)


def duplicate_plan(
    rows: int, seed: int = 0, duplicates: float = 0.0, start_key: int = 0, bad_fraction: float = 0.0
) -> dict[int, list[int]]:
    """The true near-duplicate groups (source key -> copies) of those same arguments."""
    _validate(rows=rows, seed=seed, bad_fraction=bad_fraction, duplicates=duplicates)
    bad = _bad_plan(rows, seed, bad_fraction, start_key=start_key)
    return _groups(_dup_plan(rows, seed, duplicates, start_key=start_key, bad=bad))


def sample_embeddings(
    rows: int, seed: int = 0, duplicates: float = 0.0
) -> tuple[pa.Table, dict[int, list[int]]]:
    """Only the vector-side columns of a sample, fast enough for millions of rows.

    Rows ``0 .. rows - 1`` have the same ``key``, ``similarity`` and
    ``img_emb`` (to float32 rounding) as :func:`write_sample` with these
    arguments writes. No image is drawn, so ``width``/``height`` are the drawn
    sizes (a copy's real image size may differ). For benchmarks that need large
    vector tables.

    Returns:
        ``(table of key, similarity, width, height, img_emb; true groups)``.
    """
    _validate(rows=rows, seed=seed, bad_fraction=0.0, duplicates=duplicates)
    dups = _dup_plan(rows, seed, duplicates, start_key=0, bad={})
    copies = np.fromiter(dups, np.int64, len(dups))
    emb = np.empty((rows, EMB_DIM), np.float32)
    copy_noise = np.empty((len(copies), EMB_DIM), np.float32)
    parts = []
    for block in range((rows - 1) // _BLOCK + 1):
        p = _block_params(seed, block)
        lo, hi = block * _BLOCK, min(rows, (block + 1) * _BLOCK)
        emb[lo:hi] = _embeddings(p, 0, hi - lo, seed=seed, block_start=lo, dups={})
        here = np.searchsorted(copies, [lo, hi])
        copy_noise[here[0] : here[1]] = p["emb_noise"][copies[here[0] : here[1]] - lo]
        parts.append(
            pa.table(
                {
                    "key": pa.array(np.arange(lo, hi), pa.int64()),
                    "similarity": pa.array(p["similarity"][: hi - lo]),
                    "width": pa.array(p["width"][: hi - lo], pa.int64()),
                    "height": pa.array(p["height"][: hi - lo], pa.int64()),
                }
            )
        )
    # Sources are never copies, so their embeddings are final: copies in one go.
    if len(copies):
        sources = np.array([dups[c][0] for c in copies])
        noise = np.array([_DUP_NOISE[dups[c][1]] for c in copies], np.float32)[:, None]
        moved = emb[sources] + noise * copy_noise
        emb[copies] = moved / np.linalg.norm(moved, axis=1, keepdims=True)
    table = pa.concat_tables(parts).combine_chunks()
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), EMB_DIM)
    return table.append_column("img_emb", vectors), _groups(dups)


# --- validation ---------------------------------------------------------------


def _validate(*, rows: int, seed: int, bad_fraction: float, duplicates: float = 0.0) -> None:
    if rows < 1:
        raise LaionRayError(f"rows must be >= 1, got {rows}")
    if seed < 0:
        raise LaionRayError(f"seed must be >= 0, got {seed}")
    if not 0.0 <= bad_fraction <= 1.0:
        raise LaionRayError(f"bad_fraction must be between 0 and 1, got {bad_fraction}")
    if not 0.0 <= duplicates < 0.5:
        # Every copy needs a source that is not itself a copy.
        raise LaionRayError(f"duplicates must be in [0, 0.5), got {duplicates}")


def _exists(uri: str, options: Mapping[str, str]) -> bool:
    if is_local(uri):
        return os.path.exists(uri.removeprefix("file://"))
    try:
        lance.dataset(uri, storage_options=dict(options))
    except (ValueError, OSError):
        return False
    return True


# --- bad-image plan -------------------------------------------------------------


def _bad_plan(rows: int, seed: int, bad_fraction: float, *, start_key: int) -> dict[int, str]:
    """Key -> bad kind for exactly ``round(rows * bad_fraction)`` rows (at least one)."""
    if bad_fraction <= 0:
        return {}
    n_bad = min(rows, max(1, round(rows * bad_fraction)))
    rng = np.random.default_rng([_STREAM_BAD, seed, start_key, rows])
    positions = np.sort(rng.choice(rows, size=n_bad, replace=False))
    # Cycle in key order so even a handful of bad rows covers every kind.
    return {start_key + int(p): BAD_KINDS[i % len(BAD_KINDS)] for i, p in enumerate(positions)}


def _keys_by_kind(plan: Mapping[int, str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for key in sorted(plan):
        out.setdefault(plan[key], []).append(key)
    return out


# --- near-duplicate plan ------------------------------------------------------------


def _dup_plan(
    rows: int, seed: int, duplicates: float, *, start_key: int, bad: Mapping[int, str]
) -> dict[int, tuple[int, str]]:
    """Copy key -> (source key, kind) for ``round(rows * duplicates)`` rows (at least one).

    A key may be a copy or a source, never both, whatever the plan (a hash of
    the key and seed decides), so rows appended with :func:`sample_table` can
    copy rows written earlier without copying a copy. Copies are good rows of
    this range; sources are good keys below the range's end, drawn with
    replacement, so some groups have several copies.
    """
    if duplicates <= 0:
        return {}
    keys = np.arange(start_key, start_key + rows)
    bad_keys = np.fromiter(bad, np.int64)
    eligible = np.setdiff1d(keys[_may_copy(keys, seed)], bad_keys)
    n_dup = min(len(eligible), max(1, round(rows * duplicates)))
    rng = np.random.default_rng([_STREAM_DUP, seed, start_key, rows])
    copies = np.sort(rng.choice(eligible, size=n_dup, replace=False))
    below = np.arange(start_key + rows)
    pool = np.setdiff1d(below[~_may_copy(below, seed)], bad_keys)
    sources = rng.choice(pool, size=n_dup)
    return {
        int(c): (int(s), DUPLICATE_KINDS[i % len(DUPLICATE_KINDS)])
        for i, (c, s) in enumerate(zip(copies, sources, strict=True))
    }


def _may_copy(keys: np.ndarray, seed: int) -> np.ndarray:
    """Half of the keys (by a Fibonacci hash) may be copies; the others may be sources."""
    mixed = (keys.astype(np.uint64) + np.uint64(seed)) * np.uint64(11400714819323198485)
    return ((mixed >> np.uint64(40)) & np.uint64(1)).astype(bool)


def _groups(dups: Mapping[int, tuple[int, str]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for copy in sorted(dups):
        out.setdefault(dups[copy][0], []).append(copy)
    return dict(sorted(out.items()))


def _copy_image(kind: str, image: Image.Image, jpeg: bytes, key: int) -> bytes:
    """The bytes of a near-duplicate of ``image`` (JPEG ``jpeg``) of ``kind``."""
    if kind == "exact":
        return jpeg
    if kind == "reencode":
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=60 + key % 20)
        return buf.getvalue()
    w, h = image.size
    if kind == "resize":
        scale = 0.5 + (key % 5) / 10
        image = image.resize((max(8, round(w * scale)), max(8, round(h * scale))))
    else:  # crop: 2-6% off each side
        f = 0.02 + (key % 5) / 100
        dx, dy = round(w * f), round(h * f)
        image = image.crop((dx, dy, w - dx, h - dy))
    return _encode(image, "JPEG")


# --- row generation ---------------------------------------------------------------


def _batches(
    start_key: int,
    rows: int,
    *,
    seed: int,
    plan: Mapping[int, str],
    dups: Mapping[int, tuple[int, str]],
) -> Iterator[pa.RecordBatch]:
    """Yield rows ``start_key .. start_key + rows - 1``, one batch per key block piece."""
    end = start_key + rows
    for block in range(start_key // _BLOCK, (end - 1) // _BLOCK + 1):
        params = _block_params(seed, block)
        lo = max(start_key, block * _BLOCK) - block * _BLOCK
        hi = min(end, (block + 1) * _BLOCK) - block * _BLOCK
        yield _render(params, block * _BLOCK, lo, hi, seed=seed, plan=plan, dups=dups)


def _source(seed: int, key: int) -> tuple[dict[str, np.ndarray], int]:
    """(block parameters, index in the block) of row ``key``."""
    return _block_params(seed, key // _BLOCK), key % _BLOCK


def _embeddings(
    p: dict[str, np.ndarray],
    lo: int,
    hi: int,
    *,
    seed: int,
    block_start: int,
    dups: Mapping[int, tuple[int, str]],
) -> np.ndarray:
    """Unit-norm float32 embeddings of block rows ``lo .. hi - 1``.

    A row is its cluster's centroid plus noise; a copy is its source's
    embedding plus a little of its own noise (see :data:`_DUP_NOISE`).
    """
    emb = _centroids(seed)[p["cluster"][lo:hi]] + _CLUSTER_SPREAD * p["emb_noise"][lo:hi]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    for i in range(lo, hi):
        copy = dups.get(block_start + i)
        if copy is None:
            continue
        src_p, j = _source(seed, copy[0])
        src = _embeddings(src_p, j, j + 1, seed=seed, block_start=copy[0] - j, dups={})[0]
        emb[i - lo] = src + _DUP_NOISE[copy[1]] * p["emb_noise"][i]
        emb[i - lo] /= np.linalg.norm(emb[i - lo])
    return emb.astype(np.float32)


@lru_cache(maxsize=8)  # a copy's source block is often drawn again soon
def _block_params(seed: int, block: int) -> dict[str, np.ndarray]:
    """Draw every random choice for one block of ``_BLOCK`` keys at once (vectorised)."""
    rng = np.random.default_rng([_STREAM_BLOCK, seed, block])
    n = _BLOCK
    high_res = rng.random(n) < 0.15  # some >= 512x512 so is_high_res is sometimes true
    width = np.where(high_res, rng.integers(512, _TEXTURE_SIDE, n), rng.integers(64, 449, n))
    height = np.where(high_res, rng.integers(512, _TEXTURE_SIDE, n), rng.integers(64, 449, n))
    # Most LAION images were downscaled from a larger original.
    scale = np.where(rng.random(n) < 0.6, rng.uniform(1.0, 4.0, n), 1.0)
    cluster = rng.integers(0, _N_CLUSTERS, n)
    return {
        "width": width,
        "height": height,
        "original_width": np.ceil(width * scale).astype(np.int64),
        "original_height": np.ceil(height * scale).astype(np.int64),
        "texture": rng.integers(0, _N_TEXTURES, n),
        "x0": rng.integers(0, _TEXTURE_SIDE - width + 1),
        "y0": rng.integers(0, _TEXTURE_SIDE - height + 1),
        "flip": rng.integers(0, 4, n),
        "gain": rng.uniform(0.6, 1.3, (n, 3)),
        "bias": rng.uniform(-40.0, 40.0, (n, 3)),
        "n_shapes": rng.integers(1, 4, n),
        "shape_kind": rng.integers(0, 3, (n, 3)),
        "shape_xy": rng.random((n, 3, 4)),
        "shape_rgb": rng.integers(0, 256, (n, 3, 3)),
        "soften": rng.random(n) < 0.3,
        "cluster": cluster,
        "emb_noise": rng.standard_normal((n, EMB_DIM), dtype=np.float32),
        "style": rng.integers(0, len(_STYLES), n),
        "adjective": rng.integers(0, len(_ADJECTIVES), n),
        "setting": rng.integers(0, len(_SETTINGS), n),
        "domain": rng.integers(0, len(_DOMAINS), n),
        "license": rng.integers(0, len(_LICENSES), n),
        "nsfw": (rng.random(n) < 0.05).astype(np.int64),
        "similarity": rng.uniform(0.28, 0.42, n),
        "camera": rng.integers(-len(_CAMERAS) * 2, len(_CAMERAS), n),  # < 0: no EXIF
        "junk": rng.integers(0, 256, (n, 96), dtype=np.uint8),
    }


def _render(
    p: dict[str, np.ndarray],
    block_start: int,
    lo: int,
    hi: int,
    *,
    seed: int,
    plan: Mapping[int, str],
    dups: Mapping[int, tuple[int, str]],
) -> pa.RecordBatch:
    textures = _textures(seed)
    cols: dict[str, list] = {name: [] for name in SCHEMA.names if name != "img_emb"}
    for i in range(lo, hi):
        key = block_start + i
        copy = dups.get(key)
        # A copy shows its source's picture (and subject); the rest is its own.
        src_p, src_i = _source(seed, copy[0]) if copy else (p, i)
        image = _draw_image(src_p, src_i, textures)
        data: bytes | None = _encode(image, "JPEG")
        if copy:
            data = _copy_image(copy[1], image, data, key)
            width, height = Image.open(io.BytesIO(data)).size
        else:
            width, height = int(p["width"][i]), int(p["height"][i])
        kind = plan.get(key)
        if kind is not None:
            data, message = _corrupt(kind, image, data, p["junk"][i], key)
            status = f"bad:{kind}"
        else:
            message, status = None, "success"

        subject = _SUBJECTS[src_p["cluster"][src_i]]
        setting = _SETTINGS[p["setting"][i]]
        caption = f"{_STYLES[p['style'][i]]} {_ADJECTIVES[p['adjective'][i]]} {subject}"
        camera = int(p["camera"][i])
        exif = (
            json.dumps(
                {"Image Make": _CAMERAS[camera][0], "Image Model": _CAMERAS[camera][1]},
                sort_keys=True,
            )
            if camera >= 0
            else "{}"
        )
        cols["key"].append(key)
        cols["image"].append(data)
        cols["image_path"].append(f"{key // 10000:05d}/{key:09d}.jpg")
        cols["caption"].append(f"{caption} {setting}".strip())
        cols["url"].append(
            f"https://{_DOMAINS[p['domain'][i]]}/{key % 97:02d}/{subject.replace(' ', '-')}-{key}.jpg"
        )
        cols["NSFW"].append(int(p["nsfw"][i]))
        cols["LICENSE"].append(_LICENSES[p["license"][i]])
        cols["similarity"].append(float(p["similarity"][i]))
        cols["width"].append(width)
        cols["height"].append(height)
        cols["original_width"].append(int(src_p["original_width"][src_i]))
        cols["original_height"].append(int(src_p["original_height"][src_i]))
        cols["exif"].append(exif)
        cols["md5"].append(None if data is None else hashlib.md5(data).hexdigest())
        cols["status"].append(status)
        cols["error_message"].append(message)

    emb = _embeddings(p, lo, hi, seed=seed, block_start=block_start, dups=dups)
    arrays = [pa.array(cols[f.name], type=f.type) for f in SCHEMA if f.name != "img_emb"]
    arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), EMB_DIM))
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


def _draw_image(p: dict[str, np.ndarray], i: int, textures: np.ndarray) -> Image.Image:
    """A crop of a smooth base texture, recoloured, with a few shapes on top."""
    width, height = int(p["width"][i]), int(p["height"][i])
    x0, y0 = int(p["x0"][i]), int(p["y0"][i])
    crop = textures[p["texture"][i], y0 : y0 + height, x0 : x0 + width]
    flip = int(p["flip"][i])
    if flip & 1:
        crop = crop[:, ::-1]
    if flip & 2:
        crop = crop[::-1]
    # Per-channel lookup tables recolour a uint8 image far faster than float maths.
    luts = np.clip(np.arange(256)[None, :] * p["gain"][i][:, None] + p["bias"][i][:, None], 0, 255)
    luts = luts.astype(np.uint8)
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    for c in range(3):
        pixels[..., c] = luts[c][crop[..., c]]
    image = Image.fromarray(pixels, "RGB")

    draw = ImageDraw.Draw(image)
    for s in range(int(p["n_shapes"][i])):
        xa, ya, xb, yb = p["shape_xy"][i, s]
        box = (
            min(xa, xb) * width,
            min(ya, yb) * height,
            max(xa, xb) * width + 2,
            max(ya, yb) * height + 2,
        )
        colour = tuple(int(v) for v in p["shape_rgb"][i, s])
        kind = p["shape_kind"][i, s]
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.line(box, fill=colour, width=max(2, width // 40))
    if p["soften"][i]:
        image = image.filter(ImageFilter.SMOOTH)
    return image


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, format=fmt)
    return buf.getvalue()


def _corrupt(
    kind: str, image: Image.Image, jpeg: bytes, junk: np.ndarray, key: int
) -> tuple[bytes | None, str]:
    """Bytes and error message for a bad image of ``kind`` made from a good one."""
    message = _ERROR_MESSAGES[kind]
    if kind == "truncated":
        cut = len(jpeg) // 2
        return jpeg[:cut], message.format(got=cut, total=len(jpeg))
    if kind == "empty":
        return b"", message
    if kind == "null":
        return None, message
    if kind == "not_image":
        if key % 3 == 2:
            # A prefix no image plugin accepts keeps "random bytes" reliably undecodable.
            return b"GARBAGE\x00" + junk.tobytes(), message.format(what="binary garbage")
        body = _NOT_IMAGE_BODIES[key % 3]
        return body, message.format(what="text/html" if key % 3 == 0 else "application/xml")
    if kind == "png":
        return _encode(image, "PNG"), message
    if kind == "grayscale":
        return _encode(image.convert("L"), "JPEG"), message
    if kind == "cmyk":
        return _encode(image.convert("CMYK"), "JPEG"), message
    if kind == "bomb":
        return _bomb(), message
    raise AssertionError(kind)


@lru_cache(maxsize=1)
def _bomb() -> bytes:
    """A tiny JPEG whose frame header claims ``BOMB_SIZE`` x ``BOMB_SIZE`` pixels.

    PIL refuses it in ``Image.open`` (decompression-bomb check) before allocating.
    """
    data = bytearray(_encode(Image.new("RGB", (8, 8), (128, 128, 128)), "JPEG"))
    sof = data.find(b"\xff\xc0")  # baseline frame header: len(2) precision(1) h(2) w(2)
    data[sof + 5 : sof + 9] = BOMB_SIZE.to_bytes(2, "big") * 2
    return bytes(data)


@lru_cache(maxsize=4)
def _textures(seed: int) -> np.ndarray:
    """``_N_TEXTURES`` smooth, noisy RGB base images; every sample image is a crop of one."""
    rng = np.random.default_rng([_STREAM_TEXTURES, seed])
    side = _TEXTURE_SIDE
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    out = np.empty((_N_TEXTURES, side, side, 3), dtype=np.uint8)
    for t in range(_N_TEXTURES):
        base = np.empty((side, side, 3), dtype=np.float32)
        for c in range(3):
            a, b, f1, f2 = rng.uniform(-1, 1, 4)
            cx, cy = rng.random(2)
            radial = np.hypot(xx - cx, yy - cy)
            wave = np.sin(6 * f1 * xx + 4 * f2 * yy + rng.uniform(0, 6.3))
            field = a * xx + b * yy + rng.uniform(-1, 1) * radial + 0.3 * wave
            lo, hi = field.min(), field.max()
            base[..., c] = rng.uniform(0, 80) + (field - lo) / (hi - lo + 1e-6) * rng.uniform(
                120, 175
            )
        image = Image.fromarray(base.astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(4, 9))):
            x, y = rng.uniform(0, side, 2)
            r = rng.uniform(20, 120)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.integers(0, 256, 3).tolist()))
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(6, 16))))
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 5, (side, side, 3))
        out[t] = np.clip(noisy, 0, 255).astype(np.uint8)
    return out


@lru_cache(maxsize=4)
def _centroids(seed: int) -> np.ndarray:
    rng = np.random.default_rng([_STREAM_CENTROIDS, seed])
    centroids = rng.standard_normal((_N_CLUSTERS, EMB_DIM), dtype=np.float32)
    return centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
