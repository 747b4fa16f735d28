"""Which rows an extraction computes, and from where: work items, joined to sources by uid.

    extract --source X:     every row X holds (matched by uid) that the feature set has not done,
                            from X's own source_ref for that uid, whatever X's type
    extract (no --source):  every row still to do, from the source that registered it
    --field caption:        the rows to do (held by X when given), from samples/caption

A work item is one row block's share of that: (block, rows, refs into one source, and the refs'
spans where the source's manifest gives them, so the process computing the item reads images
without indexing the source again: a remote tar is never streamed twice).  A row is never looked
up through another source's ref, and rows a source does not hold stay *to do*.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from featstore.core import format as fmt
from featstore.errors import FeatstoreError, SourceError
from featstore.core.featureset import FeatureSet
from featstore.store import Store

from .sources import Record, Source, open_source


@dataclass
class WorkItem:
    """Rows of one block to compute: `refs[i]` is where row `rows[i]` is in `source` (a source
    spec, `open_source(**source)`), `spans[i]` its span when the manifest gave one; no
    refs/source for captions (read from the store)."""

    block: int
    rows: list[int]
    refs: list[str] | None = None
    source: dict | None = None
    source_id: int | None = None
    spans: list | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def rows_held(store: Store, records: list[Record]) -> tuple[np.ndarray, list[Record]]:
    """(store rows, records) of the uids in `records` that the store has (first occurrence wins)."""
    rows = store.rows_of([r.uid for r in records])
    seen: set[int] = set()
    out_rows, out_records = [], []
    for row, rec in zip(rows.tolist(), records):
        if row >= 0 and row not in seen:
            seen.add(row)
            out_rows.append(row)
            out_records.append(rec)
    return np.asarray(out_rows, dtype=np.int64), out_records


def _items(store: Store, rows: np.ndarray, records: list[Record] | None, source: dict | None,
           source_id: int | None) -> list[WorkItem]:
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    records = None if records is None else [records[i] for i in order]
    spans = records is not None and any(r.span is not None for r in records)
    blocks = rows // store.rows_per_shard
    items = []
    for b in np.unique(blocks):
        sel = np.flatnonzero(blocks == b)
        mine = None if records is None else [records[i] for i in sel]
        items.append(WorkItem(int(b), rows[sel].tolist(), None if mine is None else [r.source_ref for r in mine],
                              source, source_id, [list(r.span) for r in mine] if spans else None))
    return items


def from_source(store: Store, fs: FeatureSet, source: Source, source_id: int, records: list[Record]) -> dict:
    """The work for `--source X`: {"items", "held", "todo_elsewhere"}."""
    rows, held_records = rows_held(store, records)  # the uid index: O(records)
    summary = fs.done_summary()  # the block summary: O(blocks)
    want = ~fs.is_done(rows, summary)  # and partial blocks' markers
    done = int(summary[0].sum())
    if fs.field == "caption":
        items = _items(store, rows[want], None, None, None)
    else:
        items = _items(store, rows[want], [r for r, w in zip(held_records, want) if w], source.spec(), source_id)
    return {"items": items, "held": int(len(rows)), "todo_elsewhere": int(store.n_rows - done - want.sum()),
            "rows_done": done}


def from_recorded(store: Store, fs: FeatureSet, log=print) -> dict:
    """The work with no --source: every row to do, from the source that registered it.
    {"items", "gone": [one line per source that cannot be opened], "not_held", "no_source"}."""
    todo = fs.todo_rows()  # O(blocks + rows to do)
    done = int(store.n_rows - len(todo))
    if fs.field == "caption":
        return {"items": _items(store, todo, None, None, None), "gone": [], "not_held": 0, "no_source": 0,
                "rows_done": done}
    ids = store.samples_at(fmt.SOURCE, todo) if fmt.SOURCE in store.sample_fields() else np.full(len(todo), -1)
    ids = np.asarray(ids, dtype=np.int64)
    sources = {int(s["id"]): s for s in store.sources}
    items, gone, not_held = [], [], 0
    no_source = int((ids < 0).sum())
    for sid in sorted(set(ids.tolist()) - {-1}):
        rows = todo[ids == sid]
        entry = sources.get(sid)
        try:
            if entry is None:
                raise SourceError(f"source #{sid} is not recorded in the store")
            source = open_source(entry["location"], entry["type"], **(entry.get("options") or {}))
            record_of = {r.uid: r for r in source.records()}
        except FeatstoreError as err:
            gone.append(f"source #{sid} ({(entry or {}).get('type')} {(entry or {}).get('location')}) of "
                        f"{len(rows):,} rows to do cannot be opened ({err}); give it (or a copy) with --source")
            continue
        if source.fingerprint() != entry.get("fingerprint"):
            log(f"warning: source #{sid} ({entry['location']}) changed since it was registered; "
                "its rows are matched by uid to what it holds now")
        found_records = [record_of.get(str(u)) for u in store.samples_at(fmt.UID, rows).tolist()]
        found = np.array([r is not None for r in found_records], bool)
        not_held += int((~found).sum())
        items += _items(store, rows[found], [r for r in found_records if r is not None], source.spec(), sid)
    items.sort(key=lambda it: (it.block, it.source_id if it.source_id is not None else -1))
    return {"items": items, "gone": gone, "not_held": not_held, "no_source": no_source, "rows_done": done}


def for_blocks(store: Store, fs: FeatureSet, source: Source, source_id: int | None, blocks: list[int]) -> list[WorkItem]:
    """Work items for whole blocks from one source (the `BlockRunner.run(blocks)` form)."""
    if fs.field == "caption":
        rows = np.concatenate([np.arange(*store.block_range(b)) for b in blocks]) if blocks else np.zeros(0, np.int64)
        return _items(store, rows, None, None, None)
    rows, records = rows_held(store, list(source.records()))
    want = np.isin(rows // store.rows_per_shard, np.asarray(blocks, dtype=np.int64))
    return _items(store, rows[want], [r for r, w in zip(records, want) if w], source.spec(), source_id)
