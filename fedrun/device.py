"""A device: receives the global weights, trains on its own shard, sends its update back.

Each round a device waits on the control plane for the server's plan, takes part in the
broadcast, trains locally (retrying a failed attempt after cleaning up), posts a small
result header to the store, and waits for the server's go before the gather. Waiting
happens on the store, never inside a collective, so collective timeouts stay short.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch import nn

from . import faults
from .comm import Comm, CommError, FlatWeights, Heartbeat
from .config import Config
from .strategies.fedprox import proximal_term

log = logging.getLogger("fedrun")

OK, FAILED, TIMEOUT, REJECTED = "OK", "FAILED", "TIMEOUT", "REJECTED"
QUARANTINED, SKIPPED = "QUARANTINED", "SKIPPED"


def seed_for(*parts: int) -> int:
    """A seed derived from (run seed, round, rank, ...): reproducible, and independent of
    how many rounds ran before, so that a resumed run draws what the straight one did."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class Stopped(BaseException):
    """The server asked every rank to stop (a BaseException, so retries never catch it)."""


@dataclass
class Progress:
    """What the heartbeat thread reports; written by the main thread, read by the beat."""

    state: str = "IDLE"
    round: int = 0
    progress: float = 0.0
    attempt: int = 0
    loss: float | None = None
    accuracy: float | None = None
    samples: int = 0
    message: str = ""
    proc: psutil.Process = field(default_factory=psutil.Process, repr=False)

    def snapshot(self) -> dict:
        cuda = (torch.cuda.memory_allocated() / 2**20) if torch.cuda.is_initialized() else None
        return {"state": self.state, "round": self.round, "progress": self.progress,
                "attempt": self.attempt, "loss": self.loss, "accuracy": self.accuracy,
                "samples": self.samples, "message": self.message,
                "memory_mb": self.proc.memory_info().rss / 2**20, "cuda_memory_mb": cuda}


