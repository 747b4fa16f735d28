"""Every error a user can cause, under one base class.

The CLI catches `FeatstoreError` and prints its message as one line (no traceback unless
`--debug`). Each subclass also inherits the matching built-in, so generic code that catches
`FileNotFoundError` or `ValueError` keeps working.  Messages name the thing and say what to do.
"""


class FeatstoreError(Exception):
    """Base class: a problem the user can fix; its message is one clear line."""


class StoreNotFound(FeatstoreError, FileNotFoundError):
    """The store path does not exist."""


class NotAStore(FeatstoreError, ValueError):
    """The path exists but is not a featstore store."""


class FormatTooNew(FeatstoreError, ValueError):
    """The store was written by a newer featstore than this one."""


class FormatTooOld(FeatstoreError, PermissionError):
    """A store of an older format, opened for writing: it reads, and `featstore upgrade` converts it."""


class ReadOnlyStore(FeatstoreError, PermissionError):
    """Writing to a store opened read-only, or one this process may not write."""


class StoreBusy(FeatstoreError, TimeoutError):
    """Another writer holds the store's lock (named in the message)."""


class MetadataConflict(FeatstoreError, ValueError):
    """A later run brings a caption/label for a uid that differs from the stored one."""


class IdentityMismatch(FeatstoreError, ValueError):
    """Writing or reading a feature set whose identity differs from the recorded one."""


class NotInStore(FeatstoreError, LookupError):
    """Something named that the store does not have (the message says what it has)."""


class UnknownFeatureSet(NotInStore):
    """A feature set that the store does not have."""


class UnknownArray(NotInStore):
    """An array, column, sample field or pixels set that the store does not have."""


class ConfigError(FeatstoreError, ValueError):
    """A bad option, config key or value."""


class SourceError(FeatstoreError, ValueError):
    """A data source that cannot be read at all (as opposed to one bad sample in it)."""


class BackboneError(FeatstoreError, ValueError):
    """A backbone that cannot be found or loaded (unknown alias, no local copy offline, ...)."""


class CheckpointError(FeatstoreError, ValueError):
    """A checkpoint that is missing, incomplete or does not match the store."""


class ExtractFailed(FeatstoreError, RuntimeError):
    """A run that wrote nothing useful (every row it tried failed, or one systemic reason).

    Raised after writing what it could; `summary` is the run's end summary (the CLI prints it
    before the one-line error)."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary


class WriteFailed(FeatstoreError, RuntimeError):
    """Writing a computed row block failed for a reason that is not a FeatstoreError (disk full,
    a storage error); the blocks written before it are kept and a re-run continues."""


class FidelityTooLow(FeatstoreError, ValueError):
    """int8 tokens of a block would read back too far from the backbone's output (worst token cosine
    below the threshold): the block is not written; store such tokens as float16."""


class WorkerError(FeatstoreError, RuntimeError):
    """A Dask worker failed on a block for a reason that is not a FeatstoreError."""


class CorruptData(FeatstoreError, ValueError):
    """Stored bytes that do not match the checksum their block's marker recorded."""


class Interrupted(FeatstoreError, KeyboardInterrupt):
    """Ctrl-C (SIGINT) in a job that saved its state first; the message says how to continue.
    Also a KeyboardInterrupt, so code that catches those keeps working."""


class BadSample(FeatstoreError):
    """One sample that cannot be used; never stops a job. `reason` is a short stable tag
    (e.g. ``corrupt-image``) used to count failures; the message says more."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)

    def __reduce__(self):  # pickles across processes (Dask) with reason and detail intact
        return (type(self), (self.reason, self.detail))


class SearchIndexError(FeatstoreError, ValueError):
    """A nearest-neighbour index (`featstore index`) that is missing, stale (the store or the feature
    set changed since it was built) or cannot be built here (a store on object storage)."""


class DedupError(FeatstoreError, ValueError):
    """A duplicate record (`featstore dedup`) that is missing or stale (the store grew, or its feature
    set changed since), or cannot be made here (a store on object storage, too many rows for a flat index)."""


class UnreadableRows(FeatstoreError, ValueError):
    """Rows that neither featstore's shard reader nor zarr can read (a damaged shard)."""


class StoreChanged(FeatstoreError, RuntimeError):
    """A block served in part was rewritten after the loader counted its rows."""

    def __init__(self, block: int, path: str):
        super().__init__(f"{path}: block {block} was rewritten (an extract wrote more rows) after this loader "
                         "counted its served rows: make a new Loader to serve the store as it is now")


class CacheFull(FeatstoreError, OSError):
    """The disk cache cannot hold the shards a loader reads (its limit, or the disk)."""


class FetchFailed(FeatstoreError, OSError):
    """A shard object could not be fetched into the disk cache, or changed while it was."""


def one_line(err: BaseException) -> str:
    """`TypeName: first line of the message` (whitespace collapsed), for an error that is not ours
    and must reach the user as one line (a library's exception inside a sample, a source, a worker)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    text = " ".join(lines[0].split()) if lines else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
