"""`featstore serve`: the real command as a subprocess on a free port, over a small store made by the
real extract (14 skimage/generated images with captions; EfficientNet-Lite0 with stored pixels, the
packaged MiniLM over the captions, a flat index), read by http.client, raw sockets and Debian's
chromium driven by playwright."""

import base64
import http.client
import inspect
import io
import json
import os
import queue
import signal
import socket
import subprocess
import time
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from featstore.pipelines.extract import extract
from featstore.pipelines.search import build_index, query
from featstore.pipelines.serve import Catalog, is_loopback, thumbnail_of
from featstore.store import Store
from featstore.tools.inspect import plot
from imagedata import encode, real_images, write_shard
from signals import default_sigint

FEATSTORE = os.path.join(os.path.dirname(sys.executable), "featstore")
QUIET = dict(progress=False, log=lambda *_: None)
CHROMIUM = "/usr/bin/chromium"
CAPTIONS = [
    "an astronaut in a white space suit standing next to a flag",
    "a cup of hot coffee on a saucer",
    "a tabby cat lying on a sofa",
    "a red sports car driving along a coastal road",
    "a bowl of fresh strawberries and cream",
    "a snowy mountain peak under a clear blue sky",
    "a man playing an acoustic guitar on stage",
    "children building a sandcastle on the beach",
    "an old steam locomotive crossing a stone bridge",
    "a plate of spaghetti with tomato sauce",
    "a lighthouse on a rocky cliff at sunset",
    "a dog catching a frisbee in a park",
    "a stack of old books on a wooden desk",
    "a hot air balloon floating over green fields",
]
SECRET = "featstore-serve-secret-do-not-serve"


@pytest.fixture(scope="module")
def images():
    return real_images(len(CAPTIONS))


@pytest.fixture(scope="module")
def store(tmp_path_factory, images):
    shards = tmp_path_factory.mktemp("wds")
    write_shard(shards / "00000.tar", [{"key": f"a{i:06d}", "image": encode(img), "caption": cap,
                                        "json": {"uid": f"a-{name}"}}
                                       for i, ((name, img), cap) in enumerate(zip(images, CAPTIONS))])
    path = tmp_path_factory.mktemp("st") / "s.zarr"
    extract(path, shards, "minilm", field="caption", batch_size=16, rows_per_shard=8, **QUIET)
    extract(path, shards, "efficientnet-lite0", name="img", pixels="crops", batch_size=8, **QUIET)
    build_index(path, "minilm", progress=False)
    build_index(path, "img", progress=False)
    r = subprocess.run([FEATSTORE, "inspect", "--store", str(path), "--plots"], capture_output=True, text=True)
    assert r.returncode == 0 and "plots   img: " in r.stdout and "(14 rows sampled)" in r.stdout, r.stdout + r.stderr
    plots = path / "plots" / "minilm"
    plot(Store.open(path), str(plots / "inspect.png"))  # the store-wide plot, kept beside them
    secret = tmp_path_factory.mktemp("outside") / "secret.png"
    secret.write_text(SECRET)
    os.symlink(secret, plots / "escape.png")  # a symlink out of the store: never listed nor served
    (path / "plots" / "outside-link").symlink_to(secret.parent, target_is_directory=True)
    return path


class Server:
    """`featstore serve` as a subprocess; ready once it printed its "serving" line."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([FEATSTORE, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=default_sigint,  # Ctrl-C must reach it, however pytest was started
                                     text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout] + [lines.put(None)], daemon=True).start()
        first = lines.get(timeout=300)  # an event (the line, or EOF when it died), bounded only against a hang
        assert first and first.startswith("serving http://127.0.0.1:"), (first, self.proc.stderr.read())
        self.url = first.split()[1]
        self.port = int(self.url.rstrip("/").rsplit(":", 1)[1])

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, r.getheader("Content-Type"), data

    def raw(self, request_line: bytes, headers: bytes = b"") -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=300) as s:
            s.sendall(request_line + b"\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + headers + b"\r\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out

    def stop(self):
        """Ctrl-C: the server stops, says so in one line, exit 0.  Waits on the process itself, not
        on its pipes' EOF; if it has not exited in 120 s, SIGUSR1 makes it print every thread's
        stack (faulthandler, registered by `featstore serve`) into the failure."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(2)  # a diagnosis of a hang already found: the stacks need a moment to be written
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"serve did not exit after Ctrl-C; its threads:\n{self._stderr()}") from None
        return self.proc.returncode, self._stderr()

    def _stderr(self) -> str:
        """What the server wrote to stderr, read without blocking (the process has ended)."""
        fd = self.proc.stderr.fileno()
        os.set_blocking(fd, False)
        chunks = []
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def server(store):
    s = Server("--store", str(store), "--features", "minilm")
    yield s
    rc, err = s.stop()
    assert rc == 0 and err.strip() == "stopped serving (nothing was changed)", (rc, err)


