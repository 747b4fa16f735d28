"""`featstore serve`: a small local, read-only web page over a store (stdlib http.server).

    /                               the page (pipelines/serve_page.py): a query box, an image drop, hits, plots
    /api/sets                       feature sets: field, whether indexed, pixels, summary plots
    /api/query?set=S&text=T|uid=U&k=K   the hits of `pipelines.search.query`, as JSON
    POST /api/query?set=S&k=K       an image query: the body is the image's bytes (at most MAX_BODY)
    /thumb/<row>                    a JPEG thumbnail: the row's stored uint8 pixels (view 0) when a feature
                                    set stored them, else the image read through the row's recorded source
    /plots/<set>/<file>.png         a summary plot found in <store>/plots/<set>/ when the server started

Read-only and closed by default: bound to 127.0.0.1; GET (and POST to /api/query only) — every
other method is 405.  No URL path is ever mapped to a file path: names are looked up in
allow-lists built from the store when the server starts (feature set names, the plots that are
regular files inside the plots folder, symlinks resolving outside it left out); `..`, encoded
separators or dots (`%2f`, `%5c`, `%2e`), backslashes and NUL are refused with 400 before routing;
anything else unknown is 404.  There are no directory listings.  Store reads are serialized by
one lock (a local page for one user; a text query loads the caption set's backbone, as `query` does).
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from featstore.core import format as fmt
from featstore.core.files import is_url
from featstore.errors import BadSample, ConfigError, FeatstoreError, NotInStore, SearchIndexError
from featstore.store import Store

from .search_index import INDEXES, read_meta

PLOTS = "plots"  # <store>/plots/<feature set>/*.png: the feature set's summary plots
MAX_BODY = 16 * 1024 * 1024  # bytes of an image query
MAX_K = 100
THUMB = 160  # pixels: a thumbnail's longer side
_BAD_RAW = re.compile(r"%(2e|2f|5c|00)|\.\.|\\|\x00", re.IGNORECASE)
_ROW = re.compile(r"[0-9]{1,12}")
_PLOT = re.compile(r"[A-Za-z0-9_.-]{1,200}\.png")


class Refused(Exception):
    """An HTTP answer other than 200: status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plots_of(store_path: str, name: str) -> list[str]:
    """The summary plots of feature set `name`: PNG regular files inside <store>/plots/<name>/ (a
    symlink is kept only when it resolves inside that folder)."""
    folder = os.path.join(store_path, PLOTS, name)
    if not os.path.isdir(folder) or os.path.islink(folder):
        return []
    real = os.path.realpath(folder)
    out = []
    for entry in sorted(os.listdir(folder)):
        full = os.path.join(folder, entry)
        if (_PLOT.fullmatch(entry) and os.path.isfile(full)
                and os.path.commonpath([real, os.path.realpath(full)]) == real):
            out.append(entry)
    return out


