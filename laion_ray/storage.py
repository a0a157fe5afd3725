"""URIs, storage options and dataset opening shared by every job.

Lance takes object-store credentials as ``storage_options``; checkpoints and
error tables go through the same options so they live in the same store as the
dataset.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from urllib.parse import urlparse

import lance
import pyarrow.fs as pafs

from laion_ray.errors import LaionRayError, brief

# Environment variables Lance itself reads for S3; passed on explicitly so that
# pyarrow (checkpoint files) sees the same credentials and endpoint.
_ENV_OPTIONS = {
    "AWS_ACCESS_KEY_ID": "aws_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "AWS_SESSION_TOKEN": "aws_session_token",
    "AWS_REGION": "aws_region",
    "AWS_DEFAULT_REGION": "aws_region",
    "AWS_ENDPOINT": "aws_endpoint",
    "AWS_ENDPOINT_URL": "aws_endpoint",
    "AWS_ALLOW_HTTP": "allow_http",
}
SECRET_KEYS = ("secret", "token", "password", "key_id", "credential")


def parse_storage_options(pairs: Iterable[str] | None) -> dict[str, str]:
    """Parse repeated ``key=value`` CLI flags into a storage-options dict."""
    options: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LaionRayError(f"--storage-option expects key=value, got {pair!r}")
        options[key.strip()] = value
    return options


def resolve_storage_options(options: Mapping[str, str] | None) -> dict[str, str]:
    """Explicit options win over the ``AWS_*`` environment."""
    resolved = {opt: os.environ[env] for env, opt in _ENV_OPTIONS.items() if os.environ.get(env)}
    resolved.update(options or {})
    return resolved


def mask_secrets(options: Mapping[str, object]) -> dict[str, object]:
    """Copy of ``options`` safe to log: credential-like values are masked."""
    return {
        k: "***" if any(s in k.lower() for s in SECRET_KEYS) and v else v
        for k, v in options.items()
    }


def is_local(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file") or len(urlparse(uri).scheme) == 1


def join_uri(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def open_dataset(
    uri: str,
    *,
    version: int | str | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> lance.LanceDataset:
    """Open a Lance dataset, turning "not found" into an error that names the URI."""
    if is_local(uri) and not os.path.exists(uri.removeprefix("file://")):
        raise LaionRayError(f"no such path: {uri}")
    try:
        return lance.dataset(
            uri, version=version, storage_options=resolve_storage_options(storage_options)
        )
    except (ValueError, OSError) as exc:
        raise LaionRayError(f"cannot open {uri} as a Lance dataset: {brief(exc)}") from exc


def filesystem(uri: str, storage_options: Mapping[str, str] | None = None):
    """Return ``(pyarrow FileSystem, path)`` for ``uri`` using Lance-style options."""
    opts = resolve_storage_options(storage_options)
    parsed = urlparse(uri)
    if is_local(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    if parsed.scheme in ("s3", "s3a"):
        endpoint = opts.get("aws_endpoint") or opts.get("endpoint")
        kwargs = {
            "access_key": opts.get("aws_access_key_id"),
            "secret_key": opts.get("aws_secret_access_key"),
            "session_token": opts.get("aws_session_token"),
            "region": opts.get("aws_region") or opts.get("region") or "us-east-1",
        }
        if endpoint:
            endpoint_url = urlparse(endpoint)
            kwargs["endpoint_override"] = endpoint_url.netloc or endpoint
            kwargs["scheme"] = endpoint_url.scheme or "https"
        fs = pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None})
        return fs, parsed.netloc + parsed.path
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


def remove_tree(uri: str, storage_options: Mapping[str, str] | None = None) -> None:
    """Delete a directory tree (checkpoints of a finished job); missing is fine."""
    fs, path = filesystem(uri, storage_options)
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_dir(path)
