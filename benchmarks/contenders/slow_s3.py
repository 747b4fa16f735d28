"""moto's S3 server with a fixed delay before every request on one bucket: object storage as far
away as a region's S3 is from a machine in it, on loopback, beside a bucket without the delay.

    python benchmarks/contenders/slow_s3.py PORT LATENCY_MS BUCKET

moto answers a loopback request in about a millisecond; S3 takes some tens of milliseconds to
first byte.  The delay is a sleep in the request's own server thread (werkzeug's threaded
server), so concurrent requests wait side by side, as they do on a network, and it costs no CPU.
"""

from __future__ import annotations

import sys
import time


class Delay:
    def __init__(self, app, seconds: float, bucket: str):
        self.app, self.seconds, self.prefix = app, seconds, f"/{bucket}"

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == self.prefix or path.startswith(self.prefix + "/"):  # path-style: /<bucket>/<key>
            time.sleep(self.seconds)
        return self.app(environ, start_response)


def main(argv=None) -> int:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    port, latency_ms, bucket = (argv or sys.argv[1:])
    app = Delay(DomainDispatcherApplication(create_backend_app), int(latency_ms) / 1000, bucket)
    port = int(port)
    make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
