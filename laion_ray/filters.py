"""One filter language for every command, and safe quoting for the filters laion-ray builds.

Users write filters the way the dataset card and standard SQL do:

- ``"NSFW" = 0``: a double-quoted **identifier** (LanceDB's ``.where()``, the card);
- `` `NSFW` = 0 ``: a backticked identifier (pylance's own quoting);
- ``caption = 'it''s'``: a single-quoted **string literal** (``''`` is a quote in it).

pylance's ``filter=`` reads ``"NSFW"`` as a string literal, so ``"NSFW" = 0``
silently compares a constant. :func:`to_lance_sql` is the one translator every
command (``backfill``, ``search``, ``materialize``, ``dedup``, ``errors``) runs a
user's ``--where`` through: double-quoted identifiers become backticked ones,
and single-quoted literals and backticked identifiers are copied byte for
byte, so a string literal stays a string whatever it contains. The output is
Lance SQL, and translating it again changes nothing.

Filters that laion-ray builds itself never splice a raw name into SQL: where
the API takes one, they are ``pyarrow.compute`` expressions (pylance's
scanners, ``count_rows`` and ``to_table`` accept ``filter=pc.Expression``);
where SQL text is needed (combined with a user's filter, or
``LanceDataset.delete``), names go through :func:`quote_identifier` and values
through :func:`quote_literal` / :func:`sql_in`.

Examples:
    >>> to_lance_sql('"NSFW" = 0 AND caption = \\'say "hi"\\'')
    '`NSFW` = 0 AND caption = \\'say "hi"\\''
    >>> quote_identifier("odd`name")
    '`odd``name`'
    >>> sql_in("udf", ["clip-embed", "it's"])
    "`udf` IN ('clip-embed', 'it''s')"
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence

import pyarrow as pa

from laion_ray.errors import LaionRayError, StorageError, brief

__all__ = [
    "check_filter",
    "filter_table",
    "quote_identifier",
    "quote_literal",
    "sql_and",
    "sql_any_null",
    "sql_in",
    "to_lance_sql",
]

_QUOTE_NAMES = {"'": "string literal", "`": "quoted identifier", '"': "quoted identifier"}


def _quoted_end(text: str, start: int) -> int:
    """Index just past the quoted token opening at ``start``; a doubled quote is
    an escaped one. Raises ``LaionRayError`` if the token is never closed."""
    quote, i = text[start], start + 1
    while i < len(text):
        if text[i] == quote:
            if i + 1 < len(text) and text[i + 1] == quote:
                i += 2
                continue
            return i + 1
        i += 1
    raise LaionRayError(
        f"unterminated {_QUOTE_NAMES[quote]} ({quote}) at character {start + 1} of filter {text!r}"
    )


def to_lance_sql(where: str | None) -> str | None:
    """The user's SQL filter as pylance reads it; ``None`` for no (or a blank) filter.

    ``"Ident"`` (with ``""`` for a quote inside) becomes :func:`quote_identifier`'s
    `` `Ident` ``; single-quoted literals, backticked identifiers and everything
    else are kept as written. Idempotent: Lance SQL passes through unchanged.

    Args:
        where: SQL as a user writes it, e.g. ``'"NSFW" = 0 AND width >= 512'``.

    Returns:
        The filter for pylance's ``filter=``, or ``None``.

    Raises:
        LaionRayError: a quote is never closed.
    """
    if where is None or not where.strip():
        return None
    out: list[str] = []
    i = 0
    while i < len(where):
        ch = where[i]
        if ch in "'`":
            end = _quoted_end(where, i)
            out.append(where[i:end])
            i = end
        elif ch == '"':
            end = _quoted_end(where, i)
            out.append(quote_identifier(where[i + 1 : end - 1].replace('""', '"')))
            i = end
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def quote_identifier(name: str) -> str:
    """A column name as a Lance SQL identifier: in backticks, backticks doubled.

    Raises:
        LaionRayError: ``name`` is empty or not a string.
    """
    if not isinstance(name, str) or not name:
        raise LaionRayError(f"a column name must be a non-empty string, got {name!r}")
    return "`" + name.replace("`", "``") + "`"


def quote_literal(value: str) -> str:
    """A string as a Lance SQL literal: in single quotes, single quotes doubled."""
    return "'" + str(value).replace("'", "''") + "'"


def _sql_value(value: str | int) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"sql_in takes strings and integers, got {value!r}")
    return quote_literal(value) if isinstance(value, str) else str(int(value))


def sql_in(column: str, values: Iterable[str | int]) -> str:
    """``column IN (values)`` in Lance SQL; ``false`` for no values (``IN ()`` is invalid)."""
    items = [_sql_value(v) for v in values]
    return f"{quote_identifier(column)} IN ({', '.join(items)})" if items else "false"


def sql_any_null(columns: Sequence[str]) -> str | None:
    """``col1 IS NULL OR col2 IS NULL ...`` (rows lacking any of ``columns``), or ``None``."""
    return " OR ".join(f"{quote_identifier(c)} IS NULL" for c in columns) or None


def sql_and(*clauses: str | None) -> str | None:
    """The clauses that are given, each parenthesised, joined by ``AND``; ``None`` if none."""
    given = [f"({c})" for c in clauses if c]
    return " AND ".join(given) or None


def check_filter(ds, where: str | None, *, flag: str = "--where", given: str | None = None) -> None:
    """Raise a one-line ``LaionRayError`` if Lance cannot plan ``where`` on ``ds``.

    Planning resolves column names and literal types without reading any rows,
    so the check costs the same at any table size.

    Args:
        ds: A ``lance.LanceDataset``.
        where: Lance SQL (see :func:`to_lance_sql`), or ``None``.
        flag: How the user gave the filter, for the message.
        given: The filter as the user wrote it, for the message (default ``where``).
    """
    if not where:
        return
    try:
        ds.scanner(filter=where, columns=[], with_row_id=True).explain_plan()
    except Exception as exc:  # Lance raises several types for a bad expression
        from laion_ray.storage import is_storage_failure

        if is_storage_failure(exc):  # the store failed (credentials, network): not a bad filter
            raise StorageError(f"cannot check {flag} on {ds.uri}: {brief(exc)}") from exc
        raise LaionRayError(f"bad {flag} {given or where!r}: {brief(exc)}") from exc


def filter_table(
    table: pa.Table, where: str | None, *, flag: str = "--where", given: str | None = None
) -> pa.Table:
    """The rows of an in-memory ``table`` that pass Lance SQL ``where``.

    Evaluated by Lance itself, over a scratch dataset of ``table``, so that the
    filter means exactly what it would mean in a scan. For small tables
    (listings), not for data.

    Raises:
        LaionRayError: Lance cannot evaluate ``where`` on ``table``'s columns.
    """
    if not where:
        return table
    import lance

    with tempfile.TemporaryDirectory(prefix="laion-ray-filter-") as tmp:
        ds = lance.write_dataset(table, f"{tmp}/rows.lance")
        check_filter(ds, where, flag=flag, given=given)
        return ds.to_table(filter=where)
