"""Download a url list into webdataset shards with img2dataset, giving every sample a stable uid.

    summary = download("urls.parquet", "shards/", uid_col="id")
    # shards/00000.tar (000000000.jpg/.txt/.json, …), 00000.parquet, 00000_stats.json, …

img2dataset's own `key` is only a position in one download, so each sample's json also carries
`uid`: the list's `uid_col` value, else `url_uid(url)` (first 16 hex digits of sha1(url)).  We
write a prepared parquet (url, caption, uid) to a temporary folder and let img2dataset save `uid`
as an additional column; `featstore.pipelines.sources` reads it back as the uid.

Re-running into the same `out_dir` resumes: img2dataset skips shards whose `*_stats.json` exists
(`incremental_mode="incremental"`), so the url list and `samples_per_shard` must not change between
runs.  Duplicate urls/uids are kept (extract keeps the first of each uid) and counted in the summary.

img2dataset runs in spawned processes and installs a SIGINT handler, so `download` must be called
from the main thread (and a script calling it needs the ``if __name__ == "__main__":`` guard);
Ctrl-C comes out as KeyboardInterrupt.  A re-run with every shard finished returns the summary
without starting img2dataset.  With `progress=False` everything
img2dataset prints (its own and its worker processes') goes to `<out_dir>/featstore_download.log`;
with `stdout_to_stderr=True` it goes to stderr, so stdout carries only what the caller prints
(`featstore download --json`).
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (via img2dataset) phones home otherwise

import contextlib
import glob
import hashlib
import inspect
import io
import json
import math
import re
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from featstore.errors import ConfigError, one_line

INPUT_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl")
ENCODE_FORMATS = ("jpg", "png", "webp")
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
LOG_NAME = "featstore_download.log"

# img2dataset arguments that download() sets itself (from its own arguments or by design).
_OWN_ARGS = {
    "url_list": "urls",
    "output_folder": "out_dir",
    "input_format": None,
    "output_format": None,
    "url_col": "url_col",
    "caption_col": "caption_col",
    "image_size": "image_size",
    "processes_count": "processes",
    "thread_count": "threads",
    "encode_format": "encode_format",
    "number_sample_per_shard": "samples_per_shard",
    "resize_mode": "resize_mode",
}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_CHATTER = ("Starting the downloading", "Sharding file number", "File sharded in", "Downloading starting now")


def url_uid(url: str) -> str:
    """The uid of a sample whose url list has no uid column: first 16 hex digits of sha1(url)."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]


