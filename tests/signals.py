"""Signals in test subprocesses.

A process started in the background by a non-interactive shell (`make test &`, some CI runners)
inherits SIGINT *ignored*, and Python then installs no KeyboardInterrupt handler: a test that sends
Ctrl-C to a child would see it ignored.  `preexec_fn=default_sigint` gives the child the default
disposition a terminal's foreground process has, whatever the test runner inherited.
"""

import signal


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
