"""The server (rank 0): plans each round, aggregates updates, evaluates, checkpoints.

A round: publish the plan on the store; broadcast the flat global weights; wait on the
store (not inside a collective) for every device's result header until the round
deadline; signal the gather; gather the flat updates; close with a monitored barrier;
then mask what must not count, aggregate the rest, evaluate on the test set, log and
checkpoint when due.
"""

from __future__ import annotations

import logging
import math
import signal
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .aggregation import Aggregator, skipped_masks
from .comm import BeatWatch, Comm, CommError, FlatWeights, Heartbeat, weights_sha256
from .config import Config, digest, resume_values
from .data import Dataset
from .device import (client_ranks, clients_per_rank,
                     seed_for)
from .crashes import CrashJournal, quarantine
from .launch import available_cpus
from .report import Reporter, memory_mb, pct, round_line, wants_dashboard
from .strategies import StrategyError, build_strategy

log = logging.getLogger("fedrun")

POLL_S = 0.1
GOODBYE_WAIT_S = 5.0


class Interrupted(Exception):
    """SIGTERM or SIGINT reached the server."""


class RunFailed(RuntimeError):
    """The run cannot go on (too many skipped rounds, a hung or dead device)."""


class Server:
    def __init__(self, cfg: Config, comm: Comm, model: nn.Module, data: Dataset,
                 fresh: bool = False):
        self.cfg, self.comm = cfg, comm
        self.ranks = list(range(1, cfg.devices.count + 1))
        self.model = model.to(comm.device).eval()
        self.flat = FlatWeights(self.model)
        self.test_x = data.normalise(data.test_x).to(comm.device)
        self.test_y = data.test_y.to(comm.device)
        self.strategy = build_strategy(cfg.server)
        self.client_rank = client_ranks(cfg)
        self.slots = clients_per_rank(cfg)
        self.aggregator = Aggregator(cfg, self.strategy, self.client_rank, self.slots)
        self.strategy.check(cfg.devices.count)
        self.folder = cfg.checkpoint_path()
        self.crashes = CrashJournal(self.folder / "crashes.json")
        self.signalled: str | None = None
        self.round = 0  # the round in flight, for the log prefix
        self._restore(fresh)
        self.report = Reporter(cfg, self.history, wants_dashboard(cfg))
        self.heartbeat = Heartbeat(comm, cfg.comm.heartbeat_s,
                                   lambda: {"state": self.report.status["state"]})
        self.seq = 0
        self.saved_round = self.start_round - 1
        self._pending: list[int] = []

    # ---- state ----------------------------------------------------------------------

    def _restore(self, fresh: bool) -> None:
        self.weights = self.flat.pack(self.model)
        self.history: list[dict] = []
        self.quarantined: dict[int, int] = {}
        self.skipped_in_a_row = 0
        self.start_round = 1
        if fresh:
            self._set_aside_old_run()
            return
        found = checkpoint.load_latest(self.folder)
        if found is None and any(self.folder.glob("round-*.pt")):
            log.warning("no readable checkpoint in %s; starting from round 1", self.folder)
        for stale in self.folder.glob(".round-*.tmp"):
            stale.unlink()  # reported by load_latest; nothing in it can be trusted
        crashes = quarantine(self.crashes.read())
        if found is None:
            self.quarantined = crashes
            return
        path, state = found
        checkpoint.check_compatible(self.cfg, state, path)
        self.weights = state["weights"].clone()
        self.strategy.load_state_dict(state["strategy"])
        self.history = list(state["history"])
        self.skipped_in_a_row = state["skipped_in_a_row"]
        torch.set_rng_state(state["torch_rng"])
        self.quarantined = {int(k): v for k, v in state["quarantined"].items()}
        self.quarantined.update(crashes)
        self.start_round = state["round"] + 1
        log.info("resuming from round %d (%s)", state["round"], path)

    def _set_aside_old_run(self) -> None:
        """--fresh keeps the old checkpoints under another name instead of deleting them."""
        if self.folder.is_dir() and any(self.folder.iterdir()):
            aside = self.folder.with_name(f"{self.folder.name}.old-{int(time.time())}")
            self.folder.rename(aside)
            log.info("starting over: the previous checkpoints are kept in %s", aside)

    def _record_crash(self, ranks: list[int], reason: str) -> None:
        for rank, since in self.crashes.record(self.round, ranks, reason).items():
            if rank not in self.quarantined:
                self.report.event(f"{self.cfg.device_label(rank)} crashed twice in round "
                                  f"{since}: it is quarantined after the restart",
                                  logging.ERROR)

    def _save(self) -> None:
        if self.saved_round == self.round_done or self.round_done == 0:
            return
        self.report.set(state="CHECKPOINTING", phase="checkpoint")
        stall = next((f for f in self.cfg.faults if f.kind == "stall_checkpoint"
                      and f.round == self.round_done), None)
        state = {
            "weights": self.weights, "strategy": self.strategy.state_dict(),
            "history": self.history, "skipped_in_a_row": self.skipped_in_a_row,
            "quarantined": {str(k): v for k, v in self.quarantined.items()},
            "torch_rng": torch.get_rng_state(), "config_digest":
            digest(resume_values(self.cfg)), "resume_values": resume_values(self.cfg),
        }
        path = checkpoint.save(self.folder, self.round_done, state,
                               self.cfg.run.keep_checkpoints,
                               before_rename=_stall if stall else None)
        self.saved_round = self.round_done
        self.report.event(f"checkpoint saved: {path}")
        self.report.set(state="RUNNING")

    @property
    def round_done(self) -> int:
        return self.history[-1]["round"] if self.history else self.start_round - 1

    # ---- the run --------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.heartbeat.start()
        self.report.set(state="RUNNING", devices_connected=self.cfg.devices.count)
        self._announce_quarantine()
        try:
            for server_round in range(self.start_round, self.cfg.run.rounds + 1):
                self.round = server_round
                record = self._round(server_round)
                t = time.monotonic()
                if (server_round % self.cfg.run.checkpoint_every == 0
                        or server_round == self.cfg.run.rounds):
                    self._save()
                record["phases"]["checkpoint"] = time.monotonic() - t
                self.report.round_done(record, self.history, weights_sha256(self.weights),
                                       self.quarantined, self.crashes.read())
                self._check_skips()
        except Interrupted:
            return self._stop(f"stopped by {self.signalled}", clean=True)
        except CommError as exc:
            if self.signalled:  # a peer that left on the same signal broke a collective
                return self._stop(f"stopped by {self.signalled}", clean=True)
            self.report.event(f"run failed: {exc}", logging.ERROR)
            return self._stop(str(exc), clean=False)
        except (RunFailed, StrategyError) as exc:
            self.report.event(f"run failed: {exc}", logging.ERROR)
            return self._stop(str(exc), clean=False)
        self._finish()
        return 0

    def _announce_quarantine(self) -> None:
        for rank, since in sorted(self.quarantined.items()):
            self.report.device(rank, state="QUARANTINED")
            self.report.event(f"{self.cfg.device_label(rank)} is quarantined (crashed twice "
                              f"in round {since}); it is masked from then on",
                              logging.WARNING)
        live = len(self.ranks) - len(self.quarantined)
        if live < self.cfg.server.min_devices:
            raise RunFailed(f"only {live} devices are left outside quarantine, below "
                            f"server.min_devices = {self.cfg.server.min_devices}")

    def _finish(self) -> None:
        self.round = self.cfg.run.rounds
        self.comm.put(f"plan/{self.seq}", {"stop": True})
        self.comm.barrier("the last round")
        self._wait_goodbyes(self.ranks)
        self.report.write_summary(self.history, weights_sha256(self.weights),
                                  self.quarantined, self.crashes.read(), final=True)
        accuracy = self.history[-1]["accuracy"] if self.history else None
        self.report.event(f"run finished: {len(self.history)} rounds, accuracy "
                          f"{pct(accuracy)}, summary in {self.report.run_dir}")
        self.report.set(phase="finished")
        self.report.finish("FINISHED", self.cfg.to_dict(), accuracy)
        self.heartbeat.stop()

    def _stop(self, reason: str, clean: bool) -> int:
        """Stop every rank, name the devices that vanished, keep the last finished round."""
        in_flight = self.round > self.round_done
        try:
            self.comm.put("stop", reason)
            gone = self._wait_goodbyes(self.ranks if in_flight else [])
        except Exception as exc:  # the store went down with a node: nobody to ask
            log.warning("cannot reach the store to stop the devices (%s)", exc)
            gone = []
        if gone and in_flight:
            labels = ", ".join(self.cfg.device_label(r) for r in gone)
            self.report.event(f"round {self.round}: {labels} left without a word "
                              "(crashed or killed)", logging.ERROR)
            self._record_crash(gone, "exited without a goodbye")
            clean = False
        self._save()
        self.report.write_summary(self.history, weights_sha256(self.weights),
                                  self.quarantined, self.crashes.read())
        resume = (f"round {self.round_done} is checkpointed: the same command resumes "
                  "from it" if self.history else "no round finished, nothing to resume")
        self.report.event(f"{reason}; {resume}",
                          logging.INFO if clean else logging.ERROR)
        self.report.finish("STOPPED" if clean else "FAILED", None, None)
        self.heartbeat.stop()
        return 0 if clean else 1

    def _on_signal(self, signum, frame) -> None:
        self.signalled = signal.Signals(signum).name
        # Slurm signals every process of the step and torchrun forwards its own SIGTERM
        # too, so repeated SIGTERMs are one request. A second Ctrl-C means "now".
        if signum == signal.SIGINT:
            signal.signal(signum, signal.SIG_DFL)

    def _check_signal(self) -> None:
        if self.signalled:
            raise Interrupted(self.signalled)

    # ---- one round ------------------------------------------------------------------

    def _plan(self, server_round: int) -> tuple[list[int], list[int]]:
        """The clients sampled this round, and the device ranks that hold them."""
        live = [c for c, r in self.client_rank.items()
                if not (r in self.quarantined and server_round >= self.quarantined[r])]
        chosen = sample_clients(self.cfg, live, server_round)
        return chosen, sorted({self.client_rank[c] for c in chosen})

    def _round(self, server_round: int) -> dict:
        self._check_signal()
        started = time.monotonic()
        phases: dict[str, float] = {}
        clients, participants = self._plan(server_round)
        self._pending = list(participants)
        quarantined = sorted(r for r in self.quarantined if server_round >= self.quarantined[r])
        self.comm.put(f"plan/{self.seq}", {
            "stop": False, "round": server_round, "participants": participants,
            "clients": clients, "quarantined": quarantined,
            "deadline_s": self.cfg.run.round_deadline_s})
        self.report.round_started(server_round)

        t = time.monotonic()
        self.comm.broadcast(self.weights)
        phases["broadcast"] = time.monotonic() - t

        t = time.monotonic()
        self.report.set(phase="training")
        headers = self._collect(participants, time.monotonic())
        phases["train"] = time.monotonic() - t

        t = time.monotonic()
        self.comm.put(f"go/{self.seq}", True)
        gathered = self.comm.gather(self.weights.repeat(self.slots))
        self.comm.barrier(f"round {server_round}")
        phases["gather"] = time.monotonic() - t
        self.seq += 1

        record = self._aggregate(server_round, participants, headers, gathered, phases)
        record["seconds"] = time.monotonic() - started
        record["phases"] = phases
        record["time"] = time.time()
        record["memory_mb"] = memory_mb()
        self.history.append(record)
        self._pending = []
        self._log_round(record, headers)
        return record

    def _collect(self, participants: list[int], started: float) -> dict[int, dict]:
        """Wait on the store for each device's result until the deadline plus a grace."""
        deadline = started + self.cfg.run.round_deadline_s + self.cfg.comm.timeout_s
        headers: dict[int, dict] = {}
        beats = BeatWatch(self.ranks, self.cfg.comm.timeout_s)
        for rank in self.ranks:
            if rank not in participants:
                headers[rank] = self.comm.get(f"done/{self.seq}/{rank}")
        while True:
            self._check_signal()
            for rank in list(self._pending):
                header = self.comm.get(f"done/{self.seq}/{rank}")
                if header is not None:
                    headers[rank] = header
                    self._pending.remove(rank)
                    self.report.result(rank, header)
            beats.read(self.comm)
            self.report.beats(beats.latest, beats.fresh())
            if not self._pending:
                break
            silent = [r for r in self._pending if r not in beats.fresh()]
            if silent or time.monotonic() > deadline:
                hung = silent or list(self._pending)
                why = ("stopped sending heartbeats" if silent else
                       f"sent no result {self.cfg.comm.timeout_s:.0f}s after the deadline")
                self._record_crash(hung, why)
                labels = ", ".join(self.cfg.device_label(r) for r in hung)
                raise RunFailed(f"round {self.round}: {labels} {why}; the group must "
                                "restart (torchrun --max-restarts) to go on")
            time.sleep(POLL_S)
        # Devices outside the plan post their header without training; collect them.
        for rank in self.ranks:
            while headers.get(rank) is None:
                self._check_signal()
                headers[rank] = self.comm.get(f"done/{self.seq}/{rank}")
                if headers[rank] is None:
                    time.sleep(POLL_S)
        return headers

    def _wait_goodbyes(self, ranks: list[int]) -> list[int]:
        """Ranks among `ranks` that said no goodbye within a few seconds."""
        end = time.monotonic() + min(GOODBYE_WAIT_S, self.cfg.comm.timeout_s)
        missing = list(ranks)
        while missing and time.monotonic() < end:
            missing = [r for r in missing if self.comm.get(f"bye/{r}") is None]
            if missing:
                time.sleep(POLL_S)
        return missing

    def _aggregate(self, server_round: int, participants: list[int],
                   headers: dict[int, dict], gathered: list[torch.Tensor],
                   phases: dict[str, float]) -> dict:
        t = time.monotonic()
        updates, masked, client_masked = self.aggregator.collect(self.weights, headers,
                                                                 gathered)
        record = {"round": server_round,
                  "participants": [r for r in self.ranks if str(r) not in masked],
                  "masked": masked, "skipped": False, "reason": "",
                  "attempts": {str(r): headers[r].get("attempts", 0) for r in self.ranks},
                  "devices": {str(r): _device_record(headers[r]) for r in self.ranks}}
        if self.cfg.data.clients:
            record["clients"] = sorted(u.rank - 1 for u in updates)
            record["clients_masked"] = client_masked
        self.report.set(phase="aggregating")
        self.report.event(f"aggregating {len(updates)} updates with "
                          f"{self.cfg.server.strategy}")
        new, record["reason"] = self.aggregator.aggregate(self.weights, updates,
                                                          server_round)
        phases["aggregate"] = time.monotonic() - t

        t = time.monotonic()
        if new is None:
            record["skipped"] = True
            skipped_masks(record)
            self.skipped_in_a_row += 1
            last = self.history[-1] if self.history else None
            record["accuracy"] = last["accuracy"] if last else None
            record["loss"] = last["loss"] if last else None
            if last is None:
                record["accuracy"], record["loss"] = self.evaluate()
        else:
            self.skipped_in_a_row = 0
            self.weights = new
            self.report.set(phase="evaluating")
            self.report.event(f"evaluating on {len(self.test_y)} test samples")
            record["accuracy"], record["loss"] = self.evaluate()
        phases["evaluate"] = time.monotonic() - t
        return record

    @torch.no_grad()
    def evaluate(self, batch: int = 1000) -> tuple[float, float]:
        """Accuracy and mean loss of the global weights on the held-out test set.

        Every device waits while the server evaluates, so the server may use all the
        cores of its node for it (its share of them the rest of the time)."""
        # TODO(eval-cost): evaluation every round is ~9% of a small round (bench target
        # 5%); an evaluate-every-N-rounds key would cut it, and does not exist yet.
        threads = torch.get_num_threads()
        torch.set_num_threads(max(threads, available_cpus()))
        try:
            return self._evaluate(batch)
        finally:
            torch.set_num_threads(threads)

    def _evaluate(self, batch: int) -> tuple[float, float]:
        self.flat.unpack(self.weights, self.model)
        correct, loss = 0, 0.0
        for i in range(0, len(self.test_y), batch):
            out = self.model(self.test_x[i : i + batch])
            y = self.test_y[i : i + batch]
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
        n = len(self.test_y)
        return correct / n, loss / n

    def _check_skips(self) -> None:
        limit = self.cfg.server.max_skipped_rounds
        if self.skipped_in_a_row >= limit:
            self._save()
            raise RunFailed(f"{self.skipped_in_a_row} rounds in a row were skipped (limit "
                            f"server.max_skipped_rounds = {limit}); too few devices sent "
                            "usable updates: see the masked reasons in summary.json")

    # ---- the round's log line -------------------------------------------------------

    def _log_round(self, record: dict, headers: dict[int, dict]) -> None:
        text, level = round_line(self.cfg, record, headers, len(self.client_rank))
        self.report.set(accuracy=record["accuracy"], loss=record["loss"], phase="done")
        self.report.event(text, level)


def sample_clients(cfg: Config, live: list[int], server_round: int) -> list[int]:
    """`server.fraction` of the live clients, at least `server.min_devices`, drawn from
    (seed, round) alone so that a resumed run samples what the straight one did."""
    if cfg.server.fraction >= 1:
        return list(live)
    want = max(cfg.server.min_devices, math.ceil(cfg.server.fraction * len(live)))
    rng = np.random.default_rng(seed_for(cfg.run.seed, server_round, 0, 2))
    return sorted(rng.choice(live, size=min(want, len(live)), replace=False).tolist())


def _stall() -> None:
    log.warning("injected fault: pausing inside the checkpoint write")
    time.sleep(3600)


def _device_record(header: dict) -> dict:
    return {k: header.get(k) for k in ("status", "samples", "loss", "accuracy", "attempts",
                                       "memory_mb", "message")}
