"""A loopback HTTP server for tests: serve a directory on 127.0.0.1, on a free port, in a thread.

    from servers import serve_directory

    with serve_directory(tmp_path) as base_url:      # "http://127.0.0.1:PORT"
        urls = [f"{base_url}/cat.jpg", f"{base_url}/missing.jpg"]   # a missing file answers 404
        ...

Only 127.0.0.1 is ever bound; nothing leaves the machine. Requests are not logged. The server
stops (and its thread joins) when the block exits, also on an exception.
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
