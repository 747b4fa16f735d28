"""The values extraction options take (the CLI's choices come from here, so they never drift).

Light on purpose: `featstore --help` imports it without torch or the backbones.
"""

from .sources import SOURCE_KINDS, SOURCE_TYPES  # noqa: F401 - re-exported

FIELDS = ("image", "caption")
POOLINGS = ("cls", "mean", "last", "pooler")  # what backbones accept (each model allows a subset)
TOKEN_DTYPES = ("float16", "int8")
POOLED_DTYPES = ("float16", "float32")
PRECISIONS = ("fp32", "bf16", "fp16")
