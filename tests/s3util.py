"""A local S3 server for tests, in a thread of the test process, that records every request.

    from s3util import s3_server

    with s3_server() as s3:             # AWS_ENDPOINT_URL + test credentials set in os.environ meanwhile
        s3.env                          # that environment, for subprocesses (the `featstore` command)
        s3.fs.mkdir("bucket")           # an s3fs filesystem on it
        s3.requests.clear(); ...; s3.requests   # [Request(method, bucket, key, query, range)] since then

moto's server (it speaks the real S3 protocol; objects in memory) on 127.0.0.1 and a free port,
wrapped in a WSGI layer that appends each request to `s3.requests`, so a test counts what a job
costs on object storage: requests from this process and from the subprocesses it starts alike.
"""

from __future__ import annotations

import contextlib
import os
import threading
import urllib.parse
from dataclasses import dataclass

ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class Request:
    method: str
    bucket: str
    key: str  # the object key ("" for bucket requests such as a listing)
    query: dict
    range: str | None

    @property
    def is_listing(self) -> bool:
        return self.method == "GET" and not self.key and ("list-type" in self.query or "prefix" in self.query)

    def touches(self, prefix: str) -> bool:
        """A request on an object under `prefix`, or a listing of it."""
        return self.key.startswith(prefix) or (self.is_listing and self.query.get("prefix", "").startswith(prefix))


class _Recorder:
    def __init__(self, app):
        self.app = app
        self.requests: list[Request] = []
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        path = urllib.parse.unquote(environ.get("PATH_INFO", "")).lstrip("/")
        bucket, _, key = path.partition("/")
        query = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
        with self.lock:
            self.requests.append(Request(environ["REQUEST_METHOD"], bucket, key, query, environ.get("HTTP_RANGE")))
        return self.app(environ, start_response)


@dataclass
class S3:
    endpoint: str
    env: dict
    fs: object
    recorder: _Recorder

    @property
    def requests(self) -> list[Request]:
        return self.recorder.requests


@contextlib.contextmanager
def s3_server():
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    recorder = _Recorder(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, recorder, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, name="test-s3-server", daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    env = {**ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # cached filesystems would still point at an earlier server
    try:
        yield S3(endpoint, {**os.environ, **env}, s3fs.S3FileSystem(skip_instance_cache=True), recorder)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.shutdown()
        thread.join(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
