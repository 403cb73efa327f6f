"""SIGTERM (how TPU VMs announce preemption) becomes a flag checked at step boundaries."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("unified_mm")


class PreemptionFlag:
    """Set by SIGTERM; the loop saves at the next step boundary and exits cleanly."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def install(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: checkpointing at the next step boundary, then exiting")
        self._event.set()

    def uninstall(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    @property
    def requested(self) -> bool:
        return self._event.is_set()
