"""Monitoring: the status file, the dashboard frame, `watch`, and TensorBoard logs."""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from fedrun.config import Config
from fedrun import atomic as atomic_module
from fedrun.monitor.dashboard import LiveDashboard, render, use_dashboard, watch
from fedrun.monitor.status import (
    DEVICE_STATES, SERVER_STATES, STATUS_NAME, StatusError, read_status, write_status,
)

NAMES = ["Hospital", "University", "Company", "Lab", "Institute"]


def make_status(state: str = "RUNNING") -> dict:
    now = time.time()
    devices = [
        {"rank": 1, "name": "Hospital", "state": "TRAINING", "progress": 0.42,
         "attempt": 1, "accuracy": 0.80, "loss": 0.51, "samples": 12000,
         "memory_mb": 350.1, "cuda_memory_mb": None, "message": ""},
        {"rank": 2, "name": "University", "state": "RETRYING", "progress": 0.0,
         "attempt": 2, "accuracy": None, "loss": None, "samples": 8000,
         "memory_mb": 340.0, "cuda_memory_mb": None,
         "message": "RuntimeError: injected"},
        {"rank": 3, "name": "Company", "state": "COMPLETED", "progress": 1.0,
         "attempt": 1, "accuracy": 0.83, "loss": 0.47, "samples": 9000,
         "memory_mb": 330.5, "cuda_memory_mb": None, "message": ""},
        {"rank": 4, "name": "Lab", "state": "QUARANTINED", "attempt": 4,
         "samples": 700},
        {"rank": 5, "name": "Institute", "state": "TIMEOUT", "progress": 0.9},
    ]
    return {
        "run": "default", "state": state, "round": 3, "rounds": 20, "phase": "training",
        "accuracy": 0.842, "loss": 0.45, "devices_connected": 5, "devices_total": 5,
        "started_at": now - 12.0, "updated_at": now - 0.5, "devices": devices,
        "events": [{"time": now - 2.0, "text": "round 2 complete: accuracy 83.1%"},
                   {"time": now - 1.0, "text": "device 4 Lab quarantined"}],
    }


def text_console() -> Console:
    """A console like a pipe or log file: not a terminal, fixed width."""
    return Console(file=io.StringIO(), width=120)


def rendered(status: dict) -> str:
    console = text_console()
    console.print(render(status))
    return console.file.getvalue()


# --- status file -------------------------------------------------------------------


def test_write_status_round_trips_and_leaves_no_temp_file(tmp_path):
    """A written status reads back equal, and only status.json is left in the folder."""
    path = tmp_path / "run" / STATUS_NAME
    status = make_status()
    write_status(path, status)
    write_status(path, status)
    assert read_status(path) == status
    assert [p.name for p in path.parent.iterdir()] == [STATUS_NAME]


def test_write_status_replaces_from_a_complete_temp_file_in_the_same_folder(
        tmp_path, monkeypatch):
    """At the rename, the temp file beside it is whole and so is the old status."""
    path = tmp_path / STATUS_NAME
    write_status(path, make_status("STARTING"))
    seen = []
    real_replace = os.replace

    def spying_replace(src, dst):
        seen.append((Path(src).parent, read_status(Path(src))["state"],
                     read_status(Path(dst))["state"]))
        real_replace(src, dst)

    monkeypatch.setattr(atomic_module.os, "replace", spying_replace)
    write_status(path, make_status("RUNNING"))
    assert seen == [(tmp_path, "RUNNING", "STARTING")]
    assert read_status(path)["state"] == "RUNNING"


def test_failed_write_keeps_the_old_status_and_removes_the_temp_file(tmp_path,
                                                                      monkeypatch):
    """A write failing at the rename keeps the old file and leaves no temp file."""
    path = tmp_path / STATUS_NAME
    write_status(path, make_status("STARTING"))

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_module.os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_status(path, make_status("RUNNING"))
    assert read_status(path)["state"] == "STARTING"
    assert [p.name for p in tmp_path.iterdir()] == [STATUS_NAME]


