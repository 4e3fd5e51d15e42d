"""Shared helpers: tiny configs and real torchrun runs with hard timeouts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_DATA = Path("/usr/share/datasets/fashion-mnist")

# A run small enough for 2 cores: 2 devices, a few hundred samples, one local epoch.
TINY = {
    "run": {"name": "tiny", "rounds": 2, "checkpoint_every": 1, "round_deadline_s": 60.0},
    "data": {"partition": "iid", "train_samples": 400, "test_samples": 200},
    "train": {"local_epochs": 1, "batch_size": 16, "cleanup_every": 10},
    "devices": {"count": 2, "names": ["Hospital", "Lab"]},
    "comm": {"timeout_s": 20.0, "heartbeat_s": 0.25},
}

needs_fashion_mnist = pytest.mark.skipif(
    not (DEBIAN_DATA / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (make data installs it)")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def write_config(path: Path, sections: dict, faults: list[dict] = ()) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    for fault in faults:
        lines.append("[[faults]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in fault.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def merged(base: dict, **changes: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in changes.items():
        out.setdefault(section, {}).update(values)
    return out


@dataclass
class Run:
    returncode: int
    output: str
    run_dir: Path
    checkpoint_dir: Path
    seconds: float

    @property
    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    def log(self, name: str = "server") -> str:
        path = self.run_dir / "logs" / f"{name}.log"
        return path.read_text() if path.exists() else ""


class Job:
    """A torchrun job in its own process group, so a timeout can end all of it."""

    def __init__(self, workdir: Path, config: Path, overrides=(), max_restarts: int = 0,
                 env: dict | None = None, fresh: bool = False, name: str = "tiny",
                 nproc: int | None = None):
        self.workdir, self.name = workdir, name
        # The launcher's preflight (`fedrun nproc`) unless a test needs to get past it.
        nproc = nproc or int(subprocess.run(
            [sys.executable, "-m", "fedrun", "nproc", "--config", str(config), *overrides],
            capture_output=True, text=True, cwd=workdir, env=job_env(env),
            timeout=120, check=True).stdout.strip())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
               f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
               "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
               "--monitor-interval=0.2", "-m", "fedrun", "--config", str(config),
               f"run.output_dir={workdir / 'runs'}",
               f"run.checkpoint_dir={workdir / 'checkpoints'}", *overrides]
        if fresh:
            cmd.append("--fresh")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=workdir, env=job_env(env),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)

    @property
    def run_dir(self) -> Path:
        return self.workdir / "runs" / self.name

    def wait(self, timeout: float) -> Run:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, _ = self.proc.communicate()
            pytest.fail(f"fedrun run exceeded its {timeout:.0f}s timeout:\n{out[-4000:]}")
        return Run(self.proc.returncode, out, self.run_dir,
                   self.workdir / "checkpoints" / self.name,
                   time.monotonic() - self.started)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def job_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({"FEDRUN_NO_DASHBOARD": "1", "OMP_NUM_THREADS": "1",
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(ROOT)})
    env.update(extra or {})
    return env


def run_fedrun(workdir: Path, config: Path, overrides=(), timeout: float = 180,
               **kwargs) -> Run:
    return Job(workdir, config, overrides, **kwargs).wait(timeout)


def wait_until(condition, timeout: float, what: str, interval: float = 0.1):
    """Poll `condition` until it returns something truthy; fail after `timeout`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def rank_pids(job: Job) -> dict[int, int]:
    """The job's fedrun processes by RANK, read from their environments."""
    import psutil

    out = {}
    for proc in psutil.Process(job.proc.pid).children(recursive=True):
        try:
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RANK" in env and "fedrun" in " ".join(proc.cmdline()):
            out[int(env["RANK"])] = proc.pid
    return out


@pytest.fixture
def tiny(tmp_path: Path):
    """Write a tiny config (with optional changes and faults) into tmp_path."""

    def make(faults: list[dict] = (), **changes) -> Path:
        return write_config(tmp_path / "tiny.toml", merged(TINY, **changes), faults)

    return make
