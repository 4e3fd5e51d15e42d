"""The bench: `python -m fedrun.bench --tiny` writes well-formed entries and a table."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedrun.bench_ref import batches_for
from fedrun.bench_report import entry, round_times
from fedrun.config import load
from fedrun.device import ShardSet, _as_batch, seed_for

REPO = Path(__file__).resolve().parents[1]
TINY_TIMEOUT_S = 360  # about 40 s on two idle cores; the limit allows for a busy machine
FIELDS = ("name", "value", "reference", "ratio", "unit")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[dict, str]:
    """One --tiny bench for every test below: its bench.json and what it printed."""
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedrun.bench", "--tiny", "--out", str(out)], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    try:
        printed, _ = proc.communicate(timeout=TINY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        pytest.fail(f"the tiny bench was still running after {TINY_TIMEOUT_S}s")
    assert proc.returncode == 0, printed[-3000:]
    return json.loads((out / "bench.json").read_text()), printed


def test_tiny_bench_entries_have_the_five_fields(tiny):
    """Every entry has name, value, reference, ratio and unit, with sensible types."""
    entries = tiny[0]["entries"]
    assert entries
    for e in entries:
        assert set(FIELDS) <= set(e), e
        assert isinstance(e["name"], str) and e["name"]
        assert isinstance(e["unit"], str) and e["unit"]
        assert isinstance(e["value"], (int, float)) and math.isfinite(e["value"]), e
        assert e["reference"] is None or isinstance(e["reference"], (int, float)), e
    assert len({e["name"] for e in entries}) == len(entries), "names must be unique"


def test_tiny_bench_ratio_is_value_over_reference(tiny):
    """ratio = value / reference wherever there is a non-zero reference, else None."""
    for e in tiny[0]["entries"]:
        if e["reference"]:
            assert e["ratio"] == pytest.approx(e["value"] / e["reference"], rel=1e-9), e
        else:
            assert e["ratio"] is None, e


def test_tiny_bench_covers_every_measurement_of_the_issue(tiny):
    """Overhead, phase shares, throughput, three models' traffic, scaling, checkpoints,
    memory of every rank, and a pass or miss for each of the three targets."""
    report = tiny[0]
    names = [e["name"] for e in report["entries"]]
    groups = {e["group"] for e in report["entries"]}
    want = {"overhead", "throughput", "comm", "scaling", "checkpoint", "memory"}
    assert want <= groups
    for phase in ("broadcast", "waiting for devices", "gather", "aggregation",
                  "evaluation", "checkpoint", "other"):
        assert f"share of round: {phase}" in names
    for model in ("cnn", "fedavg_cnn", "resnet18"):
        assert f"{model}: bytes per round" in names
        assert f"{model}: broadcast+gather bandwidth" in names
    devices = report["plan"]["devices"]
    assert sum(n.startswith("peak RSS") for n in names) == devices + 1
    targets = [e for e in report["entries"] if "target" in e]
    assert len(targets) == 2 + 3
    assert all(isinstance(e["passed"], bool) for e in targets)
    for key in ("cores_available", "cpu_model", "torch"):
        assert report["machine"][key]


def test_tiny_bench_training_steps_match_the_reference(tiny):
    """fedrun's devices and the bare loop trained on the same number of samples."""
    same = [e["same_samples"] for e in tiny[0]["entries"] if "same_samples" in e]
    assert same and all(same)


def test_tiny_bench_prints_the_table(tiny):
    """The table printed at the end has its header and one row per entry."""
    report, printed = tiny
    assert "measurement" in printed and "reference" in printed and "ratio" in printed
    for e in report["entries"]:
        assert e["name"] in printed


def test_reference_batches_are_the_devices_batches():
    """The bare loop draws the same index batches, in order, as a device's loader."""
    torch.set_num_threads(1)
    cfg = load(None, ["train.batch_size=4", "train.local_epochs=2"])
    n, server_round, rank = 22, 3, 2
    gen = torch.Generator().manual_seed(seed_for(cfg.run.seed, server_round, rank, 1))
    ids = torch.arange(n)
    loader = torch.utils.data.DataLoader(
        ShardSet(ids, ids), batch_size=4, shuffle=True, generator=gen,
        num_workers=cfg.train.num_workers, collate_fn=_as_batch)
    device_batches = [xb for _ in range(2) for xb, _ in loader]
    ours = batches_for(cfg, n, server_round, rank)
    assert len(ours) == len(device_batches) == 2 * math.ceil(n / 4)
    for a, b in zip(ours, device_batches):
        assert torch.equal(a, b)


def test_entry_ratio_and_targets():
    """entry() divides by the reference, leaves the ratio out without one, and judges
    a target in either direction."""
    assert entry("g", "a", 3.0, 4.0, "s")["ratio"] == 0.75
    assert entry("g", "b", 3.0, None, "s")["ratio"] is None
    assert entry("g", "c", 1.0, 20.0, "s", target=("<=", 0.05))["passed"] is True
    assert entry("g", "d", 2.0, 20.0, "s", target=("<=", 0.05))["passed"] is False
    assert entry("g", "e", 9.0, 10.0, "x", target=(">=", 0.9))["passed"] is True
    assert entry("g", "f", 8.0, 10.0, "x", target=(">=", 0.9))["passed"] is False
    assert entry("g", "h", 8.0, None, "x", target=(">=", 0.9))["passed"] is False


def test_round_times_add_up_and_count_the_gap_as_other():
    """A round's phases plus 'other' make its total; the time between one round's end
    and the next round's start (less the checkpoint) counts as 'other'."""
    phases = {"broadcast": 0.1, "train": 2.0, "gather": 0.2, "aggregate": 0.1,
              "evaluate": 0.3, "checkpoint": 0.0}
    devices = {"1": {"samples": 10}, "2": {"samples": 30}}
    summary = {"rounds": [
        {"time": 103.0, "seconds": 3.0, "phases": phases, "devices": devices},
        {"time": 107.5, "seconds": 3.0, "phases": dict(phases, checkpoint=0.5),
         "devices": devices},
    ]}
    rows = round_times(summary, epochs=2)
    gap = (107.5 - 3.0) - 103.0  # 1.5 s between the first round's end and the next
    assert rows[0]["other"] == pytest.approx(3.0 - 2.7 + gap)
    assert rows[1]["other"] == pytest.approx(3.0 - 2.7 + gap)  # the mean of the gaps
    for row in rows:
        parts = sum(row[k] for k in ("broadcast", "train", "gather", "aggregate",
                                     "evaluate", "checkpoint", "other"))
        assert parts == pytest.approx(row["total"])
        assert row["samples"] == 80