def test_write_status_stores_nan_as_null(tmp_path):
    """A diverged accuracy (NaN) is written as null, as strict JSON requires."""
    path = tmp_path / STATUS_NAME
    write_status(path, {**make_status(), "accuracy": float("nan")})
    assert "NaN" not in path.read_text()
    assert read_status(path)["accuracy"] is None


def test_read_status_missing_file(tmp_path):
    """A missing file says to check the run name and whether the server started."""
    with pytest.raises(StatusError) as info:
        read_status(tmp_path / STATUS_NAME)
    message = str(info.value)
    assert "is missing: is the run name right, and has the server started?" in message
    assert "\n" not in message


@pytest.mark.parametrize("content", [
    pytest.param(None, id="truncated"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\xff\xfe\x00\x81garbage", id="binary-garbage"),
    pytest.param(b"state = RUNNING", id="not-json"),
])
def test_read_status_unreadable_content(tmp_path, content):
    """Truncated, empty or garbage content says the file is half-written: retry."""
    path = tmp_path / STATUS_NAME
    if content is None:
        write_status(path, make_status())
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(StatusError) as info:
        read_status(path)
    message = str(info.value)
    assert message.startswith(f"{path} is half-written or not JSON (")
    assert message.endswith("): wait a moment and retry")
    assert "\n" not in message


@pytest.mark.parametrize("value", [
    [1, 2], "RUNNING", {"round": 3}, {"state": 7}, {"state": "RUNNING", "devices": 5},
    {"state": "RUNNING", "round": "three"}, {"state": "RUNNING", "events": ["x"]},
])
def test_read_status_wrong_shape(tmp_path, value):
    """Valid JSON that is not a status object is a StatusError naming the problem."""
    path = tmp_path / STATUS_NAME
    path.write_text(json.dumps(value))
    with pytest.raises(StatusError, match="is JSON but not a fedrun status file"):
        read_status(path)


def test_read_status_tolerates_missing_optional_keys(tmp_path):
    """Only "state" is required; a just-started server writes little else."""
    path = tmp_path / STATUS_NAME
    write_status(path, {"state": "STARTING", "accuracy": None})
    assert read_status(path) == {"state": "STARTING", "accuracy": None}


# --- dashboard ---------------------------------------------------------------------


def test_render_shows_header_devices_and_activity():
    """A frame names every device and its state, the round 3/20, accuracy and events."""
    text = rendered(make_status())
    for device in make_status()["devices"]:
        assert device["name"] in text
        assert device["state"] in text
    for expected in ("default", "RUNNING", "3/20", "84.2%", "5/5", "12,000",
                     "RETRYING (attempt 2)", "RuntimeError: injected",
                     "round 2 complete: accuracy 83.1%", "device 4 Lab quarantined"):
        assert expected in text
    assert text.index("round 2 complete") < text.index("device 4 Lab quarantined")


@pytest.mark.parametrize("state", DEVICE_STATES)
def test_render_shows_every_device_state(state):
    """Each device state a server can report appears in the table."""
    device = {"rank": 1, "name": "Lab", "state": state}
    status = {"state": "RUNNING", "devices": [device]}
    assert state in rendered(status)


@pytest.mark.parametrize("state", SERVER_STATES)
def test_render_shows_every_server_state(state):
    """Each server state appears in the header."""
    assert state in rendered(make_status(state))


def test_render_tolerates_a_bare_status():
    """A status with only a state and nulls renders without error and shows dashes."""
    text = rendered({"state": "STARTING", "accuracy": None, "loss": None,
                     "devices": [{"rank": 1}]})
    assert "STARTING" in text and "accuracy -" in text and "no events yet" in text


def test_render_prints_names_literally():
    """Run text that looks like rich markup is printed as is, not interpreted."""
    status = make_status()
    status["devices"][0]["name"] = "[bold]Ward[/bold]"
    status["events"].append({"time": time.time(), "text": "[red]not red[/red]"})
    text = rendered(status)
    assert "[bold]Ward[/bold]" in text and "[red]not red[/red]" in text


def test_render_to_a_non_terminal_has_no_escape_codes():
    """A frame printed to a pipe or a file holds no ANSI escape codes."""
    assert "\x1b[" not in rendered(make_status())


def test_live_dashboard_leaves_the_last_status_drawn():
    """After start, update and stop, the console holds a frame of the last update."""
    console = text_console()
    dashboard = LiveDashboard(console=console)
    dashboard.start()
    dashboard.update(make_status())
    finished = make_status("FINISHED")
    finished["devices"][0]["name"] = "Clinic"
    dashboard.update(finished)
    dashboard.stop()
    dashboard.stop()
    text = console.file.getvalue()
    assert "FINISHED" in text and "Clinic" in text
    assert "\x1b[" not in text


def test_live_dashboard_on_a_terminal_draws_live():
    """On a terminal the live frame uses redraw codes and ends on the last update."""
    console = Console(file=io.StringIO(), width=120, force_terminal=True)
    with LiveDashboard(console=console) as dashboard:
        dashboard.update(make_status("CHECKPOINTING"))
    text = console.file.getvalue()
    assert "\x1b[" in text and "CHECKPOINTING" in text and "Hospital" in text


def test_use_dashboard_needs_config_environment_and_terminal(monkeypatch):
    """Live drawing needs run.dashboard, no FEDRUN_NO_DASHBOARD and a terminal."""
    primary, secondary = os.openpty()
    with os.fdopen(secondary, "w") as terminal:
        monkeypatch.delenv("FEDRUN_NO_DASHBOARD", raising=False)
        assert use_dashboard(True, terminal)
        assert not use_dashboard(False, terminal)
        assert not use_dashboard(True, io.StringIO())
        monkeypatch.setenv("FEDRUN_NO_DASHBOARD", "0")
        assert use_dashboard(True, terminal)
        monkeypatch.setenv("FEDRUN_NO_DASHBOARD", "")
        assert use_dashboard(True, terminal)
        monkeypatch.setenv("FEDRUN_NO_DASHBOARD", "1")
        assert not use_dashboard(True, terminal)
    os.close(primary)


# --- watch -------------------------------------------------------------------------


def test_watch_once_prints_one_frame(tmp_path):
    """`watch --once` prints one plain frame with every device name and returns 0."""
    write_status(tmp_path / STATUS_NAME, make_status())
    console = text_console()
    assert watch(tmp_path, once=True, console=console) == 0
    text = console.file.getvalue()
    for name in NAMES:
        assert name in text
    assert text.count("recent activity") == 1
    assert "\x1b[" not in text


@pytest.mark.parametrize("truncate", [True, False], ids=["truncated", "missing"])
def test_watch_once_on_an_unreadable_file_prints_one_line(tmp_path, truncate):
    """`watch --once` on a bad file prints the one StatusError line and returns 2."""
    path = tmp_path / STATUS_NAME
    if truncate:
        write_status(path, make_status())
        path.write_bytes(path.read_bytes()[:40])
    console = text_console()
    assert watch(tmp_path, once=True, console=console) == 2
    lines = console.file.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(str(path))
    assert ("half-written" if truncate else "is missing") in lines[0]
    assert "Traceback" not in lines[0]


@pytest.mark.parametrize("state, code", [("FINISHED", 0), ("FAILED", 1)])
def test_watch_follows_until_the_run_ends(tmp_path, state, code):
    """Following returns 0 for a finished run and 1 for a failed one."""
    write_status(tmp_path / STATUS_NAME, make_status(state))
    console = text_console()
    assert watch(tmp_path, once=False, interval=0.01, console=console) == code
    assert state in console.file.getvalue()


def test_watch_gives_up_after_max_wait(tmp_path):
    """Following a missing status file gives up after max_wait_s, saying why once."""
    console = text_console()
    assert watch(tmp_path, once=False, interval=0.01, console=console,
                 max_wait_s=0.2) == 2
    lines = console.file.getvalue().splitlines()
    assert len(lines) == 1 and "is missing" in lines[0]


def test_watch_on_a_terminal_redraws_in_place(tmp_path):
    """On a terminal, following redraws live and leaves the final frame on screen."""
    write_status(tmp_path / STATUS_NAME, make_status("FINISHED"))
    console = Console(file=io.StringIO(), width=120, force_terminal=True)
    assert watch(tmp_path, once=False, interval=0.01, console=console) == 0
    text = console.file.getvalue()
    assert "\x1b[" in text and "Institute" in text and "FINISHED" in text


# --- TensorBoard -------------------------------------------------------------------


def make_record(step: int, accuracy: float, skipped: bool = False) -> dict:
    """A round record as the server keeps it in summary.json, device 4 masked."""
    return {
        "round": step, "accuracy": accuracy, "loss": 1.0 - accuracy,
        "participants": [] if skipped else [1, 2, 3], "skipped": skipped,
        "masked": {"4": {"status": "FAILED", "message": "RuntimeError: injected"}},
        "attempts": {"1": 1, "2": 1, "3": 2, "4": 4}, "reason": "",
        "seconds": 1.5, "time": 1_764_856_000.0 + 10 * step, "memory_mb": 400.0 + step,
        "phases": {"train": 1.0 + step, "evaluate": 0.25},
        "devices": {
            "1": {"status": "OK", "samples": 1200, "loss": 0.4, "accuracy": 0.85,
                  "attempts": 1, "memory_mb": 300.0},
            "2": {"status": "OK", "samples": 800, "loss": 0.5, "accuracy": 0.8,
                  "attempts": 1},
            "3": {"status": "OK", "samples": 900, "loss": None, "accuracy": None,
                  "attempts": 2},
        },
    }


def expected_scalars(record: dict) -> dict[str, float]:
    """The tags and values one record should produce, per the tag list in the brief."""
    out = {"global/accuracy": record["accuracy"], "global/loss": record["loss"],
           "devices/aggregated": len(record["participants"]),
           "devices/masked": len(record["masked"]),
           "memory/server_mb": record["memory_mb"]}
    out.update({f"phase/{k}": v for k, v in record["phases"].items()})
    for rank, info in record["devices"].items():
        prefix = f"device/{rank}-{NAMES[int(rank) - 1]}"
        for key in ("accuracy", "loss", "samples", "attempts"):
            if info[key] is not None:
                out[f"{prefix}/{key}"] = info[key]
        out[f"{prefix}/status"] = 0
    out["device/4-Lab/attempts"] = 4
    out["device/4-Lab/status"] = 1
    return out


def open_log(run_dir: Path, history: list[dict]):
    from fedrun.monitor.tensorboard import TensorBoardLog

    names = {rank: name for rank, name in enumerate(NAMES, start=1)}
    return TensorBoardLog(run_dir, history, device_names=names)


def raw_scalars(run_dir: Path) -> list[tuple[str, int, float, float]]:
    """Every scalar event in every event file of the folder, duplicates included."""
    from tensorboard.backend.event_processing.event_file_loader import (
        LegacyEventFileLoader,
    )

    out = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in LegacyEventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.append((value.tag, event.step, value.simple_value,
                                event.wall_time))
    return out


def accumulate(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    # purge_orphaned_data=False: the reader must not hide duplicate steps from us.
    reader = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0},
                              purge_orphaned_data=False)
    reader.Reload()
    return reader


