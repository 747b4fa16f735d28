"""Nearest neighbours over a feature set's stored features (`featstore index`, `featstore query`).

`build_index` (pipelines/search_index.py) saves a FAISS index under `<store>/indexes/<name>/`;
`query` loads it, refuses it when the feature set's identity or the store's rows changed since,
and answers with hits {row, uid, score, caption, source_ref} (score: cosine similarity; caption
and source_ref when the store has them).  A query is exactly one of (pipelines/query_encode.py
turns the last three into vectors):

* vectors, or a stored row's uid (its own stored vector, view 0);
* an image (`--image PATH`, or bytes), on an image feature set: decoded as extract decodes and
  cropped with the preprocessing recorded in the set's identity, then encoded by the backbone
  that made the set (re-loaded from its identity and checked against it); refused on a caption set;
* a text (`--text`): on a caption set, by the backbone that made the set (re-loaded and checked);
  on an image set made by a two-tower checkpoint (CLIP, SigLIP, EVA-CLIP), by its paired text
  tower into the shared space; other image sets are refused (use `--checkpoint` or a caption set).

With `head` (`--checkpoint RUN`, a trained ShareLock run, loaded by the command) the query goes
through the head's towers: a text through the run's caption backbone and language head; an image
or uid through the image features and the vision head.  The FAISS index holds raw image features,
which are not in the head's space, so with a head no index is used: the stored pooled features of
`feature_set` (which must be the image set the run was trained on) are projected by the vision
head one row block at a time and searched exactly (brute force, memory O(one block + k)).  That
costs one pass over the column per query; a derived index per run is not built (a later option).
"""

from __future__ import annotations

import numpy as np

from featstore.core import format as fmt
from featstore.errors import ConfigError, UnknownArray
from featstore.read.served import usable_in_block

from . import query_encode as qe
from .search_index import KINDS, build_index, load_index, normalize, open_store



def text_backbone(fs, device: str = "cpu"):
    """The text backbone that made feature set `fs` (a caption set), loaded and checked."""
    if fs.field != fmt.CAPTION:
        raise ConfigError(f"feature set '{fs.name}' was computed from images: its text side is its paired text "
                          f"tower (`encode_text`), not a caption backbone")
    return qe.recorded_backbone(fs, device, "encode a text with")


def encode_text(fs, texts: list[str], device: str = "cpu", text_tower=None) -> np.ndarray:
    """(n, dim): texts in `fs`'s space (a caption set's backbone, or an image set's paired text tower)."""
    return qe.encode_text(fs, texts, device, text_tower)


encode_image = qe.encode_image


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


def query(store, feature_set: str, vectors=None, *, uid: str | None = None, text: str | None = None,
          image=None, k: int = 10, nprobe: int | None = None, device: str = "cpu", head=None,
          text_tower=None) -> list[dict]:
    """The `k` nearest rows of `feature_set` to one query: `vectors` (dim,) or (1, dim), the stored
    vector of `uid`, `text`, or `image` (a path or encoded bytes), encoded as the module docstring
    says.  `head`: a trained ShareLock (exact search in its space, see the docstring);
    `text_tower`: loads an image set's paired text tower (the command passes UTA's).  Each hit:
    row, uid, score (cosine), caption / source_ref when the store has them."""
    given = [x is not None for x in (vectors, uid, text, image)]
    if sum(given) != 1:
        raise ConfigError("give exactly one query: vectors, a uid (--uid), a text (--text) or an image (--image)")
    if text is not None and not text.strip():
        raise ConfigError("the --text query is empty")
    if int(k) < 1:
        raise ConfigError(f"k must be >= 1, not {k}")
    store = open_store(store)
    fs = store.feature_set(feature_set)
    if head is not None:
        return head_query(store, fs, head, vectors=vectors, uid=uid, text=text, image=image, k=k, device=device)
    if uid is not None:
        vectors = stored_vector(store, fs, uid)[1]
    elif text is not None or image is not None:
        if text is not None:
            qe.check_text_side(fs)
        index, meta = load_index(store, feature_set)  # refuse a stale index before loading a backbone
        vectors = encode_text(fs, [text], device, text_tower) if text is not None else encode_image(fs, image, device)
        return _search(store, index, meta, vectors, k, nprobe)[0]
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.shape[0] != 1:
        raise ConfigError(f"query takes one vector, got {vectors.shape[0]}: use query_many for several")
    return query_many(store, feature_set, vectors, k=k, nprobe=nprobe)[0]


def head_query(store, fs, head, *, vectors=None, uid=None, text=None, image=None, k: int = 10,
               device: str = "cpu") -> list[dict]:
    """Exact search in a ShareLock head's space: the query through its tower, the stored image
    features of `fs` through its vision head one row block at a time."""
    if fs.field == fmt.CAPTION:
        raise ConfigError(f"--checkpoint searches an image feature set (the one the run was trained on); "
                          f"'{fs.name}' was computed from captions")
    qe.check_head(fs, head)
    if text is not None:
        q = qe.head_text(head, text)
    else:
        if uid is not None:
            x = stored_vector(store, fs, uid)[1]
        elif image is not None:
            x = qe.as_stored(fs, encode_image(fs, image, device))
        else:
            x = np.asarray(vectors, dtype=np.float32).reshape(1, -1)
        q = qe.head_image(head, x)
    q = normalize(q)[0]
    best_rows, best_scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
    pooled = fs.array("pooled")
    for b in range(store.n_blocks):
        start, _ = store.block_range(b)
        rows = start + np.flatnonzero(usable_in_block(store, [fs.name], b))
        if not len(rows):
            continue
        block = np.asarray(pooled[start:int(rows[-1]) + 1])
        block = (block[:, 0] if fs.views > 1 else block)[rows - start]
        scores = normalize(qe.head_image(head, block)) @ q
        best_rows = np.concatenate([best_rows, rows.astype(np.int64)])
        best_scores = np.concatenate([best_scores, scores.astype(np.float32)])
        keep = np.argsort(-best_scores, kind="stable")[: int(k)]
        best_rows, best_scores = best_rows[keep], best_scores[keep]
    return hits_for(store, best_rows, best_scores)


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
            + (f" ({params})" if params else "") + f" in {meta['seconds']:.1f}s -> {meta['path']}"
            + (f"; nprobe {c['nprobe']} measured recall@10 {c['recall']} on {c['queries']} of its rows"
               if (c := meta.get("calibration")) else ""))


__all__ = ["KINDS", "build_index", "query", "query_many", "head_query", "format_hits", "format_built", "encode_text",
           "encode_image"]