class Catalog:
    """What the server may answer about, read from the store once: the allow-lists."""

    def __init__(self, store: Store):
        self.store = store
        self.sets: dict[str, dict] = {}
        for name in store.feature_set_names():
            fs = store.feature_set(name)
            self.sets[name] = {"name": name, "field": fs.field, "indexed": self._indexed(name),
                               "pixels": fs.pixels_name, "plots": plots_of(store.path, name)}
        self.lock = threading.Lock()
        self._sources: dict[int, object] = {}

    def _indexed(self, name: str) -> bool:
        try:
            read_meta(self.store, name)
            return True
        except SearchIndexError:
            return False

    def default_set(self) -> str:
        indexed = [n for n, s in self.sets.items() if s["indexed"]]
        if not indexed:
            raise ConfigError(f"no feature set of {self.store.path} is indexed: build one with "
                              f"`featstore index --store {self.store.path} --features NAME`")
        return indexed[0]

    def need_set(self, name: str | None) -> str:
        if not name or name not in self.sets:
            raise Refused(404, f"no feature set {name!r} in this store")
        return name

    def plot_path(self, name: str, file: str) -> str:
        if name not in self.sets or file not in self.sets[name]["plots"]:
            raise Refused(404, "no such plot")
        if file not in plots_of(self.store.path, name):  # checked again: replaced since by a link out
            raise Refused(404, "no such plot")
        return os.path.join(self.store.path, PLOTS, name, file)

    # thumbnails ---------------------------------------------------------------------------------

    def thumbnail(self, row: int) -> bytes:
        """JPEG bytes of row `row`: from stored pixels when some feature set stored them for it,
        else from the image its recorded source holds."""
        if not 0 <= row < self.store.n_rows:
            raise Refused(404, f"no row {row}")
        with self.lock:
            arr = self._stored_pixels(row)
            if arr is not None:
                from PIL import Image

                return _jpeg(Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0))))
            data = self.source_image(row)
        return thumbnail_of(data)

    def _stored_pixels(self, row: int):
        for name, s in self.sets.items():
            if not s["pixels"]:
                continue
            fs = self.store.feature_set(name)
            if fs.is_done([row])[0] and bool(np.asarray(fs.array("valid")[row])):
                px = np.asarray(self.store.pixels(s["pixels"])[row])
                return px[0] if px.ndim == 4 else px  # view 0 of stored views
        return None

    def source_image(self, row: int) -> bytes:
        if fmt.SOURCE not in self.store.sample_fields():
            raise Refused(404, f"row {row} has no recorded source")
        sid = int(np.asarray(self.store.samples_at(fmt.SOURCE, np.array([row])))[0])
        ref = str(self.store.samples_at(fmt.SOURCE_REF, np.array([row]))[0])
        entries = {int(e.get("id", i)): e for i, e in enumerate(self.store.sources)}
        if sid not in entries or not ref:
            raise Refused(404, f"row {row} has no recorded source")
        if sid not in self._sources:
            from .sources import open_source

            e = entries[sid]
            try:
                self._sources[sid] = open_source(e["location"], e["type"], **(e.get("options") or {}))
            except FeatstoreError as err:
                raise Refused(404, f"the source of row {row} cannot be read: {err}") from None
        try:
            return self._sources[sid].read_image(ref)
        except BadSample as err:
            raise Refused(404, f"row {row}'s image cannot be read from its source: {err}") from None


