"""The `featstore` command with every block write slowed by FEATSTORE_TEST_WRITE_DELAY seconds
(default 0.3), so that a signal a test sends once the first blocks are marked done lands while the
job is still running, however fast the machine is.  Everything else is the real command.

    python tests/slow_featstore.py extract --store ... --source ... --backbone ...
"""

import os
import sys
import time

from featstore.pipelines import writes

DELAY = float(os.environ.get("FEATSTORE_TEST_WRITE_DELAY", "0.3"))
_write_block = writes._run


def _slow_write(*args, **kwargs):
    time.sleep(DELAY)
    return _write_block(*args, **kwargs)


writes._run = _slow_write

if __name__ == "__main__":
    from featstore.command.cli import main

    main(prog_name="featstore")