def download(
    urls: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    url_col: str = "url",
    caption_col: str | None = "caption",
    uid_col: str | None = None,
    image_size: int = 256,
    processes: int = 1,
    threads: int = 16,
    encode_format: str = "jpg",
    samples_per_shard: int = 10000,
    resize_mode: str = "keep_ratio",
    progress: bool = True,
    stdout_to_stderr: bool = False,
    extra_img2dataset_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Download the images of a url list (.parquet/.csv/.tsv/.jsonl) into webdataset shards in `out_dir`.

    `caption_col=None` (or "") for a list without captions.  Returns a summary:
    {"out_dir", "shards", "successes", "failed", "failures_by_reason", "duration_s", "samples",
    "duplicate_urls", "duplicate_uids", "skipped_shards", "incomplete_shards", "log"} where the counts
    cover every finished shard in `out_dir` (this run's and earlier runs').
    """
    started = time.perf_counter()
    caption_col = caption_col or None
    extra = dict(extra_img2dataset_kwargs or {})
    _check_arguments(image_size, processes, threads, encode_format, samples_per_shard, resize_mode)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"download output {out} is a file: give a folder for the shards")
    columns = _read_url_list(Path(urls).expanduser(), url_col, caption_col, uid_col, _extra_columns(extra))
    if threading.current_thread() is not threading.main_thread():
        raise ConfigError("download() must run in the main thread (img2dataset installs a SIGINT handler)")

    with warnings.catch_warnings():  # slow (imports torch via webdataset), so after validation
        warnings.simplefilter("ignore", DeprecationWarning)  # its `import imghdr`
        import img2dataset

    kwargs = _img2dataset_kwargs(img2dataset.download, extra, caption_col is not None)
    kwargs.update(
        output_folder=str(out.resolve()),
        image_size=image_size,
        processes_count=processes,
        thread_count=threads,
        encode_format=encode_format,
        number_sample_per_shard=samples_per_shard,
        resize_mode=resize_mode,
    )
    n = len(columns["url"])
    out.mkdir(parents=True, exist_ok=True)
    done_before = len(_stats_files(out))
    expected = math.ceil(n / samples_per_shard)
    width = kwargs.get("oom_shard_count", inspect.signature(img2dataset.download).parameters["oom_shard_count"].default)
    all_done = kwargs["incremental_mode"] == "incremental" and all(
        (out / f"{i:0{width}d}_stats.json").exists() for i in range(expected))
    if not all_done:  # (img2dataset would start its processes only to skip every shard)
        with tempfile.TemporaryDirectory(prefix="featstore-download-") as tmp:
            kwargs["url_list"] = _write_prepared(columns, Path(tmp) / "urls.parquet")
            with _output_to(None if progress else out / LOG_NAME, stdout_to_stderr):
                _run(img2dataset.download, kwargs)

    summary = summarize(out)
    summary.update(
        samples=n,
        duplicate_urls=n - len(set(columns["url"])),
        duplicate_uids=n - len(set(columns["uid"])),
        skipped_shards=done_before,
        incomplete_shards=max(0, expected - summary["shards"]),
        log=None if progress else str(out / LOG_NAME),
        duration_s=round(time.perf_counter() - started, 3),
    )
    return summary


def summarize(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Aggregate img2dataset's `*_stats.json` files in `out_dir` (every finished shard)."""
    out = Path(out_dir)
    successes = failed = 0
    reasons: Counter[str] = Counter()
    files = _stats_files(out)
    for f in files:
        stats = json.loads(f.read_text())
        successes += int(stats.get("successes", 0))
        failed += int(stats.get("failed_to_download", 0)) + int(stats.get("failed_to_resize", 0))
        for reason, count in (stats.get("status_dict") or {}).items():
            if reason != "success":
                reasons[_ADDRESS.sub("", str(reason))] += int(count)
    return {
        "out_dir": str(out),
        "shards": len(files),
        "successes": successes,
        "failed": failed,
        "failures_by_reason": dict(reasons.most_common()),
    }


def _stats_files(out: Path) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(os.path.join(glob.escape(str(out)), "[0-9]*_stats.json")))


def _check_arguments(image_size, processes, threads, encode_format, samples_per_shard, resize_mode) -> None:
    for name, value in (("image_size", image_size), ("processes", processes), ("threads", threads),
                        ("samples_per_shard", samples_per_shard)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"download {name} must be a positive integer, got {value!r}")
    if encode_format not in ENCODE_FORMATS:
        raise ConfigError(f"unknown encode_format {encode_format!r}: use one of {', '.join(ENCODE_FORMATS)}")
    if resize_mode not in RESIZE_MODES:
        raise ConfigError(f"unknown resize_mode {resize_mode!r}: use one of {', '.join(RESIZE_MODES)}")


def _extra_columns(extra: dict[str, Any]) -> list[str]:
    cols = extra.get("save_additional_columns") or []
    if isinstance(cols, str) or not all(isinstance(c, str) for c in cols):
        raise ConfigError("extra_img2dataset_kwargs['save_additional_columns'] must be a list of column names")
    return [c for c in cols if c != "uid"]


def _img2dataset_kwargs(fn, extra: dict[str, Any], with_captions: bool) -> dict[str, Any]:
    valid = set(inspect.signature(fn).parameters)
    for key in extra:
        if key not in valid:
            raise ConfigError(f"img2dataset has no argument {key!r} (extra_img2dataset_kwargs)")
        if key in _OWN_ARGS:
            own = _OWN_ARGS[key]
            hint = f": use download(..., {own}=...)" if own else ""
            raise ConfigError(f"extra_img2dataset_kwargs may not set {key!r}, download() sets it{hint}")
    kwargs = {
        "input_format": "parquet",
        "output_format": "webdataset",
        "url_col": "url",
        "caption_col": "caption" if with_captions else None,
        "incremental_mode": "incremental",
        "enable_wandb": False,
    }
    kwargs.update(extra)
    kwargs["save_additional_columns"] = ["uid", *_extra_columns(extra)]
    return kwargs


