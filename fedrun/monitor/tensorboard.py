"""TensorBoard event files: exactly one scalar per tag per round, even across resumes.

Only the server writes them, directly under the run folder. Event files are append
only, so a run that crashed after round 7 but resumes from the checkpoint of round 5
would show rounds 6 and 7 twice. Instead, opening the log deletes the old event files
and replays the metric history stored in the checkpoint, with each round's original
walltime: the files then hold exactly what the checkpoint holds, and the rerun rounds
are appended once.

Tags (step = round number, walltime = the record's "time"):
    global/accuracy, global/loss            the global model after the round
    devices/aggregated, devices/masked      how many updates were used and masked
    device/<rank>-<name>/accuracy|loss|samples|attempts|status
    phase/<name>                            seconds spent in each phase of the round
    memory/server_mb                        the server's resident memory
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

# How a device's outcome in a round is drawn as a number on the device/*/status plot.
STATUS_CODES = {
    "OK": 0, "FAILED": 1, "TIMEOUT": 2, "REJECTED": 3, "QUARANTINED": 4, "SKIPPED": 5,
}
EVENT_FILE_GLOB = "events.out.tfevents.*"


class TensorBoardLog:
    """The run's TensorBoard scalars, rebuilt from `history` when opened."""

    def __init__(self, run_dir: Path, history: list[dict[str, Any]],
                 device_names: dict[int, str] | None = None) -> None:
        self._run_dir = Path(run_dir)
        self._names = {int(rank): name for rank, name in (device_names or {}).items()}
        self._last_round = 0
        self._last_global: dict[str, float] = {}

        self._run_dir.mkdir(parents=True, exist_ok=True)
        # Only files directly in the run folder are ours; sub-folders may be another
        # tool's runs and are left alone.
        for old in self._run_dir.glob(EVENT_FILE_GLOB):
            if old.is_file():
                old.unlink()
        self._writer: SummaryWriter | None = SummaryWriter(log_dir=str(self._run_dir))

        for record in history:
            self._write(record)
        self._writer.flush()

    def log_round(self, record: dict[str, Any]) -> None:
        """Write one round record (the same dict summary.json keeps under "rounds")."""
        self._write(record)
        # One flush per round keeps a live TensorBoard current; rounds take seconds.
        self._open().flush()

    def log_hparams(self, config: dict[str, Any], final_accuracy: float) -> None:
        """Record the run's config as hparams, with the final accuracy as the metric.

        Written into the run's own event file (not a timestamped sub-folder, as
        SummaryWriter.add_hparams does) so that a resume replaces it with the rest.
        """
        metrics = {"hparam/final_accuracy": float(final_accuracy)}
        writer = self._open()
        for summary in hparams(flatten_config(config), metrics):
            writer.file_writer.add_summary(summary, self._last_round)
        writer.add_scalar("hparam/final_accuracy", metrics["hparam/final_accuracy"],
                          self._last_round)
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> SummaryWriter:
        if self._writer is None:
            raise RuntimeError(f"the TensorBoard log of {self._run_dir} is closed")
        return self._writer

    def _write(self, record: dict[str, Any]) -> None:
        writer = self._open()
        step = int(record["round"])
        walltime = record.get("time")
        for tag, value in self._scalars(record):
            writer.add_scalar(tag, value, step, walltime=walltime)
        self._last_round = max(self._last_round, step)

    def _scalars(self, record: dict[str, Any]) -> list[tuple[str, float]]:
        out: list[tuple[str, Any]] = []
        for key in ("accuracy", "loss"):
            value = record.get(key)
            # A skipped round keeps the previous global model, so its line stays flat
            # instead of having a gap, even if the record left the value out.
            if value is None and record.get("skipped"):
                value = self._last_global.get(key)
            if _is_number(value):
                self._last_global[key] = value
            out.append((f"global/{key}", value))
        if "participants" in record:
            out.append(("devices/aggregated", len(record["participants"] or [])))
        if "masked" in record:
            out.append(("devices/masked", len(record["masked"] or {})))
        out.extend(self._device_scalars(record))
        for phase, seconds in (record.get("phases") or {}).items():
            out.append((f"phase/{phase}", seconds))
        out.append(("memory/server_mb", record.get("memory_mb")))
        return [(tag, float(value)) for tag, value in out if _is_number(value)]

    def _device_scalars(self, record: dict[str, Any]) -> list[tuple[str, Any]]:
        # JSON keys are strings; a record straight from the server may use ints.
        devices = {int(k): v or {} for k, v in (record.get("devices") or {}).items()}
        masked = {int(k): v or {} for k, v in (record.get("masked") or {}).items()}
        attempts = {int(k): v for k, v in (record.get("attempts") or {}).items()}

        out: list[tuple[str, Any]] = []
        for rank in sorted(set(devices) | set(masked) | set(attempts)):
            info = devices.get(rank, {})
            prefix = self._device_tag(rank)
            status = info.get("status") or masked.get(rank, {}).get("status")
            out.append((f"{prefix}/accuracy", info.get("accuracy")))
            out.append((f"{prefix}/loss", info.get("loss")))
            out.append((f"{prefix}/samples", info.get("samples")))
            out.append((f"{prefix}/attempts", info.get("attempts", attempts.get(rank))))
            # An unknown status is left out rather than drawn as a made-up code.
            out.append((f"{prefix}/status", STATUS_CODES.get(str(status))))
        return out

    def _device_tag(self, rank: int) -> str:
        name = self._names.get(rank)
        if not name:
            return f"device/{rank}"
        # A "/" in a name would open another level in TensorBoard's tag tree.
        return f"device/{rank}-{name.replace('/', '_')}"


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as {"section.key": value}; lists (names, faults) as JSON text,
    since hparams take only numbers, strings and booleans."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value, sort_keys=True)
        elif value is None:
            flat[name] = ""
        else:
            flat[name] = value
    return flat


def _is_number(value: Any) -> bool:
    # NaN passes: a diverged round should show up on the plot, not vanish from it.
    return isinstance(value, (int, float)) and not isinstance(value, bool)
