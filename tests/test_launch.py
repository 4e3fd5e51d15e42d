"""Launchers: process count, ports, backend, threads, the Slurm mapping, local.sh."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedrun import launch
from fedrun.config import ConfigError, load

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "launch" / "local.sh"


def tiny_config(tmp_path: Path, name: str, rounds: int = 2) -> Path:
    """A two-device run small enough for two of them side by side on two cores."""
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
[run]
name = "{name}"
rounds = {rounds}
checkpoint_every = 1
dashboard = false
output_dir = "{tmp_path / 'runs'}"
checkpoint_dir = "{tmp_path / 'checkpoints'}"

[data]
train_samples = 300
test_samples = 100

[model]
name = "cnn"

[train]
local_epochs = 1

[devices]
count = 2
names = ["Hospital", "Lab"]
""")
    return path


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A launcher in its own session, so that a timeout can end all of its ranks."""
    with log.open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                cwd=log.parent, env={**os.environ, **(env or {})},
                                start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """The exit code, or the whole process group killed and a failure after `timeout`."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        pytest.fail(f"{proc.args} still running after {timeout} s")


# --- process count and ports ---------------------------------------------------------

def test_nproc_is_one_server_plus_one_rank_per_device():
    """A config with three devices needs four processes."""
    cfg = load(None, ["devices.count=3", 'devices.names=["A", "B", "C"]'])
    assert launch.nproc(cfg) == 4


def test_free_port_can_be_bound_and_skips_a_port_in_use():
    """free_port returns a bindable port, and not one that another socket holds."""
    first = launch.free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", first))
        held.listen()
        second = launch.free_port()
        assert second != first
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", second))


def test_ranks_are_split_over_nodes_with_the_remainder_first():
    """Six ranks on two nodes are 3 + 3; five are 3 + 2; every rank is placed once."""
    assert [launch.procs_on_node(6, 2, r) for r in range(2)] == [3, 3]
    assert [launch.procs_on_node(5, 2, r) for r in range(2)] == [3, 2]
    assert sum(launch.procs_on_node(11, 4, r) for r in range(4)) == 11


def test_more_nodes_than_ranks_is_a_config_error():
    """Three ranks cannot fill four nodes; the message says how many nodes fit."""
    with pytest.raises(ConfigError, match="at most 3 nodes"):
        launch.procs_on_node(3, 4, 0)


# --- backend -------------------------------------------------------------------------

@pytest.mark.parametrize("gpus, backend", [(0, "gloo"), (2, "gloo"), (3, "nccl"),
                                           (8, "nccl")])
def test_auto_backend_uses_nccl_only_with_a_gpu_per_rank(gpus, backend):
    """auto picks NCCL when every one of 3 local ranks can have its own GPU, else Gloo."""
    chosen, reason = launch.choose_backend("auto", 3, gpus)
    assert chosen == backend
    assert reason.startswith("auto:")
    if gpus:
        assert f"{gpus} visible GPU(s) for 3 local rank(s)" in reason
    else:
        assert "no visible GPU" in reason


def test_forced_gloo_stays_gloo_on_a_gpu_node():
    """comm.backend = gloo is honoured even with a GPU for every rank."""
    assert launch.choose_backend("gloo", 2, 4)[0] == "gloo"


def test_forced_nccl_with_enough_gpus_is_nccl():
    """comm.backend = nccl with one GPU per rank is used as asked."""
    assert launch.choose_backend("nccl", 4, 4)[0] == "nccl"


@pytest.mark.parametrize("gpus", [0, 2])
def test_forced_nccl_with_too_few_gpus_is_one_clear_error(gpus):
    """Too few GPUs for nccl is a one-line ConfigError naming the key, counts and fix."""
    with pytest.raises(ConfigError) as err:
        launch.choose_backend("nccl", 3, gpus)
    message = str(err.value)
    assert "\n" not in message
    assert 'comm.backend = "nccl"' in message
    assert f"{gpus} visible GPU(s) for 3 local rank(s)" in message
    assert "comm.backend=gloo" in message


def test_unknown_backend_is_rejected():
    """A backend name outside auto, gloo, nccl is a ConfigError listing the choices."""
    with pytest.raises(ConfigError, match="auto, gloo, nccl"):
        launch.choose_backend("mpi", 2, 0)


# --- threads -------------------------------------------------------------------------

def test_threads_share_the_cores_when_the_user_sets_none():
    """Without OMP_NUM_THREADS, 8 cores over 3 ranks give 2 threads each."""
    threads, reason = launch.threads_per_rank({}, 8, 3)
    assert threads == 2
    assert "8 core(s) / 3 local rank(s)" in reason