def test_api_hits_equal_query(server, store):
    status, ctype, body = server.request("GET", "/api/sets")
    assert status == 200 and ctype == "application/json"
    info = json.loads(body)
    sets = {s["name"]: s for s in info["sets"]}
    assert info["default"] == "minilm" and sets["minilm"]["indexed"] and sets["img"]["indexed"]
    assert sets["minilm"]["plots"] == ["dims.png", "inspect.png", "norms.png", "pca.png"]
    assert sets["img"]["plots"] == ["dims.png", "norms.png", "pca.png"] and sets["img"]["pixels"] == "crops"
    for path, args in (("/api/query?set=minilm&text=a+kitten+sleeping+on+the+couch&k=5",
                        dict(text="a kitten sleeping on the couch", k=5)),
                       ("/api/query?text=a%20dog%20playing%20with%20a%20disc&k=3", dict(text="a dog playing with a disc", k=3)),
                       ("/api/query?set=minilm&uid=a-coffee&k=4", dict(uid="a-coffee", k=4))):
        status, ctype, body = server.request("GET", path)
        assert status == 200 and ctype == "application/json", body
        hits = json.loads(body)
        assert hits == json.loads(json.dumps(query(store, "minilm", **args)))
        assert len(hits) == args["k"]
    assert json.loads(server.request("GET", "/api/query?text=a+kitten+sleeping+on+the+couch")[2])[0]["uid"] == "a-chelsea"
    for path, code in (("/api/query?set=minilm&uid=no-such-uid", 404), ("/api/query?set=nope&text=cat", 404),
                       ("/api/query?set=minilm&text=cat&k=0", 400), ("/api/query?set=minilm&k=3", 400),
                       ("/api/query?set=img&text=a+cat", 400)):  # an image set without a text tower: one line
        status, ctype, body = server.request("GET", path)
        assert status == code and ctype == "application/json" and json.loads(body)["error"], (path, body)


def test_thumbnails_and_plots(server, store, images):
    status, ctype, body = server.request("GET", "/thumb/2")
    assert status == 200 and ctype == "image/jpeg"
    thumb = Image.open(io.BytesIO(body))
    crop = Store.open(store).pixels("crops")[2]
    assert thumb.size == (160, 160) and crop.shape[-2:] == (224, 224)  # the stored crop, shrunk
    want = np.asarray(Image.fromarray(np.ascontiguousarray(crop.transpose(1, 2, 0))).resize((160, 160)), np.float32)
    assert np.abs(np.asarray(thumb.convert("RGB"), np.float32) - want).mean() < 12
    # without stored pixels: the bytes the recorded source holds for the row
    cat = Catalog(Store.open(store))
    assert cat.source_image(2) == encode(images[2][1])
    assert Image.open(io.BytesIO(thumbnail_of(cat.source_image(0)))).size[0] == 160
    assert server.request("GET", f"/thumb/{len(CAPTIONS)}")[0] == 404
    for name in ("minilm/inspect.png", "img/pca.png", "img/norms.png"):
        status, ctype, body = server.request("GET", f"/plots/{name}")
        assert status == 200 and ctype == "image/png" and body == (store / "plots" / name).read_bytes()
        assert Image.open(io.BytesIO(body)).size[0] >= 400  # a real PNG


TRAVERSALS = ["/thumb/../../etc/passwd", "/thumb/..%2f..%2fetc%2fpasswd", "/plots/x/..%2f..%2fetc%2fpasswd",
              "/plots/minilm/..%2f..%2f..%2f..%2fetc%2fpasswd", "/plots/minilm/%2e%2e/%2e%2e/meta.json",
              "/plots/minilm/%252e%252e%252fzarr.json", "/plots/minilm/escape.png", "/plots/outside-link/secret.png",
              "/plots/minilm/", "/plots/minilm", "/plots/", "/indexes/minilm/meta.json", "/zarr.json",
              "/plots/minilm/inspect.png%00.txt", "/thumb/2%00", "/plots/minilm/..\\..\\zarr.json",
              "//etc/passwd", "/etc/passwd", "/thumb//etc/passwd", "/plots/minilm//etc/passwd",
              "/thumb/-1", "/thumb/2.0", "/api/../zarr.json", "/./zarr.json", "/plots/minilm/%2E%2E%5Czarr.json"]


