"""The server's reporter: what status.json says about devices and rounds."""

from __future__ import annotations

import json

from fedrun.config import load
from fedrun.report import Reporter


def test_a_late_heartbeat_does_not_undo_a_device_result(tmp_path):
    """A beat sent mid-training that is read after the result keeps COMPLETED, 100%."""
    cfg = load(None, [f"run.output_dir={tmp_path}", "devices.count=2",
                      "devices.names=['Hospital', 'Lab']"])
    report = Reporter(cfg, [], dashboard=False)
    report.round_started(1)
    report.result(1, {"status": "OK", "samples": 10, "accuracy": 0.5, "loss": 1.0,
                      "seconds": 1.0, "message": ""})
    stale = {"state": "TRAINING", "progress": 0.4, "attempt": 1, "accuracy": 0.1,
             "loss": 2.0, "samples": 10, "memory_mb": 123.0, "cuda_memory_mb": None,
             "message": "", "seq": 7}
    report.beats({1: stale, 2: stale}, fresh={1, 2})
    report.flush(force=True)
    devices = json.loads((tmp_path / "default" / "status.json").read_text())["devices"]
    assert (devices[0]["state"], devices[0]["progress"], devices[0]["accuracy"]) == \
        ("COMPLETED", 1.0, 0.5)
    assert devices[0]["memory_mb"] == 123.0  # memory still follows the beats
    assert (devices[1]["state"], devices[1]["progress"]) == ("TRAINING", 0.4)
    report.finish("FINISHED", None, None)
