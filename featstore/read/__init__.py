"""The read path: which rows are served, in what order, read how (local mapped shards, ranged
reads, the disk cache), batched into buffers, and the loader's small state.  Imports core/,
never tools/."""