def test_traversal_is_refused(server, store):
    secrets = [SECRET.encode(), b"root:", (store / "zarr.json").read_bytes()[:40],
               (store / "indexes" / "minilm" / "meta.json").read_bytes()[:40]]
    for path in TRAVERSALS:
        status, _, body = server.request("GET", path)
        assert 400 <= status < 500, (path, status)
        assert not any(s in body for s in secrets), path
    for target in (b"/../../etc/passwd", b"/thumb/../../../etc/passwd", b"http://127.0.0.1/../etc/passwd",
                   b"/etc/passwd", b"C:\\etc\\passwd", b"/plots/minilm/\x00", b"*"):
        out = server.raw(b"GET " + target + b" HTTP/1.1")
        assert out.split(b" ", 2)[1].startswith(b"4"), (target, out[:80])
        assert not any(s in out for s in secrets), target
    # a Host that is not this machine (DNS rebinding) is refused while bound to loopback
    assert server.request("GET", "/api/sets", headers={"Host": "evil.example:80"})[0] == 400


def test_only_get_and_post_are_allowed(server):
    for method in ("PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "CONNECT"):
        status, _, _ = server.request(method, "/api/sets", body=b"x" if method in ("PUT", "PATCH") else None)
        assert status == 405, method
    assert server.request("POST", "/thumb/1", body=b"x")[0] == 405
    # a body over the bound is refused from its Content-Length, before any of it is read
    out = server.raw(b"POST /api/query?set=img HTTP/1.1", b"Content-Length: %d\r\n" % (16 * 2**20 + 1))
    assert out.split(b" ", 2)[1] == b"413", out[:80]
    assert server.raw(b"POST /api/query?set=img HTTP/1.1").split(b" ", 2)[1] == b"411"
    assert server.request("GET", "/api/sets")[0] == 200  # still serving


def test_image_query(server, store, images):
    """An image dropped on the page is POSTed as bytes to query(..., image=)."""
    assert "image" in inspect.signature(query).parameters
    data = encode(images[0][1])
    status, ctype, body = server.request("POST", "/api/query?set=img&k=3", body=data)
    assert status == 200 and ctype == "application/json", body
    hits = json.loads(body)
    assert hits == json.loads(json.dumps(query(store, "img", image=data, k=3))) and hits[0]["uid"] == "a-astronaut"
    for path, payload in (("/api/query?set=minilm&k=3", data),  # a caption set takes no image: one line
                          ("/api/query?set=img&k=3", b"not an image")):
        status, ctype, body = server.request("POST", path, body=payload)
        assert 400 <= status < 500 and ctype == "application/json" and json.loads(body)["error"], body


def test_loopback():
    assert all(map(is_loopback, ("127.0.0.1", "127.0.0.2", "::1", "localhost")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "192.168.1.4", "example.com", "")))


def test_missing_store_and_bad_options_exit_2(tmp_path, store):
    for args in (["--store", str(tmp_path / "nope.zarr")], ["--store", str(store), "--features", "nope"]):
        r = subprocess.run([FEATSTORE, "serve", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stdout == ""
    r = subprocess.run([FEATSTORE, "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--port" in r.stdout and "read-only" in r.stdout


def test_browser_query_shows_the_expected_first_hit(server, images):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (Debian's chromium: `make browser` as root installs it)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.url)
            page.wait_for_selector("body[data-ready='1']", timeout=120_000)
            assert page.input_value("#set") == "minilm"
            assert page.locator("#plots img").count() == 4
            page.fill("#text", "a kitten sleeping on the couch")
            page.click("#go")
            first = page.locator("#hits li.hit").first
            first.wait_for(timeout=300_000)
            assert first.get_attribute("data-uid") == "a-chelsea"
            assert "a tabby cat lying on a sofa" in first.inner_text()
            img = first.locator("img")
            img.evaluate("i => i.decode()")  # waits for the thumbnail to load (rejects on error)
            assert img.evaluate("i => i.naturalWidth") > 0
            # an image dropped on the page: its bytes POSTed, the image set's hits shown
            page.select_option("#set", "img")
            drop = page.evaluate_handle("""(b64) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], "query.jpg", { type: "image/jpeg" }));
                return dt; }""", base64.b64encode(encode(images[0][1])).decode())
            page.dispatch_event("#drop", "drop", {"dataTransfer": drop})
            page.wait_for_function("() => !document.getElementById('status').textContent.startsWith('searching')",
                                   timeout=300_000)
            assert page.text_content("#status").endswith("hits"), page.text_content("#status")
            assert page.locator("#hits li.hit").first.get_attribute("data-uid") == "a-astronaut"
        finally:
            browser.close()