def _read_url_list(path: Path, url_col, caption_col, uid_col, extra_cols) -> dict[str, list]:
    """Read and check the url list; returns columns url, uid, caption? and extra ones as lists."""
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise ConfigError(f"url list {path} must be one of {', '.join(INPUT_SUFFIXES)} (by extension)")
    if not path.is_file():
        raise ConfigError(f"url list not found: {path}")
    wanted = [("url_col", url_col), ("caption_col", caption_col), ("uid_col", uid_col)]
    wanted += [("save_additional_columns", c) for c in extra_cols]
    try:
        names = _column_names(path, suffix)
        for arg, col in wanted:
            if col is not None and col not in names:
                hint = (" (caption_col=None, --caption-col '', for a list without captions)"
                        if arg == "caption_col" else "")
                raise ConfigError(f"url list {path} has no column {col!r} for {arg}{hint}; "
                                  f"its columns: {', '.join(map(str, names)) or 'none'}")
        table = _read_columns(path, suffix, list(dict.fromkeys(c for _, c in wanted if c is not None)))
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader error means the same thing to the user
        raise ConfigError(f"cannot read url list {path}: {one_line(err)}") from None
    urls = ["" if u is None else str(u) for u in table[url_col]]
    if not urls:
        raise ConfigError(f"url list {path} has no rows")
    if uid_col is None:
        uids = [url_uid(u) for u in urls]
    else:
        uids = ["" if v is None else str(v) for v in table[uid_col]]
        empty = [i for i, v in enumerate(uids) if v == ""]
        if empty:
            raise ConfigError(f"uid column {uid_col!r} of {path} is empty in {len(empty)} rows "
                              f"(first: row {empty[0]}): fill it, or leave uid_col out to hash the urls")
    columns = {"url": urls, "uid": uids}
    if caption_col is not None:
        columns["caption"] = [None if c is None else str(c) for c in table[caption_col]]
    for col in extra_cols:
        columns[col] = table[col]
    return columns


def _column_names(path: Path, suffix: str) -> list[str]:
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    import pandas as pd

    if suffix == ".jsonl":
        return [str(c) for c in pd.read_json(path, lines=True, nrows=1).columns]
    return [str(c) for c in pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", nrows=0).columns]


def _read_columns(path: Path, suffix: str, columns: list[str]) -> dict[str, list]:
    """The named columns as lists; csv/tsv values as text ("" for an empty cell)."""
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path, columns=columns).to_pydict()
    import pandas as pd

    if suffix == ".jsonl":
        df = pd.read_json(path, lines=True, dtype=False)[columns]
    else:
        df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", usecols=columns, dtype=str,
                         keep_default_na=False)
    return {c: df[c].tolist() for c in columns}


def _write_prepared(columns: dict[str, list], target: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = ("url", "uid", "caption")
    arrays = {k: pa.array(v, pa.string()) if k in text else pa.array(v) for k, v in columns.items()}
    pq.write_table(pa.table(arrays), target)
    return str(target)


def _run(fn, kwargs: dict[str, Any]) -> None:
    """Call img2dataset.download, restoring our SIGINT handler after (its own exits with status 0)."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        fn(**kwargs)
    except SystemExit:  # img2dataset's SIGINT handler: clean up, then sys.exit(0)
        raise KeyboardInterrupt("download interrupted; re-run the same command to resume") from None
    finally:
        signal.signal(signal.SIGINT, previous)


class _DropChatter(io.TextIOBase):
    """A stdout that drops img2dataset's setup chatter lines and passes the rest on."""

    def __init__(self, target):
        self.target, self.pending = target, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if not line.startswith(_CHATTER):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and not self.pending.startswith(_CHATTER):
            self.target.write(self.pending)
        self.pending = ""
        self.target.flush()


@contextlib.contextmanager
def _output_to(log: Path | None, to_stderr: bool = False):
    """Send everything printed (this process and the ones it spawns) to `log`; for None, only
    drop img2dataset's setup chatter (its progress bar and per-shard lines stay), on stdout, or
    with `to_stderr` on stderr (file descriptor 1 itself points at stderr meanwhile, so spawned
    workers print there too)."""
    if log is None:
        saved = None
        if to_stderr:
            sys.stdout.flush()
            saved = os.dup(1)
            os.dup2(2, 1)
        quiet = _DropChatter(sys.stderr if to_stderr else sys.stdout)
        try:
            with contextlib.redirect_stdout(quiet):
                yield
        finally:
            quiet.flush()
            if saved is not None:
                sys.stdout.flush()
                os.dup2(saved, 1)
                os.close(saved)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "ab") as f:
        f.write(f"--- featstore download {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        f.flush()
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            with open(os.dup(f.fileno()), "w", buffering=1) as text, \
                    contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
