"""SIGTERM unwinds like Ctrl-C: the one handler every command (and every sweep worker process) installs."""

from __future__ import annotations

import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that it unwinds the same way: every
    temporary file or folder goes with the `finally` / `except BaseException` that guards it (memcli.core.runs' atomic
    writers, verify's report folder, train's checkpoint and run folder lock) and earlier outputs stay whole."""


def _terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut that cleanup short
    raise Terminated()


def handle_sigterm() -> object | None:
    """From now on SIGTERM unwinds like Ctrl-C (see Terminated); returns the handler it replaced, or None where
    signals cannot be handled (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _terminated)
