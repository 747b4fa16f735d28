"""The store's core: its format, files, identities, registration of rows and the block writes
of feature rows, with their progress markers and checksums.  Imports nothing of read/ or tools/."""
