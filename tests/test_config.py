"""Config: TOML to dataclasses, overrides, and one clear error for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, TINY, job_env, write_config
from fedrun import config
from fedrun.config import ConfigError


def test_shipped_configs_load():
    """Every config in configs/ loads and validates; default.toml has the agreed values."""
    for path in sorted((ROOT / "configs").glob("*.toml")):
        config.load(path)
    cfg = config.load(ROOT / "configs" / "default.toml")
    assert (cfg.run.rounds, cfg.devices.count, cfg.train.batch_size) == (20, 5, 8)
    assert (cfg.train.local_epochs, cfg.train.max_grad_norm) == (3, 1.0)
    assert (cfg.train.cleanup_every, cfg.train.num_workers) == (10, 0)
    assert (cfg.train.max_retries, cfg.run.checkpoint_every) == (3, 5)
    assert cfg.devices.names == ["Hospital", "University", "Company", "Lab", "Institute"]
    assert cfg.world_size == 6


def test_overrides_take_toml_values():
    """section.key=value overrides parse as TOML, and faults.N.key builds fault entries."""
    cfg = config.load(None, ["run.rounds=30", "run.name=abc", "server.fraction=0.5",
                             "faults.0.device=2", "faults.0.round=3", "faults.0.kind=nan"])
    assert (cfg.run.rounds, cfg.run.name, cfg.server.fraction) == (30, "abc", 0.5)
    assert [(f.device, f.round, f.kind, f.attempts) for f in cfg.faults] == [(2, 3, "nan", 0)]


@pytest.mark.parametrize("override, words", [
    ("run.roundz=3", ["unknown key run.roundz", "rounds"]),
    ("runn.rounds=3", ["unknown config section [runn]"]),
    ("run.rounds=many", ["run.rounds", "'many'", "an integer"]),
    ("run.rounds=0", ["run.rounds = 0", "at least 1"]),
    ("data.partition=random", ["data.partition", "iid, dirichlet, shards"]),
    ("server.fraction=1.5", ["server.fraction = 1.5", "(0, 1]"]),
    ("devices.count=3", ["devices.names", "exactly devices.count (3) names"]),
    ("faults.0.kind=explode", ["faults.0.kind", "raise"]),
    ("rounds=3", ["section.key=value"]),
])
def test_bad_values_name_key_value_and_fix(override, words):
    """A bad key or value is a ConfigError naming the key, the value and the rule."""
    with pytest.raises(ConfigError) as info:
        config.load(None, [override])
    for word in words:
        assert word in str(info.value)


def test_bad_toml_and_missing_file(tmp_path):
    """A missing file and broken TOML each give a one-line error saying what to fix."""
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nrounds = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)


def test_world_size_mismatch_is_one_line_before_any_group(tmp_path):
    """A WORLD_SIZE that does not fit devices.count exits 2 with one line and the fix."""
    cfg = write_config(tmp_path / "c.toml", TINY)
    env = job_env({"WORLD_SIZE": "5", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": "1"})  # port 1: forming a group would fail loudly
    proc = subprocess.run([sys.executable, "-m", "fedrun", "--config", str(cfg)],
                          capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "WORLD_SIZE is 5" in lines[0] and "--nproc_per_node=3" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_nproc_prints_process_count(tmp_path):
    """`fedrun nproc` checks the config and prints devices + 1 for the launcher."""
    cfg = write_config(tmp_path / "c.toml", TINY)
    proc = subprocess.run([sys.executable, "-m", "fedrun", "nproc", "--config", str(cfg),
                           "devices.count=3", 'devices.names=["a","b","c"]'],
                          capture_output=True, text=True, env=job_env(), timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "4"


def test_resume_digest_ignores_rounds():
    """More rounds do not change the resume digest; a different model does."""
    base = config.digest(config.resume_values(config.load(None)))
    more = config.digest(config.resume_values(config.load(None, ["run.rounds=40"])))
    other = config.digest(config.resume_values(config.load(None, ["model.name=fedavg_cnn"])))
    assert base == more and base != other


def test_strategy_that_devices_cannot_satisfy_is_refused_by_the_preflight(tmp_path):
    """Krum with too few devices for 2f+3 is one error line before torchrun starts."""
    cfg = write_config(tmp_path / "c.toml", TINY)
    proc = subprocess.run([sys.executable, "-m", "fedrun", "nproc", "--config", str(cfg),
                           "server.strategy=krum", "server.byzantine=1"],
                          capture_output=True, text=True, env=job_env(), timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "server.strategy = 'krum'" in lines[0], proc.stderr