def test_tensorboard_scalars_match_the_records(tmp_path):
    """TensorBoard's reader gives back each record's tags, steps, values, walltimes."""
    records = [make_record(step, 0.5 + 0.1 * step) for step in (1, 2, 3)]
    log = open_log(tmp_path, [])
    for record in records:
        log.log_round(record)
    log.close()

    reader = accumulate(tmp_path)
    expected = expected_scalars(records[0])
    assert set(reader.Tags()["scalars"]) == set(expected)
    for tag in expected:
        events = reader.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3]
        assert [e.wall_time for e in events] == [r["time"] for r in records]
        wanted = [expected_scalars(r)[tag] for r in records]
        assert [e.value for e in events] == pytest.approx(wanted, rel=1e-6)


def test_tensorboard_resume_has_one_value_per_round(tmp_path):
    """A resume after a crash past the checkpoint leaves one value per tag per round."""
    first = [make_record(step, 0.5 + 0.1 * step) for step in (1, 2, 3, 4)]
    log = open_log(tmp_path, [])
    for record in first[:3]:
        log.log_round(record)
    log.close()  # the crash: rounds 1-3 on disk, the checkpoint holds rounds 1-2

    # The rerun of rounds 3-4 reaches other accuracies; those must be the ones kept.
    rerun = [make_record(step, 0.2 + 0.1 * step) for step in (3, 4)]
    log = open_log(tmp_path, first[:2])
    for record in rerun:
        log.log_round(record)
    log.close()

    scalars = raw_scalars(tmp_path)
    counts = Counter((tag, step) for tag, step, _, _ in scalars)
    assert set(counts.values()) == {1}
    assert {step for _, step in counts} == {1, 2, 3, 4}
    accuracy = {step: value for tag, step, value, _ in scalars
                if tag == "global/accuracy"}
    assert accuracy == pytest.approx({1: 0.6, 2: 0.7, 3: 0.5, 4: 0.6})
    walltimes = {step: wall for tag, step, _, wall in scalars if tag == "global/loss"}
    assert walltimes == {r["round"]: r["time"] for r in first[:2] + rerun}


