"""`featstore.command`: the `featstore` command.  Its one module, `cli`, is the repository's root
cli.py (pyproject.toml installs only that file under this name, so nothing else at the root is
ever packaged); this file lets an editable install find it (the installed wheel needs none)."""
