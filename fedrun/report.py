"""What the server tells people: the status file, the dashboard, TensorBoard, the summary.

The server owns the truth; this module turns it into `runs/<run>/status.json` (replaced
atomically on every change and at least every `STATUS_EVERY_S` while devices train),
the live dashboard or one plain log line per event, TensorBoard scalars, and
`runs/<run>/summary.json`.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import psutil

from .atomic import write_json
from .config import Config
from .monitor.dashboard import LiveDashboard, use_dashboard
from .monitor.status import write_status
from .monitor.tensorboard import TensorBoardLog

log = logging.getLogger("fedrun")

STATUS_EVERY_S = 1.0
EVENTS_KEPT = 20


class Reporter:
    def __init__(self, cfg: Config, history: list[dict], dashboard: bool):
        self.cfg = cfg
        self.run_dir = cfg.run_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        names = {r: cfg.device_name(r) for r in range(1, cfg.devices.count + 1)}
        self.tensorboard = TensorBoardLog(self.run_dir, history, device_names=names)
        self.events: deque[dict] = deque(maxlen=EVENTS_KEPT)
        self.devices = {r: {"rank": r, "name": n, "state": "IDLE", "progress": 0.0,
                            "attempt": 0, "accuracy": None, "loss": None, "samples": 0,
                            "memory_mb": None, "cuda_memory_mb": None, "message": ""}
                        for r, n in names.items()}
        self.status = {"run": cfg.run.name, "state": "STARTING", "round": 0,
                       "rounds": cfg.run.rounds, "phase": "starting", "accuracy": None,
                       "loss": None, "devices_connected": 0,
                       "devices_total": cfg.devices.count, "started_at": time.time()}
        self.live = LiveDashboard() if dashboard else None
        self._written = 0.0
        self._reported: set[int] = set()
        if self.live is not None:
            self.live.start()

    # ---- status ---------------------------------------------------------------------

    def event(self, text: str, level: int = logging.INFO) -> None:
        """One event: a line in the log and an entry in the status file's activity."""
        log.log(level, text)
        self.events.append({"time": time.time(), "text": text})
        self.flush(force=True)

    def set(self, **fields) -> None:
        self.status.update(fields)
        self.flush(force=True)

    def device(self, rank: int, **fields) -> None:
        self.devices[rank].update(fields)

    def result(self, rank: int, header: dict) -> None:
        """A device's result for this round; later beats of this round cannot undo it."""
        state = "COMPLETED" if header["status"] == "OK" else header["status"]
        self.devices[rank].update(state=state, progress=1.0, message=header.get("message", ""),
                                  **{k: header[k] for k in ("accuracy", "loss")
                                     if header.get(k) is not None})
        self._reported.add(rank)
        self.event(result_text(self.cfg.device_label(rank), header))

    def round_started(self, server_round: int) -> None:
        self._reported = set()
        self.set(round=server_round, phase="broadcast")

    def beats(self, beats: dict[int, dict | None], fresh: set[int]) -> None:
        for rank, beat in beats.items():
            if beat is None:
                continue
            # A beat sent mid-training may arrive after the result: keep the result.
            keys = (("memory_mb", "cuda_memory_mb") if rank in self._reported else
                    ("state", "progress", "attempt", "accuracy", "loss", "samples",
                     "memory_mb", "cuda_memory_mb", "message"))
            self.devices[rank].update({k: beat.get(k) for k in keys})
        self.status["devices_connected"] = len(fresh)
        self.flush()

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._written < STATUS_EVERY_S:
            return
        self._written = now
        status = dict(self.status, updated_at=time.time(),
                      devices=list(self.devices.values()), events=list(self.events))
        write_status(self.run_dir / "status.json", status)
        if self.live is not None:
            self.live.update(status)

    # ---- rounds ---------------------------------------------------------------------

    def round_done(self, record: dict, history: list[dict], weights_sha: str,
                   quarantined: dict[int, int], crashes: list[dict]) -> None:
        self.tensorboard.log_round(record)
        self.write_summary(history, weights_sha, quarantined, crashes)

    def write_summary(self, history: list[dict], weights_sha: str,
                      quarantined: dict[int, int], crashes: list[dict],
                      final: bool = False) -> None:
        last = next((r for r in reversed(history) if r.get("accuracy") is not None), None)
        summary = {
            "run": self.cfg.run.name,
            "rounds_completed": len(history),
            "rounds_planned": self.cfg.run.rounds,
            "finished": final,
            "final_accuracy": last["accuracy"] if last else None,
            "final_loss": last["loss"] if last else None,
            "devices": [{"rank": r, "name": d["name"]} for r, d in self.devices.items()],
            "quarantined": [{"rank": r, "name": self.devices[r]["name"], "since_round": q}
                            for r, q in sorted(quarantined.items())],
            "crashes": crashes,
            "final_weights_sha256": weights_sha,
            "rounds": history,
        }
        write_json(self.run_dir / "summary.json", summary)

    def finish(self, state: str, config: dict | None, final_accuracy: float | None) -> None:
        if config is not None and final_accuracy is not None:
            self.tensorboard.log_hparams(config, final_accuracy)
        self.status["state"] = state
        self.flush(force=True)
        self.tensorboard.close()
        if self.live is not None:
            self.live.stop()
            self.live = None


def memory_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def wants_dashboard(cfg: Config) -> bool:
    return use_dashboard(cfg.run.dashboard)


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def result_text(label: str, header: dict) -> str:
    """One device's result for the activity list."""
    if header["status"] == "OK":
        return (f"{label} completed: {header['samples']} samples, local accuracy "
                f"{pct(header.get('accuracy'))}, {header.get('seconds', 0):.1f}s")
    return f"{label} {header['status'].lower()}: {header.get('message', '')}"


def round_line(cfg: Config, record: dict, headers: dict[int, dict],
               clients: int) -> tuple[str, int]:
    """The one summary line of a round, in the words of the field, and its log level."""
    parts = []
    for rank in range(1, cfg.devices.count + 1):
        label, attempts = cfg.device_label(rank), headers[rank].get("attempts", 0)
        masked = record["masked"].get(str(rank))
        if masked and masked["status"] in ("QUARANTINED", "SKIPPED"):
            continue
        if masked:
            parts.append(f"{label} {masked['status'].lower()} ({masked['message']})"
                         + (f" after {attempts} attempts" if attempts > 1 else ""))
        elif attempts > 1:
            parts.append(f"{label} failed {attempts - 1}x, retry {attempts - 1}/"
                         f"{cfg.train.max_retries} succeeded")
    used, total = len(record["participants"]), cfg.devices.count
    if record["skipped"]:
        parts.append(f"round skipped: {record['reason']}; weights unchanged")
    elif cfg.data.clients:
        parts.append(f"{len(record['clients'])}/{clients} clients from {used}/{total} "
                     "devices aggregated")
    else:
        parts.append(f"{used}/{total} devices aggregated")
    parts.append(f"accuracy {pct(record['accuracy'])}, loss {record['loss']:.4f}, "
                 f"{record['seconds']:.1f}s")
    level = logging.WARNING if record["skipped"] or record["masked"] else logging.INFO
    return f"round {record['round']}/{cfg.run.rounds}: " + "; ".join(parts), level
