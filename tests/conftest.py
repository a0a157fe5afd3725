"""Shared fixtures: one Ray per test session, small generated datasets."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray workers inherit this, so test UDFs in tests/helpers.py import by reference.
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_TESTS_DIR, os.environ.get("PYTHONPATH")) if p
)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once for the whole session (the first start takes ~30 s here)."""
    import ray

    from laion_ray.ray_env import ensure_ray

    # More logical CPUs than cores so fractional-CPU actors and read tasks overlap.
    ensure_ray(num_cpus=4)
    yield ray
    ray.shutdown()


# --- S3-compatible object store (moto) --------------------------------------


def _fix_complete_multipart(app):
    """WSGI wrapper: moto 5.2 names the CompleteMultipartUpload root element
    ``...Response`` instead of ``...Result``. Lance and boto3 accept that, but
    pyarrow's S3FileSystem treats it as an error embedded in a 200 OK and fails
    every multipart upload (any file it writes without ``allow_delayed_open``)."""

    def wrapped(environ, start_response):
        if environ.get("REQUEST_METHOD") != "POST" or "uploadId=" not in environ.get(
            "QUERY_STRING", ""
        ):
            return app(environ, start_response)
        captured: dict = {}

        def capture(status, headers, exc_info=None):
            captured["status"], captured["headers"] = status, headers
            return lambda data: None

        chunks = app(environ, capture)
        try:
            body = b"".join(chunks)
        finally:
            getattr(chunks, "close", lambda: None)()
        body = body.replace(b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult")
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
        start_response(captured["status"], [*headers, ("Content-Length", str(len(body)))])
        return [body]

    return wrapped


class S3Server:
    """A running moto S3 server: ``endpoint``, ``bucket`` and Lance ``storage_options``."""

    def __init__(self, endpoint: str, bucket: str) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        # Option names as Lance (object_store) spells them; path-style requests are
        # its default when an endpoint is given, so moto needs nothing more.
        self.storage_options = {
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "aws_endpoint": endpoint,
            "aws_region": "us-east-1",
            "allow_http": "true",
        }

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])


@pytest.fixture(scope="session")
def s3_server():
    """moto S3 on 127.0.0.1 (free port) with one bucket; stopped at session end."""
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")

    class _Server(server_mod.ThreadedMotoServer):
        # Same as ThreadedMotoServer._server_entry, plus the multipart fix-up.
        def _server_entry(self) -> None:
            from werkzeug.serving import make_server

            app = _fix_complete_multipart(
                server_mod.DomainDispatcherApplication(server_mod.create_backend_app)
            )
            self._server = make_server(self._ip_address, self._port, app, True)
            self._server_ready_event.set()
            self._server.serve_forever()

    server = _Server(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        bucket = "laion-ray-test"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)
        yield S3Server(endpoint, bucket)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def fault_proxy(s3_server):
    """A :class:`fault_proxy.FaultProxy` in front of ``s3_server`` (no faults until told).

    Yields ``(proxy, S3Server)``: the second names the same bucket with the
    proxy as its endpoint, so jobs given its ``storage_options`` go through it.
    """
    from fault_proxy import FaultProxy

    proxy = FaultProxy(s3_server.endpoint, seed=22).start()
    try:
        yield proxy, S3Server(proxy.endpoint, s3_server.bucket)
    finally:
        proxy.stop()


@pytest.fixture
def faulty_s3(fault_proxy):
    """``fault_proxy`` with its refusals and stripped headers cleared after the test."""
    proxy, server = fault_proxy
    proxy.clear()
    try:
        yield proxy, server
    finally:
        proxy.clear()
        proxy.rate = 0.0
