"""The fault-injection plan: `[[faults]]` entries that make device k misbehave in round r.

Tests and chaos runs share this mechanism, so every failure path is exercised by the
same code a user's run goes through, never by hoping that a fault happens.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch

from .config import Config, FaultConfig

log = logging.getLogger("fedrun")

UPDATE_FAULTS = ("nan", "inf", "huge")


class InjectedFault(RuntimeError):
    """The exception a `raise` fault throws inside local training."""


class FaultPlan:
    # TODO(client-faults): faults name device ranks, not clients, so with data.clients
    # above devices.count a fault hits every client its rank trains that round.
    def __init__(self, cfg: Config, rank: int):
        self.entries = [f for f in cfg.faults if f.device == rank]

    def find(self, server_round: int, attempt: int) -> FaultConfig | None:
        """The fault due in this round and attempt (attempts count from 1), if any."""
        for fault in self.entries:
            if fault.round == server_round and (fault.attempts == 0
                                                or attempt <= fault.attempts):
                return fault
        return None


def before_training(fault: FaultConfig | None) -> None:
    """Faults that strike as local training starts: exceptions and process deaths."""
    if fault is None:
        return
    kind = fault.kind
    if kind == "raise":
        raise InjectedFault(f"injected fault in round {fault.round}")
    if kind == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory (injected fault)")
    if kind == "exit":
        log.warning("injected fault: exiting the process with code 3")
        logging.shutdown()
        os._exit(3)
    if kind == "sigkill":
        log.warning("injected fault: sending SIGKILL to this process")
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        log.warning("injected fault: blocking forever, as a stuck native call would")
        # Never set: only the server's deadline and a restart end this wait.
        threading.Event().wait()


def slow_step(fault: FaultConfig | None, deadline_s: float, batches: int) -> None:
    """A `slow` device sleeps per batch so that its round would take twice the deadline;
    the deadline stops it halfway, which is what the fault is there to show."""
    if fault is not None and fault.kind == "slow":
        time.sleep(2 * deadline_s / max(1, batches))


def corrupt_update(fault: FaultConfig | None, start: torch.Tensor,
                   trained: torch.Tensor) -> torch.Tensor:
    """Faults that spoil the update itself, for the server's checks to catch."""
    if fault is None or fault.kind not in UPDATE_FAULTS:
        return trained
    if fault.kind == "nan":
        return torch.full_like(trained, float("nan"))
    if fault.kind == "inf":
        return torch.full_like(trained, float("inf"))
    return start + (trained - start) * 1e30
