"""The store format (version 3): constants, dimension names and the one rule for chunk sizes.

See DESIGN.md, "The store format".  Everything here is plain data so a reader can check a
store against it by eye.
"""

FORMAT_VERSION = 3
DEFAULT_ROWS_PER_SHARD = 4096
# samples/ arrays: shards of whole row blocks holding at least this many rows (at 1.28B rows
# about 20,000 files per array), chunks small enough that reading one row's uid (the uid index
# checks its candidates) decodes a few KiB
SAMPLE_SHARD_MIN_ROWS = 65536
SAMPLE_CHUNK_ROWS = {"str": 1024, "int": 8192}

SAMPLES = "samples"
FEATURES = "features"
PIXELS = "pixels"
PROMPTS = "prompts"
INDEXES = "indexes"  # indexes/<feature set>/{index.faiss, meta.json, covered-<n>.npz}: derived nearest-neighbour indexes
PROGRESS = "_progress"
MANIFEST_MARKER = f"{PROGRESS}/manifest.json"
LOCKS = f"{PROGRESS}/_locks"  # lock files (local stores) / lease objects (object storage)
INDEX = "index.json"  # _progress/<feature set>/index.json: the compacted markers
REGISTRATIONS = f"{PROGRESS}/registrations"  # one record per registration: <generation>.json
UID_INDEX = "_index/uid"  # featstore.core.uidindex

# The per-sample fields registered with the manifest.
UID = "uid"
CAPTION = "caption"
LABEL = "label"
SOURCE_REF = "source_ref"
SOURCE = "source"  # index into attrs.featstore.sources
STR_FIELDS = (UID, CAPTION, SOURCE_REF)

# Dimension names (zarr v3 `dimension_names`): the row dimension is named the same everywhere,
# so `xarray.open_zarr(store, group="features/NAME")` and `group="samples"` open as Datasets.
ROW = "row"
DIMS = {
    "pooled": (ROW, "dim"),
    "valid": (ROW,),
    "tokens": (ROW, "token", "token_dim"),
    "tokens_scale": (ROW, "token"),
    "tokens_channel_scale": (ROW, "token_dim"),
    "pixels": (ROW, "channel", "height", "width"),
    # stored views (extract --views K): where each view's crop lies in the original image, as
    # fractions of its height/width (y0, x0, h, w), and whether it was mirrored
    "view_crops": (ROW, "view", "box"),
    "view_flips": (ROW, "view"),
    # prompts/<text feature set>/{text, pooled}: the eval prompt cache (trainers/prompts.py)
    "prompts_text": ("prompt",),
    "prompts_pooled": ("prompt", "dim"),
}

# Stored views: a feature set made with K > 1 views per image has a `view` axis right after `row`
# in every array computed per view (pooled (row, view, dim), tokens (row, view, token, token_dim),
# their int8 scales, pixels (row, view, channel, height, width)), plus view_crops and view_flips;
# `valid` stays (row,).  K = 1 is the plain layout (no view axis).  View 0 is the recipe's centre crop.
VIEW = "view"
PER_VIEW = ("pooled", "tokens", "tokens_scale", "tokens_channel_scale", "pixels")
VIEW_ARRAYS = ("view_crops", "view_flips")
BOX = ("y0", "x0", "h", "w")


def dims(key: str, views: int = 1) -> tuple:
    """The dimension names of array `key` (a DIMS key) in a feature set of `views` views per row."""
    names = DIMS[key]
    if views > 1 and key in PER_VIEW:
        return (names[0], VIEW) + tuple(names[1:])
    return names

# int8 token layouts (featstore.tokens): how `tokens` reads back as floats, also in the tokens
# array's attrs so a plain-zarr reader can do it.
TOKEN_SCALINGS = ("token_channel", "token")  # the first is what new int8 feature sets get
DEQUANTIZE = {"token": "tokens * tokens_scale[..., None]",
              "token_channel": "tokens * tokens_scale[..., None] * tokens_channel_scale[..., None, :]"}

TARGET_CHUNK_BYTES = 2 << 20  # aim for ~2 MiB chunks (DESIGN: 1-4 MiB)


def chunk_rows(row_bytes: int, rows_per_shard: int, max_rows: int | None = None) -> int:
    """The number of rows per chunk for an array whose rows take `row_bytes` bytes.

    The result always divides `rows_per_shard` (so every shard holds whole chunks) and is
    the largest divisor whose chunk stays within ~2 MiB (never above 4 MiB unless one row
    alone is bigger).  `max_rows` caps it further (token arrays keep a few samples per chunk).
    """
    if rows_per_shard < 1:
        raise ValueError("rows_per_shard must be >= 1")
    limit = max(1, TARGET_CHUNK_BYTES // max(1, row_bytes))
    if max_rows is not None:
        limit = min(limit, max_rows)
    best = 1
    for d in range(1, rows_per_shard + 1):
        if rows_per_shard % d == 0 and d <= limit:
            best = d
    return best


def block_range(block: int, rows_per_shard: int, n_rows: int) -> tuple[int, int]:
    """Rows [start, stop) of row block `block` in a store of `n_rows` rows."""
    start = block * rows_per_shard
    return start, min(start + rows_per_shard, n_rows)


def n_blocks(n_rows: int, rows_per_shard: int) -> int:
    return -(-n_rows // rows_per_shard)


def sample_shard_rows(rows_per_shard: int) -> int:
    """Rows per shard of a samples/ array: whole row blocks, at least SAMPLE_SHARD_MIN_ROWS."""
    return rows_per_shard * max(1, -(-SAMPLE_SHARD_MIN_ROWS // rows_per_shard))


def sample_chunk_rows(rows_per_shard: int, is_str: bool) -> int:
    """Rows per chunk of a samples/ array: divides its shard."""
    shard = sample_shard_rows(rows_per_shard)
    want = SAMPLE_CHUNK_ROWS["str" if is_str else "int"]
    best = 1
    for d in range(1, min(shard, want) + 1):
        if shard % d == 0:
            best = d
    return best
