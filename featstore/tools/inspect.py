"""What is in a store: rows, blocks, feature sets, coverage, failures, bytes; and a plot of it."""

from __future__ import annotations

import collections
import json
import os

import numpy as np

from featstore.core import format as fmt
from featstore.core.files import is_url as _is_url
from featstore.store import Store
from featstore.tokens import merge_fidelity

from .plots import sample_rows


def _bytes_on_disk(path: str) -> int | None:
    if _is_url(path):
        return None
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def summarize(store: Store, examples: int = 3) -> dict:
    """A JSON-able description of the store (what `featstore inspect --json` prints)."""
    n = store.n_rows
    record = store.manifest_record()
    out = {
        "path": store.path,
        "format": store.meta["format"],
        "rows": n,
        "rows_per_shard": store.rows_per_shard,
        "blocks": store.n_blocks,
        "bytes_on_disk": _bytes_on_disk(store.path),
        "sample_fields": store.sample_fields(),
        "sources": [{k: src.get(k) for k in ("id", "type", "location", "options", "rows", "registered_at")}
                    for src in store.sources],
        "duplicates_rejected": len(record["duplicates"]),
        "duplicate_examples": record["duplicates"][:examples],
        "feature_sets": {},
        "pixels": {},
        "prompts": prompt_caches(store),
        "dedup": dedup_records(store),
        "indexes": indexes(store),
    }
    for name in store.feature_set_names():
        fs = store.feature_set(name)
        markers = fs.markers()
        done = fs.done_blocks(markers)
        complete = fs.done_mask(markers)
        valid = np.asarray(fs.array("valid")[:n]) & complete if n else np.zeros(0, bool)
        reasons = collections.Counter()
        uids_by_reason = collections.defaultdict(list)
        for b in sorted(markers):
            for f in markers[b].get("failures", []):
                reasons[f["reason"]] += 1
                if len(uids_by_reason[f["reason"]]) < examples:
                    uids_by_reason[f["reason"]].append(f.get("uid"))
        arrays = {k: {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks)}
                  for k, a in sorted(fs.group.arrays())}
        out["feature_sets"][name] = {
            "dim": fs.attrs.get("dim"),
            "tokens": fs.attrs.get("tokens"),
            "token_dtype": fs.attrs.get("token_dtype"),
            "token_scaling": fs.token_scaling,
            "int8_fidelity": _fidelity(markers),
            "pixels": fs.pixels_name,
            "views": fs.views,
            "view_recipe": fs.identity.get("views"),
            "arrays": arrays,
            "blocks_done": len(done),
            "blocks_missing": store.n_blocks - len(done),
            "complete_rows": int(complete.sum()),
            "rows_to_do": int(n - complete.sum()),
            "coverage": float(complete.sum() / n) if n else 0.0,
            "valid_rows": int(valid.sum()),
            "invalid_rows": int(complete.sum() - valid.sum()),
            "failures_by_reason": dict(reasons.most_common()),
            "failure_examples": dict(uids_by_reason),
            "bytes_on_disk": _bytes_on_disk(os.path.join(store.path, fmt.FEATURES, name)),
            "identity": fs.identity,
        }
    for name in store.pixels_names():
        arr = store.pixels(name)
        out["pixels"][name] = {"shape": list(arr.shape), "feature_set": arr.attrs.get("feature_set"),
                               "identity": dict(arr.attrs.get("identity", {}))}
    return out


def index_metas(store: Store) -> dict:
    """`indexes/<name>/meta.json` of a local store, read directly (tools/ does not import the
    pipelines that build them): {name: the meta dict, or a one-line string saying why it is unreadable}.
    A folder without meta.json holds no index (an interrupted first build) and is skipped."""
    folder = None if _is_url(store.path) else os.path.join(store.path, fmt.INDEXES)
    if not folder or not os.path.isdir(folder):
        return {}
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name, "meta.json")
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                meta = json.load(f)
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
            missing = [k for k in ("kind", "rows_indexed", "store_rows", "rows_done", "identity") if k not in meta]
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
            if not isinstance(meta["rows_indexed"], int) or not isinstance(meta["store_rows"], int):
                raise ValueError("rows_indexed / store_rows are not integers")
        except (OSError, ValueError) as e:
            out[name] = f"{fmt.INDEXES}/{name}/meta.json is unreadable ({str(e).splitlines()[0]})"
            continue
        out[name] = meta
    return out