def test_tensorboard_skipped_round_keeps_the_global_line(tmp_path):
    """A skipped round logs the unchanged global accuracy and no aggregated devices."""
    skipped = make_record(2, 0.0, skipped=True)
    skipped["accuracy"] = skipped["loss"] = None
    log = open_log(tmp_path, [make_record(1, 0.7)])
    log.log_round(skipped)
    log.close()

    reader = accumulate(tmp_path)
    accuracy = [e.value for e in reader.Scalars("global/accuracy")]
    assert accuracy == pytest.approx([0.7, 0.7])
    assert [e.value for e in reader.Scalars("devices/aggregated")] == [3, 0]
    assert [e.step for e in reader.Scalars("devices/masked")] == [1, 2]


def test_tensorboard_hparams_hold_the_flat_config(tmp_path):
    """hparams hold the flat config and the final accuracy, in the run's own folder."""
    from tensorboard.plugins.hparams import metadata

    config = Config().to_dict()
    log = open_log(tmp_path, [make_record(1, 0.7)])
    log.log_hparams(config, 0.7)
    log.close()

    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []
    reader = accumulate(tmp_path)
    content = reader.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["run.rounds"].number_value == 20
    assert start.hparams["server.strategy"].string_value == "fedavg"
    assert json.loads(start.hparams["devices.names"].string_value) == NAMES
    assert start.hparams["faults"].string_value == "[]"
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert [m.name.tag for m in experiment.metric_infos] == ["hparam/final_accuracy"]
    assert reader.Scalars("hparam/final_accuracy")[0].value == pytest.approx(0.7)


def test_tensorboard_leaves_other_files_alone(tmp_path):
    """Reopening removes only event files directly in the run folder."""
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "events.out.tfevents.1.host").write_bytes(b"")
    open_log(tmp_path, []).close()
    open_log(tmp_path, []).close()
    assert (tmp_path / "summary.json").exists()
    assert (tmp_path / "other" / "events.out.tfevents.1.host").exists()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1

