"""Fault tolerance, proven with injected faults in real torchrun runs.

Each test injects faults through the config's [[faults]] section (or kills a process
from outside) and checks what the round records, the logs and the checkpoints say.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import torch

from conftest import (Job, TINY, job_env, merged, needs_fashion_mnist, rank_pids,
                      run_fedrun, wait_until, write_config)

pytestmark = needs_fashion_mnist


def _records(run) -> dict[int, dict]:
    return {r["round"]: r for r in run.summary["rounds"]}


def _accounted(record: dict, ranks: list[int]) -> bool:
    """participants plus masked name every device exactly once."""
    named = record["participants"] + [int(r) for r in record["masked"]]
    return sorted(named) == ranks


def _weights(path) -> torch.Tensor:
    return torch.load(path, weights_only=True)["weights"]


def test_raise_once_is_retried_and_aggregated(tmp_path, tiny):
    """A device that raises once (or hits an OOM twice) succeeds on retry; all count."""
    cfg = tiny(faults=[{"device": 1, "round": 1, "kind": "raise", "attempts": 1},
                       {"device": 2, "round": 2, "kind": "oom", "attempts": 2}])
    run = run_fedrun(tmp_path, cfg)
    assert run.returncode == 0, run.output[-3000:]
    records = _records(run)
    assert records[1]["participants"] == [1, 2] and records[1]["attempts"]["1"] == 2
    assert records[2]["participants"] == [1, 2] and records[2]["attempts"]["2"] == 3
    assert "Device 1 [Hospital] failed 1x, retry 1/3 succeeded" in run.output
    assert "attempt 1/4 failed (InjectedFault" in run.log("device-1")
    assert "OutOfMemoryError" in run.log("device-2")


def test_raise_every_attempt_is_masked_then_back(tmp_path, tiny):
    """Failing every attempt masks the device for that round only."""
    cfg = tiny(train={"max_retries": 2}, faults=[{"device": 2, "round": 1, "kind": "raise"}])
    run = run_fedrun(tmp_path, cfg)
    assert run.returncode == 0, run.output[-3000:]
    first, second = _records(run)[1], _records(run)[2]
    assert first["participants"] == [1]
    assert first["masked"]["2"]["status"] == "FAILED"
    assert "InjectedFault" in first["masked"]["2"]["message"]
    assert first["attempts"]["2"] == 3
    assert second["participants"] == [1, 2] and second["masked"] == {}
    assert "Device 2 [Lab] failed (InjectedFault" in run.output


def test_nan_inf_and_huge_updates_are_rejected(tmp_path, tiny):
    """Non-finite and out-of-bound updates are rejected by name; weights stay finite."""
    cfg = tiny(run={"rounds": 3}, faults=[
        {"device": 1, "round": 1, "kind": "nan"},
        {"device": 2, "round": 2, "kind": "inf"},
        {"device": 1, "round": 3, "kind": "huge"}])
    run = run_fedrun(tmp_path, cfg)
    assert run.returncode == 0, run.output[-3000:]
    records = _records(run)
    expected = {1: ("1", "non-finite"), 2: ("2", "non-finite"), 3: ("1", "exceeds")}
    for rnd, (rank, words) in expected.items():
        assert records[rnd]["masked"][rank]["status"] == "REJECTED"
        assert words in records[rnd]["masked"][rank]["message"]
        assert len(records[rnd]["participants"]) == 1
    for rnd in (1, 2, 3):
        assert torch.isfinite(_weights(run.checkpoint_dir / f"round-000{rnd}.pt")).all()
    assert "Device 1 [Hospital] rejected (non-finite update" in run.output


def test_zero_samples_and_all_failing_skip_the_round(tmp_path, tiny):
    """No usable update: the round is skipped, weights unchanged, the run goes on."""
    cfg = tiny(run={"rounds": 4, "keep_checkpoints": 5}, train={"max_retries": 0}, faults=[
        {"device": 1, "round": 2, "kind": "zero_samples"},
        {"device": 2, "round": 2, "kind": "zero_samples"},
        {"device": 1, "round": 3, "kind": "raise"},
        {"device": 2, "round": 3, "kind": "raise"}])
    run = run_fedrun(tmp_path, cfg)
    assert run.returncode == 0, run.output[-3000:]
    records = _records(run)
    for rnd in (2, 3):
        assert records[rnd]["skipped"] and records[rnd]["participants"] == []
        assert records[rnd]["accuracy"] == records[1]["accuracy"]
        assert _accounted(records[rnd], [1, 2])
    assert "reported 0 samples" in records[2]["masked"]["1"]["message"]
    assert not records[4]["skipped"] and records[4]["participants"] == [1, 2]
    ckpt = run.checkpoint_dir
    assert torch.equal(_weights(ckpt / "round-0001.pt"), _weights(ckpt / "round-0003.pt"))
    assert not torch.equal(_weights(ckpt / "round-0003.pt"), _weights(ckpt / "round-0004.pt"))
    assert "round skipped: 0 usable updates" in run.output


def test_too_many_skipped_rounds_stop_with_a_clear_error(tmp_path, tiny):
    """Below min_devices for max_skipped_rounds in a row: a clear error and a checkpoint."""
    cfg = tiny(run={"rounds": 5}, train={"max_retries": 0},
               server={"min_devices": 2, "max_skipped_rounds": 2},
               faults=[{"device": 1, "round": r, "kind": "raise"} for r in (1, 2, 3)])
    run = run_fedrun(tmp_path, cfg)
    assert run.returncode != 0
    assert "2 rounds in a row were skipped (limit server.max_skipped_rounds = 2)" in run.output
    assert (run.checkpoint_dir / "round-0002.pt").is_file()
    assert run.summary["rounds_completed"] == 2


def test_slow_device_times_out_at_the_deadline(tmp_path, tiny):
    """A slow device stops at the round deadline as TIMEOUT; the round stays bounded."""
    deadline = 8.0
    cfg = tiny(run={"round_deadline_s": deadline},
               faults=[{"device": 2, "round": 1, "kind": "slow"}])
    run = run_fedrun(tmp_path, cfg)
    assert run.returncode == 0, run.output[-3000:]
    first = _records(run)[1]
    assert first["masked"]["2"]["status"] == "TIMEOUT"
    assert "round deadline" in first["masked"]["2"]["message"]
    assert first["participants"] == [1]
    assert deadline * 0.9 < first["seconds"] < deadline + 8
    assert _records(run)[2]["participants"] == [1, 2]


def test_device_killed_mid_round_resumes_after_restart(tmp_path, tiny):
    """SIGKILL of a device mid-round: torchrun restarts the group, the run resumes."""
    cfg = tiny(run={"rounds": 3}, data={"train_samples": 1600},
               train={"local_epochs": 3, "batch_size": 8})
    job = Job(tmp_path, cfg, max_restarts=1)
    status = job.run_dir / "status.json"

    def round_two_training():
        try:
            s = json.loads(status.read_text())
        except (OSError, ValueError):
            return False
        return s["round"] == 2 and s["phase"] == "training"

    wait_until(round_two_training, 120, "round 2 to start training")
    os.kill(rank_pids(job)[2], signal.SIGKILL)
    run = job.wait(240)
    assert run.returncode == 0, run.output[-3000:]
    assert run.summary["rounds_completed"] == 3 and run.summary["quarantined"] == []
    assert "Device 2 [Lab] left without a word" in run.output
    assert [c["ranks"] for c in run.summary["crashes"]] == [[2]]
    assert "resuming from round 1" in run.output
    assert all(_accounted(r, [1, 2]) for r in run.summary["rounds"])


def test_device_crashing_twice_in_a_round_is_quarantined(tmp_path, tiny):
    """A device that dies in the same round after a restart is masked from then on."""
    cfg = tiny(run={"rounds": 3}, faults=[{"device": 2, "round": 2, "kind": "sigkill"}])
    run = run_fedrun(tmp_path, cfg, max_restarts=2, timeout=300)
    assert run.returncode == 0, run.output[-3000:]
    summary = run.summary
    assert summary["quarantined"] == [{"rank": 2, "name": "Lab", "since_round": 2}]
    records = _records(run)
    assert records[1]["participants"] == [1, 2]
    for rnd in (2, 3):
        assert records[rnd]["participants"] == [1]
        assert records[rnd]["masked"]["2"]["status"] == "QUARANTINED"
    assert "Device 2 [Lab] is quarantined" in run.output


def test_hung_device_is_caught_by_the_deadline_and_quarantined(tmp_path, tiny):
    """A device stuck forever is named after deadline + timeout, then quarantined."""
    cfg = tiny(run={"rounds": 2, "round_deadline_s": 8.0}, comm={"timeout_s": 5.0},
               faults=[{"device": 1, "round": 2, "kind": "hang"}])
    run = run_fedrun(tmp_path, cfg, max_restarts=2, timeout=300)
    assert run.returncode == 0, run.output[-3000:]
    assert "Device 1 [Hospital] sent no result 5s after the deadline" in run.output
    assert run.summary["quarantined"] == [{"rank": 1, "name": "Hospital", "since_round": 2}]
    assert _records(run)[2]["participants"] == [2]


def test_server_killed_leaves_no_process_behind(tmp_path):
    """Without torchrun to clean up, devices notice a dead server and exit in time."""
    timeout = 5.0
    cfg = write_config(tmp_path / "c.toml", merged(
        TINY, run={"rounds": 50, "output_dir": str(tmp_path / "runs"),
                   "checkpoint_dir": str(tmp_path / "ckpt")},
        comm={"timeout_s": timeout}))
    from fedrun.launch import free_port

    port = free_port()
    procs = []
    for rank in range(3):
        env = job_env({"RANK": str(rank), "WORLD_SIZE": "3", "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
        procs.append(subprocess.Popen([sys.executable, "-m", "fedrun", "--config", str(cfg)],
                                      env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
    try:
        summary = tmp_path / "runs" / "tiny" / "summary.json"
        wait_until(summary.exists, 120, "the first round")
        procs[0].kill()
        killed = time.monotonic()
        for proc in procs[1:]:
            proc.wait(timeout=timeout + 30)
        assert time.monotonic() - killed < timeout + 30
        assert all(proc.returncode != 0 for proc in procs[1:])
        assert not [p for p in procs if psutil.pid_exists(p.pid)
                    and psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


def _chaos_faults(seed: int, rounds: int, devices: int) -> list[dict]:
    """Every fault kind at a seeded random place; each crash kind on its own device."""
    rng = np.random.default_rng(seed)
    # Crashes first: the first matching entry wins, and a crash must not be shadowed.
    faults = []
    crash_rounds = rng.choice(np.arange(3, rounds), size=3, replace=False)
    for device, kind, rnd in zip((1, 2, 3), ("hang", "exit", "sigkill"), crash_rounds):
        faults.append({"device": device, "round": int(rnd), "kind": kind})
    for kind in ("raise", "oom", "nan", "inf", "huge", "zero_samples", "slow"):
        for _ in range(2):
            faults.append({"device": int(rng.integers(1, devices + 1)),
                           "round": int(rng.integers(1, rounds + 1)), "kind": kind,
                           "attempts": int(rng.integers(0, 3))})
    return faults


def test_seeded_chaos_run_completes_with_every_device_accounted_for(tmp_path):
    """30 short rounds with every kind of fault: the run completes, nobody unaccounted."""
    rounds, devices = 30, 4
    sections = merged(TINY, run={"rounds": rounds, "round_deadline_s": 5.0,
                                 "checkpoint_every": 2},
                      data={"train_samples": 600},
                      devices={"count": devices, "names": ["Hospital", "University",
                                                           "Company", "Lab"]},
                      train={"max_retries": 1}, comm={"timeout_s": 5.0})
    cfg = write_config(tmp_path / "chaos.toml", sections, _chaos_faults(7, rounds, devices))
    run = run_fedrun(tmp_path, cfg, max_restarts=8, timeout=600)
    assert run.returncode == 0, run.output[-4000:]
    summary = run.summary
    assert [r["round"] for r in summary["rounds"]] == list(range(1, rounds + 1))
    ranks = list(range(1, devices + 1))
    assert all(_accounted(r, ranks) for r in summary["rounds"])
    assert sorted(q["rank"] for q in summary["quarantined"]) == [1, 2, 3]
    statuses = {m["status"] for r in summary["rounds"] for m in r["masked"].values()}
    assert {"FAILED", "REJECTED", "TIMEOUT", "QUARANTINED"} <= statuses
