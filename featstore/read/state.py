"""The Loader's resume state: a small dict (mosaic streaming style) that also records what it
replays against, and the check that a state still replays exactly.

    {"seed", "epoch", "offset"}          where the order is: offset = rows this rank was served
    {"rows", "fingerprint", "usable",    the served set (count, digest), the rows finished and
     "store_rows"}                       valid before any `rows` subset, the store's row count
    {"world_size", "batch_size",         what else the order depends on
     "window", "order", "drop_last"}
    {"view"}                             only with stored views served one per row: which one
"""

from __future__ import annotations

KEYS = ("seed", "epoch", "offset", "rows", "fingerprint", "usable", "store_rows", "world_size", "batch_size",
        "window", "order", "drop_last")
OPTIONAL_KEYS = ("view",)


def changes(saved: dict, now: dict) -> list[str]:
    """What differs between a saved state and this loader, in words (empty: it replays exactly)."""
    if "fingerprint" not in saved:
        return ["it records only seed/epoch/offset (saved by an older featstore), not what it replays against"]
    out = []
    if saved["store_rows"] != now["store_rows"]:
        how = "grew" if now["store_rows"] > saved["store_rows"] else "shrank"
        out.append(f"the store {how} ({saved['store_rows']} rows when saved, {now['store_rows']} now)")
    elif saved["usable"] != now["usable"]:
        out.append(f"{now['usable']} rows are finished and valid now, {saved['usable']} when saved "
                   "(extraction was still finishing blocks, or a feature set was recomputed)")
    elif saved["fingerprint"] != now["fingerprint"]:
        out.append(f"the served rows differ ({saved['rows']} then, {now['rows']} now: another `rows` subset or split)")
    for key, what in (("world_size", "world size"), ("batch_size", "batch size"), ("window", "shuffle window (rows)"),
                      ("order", "order"), ("drop_last", "drop_last")):
        if key == "window" and now["order"] != "window":
            continue  # the window shapes only a shuffled order (elsewhere it only groups reads)
        if saved.get(key) != now[key]:
            out.append(f"{what} {saved.get(key)!r} when saved, {now[key]!r} now")
    if saved.get("view") != now.get("view"):  # absent: no stored views served one per row
        out.append(f"stored views served {saved.get('view')!r} when saved, {now.get('view')!r} now")
    return out
