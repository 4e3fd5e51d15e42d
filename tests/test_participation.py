"""Participation, many clients per device, server optimizer state and update clipping,
in real runs."""

from __future__ import annotations

import torch

from conftest import needs_fashion_mnist, run_fedrun
from fedrun.config import load
from fedrun.server import sample_clients

pytestmark = needs_fashion_mnist


def test_sampling_is_seeded_and_respects_min_devices():
    """The same seed and round draw the same clients; never fewer than min_devices."""
    cfg = load(None, ["server.fraction=0.3", "server.min_devices=3"])
    live = list(range(5))
    draws = [sample_clients(cfg, live, r) for r in range(1, 21)]
    assert all(len(d) == 3 and len(set(d)) == 3 for d in draws)
    assert draws == [sample_clients(cfg, live, r) for r in range(1, 21)]
    assert len({tuple(d) for d in draws}) > 1
    other = load(None, ["server.fraction=0.3", "server.min_devices=3", "run.seed=1"])
    assert draws != [sample_clients(other, live, r) for r in range(1, 21)]


def test_sampled_rounds_record_who_took_part(tmp_path, tiny):
    """With fraction < 1 each record lists the sampled devices and masks the rest."""
    cfg = tiny(run={"rounds": 3}, server={"fraction": 0.5, "min_devices": 2},
               devices={"count": 4, "names": ["A", "B", "C", "D"]})
    run = run_fedrun(tmp_path, cfg)
    assert run.returncode == 0, run.output[-3000:]
    full = load(cfg, [])
    for record in run.summary["rounds"]:
        expected = [c + 1 for c in sample_clients(full, [0, 1, 2, 3], record["round"])]
        assert record["participants"] == expected
        assert {int(r) for r in record["masked"]} == {1, 2, 3, 4} - set(expected)
        assert all(m["message"] == "not sampled this round"
                   for m in record["masked"].values())


def test_fifty_clients_on_five_device_ranks(tmp_path, tiny):
    """50 clients spread over 5 ranks: every client trains once per round."""
    cfg = tiny(run={"rounds": 2}, data={"clients": 50, "train_samples": 1000,
                                        "min_samples": 5},
               devices={"count": 5, "names": ["A", "B", "C", "D", "E"]})
    run = run_fedrun(tmp_path, cfg, timeout=300)
    assert run.returncode == 0, run.output[-3000:]
    for record in run.summary["rounds"]:
        assert record["clients"] == list(range(50))
        assert record["clients_masked"] == {}
        assert record["participants"] == [1, 2, 3, 4, 5]
    assert "50/50 clients from 5/5 devices aggregated" in run.output


def test_server_optimizer_state_survives_a_resume_bit_exactly(tmp_path):
    """FedAdam's moments are checkpointed: crash after round 2, resume, same weights."""
    common = {"run": {"rounds": 4, "checkpoint_every": 2},
              "server": {"strategy": "fedadam"}}
    straight = run_fedrun(tmp_path / "a", _mk(tmp_path / "a", common))
    crash = _mk(tmp_path / "b", common, [{"device": 2, "round": 3, "kind": "exit"}])
    assert run_fedrun(tmp_path / "b", crash).returncode != 0
    resumed = run_fedrun(tmp_path / "b", _mk(tmp_path / "b", common))
    assert straight.returncode == 0 and resumed.returncode == 0, resumed.output[-3000:]
    assert "resuming from round 2 (" in resumed.output
    assert straight.summary["final_weights_sha256"] == resumed.summary["final_weights_sha256"]
    state = torch.load(resumed.checkpoint_dir / "round-0004.pt", weights_only=True)
    assert {"m", "v"} <= set(state["strategy"])


def test_clipping_bounds_every_update(tmp_path, tiny):
    """privacy.clip_norm bounds each update, so no round moves the weights further."""
    clip = 0.05
    cfg = tiny(run={"rounds": 3, "keep_checkpoints": 5}, privacy={"clip_norm": clip})
    run = run_fedrun(tmp_path, cfg)
    assert run.returncode == 0, run.output[-3000:]
    weights = [torch.load(run.checkpoint_dir / f"round-000{r}.pt",
                          weights_only=True)["weights"] for r in (1, 2, 3)]
    steps = [float((b - a).norm()) for a, b in zip(weights, weights[1:])]
    assert all(0 < s <= clip * (1 + 1e-5) for s in steps), steps


def _mk(folder, changes, faults=()):
    folder.mkdir(exist_ok=True)
    from conftest import TINY, merged, write_config

    sections = merged(TINY, **changes)
    return write_config(folder / "c.toml", sections, faults)
