"""The status file: one JSON object that the server replaces while the run goes on.

Only the server writes it, always through `write_status`, so a reader sees either the
previous object or the next one, never a mix. `read_status` turns every way the file
can be unusable (missing, half-written by another tool, not an object) into one
`StatusError` whose message says what to do, so `watch` never shows a traceback.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedrun.atomic import write_json

SERVER_STATES = ("STARTING", "RUNNING", "CHECKPOINTING", "FINISHED", "STOPPED", "FAILED")
DEVICE_STATES = (
    "IDLE", "TRAINING", "RETRYING", "COMPLETED", "FAILED", "TIMEOUT", "REJECTED",
    "QUARANTINED",
)
# STOPPED: ended cleanly by SIGTERM or Ctrl-C, with a checkpoint to resume from.
FINAL_STATES = ("FINISHED", "STOPPED", "FAILED")
STATUS_NAME = "status.json"  # inside the run folder, runs/<run.name>/

# Keys a reader relies on, with the JSON types they may hold; all but "state" may be
# missing (a STARTING server has no devices yet) and the numbers may be null.
_NUMBER = (int, float, type(None))
_TOP_LEVEL_TYPES: dict[str, tuple[type, ...]] = {
    "run": (str,),
    "state": (str,),
    "round": _NUMBER,
    "rounds": _NUMBER,
    "phase": (str, type(None)),
    "accuracy": _NUMBER,
    "loss": _NUMBER,
    "devices_connected": _NUMBER,
    "devices_total": _NUMBER,
    "started_at": _NUMBER,
    "updated_at": _NUMBER,
    "devices": (list,),
    "events": (list,),
}


class StatusError(RuntimeError):
    """A status file that cannot be read; the message is one line saying what to do."""


def write_status(path: Path, status: dict[str, Any]) -> None:
    """Replace `path` with `status` so that no reader ever sees a partial file.

    The temp file must sit in the same folder: `os.replace` is only atomic within one
    file system. The fsync costs a disk flush per write, which is why the server
    writes on events and heartbeats, not per batch.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, _finite(status), allow_nan=False)


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities as null: a diverged model must not make the
    file unreadable to strict JSON readers (jq, browsers), which reject NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def read_status(path: Path) -> dict[str, Any]:
    """The status object at `path`, or a `StatusError` that says why there is none."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StatusError(f"{path} is missing: is the run name right, and has the "
                          "server started?") from None
    except UnicodeDecodeError as exc:
        raise StatusError(f"{path} is half-written or not JSON ({exc.reason}): wait a "
                          "moment and retry") from None
    except OSError as exc:
        raise StatusError(f"{path} cannot be read ({exc.strerror}): check the path "
                          "and its permissions") from None
    try:
        status = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StatusError(f"{path} is half-written or not JSON ({exc.msg} at line "
                          f"{exc.lineno} column {exc.colno}): wait a moment and retry"
                          ) from None
    _check_shape(path, status)
    return status


def _check_shape(path: Path, status: Any) -> None:
    def wrong(what: str) -> StatusError:
        return StatusError(f"{path} is JSON but not a fedrun status file ({what}): was "
                           "it written by a fedrun server?")

    if not isinstance(status, dict):
        raise wrong(f"a {type(status).__name__}, not an object")
    if "state" not in status:
        raise wrong('no "state" key')
    for key, types in _TOP_LEVEL_TYPES.items():
        if key in status and not _is(status[key], types):
            raise wrong(f'"{key}" is {json.dumps(status[key])[:40]}')
    for key in ("devices", "events"):
        if not all(isinstance(item, dict) for item in status.get(key, [])):
            raise wrong(f'"{key}" holds an entry that is not an object')


def _is(value: Any, types: tuple[type, ...]) -> bool:
    # JSON true/false are Python bools, which are ints; a bool is never a count here.
    return isinstance(value, types) and not isinstance(value, bool)
