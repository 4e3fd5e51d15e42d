"""The bench's processes: fedrun jobs under torchrun, watched from outside, and helpers.

A fedrun job runs exactly as a user starts it (`launch/local.sh`), so what the bench
times is what a user gets. The bench never instruments the core: round and phase times
come from the job's own `summary.json`, and memory, CPU time and thread counts of every
rank from psutil, sampled from this process while the job runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "launch" / "local.sh"
DEFAULT_CONFIG = REPO / "configs" / "default.toml"
SAMPLE_S = 0.2


class BenchError(RuntimeError):
    """A bench job that failed or ran past its time limit; the message names its log."""


@dataclass
class RankUsage:
    """What psutil saw of one rank: the peak resident set, CPU seconds, most threads,
    and (wall clock, CPU seconds) at every sample, to tell CPU spent within a window."""

    peak_rss_mib: float = 0.0
    cpu_s: float = 0.0
    threads: int = 0
    cpu_series: list[tuple[float, float]] = field(default_factory=list, repr=False)

    def cpu_between(self, start: float, end: float) -> float:
        """CPU seconds between two wall-clock times, from the nearest samples around."""
        before = [c for t, c in self.cpu_series if t <= start]
        after = [c for t, c in self.cpu_series if t >= end]
        low = before[-1] if before else 0.0
        high = after[0] if after else self.cpu_s
        return max(0.0, high - low)


@dataclass
class Job:
    name: str
    wall_s: float
    log: Path
    summary: dict = field(default_factory=dict)
    ranks: dict[int, RankUsage] = field(default_factory=dict)


class RankWatch(threading.Thread):
    """Samples every rank below a launcher's process until told to stop.

    Ranks are told apart by the RANK variable torchrun gives them. The kernel's own
    high-water mark (VmHWM) is read where Linux has it, so a peak between two samples
    is not missed.
    """

    def __init__(self, root_pid: int):
        super().__init__(name="bench-rank-watch", daemon=True)
        self.root_pid = root_pid
        self.halt = threading.Event()
        self.usage: dict[int, RankUsage] = {}
        self._rank_of: dict[int, int | None] = {}

    def run(self) -> None:
        while not self.halt.wait(SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        try:
            procs = psutil.Process(self.root_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for proc in procs:
            rank = self._rank(proc)
            if rank is None:
                continue
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    cpu = proc.cpu_times()
                    threads = proc.num_threads()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            seen = self.usage.setdefault(rank, RankUsage())
            peak = max(rss, high_water(proc.pid))
            seen.peak_rss_mib = max(seen.peak_rss_mib, peak / 2**20)
            seen.cpu_s = max(seen.cpu_s, cpu.user + cpu.system)
            seen.threads = max(seen.threads, threads)
            seen.cpu_series.append((time.time(), seen.cpu_s))

    def _rank(self, proc: psutil.Process) -> int | None:
        # Not known yet is asked again next time: a child caught between fork and exec
        # still has the launcher's environment, without RANK.
        if self._rank_of.get(proc.pid) is None:
            try:
                value = proc.environ().get("RANK")
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                return None
            self._rank_of[proc.pid] = int(value) if value is not None else None
        return self._rank_of[proc.pid]


def high_water(pid: int) -> int:
    """The peak resident set in bytes from /proc/PID/status; 0 where there is none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def job_env(one_thread: bool) -> dict[str, str]:
    """The environment of every bench process: no dashboard, no restarts to hide a
    failure, and (for --tiny) one intra-op thread per process."""
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, FEDRUN_NO_DASHBOARD="1", MAX_RESTARTS="0",
               PYTHON=sys.executable,
               PYTHONPATH=str(REPO) + (os.pathsep + path if path else ""))
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    return env


def run_logged(cmd: list[str], log: Path, env: dict[str, str], timeout_s: float,
               watch: bool = False) -> tuple[float, dict[int, RankUsage]]:
    """Run `cmd` in its own session with output to `log`; (wall seconds, rank usage).

    Its own session lets a time-out end the launcher and every rank below it at once.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO, start_new_session=True)
        watcher = RankWatch(proc.pid) if watch else None
        if watcher is not None:
            watcher.start()
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            raise BenchError(f"{log.stem} still running after {timeout_s:.0f}s; killed "
                             f"it; see {log}") from None
        finally:
            if watcher is not None:
                watcher.halt.set()
                watcher.join()
    wall = time.monotonic() - started
    if code != 0:
        raise BenchError(f"{log.stem} exited with {code}; last lines of {log}:\n"
                         + tail(log))
    return wall, (watcher.usage if watcher is not None else {})


def run_side_by_side(cmds: list[list[str]], logs: list[Path], env: dict[str, str],
                     timeout_s: float) -> float:
    """Start every command at once, each in its own session; wall seconds of all.

    Only the bare-loop parts run side by side: they stand for ranks sharing the cores.
    """
    started = time.monotonic()
    procs = []
    for cmd, log in zip(cmds, logs):
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                          env=env, cwd=REPO, start_new_session=True))
    failed = []
    for proc, log in zip(procs, logs):
        left = max(1.0, timeout_s - (time.monotonic() - started))
        try:
            if proc.wait(timeout=left) != 0:
                failed.append(f"{log.stem} exited with {proc.returncode}:\n{tail(log)}")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            failed.append(f"{log.stem} still running after {timeout_s:.0f}s; killed it")
    if failed:
        raise BenchError("; ".join(failed))
    return time.monotonic() - started


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_fedrun(name: str, overrides: list[str], out: Path, env: dict[str, str],
               timeout_s: float) -> Job:
    """One fedrun job under torchrun, from a clean run folder; its summary and usage."""
    runs, checkpoints = out / "fedrun", out / "checkpoints"
    for folder in (runs / name, checkpoints / name):
        shutil.rmtree(folder, ignore_errors=True)
    cmd = [str(LOCAL_SH), str(DEFAULT_CONFIG), *overrides, f"run.name={name}",
           f"run.output_dir={runs}", f"run.checkpoint_dir={checkpoints}",
           "run.dashboard=false"]
    log = out / "logs" / f"{name}.log"
    wall, usage = run_logged(cmd, log, env, timeout_s, watch=True)
    summary = json.loads((runs / name / "summary.json").read_text())
    if not summary.get("finished"):
        raise BenchError(f"{name} did not finish its rounds; see {log}")
    return Job(name, wall, log, summary, usage)


def run_module(module: str, args: list[str], log: Path, env: dict[str, str],
               timeout_s: float) -> float:
    """`python -m module args` in one process; its wall seconds."""
    wall, _ = run_logged([sys.executable, "-m", module, *args], log, env, timeout_s)
    return wall


def run_torchrun(module: str, args: list[str], nproc: int, log: Path,
                 env: dict[str, str], timeout_s: float) -> float:
    """`module` on `nproc` ranks under torchrun with a free port; its wall seconds."""
    env = dict(env, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
           f"--nproc-per-node={nproc}", "--max-restarts=0", "--rdzv-backend=c10d",
           "--rdzv-endpoint=127.0.0.1:0", f"--rdzv-id=bench-{os.getpid()}",
           "-m", module, *args]
    wall, _ = run_logged(cmd, log, env, timeout_s)
    return wall