def test_threads_are_at_least_one():
    """More ranks than cores still gives each rank one thread."""
    assert launch.threads_per_rank({}, 2, 6)[0] == 1


def test_users_omp_num_threads_wins():
    """A user's OMP_NUM_THREADS is used as it is, and the reason says so."""
    threads, reason = launch.threads_per_rank({"OMP_NUM_THREADS": "5"}, 8, 3)
    assert (threads, reason) == (5, "OMP_NUM_THREADS=5 from the environment")


def test_torchruns_default_is_not_taken_for_the_users_choice():
    """Under the launchers, torchrun's OMP_NUM_THREADS=1 does not hide an unset value."""
    env = {"OMP_NUM_THREADS": "1", launch.USER_THREADS_VAR: ""}
    assert launch.threads_per_rank(env, 8, 2)[0] == 4
    env = {"OMP_NUM_THREADS": "1", launch.USER_THREADS_VAR: "3"}
    assert launch.threads_per_rank(env, 8, 2) == (3, "OMP_NUM_THREADS=3 set by the user")


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_bad_omp_num_threads_is_a_config_error(value):
    """OMP_NUM_THREADS that is not a positive integer is rejected with the value."""
    with pytest.raises(ConfigError, match=repr(value)):
        launch.threads_per_rank({"OMP_NUM_THREADS": value}, 4, 2)


# --- Slurm ---------------------------------------------------------------------------

# Port 30211 = SLURM_PORT_BASE 29500 + job id 4711 % SLURM_PORT_SPAN 2000.
SLURM_ENV = {
    "SLURM_JOB_ID": "4711",
    "SLURM_NNODES": "4",
    "SLURM_NODEID": "2",
    "SLURM_JOB_NODELIST": "gpu[07-09,12]",
    "SLURM_RESTART_COUNT": "1",
}


def test_slurm_env_maps_to_torchrun_layout():
    """Job id, node count, node id and first host become torchrun's rendezvous."""
    layout = launch.slurm_layout(SLURM_ENV)
    assert layout == {
        "nnodes": 4,
        "node_rank": 2,
        "rdzv_id": "fedrun-4711",
        "rdzv_endpoint": "gpu07:30211",
        "restart_count": 1,
        "job_id": 4711,
    }


def test_slurm_rendezvous_is_the_same_on_every_node_and_after_a_requeue():
    """Every node of a job, and the job requeued, meet at one endpoint and id."""
    layouts = [launch.slurm_layout({**SLURM_ENV, "SLURM_NODEID": str(n),
                                    "SLURM_RESTART_COUNT": str(n % 2)})
               for n in range(4)]
    assert len({(lay["rdzv_endpoint"], lay["rdzv_id"]) for lay in layouts}) == 1
    assert [lay["node_rank"] for lay in layouts] == [0, 1, 2, 3]


def test_slurm_host_and_port_can_be_overridden():
    """FEDRUN_RDZV_HOST (from scontrol) and FEDRUN_RDZV_PORT replace derived values."""
    env = {**SLURM_ENV, "FEDRUN_RDZV_HOST": "10.0.0.5", "FEDRUN_RDZV_PORT": "31000"}
    assert launch.slurm_layout(env)["rdzv_endpoint"] == "10.0.0.5:31000"


def test_slurm_defaults_for_a_one_node_job():
    """A job without SLURM_NNODES, SLURM_NODEID or a restart count is node 0 of 1."""
    layout = launch.slurm_layout({"SLURM_JOB_ID": "12", "SLURM_JOB_NODELIST": "vm"})
    assert (layout["nnodes"], layout["node_rank"], layout["restart_count"]) == (1, 0, 0)


def test_outside_slurm_is_a_config_error():
    """Without SLURM_JOB_ID the message says to run inside a Slurm job."""
    with pytest.raises(ConfigError, match="inside a Slurm job"):
        launch.slurm_layout({})


def test_node_id_outside_the_job_is_a_config_error():
    """SLURM_NODEID 4 of a 4-node job is rejected with both values."""
    with pytest.raises(ConfigError, match="SLURM_NODEID = 4"):
        launch.slurm_layout({**SLURM_ENV, "SLURM_NODEID": "4"})


