"""Nearest neighbours over a feature set's stored features (`featstore index`, `featstore query`).

`build_index` (pipelines/search_index.py) saves a FAISS index under `<store>/indexes/<name>/`;
`query` loads it, refuses it when the feature set's identity or the store's rows changed since,
and answers with hits {row, uid, score, caption, source_ref} (score: cosine similarity; caption
and source_ref when the store has them).  A query is given as vectors, as a stored row's uid (its
own stored vector), or, for a feature set computed from captions (`extract --field caption`), as a
text encoded by the backbone that made the set, re-loaded from its recorded identity and checked
against it.  Text queries against an image feature set are refused: no image backbone here
exposes the matching text tower yet.
"""

from __future__ import annotations

import numpy as np

from featstore.core import format as fmt
from featstore.core.identity import lines, rebuild_options, same_backbone_diff
from featstore.errors import BackboneError, ConfigError, IdentityMismatch, UnknownArray

from .search_index import KINDS, build_index, load_index, normalize, open_store



def text_backbone(fs, device: str = "cpu"):
    """The text backbone that made feature set `fs` (a caption set), loaded and checked."""
    from featstore.pipelines.backbones import load_backbone

    recorded = fs.identity
    if fs.field != fmt.CAPTION:
        raise ConfigError(f"feature set '{fs.name}' was computed from images: --text queries need a feature set "
                          f"computed from captions (`featstore extract --field caption`)")
    name, kwargs = rebuild_options(recorded)
    if not name:
        raise BackboneError(f"feature set '{fs.name}' records no backbone (no alias or model) to encode a text with")
    bb = load_backbone(name, device=device, **kwargs)
    diff = same_backbone_diff(recorded, bb.identity)
    if diff:
        raise IdentityMismatch(f"backbone {name} loaded now differs from the one that made feature set "
                               f"'{fs.name}' (install the same weights/version):{lines(diff)}")
    return bb


def encode_text(fs, texts: list[str], device: str = "cpu") -> np.ndarray:
    return np.asarray(text_backbone(fs, device).encode_texts(list(texts))["pooled"], dtype=np.float32)


def stored_vector(store, fs, uid: str) -> tuple[int, np.ndarray]:
    """(row, pooled vector (view 0)) of the sample `uid`; refused when it is not a usable row."""
    row = int(store.rows_of([uid])[0])
    if row < 0:
        raise UnknownArray(f"the store has no sample with uid {uid!r}")
    if not (fs.is_done([row])[0] and bool(np.asarray(fs.array("valid")[row]))):
        raise UnknownArray(f"uid {uid!r} (row {row}) has no valid features in '{fs.name}' (not done, or failed)")
    vec = np.asarray(fs.array("pooled")[row], dtype=np.float32)
    return row, (vec[0] if fs.views > 1 else vec)[None]


def hits_for(store, rows: np.ndarray, scores: np.ndarray) -> list[dict]:
    """Hits of one query: FAISS pads missing neighbours with -1, which are dropped."""
    keep = rows >= 0
    rows, scores = rows[keep].astype(np.int64), scores[keep]
    fields = set(store.sample_fields())
    out = [{"row": int(r), "score": float(s)} for r, s in zip(rows.tolist(), scores.tolist())]
    if not len(rows):
        return out
    columns = {f: store.samples_at(f, rows) for f in (fmt.UID, fmt.CAPTION, fmt.SOURCE_REF) if f in fields}
    for i, hit in enumerate(out):
        for f, values in columns.items():
            v = str(values[i])
            if f == fmt.UID or v:
                hit[f] = v
    return out


def query(store, feature_set: str, vectors=None, *, uid: str | None = None, text: str | None = None, k: int = 10,
          nprobe: int | None = None, device: str = "cpu") -> list[dict]:
    """The `k` nearest rows of `feature_set` to one query: `vectors` (dim,) or (1, dim), the stored
    vector of `uid`, or `text` encoded by the caption set's backbone.  Each hit: row, uid, score
    (cosine), caption / source_ref when the store has them.  Several vectors: use `query_many`."""
    given = [x is not None for x in (vectors, uid, text)]
    if sum(given) != 1:
        raise ConfigError("give exactly one query: vectors, a uid (--uid) or a text (--text)")
    store = open_store(store)
    fs = store.feature_set(feature_set)
    if uid is not None:
        vectors = stored_vector(store, fs, uid)[1]
    elif text is not None:
        if not text.strip():
            raise ConfigError("the --text query is empty")
        index, meta = load_index(store, feature_set)  # refuse a stale index before loading a backbone
        vectors = encode_text(fs, [text], device)
        return _search(store, index, meta, vectors, k, nprobe)[0]
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.shape[0] != 1:
        raise ConfigError(f"query takes one vector, got {vectors.shape[0]}: use query_many for several")
    return query_many(store, feature_set, vectors, k=k, nprobe=nprobe)[0]


def query_many(store, feature_set: str, vectors, *, k: int = 10, nprobe: int | None = None) -> list[list[dict]]:
    """The hits of each row of `vectors` (n, dim)."""
    store = open_store(store)
    index, meta = load_index(store, feature_set)
    return _search(store, index, meta, np.asarray(vectors, dtype=np.float32), k, nprobe)


def _search(store, index, meta: dict, vectors: np.ndarray, k: int, nprobe: int | None) -> list[list[dict]]:
    if int(k) < 1:
        raise ConfigError(f"k must be >= 1, not {k}")
    if vectors.ndim != 2 or vectors.shape[1] != meta["dim"]:
        raise ConfigError(f"query vectors must have width {meta['dim']} (the feature set's), got shape {vectors.shape}")
    if meta["kind"] != "flat":
        index.nprobe = int(nprobe or meta["nprobe"])
    scores, rows = index.search(normalize(vectors), int(k))
    return [hits_for(store, rows[i], scores[i]) for i in range(len(rows))]


def format_hits(hits: list[dict]) -> str:
    """The hits as a small table: rank, score, row, uid, caption (cut to fit)."""
    head = f"{'#':>3}  {'score':>7}  {'row':>8}  {'uid':<24}  caption / source"
    out = [head]
    for i, h in enumerate(hits, 1):
        what = h.get("caption") or h.get("source_ref") or ""
        what = what if len(what) <= 60 else what[:57] + "..."
        out.append(f"{i:>3}  {h['score']:7.4f}  {h['row']:>8}  {h['uid'][:24]:<24}  {what}")
    return "\n".join(out)


def format_built(meta: dict) -> str:
    params = ", ".join(f"{k}={meta[k]}" for k in ("nlist", "nprobe", "m", "train_rows") if k in meta)
    return (f"indexed {meta['rows_indexed']:,} rows of '{meta['feature_set']}' (dim {meta['dim']}) as {meta['kind']}"
            + (f" ({params})" if params else "") + f" in {meta['seconds']:.1f}s -> {meta['path']}")


__all__ = ["KINDS", "build_index", "query", "query_many", "format_hits", "format_built", "encode_text"]