def _jpeg(img) -> bytes:
    img = img.convert("RGB")
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def thumbnail_of(data: bytes) -> bytes:
    """A JPEG thumbnail of encoded image bytes (a decompression bomb is refused by PIL's limit)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (THUMB, THUMB))
            return _jpeg(img)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise Refused(404, f"the image cannot be decoded: {err}") from None


def _k(params: dict) -> int:
    try:
        k = int(params.get("k", "10"))
    except ValueError:
        raise Refused(400, "k must be a whole number") from None
    if not 1 <= k <= MAX_K:
        raise Refused(400, f"k must be between 1 and {MAX_K}")
    return k


class Handler(BaseHTTPRequestHandler):
    server_version = "featstore-serve"
    catalog: Catalog
    loopback_only: bool
    query_options: dict

    def log_message(self, format, *args):  # noqa: A002 (http.server's name)
        pass  # quiet: the command prints its one line

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # every method but GET and POST: 405
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self):
        self._send(405, json.dumps({"error": f"{self.command} is not allowed: this server is read-only"}).encode(),
                   "application/json", extra={"Allow": "GET, POST"})

    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _route(self, fn) -> None:
        try:
            fn()
        except (BrokenPipeError, ConnectionResetError):  # the browser went away (a superseded thumbnail): nothing to say
            self.close_connection = True
        except Refused as e:
            self._json({"error": str(e)}, e.status)
        except NotInStore as e:
            self._json({"error": str(e)}, 404)
        except FeatstoreError as e:
            self._json({"error": str(e).splitlines()[0] if str(e) else type(e).__name__}, 400)
        except Exception as e:  # a bug: said in one line, the server goes on
            self._json({"error": f"internal error: {type(e).__name__}: {str(e)[:200]}"}, 500)

    def _parts(self) -> tuple[list[str], dict]:
        raw = self.path
        if _BAD_RAW.search(raw):
            raise Refused(400, "refused: path traversal or encoded separators")
        split = urllib.parse.urlsplit(raw)
        if split.scheme or split.netloc or not split.path.startswith("/"):
            raise Refused(400, "refused: not a path")
        if self.loopback_only:
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
            if not is_loopback(host):
                raise Refused(400, "refused: Host is not this machine (bound to loopback)")
        parts = [urllib.parse.unquote(p) for p in split.path.split("/")[1:]]
        if any(p in ("..", ".") or "/" in p or "\x00" in p for p in parts):
            raise Refused(400, "refused: path traversal")
        params = {k: v[-1] for k, v in urllib.parse.parse_qs(split.query, keep_blank_values=True).items()}
        return parts, params

    def do_GET(self):
        self._route(self._get)

    def do_POST(self):
        self._route(self._post)

    def _get(self):
        parts, params = self._parts()
        cat = self.catalog
        if parts == [""]:
            from .serve_page import page

            self._send(200, page(self.server.default_set).encode(), "text/html; charset=utf-8",
                       extra={"Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
                                                         "script-src 'unsafe-inline'; img-src 'self'"})
        elif parts == ["api", "sets"]:
            self._json({"store": cat.store.path, "default": self.server.default_set, "sets": list(cat.sets.values())})
        elif parts == ["api", "query"]:
            self._json(self._query(params, None))
        elif len(parts) == 2 and parts[0] == "thumb" and _ROW.fullmatch(parts[1]):
            self._send(200, cat.thumbnail(int(parts[1])), "image/jpeg")
        elif len(parts) == 3 and parts[0] == "plots":
            with open(cat.plot_path(parts[1], parts[2]), "rb") as f:
                self._send(200, f.read(), "image/png")
        else:
            raise Refused(404, "not found")

    def _post(self):
        parts, params = self._parts()
        if parts != ["api", "query"]:
            raise Refused(405, "POST is only for an image query (/api/query)")
        try:
            size = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise Refused(411, "an image query needs a Content-Length") from None
        if not 0 < size <= MAX_BODY:
            self.close_connection = True
            raise Refused(413, f"an image query takes 1 byte to {MAX_BODY // 2**20} MiB")
        self._json(self._query(params, self.rfile.read(size)))

    def _query(self, params: dict, image: bytes | None) -> list[dict]:
        from .search import query

        cat = self.catalog
        name = cat.need_set(params.get("set") or self.server.default_set)
        k = _k(params)
        kw = {"image": image} if image is not None else \
            {key: params[key] for key in ("text", "uid") if params.get(key)}
        if len(kw) != 1:
            raise Refused(400, "give one query: text=... or uid=... (or POST an image)")
        with cat.lock:
            return query(cat.store, name, k=k, **kw, **self.query_options)


def make_server(store_path, feature_set: str | None = None, host: str = "127.0.0.1", port: int = 0,
                **query_options):
    """A ThreadingHTTPServer over the store (not started: call serve_forever); `.url` is its address.
    `query_options` go to every `query` call (the command passes `text_tower`, which pipelines/ may not import)."""
    store = Store.open(store_path)
    if is_url(store.path):
        raise ConfigError(f"{store.path} is on object storage: serve a local store")
    catalog = Catalog(store)
    default = catalog.default_set() if feature_set is None else feature_set
    if default not in catalog.sets:
        raise NotInStore(f"{store.path} has no feature set '{default}' (it has: {', '.join(catalog.sets) or 'none'})")
    handler = type("StoreHandler", (Handler,), {"catalog": catalog, "loopback_only": is_loopback(host),
                                                "query_options": dict(query_options)})
    server = ThreadingHTTPServer((host, int(port)), handler)
    server.daemon_threads = True
    server.default_set = default
    shown = f"[{host}]" if ":" in host else host
    server.url = f"http://{shown}:{server.server_address[1]}/"
    return server


__all__ = ["make_server", "Catalog", "plots_of", "thumbnail_of", "is_loopback", "PLOTS", "INDEXES"]
