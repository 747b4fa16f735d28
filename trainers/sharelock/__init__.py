"""ShareLock (Ruthardt et al., 2024): small heads over frozen image features and frozen LLM caption
features, trained contrastively.

Where each part lives: `config.py` (Config: the published defaults), `model.py` (the heads, the
checkpoint format, `ShareLock` for inference), `train.py` (train-head, read top to bottom),
`heldout.py` (the validation rows), `text_sets.py` (several caption feature sets per image),
`evaluate.py` (CLIP_benchmark's protocol) and `import_official.py` (the official checkpoints).
"""



def __getattr__(name):
    """`from featstore.trainers.sharelock import ShareLock` (the README's import) without loading
    torch for every module of this package (config.py is read by `--help`-light code)."""
    if name == "ShareLock":
        from featstore.trainers.sharelock.model import ShareLock

        return ShareLock
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
