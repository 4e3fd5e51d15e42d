"""Checkpoints and automatic resume: atomic files, fallbacks, and bit-exact resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import Job, job_env, needs_fashion_mnist, rank_pids, run_fedrun, wait_until
from fedrun import checkpoint
from fedrun.config import ConfigError, load


def _state(value: float) -> dict:
    return {"weights": torch.full((4,), value), "history": [{"round": 1}]}


def test_save_is_atomic_keeps_the_newest_and_points_latest(tmp_path):
    """Saves rename into place, leave no temp file, keep K files and update `latest`."""
    for rnd in range(1, 5):
        checkpoint.save(tmp_path, rnd, _state(rnd), keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", "round-0003.pt", "round-0004.pt"]
    assert (tmp_path / "latest").read_text().strip() == "round-0004.pt"
    path, state = checkpoint.load_latest(tmp_path)
    assert path.name == "round-0004.pt" and state["round"] == 4
    assert torch.equal(state["weights"], torch.full((4,), 4.0))


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path):
    """A crash inside the write (before the rename) keeps the old file as latest."""
    checkpoint.save(tmp_path, 1, _state(1), keep=3)

    def crash():
        raise KeyboardInterrupt  # stands in for the process dying at this instant

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, _state(2), keep=3, before_rename=crash)
    assert not (tmp_path / "round-0002.pt").exists()
    assert not list(tmp_path.glob(".*.tmp"))
    assert checkpoint.load_latest(tmp_path)[0].name == "round-0001.pt"


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_broken_newest_falls_back_to_previous(tmp_path, damage, caplog):
    """A truncated or garbage newest file is reported by name; the previous one is used."""
    checkpoint.save(tmp_path, 1, _state(1), keep=3)
    checkpoint.save(tmp_path, 2, _state(2), keep=3)
    newest = tmp_path / "round-0002.pt"
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    else:
        newest.write_bytes(os.urandom(2048))
    path, state = checkpoint.load_latest(tmp_path)
    assert path.name == "round-0001.pt" and state["round"] == 1
    assert "round-0002.pt is unreadable" in caplog.text


def test_checkpoint_holds_only_plain_values(tmp_path):
    """Files load with weights_only=True: tensors and plain Python values only."""
    checkpoint.save(tmp_path, 3, _state(3), keep=1)
    state = torch.load(tmp_path / "round-0003.pt", weights_only=True)
    assert state["format"] == checkpoint.FORMAT and state["round"] == 3


def test_changed_defining_values_are_refused_with_both_values(tmp_path):
    """Resuming with another model or device count names the keys and both values."""
    cfg = load(None)
    from fedrun.config import digest, resume_values

    state = {"resume_values": resume_values(cfg), "config_digest": digest(resume_values(cfg))}
    checkpoint.check_compatible(load(None, ["run.rounds=99"]), state, tmp_path)
    changed = load(None, ["model.name=fedavg_cnn", "devices.count=4",
                          'devices.names=["a","b","c","d"]'])
    with pytest.raises(ConfigError) as info:
        checkpoint.check_compatible(changed, state, tmp_path / "round-0005.pt")
    text = str(info.value)
    assert "model.name was 'cnn', now 'fedavg_cnn'" in text
    assert "devices.count was 5, now 4" in text and "--fresh" in text


# ---- real runs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_and_resumed(tmp_path_factory):
    """The same 6 rounds twice: straight through, and crashed after round 3 then resumed."""
    from conftest import TINY, merged, write_config

    base = tmp_path_factory.mktemp("straight")
    cut = tmp_path_factory.mktemp("resumed")
    sections = merged(TINY, run={"rounds": 6, "checkpoint_every": 3},
                      data={"partition": "dirichlet", "alpha": 1.0})
    straight = run_fedrun(base, write_config(base / "c.toml", sections))
    crashing = write_config(cut / "crash.toml", sections,
                            [{"device": 1, "round": 4, "kind": "exit"}])
    crashed = run_fedrun(cut, crashing)
    crashed_rounds = crashed.summary["rounds_completed"]  # before the resume rewrites it
    resumed = run_fedrun(cut, write_config(cut / "c.toml", sections))
    return straight, (crashed, crashed_rounds), resumed


@needs_fashion_mnist
def test_resume_reproduces_the_straight_run_exactly(straight_and_resumed):
    """A run crashed after round 3 and resumed ends bit-identical to the straight run."""
    straight, (crashed, crashed_rounds), resumed = straight_and_resumed
    assert straight.returncode == 0, straight.output[-3000:]
    assert crashed.returncode != 0 and crashed_rounds == 3
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "resuming from round 3 (" in resumed.output
    a, b = straight.summary, resumed.summary
    assert a["final_weights_sha256"] == b["final_weights_sha256"]
    keys = ("round", "accuracy", "loss", "participants", "masked", "skipped")
    assert [{k: r[k] for k in keys} for r in a["rounds"]] == \
           [{k: r[k] for k in keys} for r in b["rounds"]]


@needs_fashion_mnist
def test_sigterm_checkpoints_the_last_round_and_the_next_start_resumes(tmp_path, tiny):
    """SIGTERM to torchrun mid-run: the last finished round is saved, the exit is clean."""
    cfg = tiny(run={"rounds": 6, "checkpoint_every": 100}, data={"train_samples": 1200},
               train={"local_epochs": 2})
    job = Job(tmp_path, cfg)
    summary = job.run_dir / "summary.json"

    def two_rounds():
        try:
            return json.loads(summary.read_text())["rounds_completed"] >= 2
        except (OSError, ValueError):
            return False

    wait_until(two_rounds, 180, "two finished rounds")
    job.proc.send_signal(signal.SIGTERM)
    run = job.wait(120)
    done = run.summary["rounds_completed"]
    assert 2 <= done < 6
    assert (run.checkpoint_dir / "latest").read_text().strip() == f"round-{done:04d}.pt"
    server_log = run.log()
    assert (f"stopped by SIGTERM; round {done} is checkpointed: the same command resumes "
            "from it") in server_log
    assert "Traceback" not in server_log
    assert json.loads((run.run_dir / "status.json").read_text())["state"] == "STOPPED"
    again = run_fedrun(tmp_path, cfg)
    assert again.returncode == 0, again.output[-3000:]
    assert f"resuming from round {done} (" in again.output
    assert again.summary["rounds_completed"] == 6


@needs_fashion_mnist
def test_server_killed_while_writing_uses_the_previous_checkpoint(tmp_path, tiny):
    """kill -9 of the server inside a checkpoint write: the next start uses the last one."""
    stalled = tiny(run={"rounds": 3}, faults=[{"device": 0, "round": 2,
                                                "kind": "stall_checkpoint"}])
    job = Job(tmp_path, stalled)
    server_log = job.run_dir / "logs" / "server.log"
    wait_until(lambda: server_log.exists() and "pausing inside the checkpoint write"
               in server_log.read_text(), 120, "the checkpoint write to stall")
    os.kill(rank_pids(job)[0], signal.SIGKILL)
    killed = job.wait(120)
    assert killed.returncode != 0
    assert list(killed.checkpoint_dir.glob(".round-0002.pt.*.tmp"))
    assert (killed.checkpoint_dir / "latest").read_text().strip() == "round-0001.pt"
    run = run_fedrun(tmp_path, tiny(run={"rounds": 3}))
    assert run.returncode == 0, run.output[-3000:]
    assert "resuming from round 1 (" in run.output
    assert "a checkpoint write that did not finish" in run.output
    assert run.summary["rounds_completed"] == 3


@needs_fashion_mnist
def test_resume_refuses_a_changed_model_and_allows_more_rounds(tmp_path, tiny):
    """After a run, another model is refused before any group forms; more rounds go on."""
    cfg = tiny(run={"rounds": 2})
    assert run_fedrun(tmp_path, cfg).returncode == 0
    preflight = subprocess.run(
        [sys.executable, "-m", "fedrun", "nproc", "--config", str(cfg),
         f"run.checkpoint_dir={tmp_path / 'checkpoints'}", "model.name=fedavg_cnn"],
        capture_output=True, text=True, env=job_env(), cwd=tmp_path, timeout=120)
    assert preflight.returncode == 2
    assert "model.name was 'cnn', now 'fedavg_cnn'" in preflight.stderr
    assert len(preflight.stderr.strip().splitlines()) == 1
    refused = run_fedrun(tmp_path, cfg, ["model.name=fedavg_cnn"], nproc=3)
    assert refused.returncode != 0 and "model.name was 'cnn'" in refused.output
    longer = run_fedrun(tmp_path, cfg, ["run.rounds=3"])
    assert longer.returncode == 0, longer.output[-3000:]
    assert "resuming from round 2 (" in longer.output
    assert longer.summary["rounds_completed"] == 3


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's event files, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), purge_orphaned_data=False)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


@needs_fashion_mnist
def test_tensorboard_matches_summary_with_one_value_per_round(straight_and_resumed):
    """Event files read back hold exactly one value per round per tag, equal to the
    summary, in the straight run and after the crash-and-resume alike."""
    for run in straight_and_resumed[::2]:
        scalars = _scalars(run.run_dir)
        rounds = run.summary["rounds"]
        for tag in ("global/accuracy", "global/loss", "devices/aggregated",
                    "device/1-Hospital/loss", "phase/train", "memory/server_mb"):
            assert [s for s, _ in scalars[tag]] == [r["round"] for r in rounds], tag
        assert [v for _, v in scalars["global/accuracy"]] == pytest.approx(
            [r["accuracy"] for r in rounds])
        assert [v for _, v in scalars["devices/aggregated"]] == [
            len(r["participants"]) for r in rounds]
        for tag, values in scalars.items():
            steps = [s for s, _ in values]
            assert len(steps) == len(set(steps)), f"duplicate steps in {tag}"