def indexes(store: Store) -> dict:
    """Per index: kind, rows indexed, what it was built over, and whether it is current (the
    feature set exists with the same identity and the store's rows and done rows are unchanged)."""
    out = {}
    for name, meta in index_metas(store).items():
        if isinstance(meta, str):
            out[name] = {"error": meta, "current": False}
            continue
        exists = name in store.feature_set_names()
        fs = store.feature_set(name) if exists else None
        same_identity = exists and meta["identity"] == fs.identity
        done = int(np.sum(fs.done_summary()[0])) if exists else None
        out[name] = {"kind": meta["kind"], "rows_indexed": meta["rows_indexed"], "store_rows": meta["store_rows"],
                     "rows_done": meta["rows_done"], "view": meta.get("view"), "feature_set_exists": exists,
                     "identity_current": bool(same_identity),
                     "current": bool(same_identity and meta["store_rows"] == store.n_rows and meta["rows_done"] == done),
                     "built": meta.get("extended") or meta.get("built"), "index_bytes": meta.get("index_bytes")}
    return out


def prompt_caches(store: Store) -> dict:
    """`prompts/<name>/`: the class-prompt features eval cached, per text feature set (a cache:
    `featstore rm` of the feature set removes it, and eval recomputes what is missing)."""
    try:
        group = store.root[fmt.PROMPTS]
    except KeyError:
        return {}
    out = {}
    for name, g in sorted(group.groups()):
        identity = dict(g.attrs.get("identity") or {})
        out[name] = {"texts": int(g.attrs.get("n", 0)), "model": identity.get("model"),
                     "bytes_on_disk": _bytes_on_disk(os.path.join(store.path, fmt.PROMPTS, name))}
    return out


def dedup_records(store: Store) -> dict:
    """`dedup/<name>/meta.json`, `featstore dedup`'s records (read directly: tools/ never imports
    pipelines/), each with `stale` when the store's rows or the feature set changed since."""
    import json

    root = None if _is_url(store.path) else os.path.join(store.path, "dedup")
    out = {}
    for name in sorted(os.listdir(root)) if root and os.path.isdir(root) else []:
        try:
            with open(os.path.join(root, name, "meta.json")) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue  # no commit (a run in progress or interrupted): no record
        fs = meta.get("feature_set")
        stale = meta.get("store_rows") != store.n_rows or bool(fs) and (
            fs not in store.feature_set_names() or store.feature_set(fs).identity != meta.get("identity"))
        out[name] = {**{k: meta.get(k) for k in ("feature_set", "threshold", "rows", "exact_dup_rows", "near_dup_rows",
                                                 "groups", "cross_source_groups", "built")}, "stale": bool(stale)}
    return out


def _fidelity(markers: dict[int, dict]) -> dict | None:
    """int8 tokens: the fidelity over every block's marker (None when none records it)."""
    out = None
    for m in markers.values():
        out = merge_fidelity(out, m.get("int8_fidelity"))
    return out