class ShardSet(torch.utils.data.Dataset):
    """A shard held in memory; `__getitems__` lets the DataLoader fetch a whole batch by
    one indexing operation instead of collating `batch_size` single samples."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices)
        return self.x[idx], self.y[idx]


def _as_batch(batch):
    return batch


class Device:
    """One device rank; it trains the clients it holds (one, unless data.clients is
    larger than devices.count) in turn each round, each from the global weights."""

    def __init__(self, cfg: Config, comm: Comm, model: nn.Module,
                 clients: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.cfg, self.comm, self.rank = cfg, comm, comm.rank
        self.model = model.to(comm.device)
        self.flat = FlatWeights(self.model)
        self.clients = {c: ShardSet(x.to(comm.device), y.to(comm.device))
                        for c, (x, y) in clients.items()}
        self.slots = clients_per_rank(cfg)
        self.shard = next(iter(self.clients.values()))
        self.plan = faults.FaultPlan(cfg, self.rank)
        self.status = Progress(samples=sum(len(s) for s in self.clients.values()))
        self.stop = threading.Event()
        self.server_lost = threading.Event()
        self.heartbeat = Heartbeat(comm, cfg.comm.heartbeat_s, self.status.snapshot,
                                   on_beat=self._watch_server)
        self._server_seen = (None, time.monotonic())

    # ---- control plane ------------------------------------------------------------------

    def _watch_server(self, store) -> None:
        """Runs on the heartbeat thread: notices the stop signal and a silent server."""
        if store is None:
            self.server_lost.set()
            return
        if store.check(["stop"]):
            self.stop.set()
        beat = store.get("hb/0") if store.check(["hb/0"]) else None
        seen, since = self._server_seen
        now = time.monotonic()
        if beat != seen:
            self._server_seen = (beat, now)
        elif now - since > self.cfg.comm.timeout_s:
            self.server_lost.set()
        if self.server_lost.is_set() or self.stop.is_set():
            self._exit_if_stuck()

    def _exit_if_stuck(self) -> None:
        """If the main thread does not act on a stop within a timeout (it may be stuck in
        native code), end the process from here: a device must never be left behind."""
        deadline = time.monotonic() + self.cfg.comm.timeout_s
        while time.monotonic() < deadline:
            if self.heartbeat.halt.wait(0.2):
                return
        log.error("main thread did not stop within %.0fs; exiting", self.cfg.comm.timeout_s)
        logging.shutdown()
        os._exit(1)

    def _check_control(self) -> None:
        if self.stop.is_set():
            raise Stopped()
        if self.server_lost.is_set():
            raise CommError("the server stopped sending heartbeats or the store went away; "
                            "this device exits so that torchrun can restart the group")

    def _wait_for(self, key: str, limit_s: float):
        """Poll the store for `key`, backing off from 2 ms to 50 ms between looks.

        Polling rather than `store.wait` keeps signals and stops responsive (a blocking
        wait runs no Python signal handler) and costs one small request per look.
        """
        end = time.monotonic() + limit_s
        pause = 0.002
        while True:
            self._check_control()
            value = self.comm.get(key)
            if value is not None:
                return value
            if time.monotonic() > end:
                raise CommError(f"no {key} from the server within {limit_s:.0f}s")
            time.sleep(pause)
            pause = min(0.05, pause * 2)

    # ---- the round loop -----------------------------------------------------------------

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.heartbeat.start()
        weights = torch.zeros(self.flat.numel)
        # The server may evaluate and checkpoint between rounds; its heartbeat bounds that.
        # TODO(server-hang): a server whose main thread hangs while its heartbeat thread
        # lives is only caught by this generous limit, not within comm.timeout_s.
        idle_limit = self.cfg.run.round_deadline_s + 10 * self.cfg.comm.timeout_s + 600
        seq = 0
        try:
            while True:
                plan = self._wait_for(f"plan/{seq}", idle_limit)
                if plan["stop"]:
                    break
                self.comm.broadcast(weights)
                header, update = self._take_part(plan, weights)
                self.comm.put(f"done/{seq}/{self.rank}", header)
                self._wait_for(f"go/{seq}", self.cfg.run.round_deadline_s
                               + 2 * self.cfg.comm.timeout_s)
                self.comm.gather(update)
                self.comm.barrier(f"round {plan['round']}")
                seq += 1
            self.comm.barrier("the last round")
        except Stopped:
            log.info("stopping: the server asked every rank to stop")
        finally:
            self._say_goodbye()

    def _take_part(self, plan: dict, weights: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Train this rank's sampled clients; the update holds one flat slot per client
        (padded to the same count on every rank, as the gather needs equal sizes)."""
        server_round = plan["round"]
        self.status.round = server_round
        update = weights.repeat(self.slots)
        if self.rank not in plan["participants"]:
            state = QUARANTINED if self.rank in plan["quarantined"] else SKIPPED
            self.status.state = state
            why = "quarantined" if state == QUARANTINED else "not sampled this round"
            return {"status": state, "samples": 0, "attempts": 0, "message": why,
                    "clients": []}, update
        deadline = time.monotonic() + plan["deadline_s"]
        results = []
        for slot, client in enumerate(c for c in self.clients if c in plan["clients"]):
            self.shard = self.clients[client]
            header, trained = self.train_round(weights, server_round, deadline, client)
            update[slot * self.flat.numel : (slot + 1) * self.flat.numel] = trained
            results.append(dict(header, client=client, slot=slot))
        header = _device_header(results)
        self.status.state = "COMPLETED" if header["status"] == OK else header["status"]
        self.status.message = header["message"]
        return header, update

    def _on_signal(self, signum, frame) -> None:
        log.info("received %s; leaving", signal.Signals(signum).name)
        self._say_goodbye()
        logging.shutdown()
        os._exit(0)

    def _say_goodbye(self) -> None:
        """A goodbye on the store tells the server this device left on purpose; a device
        that dies without one is the one that crashed."""
        try:
            self.comm.put(f"bye/{self.rank}", {"time": time.time()})
        except Exception:  # the store may be gone already: nothing left to tell
            pass
        self.heartbeat.stop()

    # ---- local training -----------------------------------------------------------------

    def train_round(self, weights: torch.Tensor, server_round: int, deadline: float,
                    client: int) -> tuple[dict, torch.Tensor]:
        """Train with retries; returns the result header and the flat trained weights."""
        retries = self.cfg.train.max_retries
        started = time.monotonic()
        for attempt in range(1, retries + 2):
            self.status.attempt = attempt
            self.status.state = "TRAINING" if attempt == 1 else "RETRYING"
            fault = self.plan.find(server_round, attempt)
            try:
                header, update = self._attempt(weights, server_round, attempt, fault,
                                               deadline, client)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                self._cleanup()
                if attempt > retries:
                    log.warning("attempt %d/%d failed (%s); giving up this round",
                                attempt, retries + 1, reason)
                    header = self._header(FAILED, attempt, reason)
                    header["seconds"] = time.monotonic() - started
                    return header, weights
                log.warning("attempt %d/%d failed (%s); retry %d/%d", attempt, retries + 1,
                            reason, attempt, retries)
                continue
            if attempt > 1 and header["status"] == OK:
                log.info("retry %d/%d succeeded", attempt - 1, retries)
            header["seconds"] = time.monotonic() - started
            return header, update
        raise AssertionError("unreachable: the last attempt returns or fails")

    def _attempt(self, weights, server_round, attempt, fault, deadline, client):
        cfg = self.cfg.train
        self.flat.unpack(weights, self.model)
        self.model.train()
        params = [p for p in self.model.parameters()]
        anchor = [p.detach().clone() for p in params] if self._mu() else None
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
        # Client c draws from (seed, round, c + 1): with one client per device that is
        # (seed, round, rank), whatever rank the client lands on.
        torch.manual_seed(seed_for(self.cfg.run.seed, server_round, client + 1))
        gen = torch.Generator().manual_seed(seed_for(self.cfg.run.seed, server_round,
                                                     client + 1, 1))
        loader = torch.utils.data.DataLoader(
            self.shard, batch_size=cfg.batch_size, shuffle=True, generator=gen,
            num_workers=cfg.num_workers, collate_fn=_as_batch)
        faults.before_training(fault)
        if fault is not None and fault.kind == "zero_samples":
            return self._header(OK, attempt, "", samples=0), weights.clone()

        total = cfg.local_epochs * len(loader)
        step = 0
        for epoch in range(cfg.local_epochs):
            # Sums stay on the device: a .item() per batch would be a host sync on CUDA.
            loss_sum = torch.zeros((), device=self.comm.device)
            correct = torch.zeros((), device=self.comm.device)
            for xb, yb in loader:
                if time.monotonic() > deadline:
                    return self._header(TIMEOUT, attempt, "stopped at the round deadline "
                                        f"after {step}/{total} batches"), weights
                self._check_control()
                faults.slow_step(fault, self.cfg.run.round_deadline_s, total)
                opt.zero_grad(set_to_none=True)
                out = self.model(xb)
                loss = F.cross_entropy(out, yb)
                if anchor is not None:
                    loss = loss + proximal_term(self.model, anchor, self._mu())
                loss.backward()
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                loss_sum += loss.detach() * len(yb)
                correct += (out.argmax(1) == yb).sum()
                step += 1
                self.status.progress = step / total
                if cfg.cleanup_every and step % cfg.cleanup_every == 0:
                    self._cleanup()

        n = len(self.shard)
        loss_value = float(loss_sum) / n
        self.status.loss, self.status.accuracy = loss_value, float(correct) / n
        if not math.isfinite(loss_value):
            return self._header(REJECTED, attempt,
                                f"non-finite training loss ({loss_value})"), weights
        update = faults.corrupt_update(fault, weights, self.flat.pack(self.model))
        return self._header(OK, attempt, ""), update

    def _mu(self) -> float:
        server = self.cfg.server
        return server.proximal_mu if server.strategy == "fedprox" else 0.0

    def _header(self, status: str, attempts: int, message: str,
                samples: int | None = None) -> dict:
        """A client's result; train_round adds the seconds it took, retries included."""
        return {"status": status, "attempts": attempts, "message": message,
                "samples": len(self.shard) if samples is None else samples,
                "loss": self.status.loss, "accuracy": self.status.accuracy,
                "memory_mb": self.status.snapshot()["memory_mb"], "seconds": 0.0}

    def _cleanup(self) -> None:
        gc.collect()
        if self.comm.device.type == "cuda":
            torch.cuda.empty_cache()


def clients_per_rank(cfg: Config) -> int:
    """Update slots per rank: the most clients any device rank holds."""
    clients = cfg.data.clients or cfg.devices.count
    return math.ceil(clients / cfg.devices.count)


def client_ranks(cfg: Config) -> dict[int, int]:
    """Client id -> device rank, dealt round-robin: client c lives on rank c % N + 1."""
    clients = cfg.data.clients or cfg.devices.count
    return {c: c % cfg.devices.count + 1 for c in range(clients)}


def _device_header(results: list[dict]) -> dict:
    """A device's result: OK when any client is usable, else its first client's verdict."""
    usable = [r for r in results if r["status"] == OK]
    first = (usable or results)[0]
    return {"status": first["status"], "message": first["message"],
            "samples": sum(r["samples"] for r in usable),
            "attempts": max(r["attempts"] for r in results),
            "loss": first["loss"], "accuracy": first["accuracy"],
            "memory_mb": first["memory_mb"], "seconds": sum(r["seconds"] for r in results),
            "clients": results}
