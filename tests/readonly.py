"""Make a store truly read-only for a command, even when the tests run as root (who ignores
permission bits): a read-only bind mount of it in a private mount namespace (`unshare -Urm`), the
way a shared dataset on a read-only mount looks; as another user, plain permissions."""

from __future__ import annotations

import shutil
import subprocess


def read_only_prefix(path) -> list[str] | None:
    """A command prefix under which `path` cannot be written (for a non-root user the permissions
    are changed now: restore them with `chmod -R u+w`); None where this machine allows neither."""
    import os

    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", str(path)], check=True)
        return []
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode:
        return None
    p = str(path)
    return ["unshare", "-Urm", "sh", "-c", f'mount --bind "{p}" "{p}" && mount -o remount,bind,ro "{p}" && exec "$@"', "sh"]
