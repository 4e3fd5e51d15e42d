"""`fedrun watch` on the status file of a real run."""

from __future__ import annotations

import subprocess
import sys

from conftest import job_env, needs_fashion_mnist, run_fedrun


def _watch(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fedrun", "watch", *map(str, args)],
                          capture_output=True, text=True, env=job_env(), cwd=cwd,
                          timeout=60)


@needs_fashion_mnist
def test_watch_once_shows_every_device_and_the_round(tmp_path, tiny):
    """One frame from a finished run names every device, its state and the round."""
    run = run_fedrun(tmp_path, tiny(run={"rounds": 2}))
    assert run.returncode == 0, run.output[-3000:]
    import json

    status = json.loads((run.run_dir / "status.json").read_text())
    assert [(d["state"], d["progress"]) for d in status["devices"]] == [("COMPLETED", 1.0)] * 2
    frame = _watch(run.run_dir, "--once", cwd=tmp_path)
    assert frame.returncode == 0, frame.stderr
    for text in ("Hospital", "Lab", "COMPLETED", "FINISHED", "2/2", "tiny"):
        assert text in frame.stdout, text
    assert "\x1b[" not in frame.stdout
    follow = _watch(run.run_dir, cwd=tmp_path)  # a finished run: follow returns at once
    assert follow.returncode == 0 and "Hospital" in follow.stdout


def test_watch_on_a_truncated_or_missing_status_is_one_clear_line(tmp_path):
    """A half-written or missing status file gives one line and no traceback."""
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    (run_dir / "status.json").write_text('{"run": "x", "state": "RUNN')
    half = _watch(run_dir, "--once", cwd=tmp_path)
    assert half.returncode == 2 and "half-written" in half.stderr + half.stdout
    assert "Traceback" not in half.stderr
    missing = _watch(tmp_path / "runs" / "nope", "--once", cwd=tmp_path)
    assert missing.returncode == 2 and "missing" in missing.stderr + missing.stdout
    assert "Traceback" not in missing.stderr
