"""Loopback servers for tests: HTTP (a directory) and S3 (moto), on 127.0.0.1 only, on free ports.

An HTTP server serves a directory in a thread:

    from servers import serve_directory

    with serve_directory(tmp_path) as base_url:      # "http://127.0.0.1:PORT"
        urls = [f"{base_url}/cat.jpg", f"{base_url}/missing.jpg"]   # a missing file answers 404
        ...

Only 127.0.0.1 is ever bound; nothing leaves the machine. Requests are not logged. The server
stops (and its thread joins) when the block exits, also on an exception.

An S3 server (moto's, which speaks the real S3 protocol) runs in a child process:

    from servers import s3_server

    with s3_server() as endpoint:   # AWS_ENDPOINT_URL and test credentials set meanwhile
        fs = s3fs.S3FileSystem(); fs.mkdir("bucket"); fs.put(local_store, "bucket/s.zarr", recursive=True)
        Store.open("s3://bucket/s.zarr")
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import threading
from collections.abc import Iterator


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@contextlib.contextmanager
def serve_directory(directory: str | os.PathLike) -> Iterator[str]:
    """Serve `directory` read-only over HTTP on 127.0.0.1; yields the base url (no trailing slash)."""
    handler = functools.partial(_QuietHandler, directory=os.fspath(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="test-http-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# ---- a local S3 server (moto) ------------------------------------------------------------------
_S3_SERVER = r"""
import os, sys, time
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
parent = os.getppid()
while os.getppid() == parent and sys.stdin.read(1) != "":  # stops when its parent does
    time.sleep(0.2)
server.stop()
"""

S3_ENV = {"AWS_ACCESS_KEY_ID": "featstore-test", "AWS_SECRET_ACCESS_KEY": "featstore-test",
          "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server (the real S3 protocol, objects in memory) in a child process on
    127.0.0.1, on a free port; yields its endpoint url ("http://127.0.0.1:PORT").

    While the block runs, the usual environment variables point every S3 client at it
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION); they are
    restored after.  The server exits when the block ends, and by itself if this process dies
    (it watches its stdin, a pipe from us).
    """
    import subprocess
    import sys

    env = dict(os.environ, MOTO_S3_DEFAULT_KEY_BUFFER_SIZE=str(256 << 20))  # objects stay in memory
    proc = subprocess.Popen([sys.executable, "-c", _S3_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, text=True)
    saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    try:
        port = int(proc.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        os.environ.update(S3_ENV, AWS_ENDPOINT_URL=url)
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.stdin.close()  # the server's watch loop sees EOF and stops
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
