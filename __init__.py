"""The repository root is installed as `featstore.command` (see pyproject.toml) so that cli.py does not land in site-packages as a top-level module named `cli`."""
