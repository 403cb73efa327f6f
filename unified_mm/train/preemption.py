"""SIGTERM (how TPU VMs announce preemption) becomes a flag checked at step boundaries.

Single process: a Python SIGTERM handler sets the flag. Several processes: every process must
stop at the same step (a save is collective; one process saving while the others train hangs
both), so SIGTERM is left to JAX's preemption service, which agrees on a step across processes
and reports it through ``CheckpointManager.reached_preemption(step)``. A Python handler would
replace JAX's and each process would stop on its own.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

log = logging.getLogger("unified_mm")


def jax_preemption_service_active() -> bool:
    """True when JAX's multi-process preemption service owns SIGTERM in this process."""
    if jax.process_count() == 1:
        return False
    try:
        from jax._src import distributed

        return distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):  # a JAX without this internal: assume it is off
        return False


class PreemptionFlag:
    """Set by SIGTERM; the loop saves at the next step boundary and exits cleanly."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def install(self) -> PreemptionFlag:
        if jax.process_count() > 1:
            if jax_preemption_service_active():
                log.info(
                    "SIGTERM: handled by JAX's preemption service (agreed step on all processes)"
                )
            else:
                log.warning(
                    "JAX's preemption service is off (jax_enable_preemption_service): SIGTERM "
                    "will end this process without a checkpoint"
                )
            return self
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