def format_summary(s: dict) -> str:
    """The human-readable form of `summarize`."""
    mib = lambda b: "?" if b is None else f"{b / 2**20:,.1f} MiB"  # noqa: E731
    lines = [
        f"store   {s['path']}  (format {s['format']}, {mib(s['bytes_on_disk'])})",
        f"rows    {s['rows']:,} in {s['blocks']} blocks of {s['rows_per_shard']:,}; fields: {', '.join(s['sample_fields']) or '-'}",
    ]
    for src in s.get("sources", []):
        lines.append(f"source  #{src['id']} {src['type']} {src['location']}: {src['rows']:,} rows registered")
    if s["duplicates_rejected"]:
        ex = ", ".join(f"{d['uid']} ({d['source_ref']})" for d in s["duplicate_examples"])
        lines.append(f"        {s['duplicates_rejected']} duplicate uids rejected, e.g. {ex}")
    if not s["feature_sets"]:
        lines.append("features: none yet")
    for name, f in s["feature_sets"].items():
        ident = f["identity"]
        model = ident.get("model") or ident.get("model_id") or ident.get("path") or ident.get("name") or "?"
        shape = f"pooled {f['dim']}" + (f", tokens {f['tokens'][0]}x{f['tokens'][1]} {f['token_dtype']}" if f["tokens"] else "")
        lines.append(f"features/{name}  [{shape}]  from {model}  {mib(f['bytes_on_disk'])}")
        lines.append(
            f"        coverage {100 * f['coverage']:.1f}% ({f['complete_rows']:,} rows done, "
            f"{f['blocks_done']}/{f['blocks_done'] + f['blocks_missing']} blocks complete), "
            f"valid {f['valid_rows']:,}, invalid {f['invalid_rows']:,}" + (f", pixels/{f['pixels']}" if f["pixels"] else "")
        )
        recipe = f.get("view_recipe") or {}
        if f.get("views", 1) > 1:
            lines.append(f"        {f['views']} stored views per row (a view axis after row): view 0 the centre crop, "
                         f"the others random-resized crops of area {_range(recipe.get('scale'))}, aspect "
                         f"{_range(recipe.get('ratio'))}, mirrored with p {recipe.get('flip', '?')}, seed "
                         f"{recipe.get('seed', '?')}; crops in view_crops, mirroring in view_flips")
        fid = f.get("int8_fidelity")
        if f.get("token_scaling"):
            lines.append(f"        int8 tokens, {f['token_scaling'].replace('_', ' x ')} scaling"
                         + (f": token cosine to the backbone's output mean {fid['mean_cos']:.5f}, worst {fid['worst_cos']:.5f}"
                            if fid else " (no fidelity recorded)"))
        for reason, count in list(f["failures_by_reason"].items())[:5]:
            ex = ", ".join(str(u) for u in f["failure_examples"].get(reason, []))
            lines.append(f"        {count:>6} {reason}  (e.g. {ex})")
    for name, p in s.get("prompts", {}).items():
        lines.append(f"prompts/{name}  {p['texts']:,} cached prompt features from {p['model'] or '?'}  {mib(p['bytes_on_disk'])}")
    for name, d in s.get("dedup", {}).items():
        near = f", {d['near_dup_rows']:,} near (cosine >= {d['threshold']:g})" if d["feature_set"] else ""
        lines.append(f"dedup/{name}  {d['rows']:,} rows: {d['exact_dup_rows']:,} exact duplicates{near}, {d['groups']:,} "
                     f"groups ({d['cross_source_groups']:,} across sources)" + ("  STALE: re-run featstore dedup" if d["stale"] else ""))
    for name, ix in s.get("indexes", {}).items():
        if "error" in ix:
            lines.append(f"indexes/{name}  {ix['error']}")
            continue
        state = "current" if ix["current"] else ("stale: another identity (`featstore index --rebuild`)"
                                                 if ix["feature_set_exists"] and not ix["identity_current"] else
                                                 "stale: no such feature set" if not ix["feature_set_exists"] else
                                                 "stale: the store changed since (`featstore index` extends it)")
        view = ", view 0" if ix.get("view") is not None else ""
        lines.append(f"indexes/{name}  {ix['kind']}, {ix['rows_indexed']:,} rows covered (of {ix['store_rows']:,} "
                     f"then{view}), {state}  {mib(ix.get('index_bytes'))}")
    return "\n".join(lines)


def _range(pair) -> str:
    return f"{pair[0]:g}-{pair[1]:g}" if pair else "?"


def plot(store: Store, path: str, max_rows: int = 5000, seed: int = 0) -> str:
    """PNG: per-feature-set histograms of pooled-feature L2 norms, and coverage per feature set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = store.feature_set_names()
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4 * (len(names) + 1), 3.4), squeeze=False)
    axes = axes[0]
    coverage, valid = [], []
    for ax, name in zip(axes, names):
        fs = store.feature_set(name)
        rows, x = sample_rows(store, name, max_rows, seed)  # whole row blocks, never the column
        if len(rows):
            ax.hist(np.linalg.norm(x, axis=-1).reshape(-1), bins=50, color="tab:blue")  # every stored view
        views = f", {fs.views} views" if fs.views > 1 else ""
        ax.set_title(f"{name}: ‖pooled‖ (n={len(rows):,}{views})", fontsize=9)
        ax.set_xlabel("L2 norm")
        n = max(store.n_rows, 1)
        coverage.append(100 * fs.complete_rows().sum() / n)
        valid.append(100 * fs.usable_rows().sum() / n)
    ax = axes[-1]
    y = np.arange(len(names))
    ax.barh(y, coverage, color="lightgray", label="complete")
    ax.barh(y, valid, color="tab:green", label="valid")
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of rows")
    ax.set_title(f"coverage of {store.n_rows:,} rows", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