@pytest.mark.parametrize("nodelist, host", [
    ("vm", "vm"),
    ("node[01-04]", "node01"),
    ("gpu[3,5-7]", "gpu3"),
    ("a1,b[2-3]", "a1"),
    ("rack[2-3]-n[10-12],x", "rack2-n10"),
])
def test_first_host_of_a_slurm_hostlist(nodelist, host):
    """The first host of a hostlist keeps its zero padding and ignores later ranges."""
    assert launch.first_host(nodelist) == host


def test_torchrun_args_for_one_node():
    """The layout and share of ranks become torchrun's options, c10d rendezvous."""
    args = launch.torchrun_args(launch.slurm_layout(SLURM_ENV), 3, 2)
    assert args == ["--nnodes=4", "--nproc-per-node=3", "--node-rank=2",
                    "--rdzv-backend=c10d",
                    "--rdzv-endpoint=gpu07:30211",
                    "--rdzv-id=fedrun-4711", "--max-restarts=2"]


def test_slurm_entry_point_reports_a_bad_environment():
    """`python -m fedrun.launch slurm` outside Slurm exits 2 with one clear line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run([sys.executable, "-m", "fedrun.launch", "slurm"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "SLURM_JOB_ID is not set" in done.stderr


# --- launch/local.sh (needs the fedrun core) -----------------------------------------

def read_summary(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / "runs" / name / "summary.json").read_text())


def test_two_local_runs_at_once_both_complete(tmp_path):
    """Two launch/local.sh runs side by side each get their own rendezvous and finish."""
    procs = {}
    for name in ("left", "right"):
        config = tiny_config(tmp_path, name)
        procs[name] = start([str(LOCAL_SH), str(config)], tmp_path / f"{name}.log",
                            {"MAX_RESTARTS": "0"})
    codes = {name: finish(proc, timeout=240) for name, proc in procs.items()}

    for name, code in codes.items():
        log = (tmp_path / f"{name}.log").read_text()
        assert code == 0, f"{name} exited {code}:\n{log[-3000:]}"
        summary = read_summary(tmp_path, name)
        assert summary["rounds_completed"] == 2
        assert [r["round"] for r in summary["rounds"]] == [1, 2]


def test_forced_nccl_without_gpus_fails_before_the_group_forms(tmp_path):
    """local.sh with comm.backend=nccl on a machine without GPUs stops with the fix."""
    if subprocess.run([sys.executable, "-c", "import torch, sys; "
                       "sys.exit(torch.cuda.device_count() >= 2)"],
                      timeout=120).returncode:
        pytest.skip("this machine has 2 GPUs or more; the check needs fewer than 2")
    config = tiny_config(tmp_path, "nccl")
    # One device: two ranks are enough to need two GPUs, and start fastest.
    proc = start([str(LOCAL_SH), str(config), "comm.backend=nccl", "devices.count=1",
                  'devices.names=["Hospital"]'],
                 tmp_path / "nccl.log", {"MAX_RESTARTS": "0"})
    code = finish(proc, timeout=120)

    log = (tmp_path / "nccl.log").read_text()
    assert code != 0
    assert ('comm.backend = "nccl" needs one GPU per local rank, but this node has 0 '
            "visible GPU(s) for 2 local rank(s)") in log
    assert not (tmp_path / "runs" / "nccl" / "summary.json").exists()


def test_sigterm_to_every_process_at_once_still_stops_the_server_cleanly(tmp_path):
    """SIGTERM to the agent and all ranks at once, as Slurm sends it, stops cleanly."""
    import psutil

    config = tiny_config(tmp_path, "term", rounds=40)
    proc = start([str(LOCAL_SH), str(config)], tmp_path / "term.log",
                 {"MAX_RESTARTS": "0"})
    checkpoint = tmp_path / "checkpoints" / "term" / "round-0001.pt"
    deadline = time.monotonic() + 180
    while not checkpoint.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            finish(proc, timeout=1)
            log = (tmp_path / "term.log").read_text()
            pytest.fail(f"no checkpoint of round 1:\n{log[-3000:]}")
        time.sleep(0.2)

    # Slurm (scancel, scontrol requeue, a time limit) signals every process of the step;
    # torchrun then passes its own SIGTERM on, so each rank gets two.
    agent = psutil.Process(proc.pid)
    for process in [agent, *agent.children(recursive=True)]:
        process.send_signal(signal.SIGTERM)
    finish(proc, timeout=90)

    log = (tmp_path / "term.log").read_text()
    assert "stopped by SIGTERM" in log, log[-3000:]
    summary = read_summary(tmp_path, "term")
    assert 1 <= summary["rounds_completed"] < 40
