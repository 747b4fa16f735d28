"""What an extraction run reports: the progress bar while it runs, the summary at its end.

The summary says what this run did (rows computed, valid, failures by reason, new rows
registered, metadata filled) and what the feature set has now (its real coverage), so a
no-op resume still tells the truth about the store.
"""

from __future__ import annotations

import collections

import numpy as np


def summarize_run(store, spec, markers: list[dict], registered: dict | None, seconds: float,
                  per_worker: dict | None = None, work: dict | None = None) -> dict:
    writes = [m.get("last_write", {}) for m in markers]
    reasons: collections.Counter = collections.Counter()
    for w in writes:
        reasons.update(w.get("failures", {}))
    rows = sum(w.get("rows", 0) for w in writes)
    valid = sum(w.get("valid", 0) for w in writes)
    cur = store.fresh()
    fs = cur.feature_set(spec.name)
    progress = fs.markers()  # read once: a listing and the index (`featstore.core.progress`)
    done = fs.done_mask(progress)
    usable = done & np.asarray(fs.array("valid")[: cur.n_rows]) if cur.n_rows else done
    registered = registered or {}
    work = work or {}
    summary = {
        "store": spec.store_path,
        "feature_set": spec.name,
        "backbone": spec.backbone,
        "field": spec.field,
        "source": (spec.source or {}).get("path"),
        "rows_registered": registered.get("registered", 0),
        "duplicates_rejected": len(registered.get("duplicates", [])),
        "metadata_filled": {k: v for k, v in (registered.get("filled") or {}).items() if v},
        "metadata_updated": {k: v for k, v in (registered.get("updated") or {}).items() if v},
        "rows_reset": registered.get("reset") or {},
        "blocks_written": sum(1 for w in writes if w.get("rows")),
        "rows_written": rows,
        "valid": valid,
        "invalid": rows - valid,
        "invalid_by_reason": dict(reasons.most_common()),
        "rows_total": cur.n_rows,
        "rows_done": int(done.sum()),
        "rows_usable": int(usable.sum()),
        "rows_to_do": int(cur.n_rows - done.sum()),
        "blocks_total": cur.n_blocks,
        "blocks_missing": len(fs.missing_blocks(progress)),
        "rows_not_in_source": int(work.get("todo_elsewhere", 0) + work.get("not_held", 0)),
        "rows_without_source": int(work.get("no_source", 0)),
        "sources_gone": list(work.get("gone", [])),
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds, 2) if seconds > 0 else None,
        "forward_seconds": round(sum(w.get("forward_seconds", 0.0) for w in writes), 2),
    }
    if per_worker:
        summary["per_worker"] = per_worker
    return summary


def format_summary(s: dict) -> str:
    lines = [f"features/{s['feature_set']} ({s['field']}, {s['backbone']}) in {s['store']}"]
    if s["rows_written"]:
        lines.append(f"  computed {s['rows_written']:,} rows in {s['blocks_written']} blocks in {s['seconds']:.1f}s "
                     f"= {s['rows_per_s'] or 0:,.1f} rows/s: valid {s['valid']:,}, invalid {s['invalid']:,}")
        for reason, count in s["invalid_by_reason"].items():
            lines.append(f"    {count:>7,} {reason}")
    else:
        lines.append("  nothing to compute in this run")
    if s["rows_registered"]:
        lines.append(f"  {s['rows_registered']:,} new rows registered")
    for key, verb in (("metadata_filled", "filled"), ("metadata_updated", "updated")):
        for field, count in s[key].items():
            lines.append(f"  {field} {verb} for {count:,} existing rows")
    for name, count in s["rows_reset"].items():
        lines.append(f"  {count:,} rows of features/{name} sent back to do (their caption changed)")
    if s["duplicates_rejected"]:
        lines.append(f"  {s['duplicates_rejected']:,} duplicate uids rejected (see `featstore inspect`)")
    lines.append(f"  coverage: {s['rows_done']:,} of {s['rows_total']:,} rows done ({s['rows_usable']:,} usable), "
                 f"{s['blocks_total'] - s['blocks_missing']}/{s['blocks_total']} blocks complete")
    if s["rows_to_do"]:
        why = []
        if s["rows_not_in_source"]:
            why.append(f"{s['rows_not_in_source']:,} not in the source(s) of this run")
        if s["rows_without_source"]:
            why.append(f"{s['rows_without_source']:,} registered without a recorded source")
        lines.append(f"  {s['rows_to_do']:,} rows still to do" + (f" ({'; '.join(why)})" if why else "")
                     + ": run again with --source giving them, or with no --source to use their recorded sources")
    for worker, w in (s.get("per_worker") or {}).items():
        lines.append(f"  worker {worker}: {w['items']} items, {w['rows']:,} rows, {w['rows_per_s']:,.1f} rows/s")
    return "\n".join(lines)


class progress_bar:
    """A tqdm bar with rate and ETA (or a silent stand-in)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled = total, desc, enabled

    def __enter__(self):
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit="row", smoothing=0.1, dynamic_ncols=True)
        else:
            self.bar = None
        return self

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
