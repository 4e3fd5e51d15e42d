"""Launch layout: process count, backend, threads per rank, and where the nodes meet.

Pure functions of a config, an environment and device counts, so that every choice a
launcher makes can be tested without GPUs or Slurm. `launch/local.sh` and the core call
them; `launch/slurm.sbatch` runs `python -m fedrun.launch slurm CONFIG [overrides]` once
per node, which turns the SLURM_* variables into one torchrun command and execs it.
Nothing here forms a process group.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Mapping

from fedrun.config import Config, ConfigError, load

# torchrun sets OMP_NUM_THREADS=1 for its ranks whenever it is unset, so a rank cannot
# tell the user's value from torchrun's. The launchers copy the user's value (or "")
# here before torchrun starts; see threads_per_rank.
USER_THREADS_VAR = "FEDRUN_USER_OMP_NUM_THREADS"

# Rendezvous ports for Slurm jobs: every node must compute the same port without talking
# to the others, so it comes from the job id. The range stays below Linux's ephemeral
# ports (32768 and up), where bind(0) picks from.
# TODO(slurm-port): two jobs whose ids agree mod 2000 and share a first node collide;
# set FEDRUN_RDZV_PORT for such jobs, as nothing here can see the other job.
SLURM_PORT_BASE = 29500
SLURM_PORT_SPAN = 2000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on now; another process may take it before use."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def nproc(cfg: Config) -> int:
    """Processes a run needs: one server plus one per device."""
    return cfg.world_size


def procs_on_node(total: int, nnodes: int, node_rank: int) -> int:
    """This node's share of `total` ranks; the first `total % nnodes` take one more."""
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ConfigError(f"node rank {node_rank} is outside 0..{nnodes - 1}; check "
                          "SLURM_NODEID and SLURM_NNODES")
    if total < nnodes:
        raise ConfigError(f"{nnodes} nodes for {total} processes would leave a node "
                          f"without a rank; ask for at most {total} nodes "
                          f"(sbatch --nodes={total}) or raise devices.count")
    return total // nnodes + (1 if node_rank < total % nnodes else 0)


def choose_backend(requested: str, local_world_size: int,
                   gpu_count: int) -> tuple[str, str]:
    """The process-group backend for `comm.backend`, and why, for the start-up log.

    NCCL needs a GPU of its own for every rank of the node (the server included):
    two ranks on one GPU fail inside NCCL with an error that does not say so.
    """
    enough = gpu_count > 0 and gpu_count >= local_world_size
    have = f"{gpu_count} visible GPU(s) for {local_world_size} local rank(s)"
    if requested == "gloo":
        return "gloo", f"comm.backend = gloo requested ({have})"
    if requested == "nccl":
        if not enough:
            raise ConfigError(
                f'comm.backend = "nccl" needs one GPU per local rank, but this node has '
                f"{have}; set comm.backend=auto or comm.backend=gloo, or run fewer ranks "
                "per node (more nodes, or a smaller devices.count)")
        return "nccl", f"comm.backend = nccl requested ({have})"
    if requested != "auto":
        raise ConfigError(f"comm.backend = {requested!r} is invalid: choose one of auto, "
                          "gloo, nccl")
    if enough:
        return "nccl", f"auto: {have}, one GPU per rank"
    if gpu_count == 0:
        return "gloo", "auto: no visible GPU"
    return "gloo", f"auto: only {have}; NCCL needs one GPU per rank"


def available_cpus() -> int:
    """Cores this process may run on (a Slurm or taskset mask counts, not the machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(env: Mapping[str, str], cpu_count: int,
                     local_world_size: int) -> tuple[int, str]:
    """Intra-op threads per rank, and why: the user's OMP_NUM_THREADS or a core share."""
    if USER_THREADS_VAR in env:
        user, source = env[USER_THREADS_VAR], "set by the user"
    else:
        # Started by plain torchrun: its own default of 1 looks like the user's.
        user, source = env.get("OMP_NUM_THREADS", ""), "from the environment"
    if user.strip():
        try:
            threads = int(user)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ConfigError(f"OMP_NUM_THREADS = {user!r} is invalid: a positive "
                              "integer, or unset to share the cores among the ranks")
        return threads, f"OMP_NUM_THREADS={threads} {source}"
    threads = max(1, cpu_count // max(1, local_world_size))
    return threads, (f"{cpu_count} core(s) / {local_world_size} local rank(s) "
                     "(OMP_NUM_THREADS unset)")


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist such as "gpu[07-09,12],cpu3" (here "gpu07")."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    head = nodelist[:end].strip()

    def first_of(match: re.Match) -> str:
        return re.split(r"[,-]", match.group(1))[0]

    host = re.sub(r"\[([^\]]*)\]", first_of, head)
    if not host or "[" in host or "]" in host:
        raise ConfigError(f"cannot read a host from SLURM_JOB_NODELIST={nodelist!r}; "
                          "set FEDRUN_RDZV_HOST to the first host of the allocation")
    return host


def _int_var(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    text = env.get(name)
    if text is None or not text.strip():
        if default is None:
            raise ConfigError(f"{name} is not set: run this inside a Slurm job "
                              "(sbatch launch/slurm.sbatch ...)")
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name} = {text!r} is not an integer") from None


def slurm_layout(env: Mapping[str, str]) -> dict:
    """torchrun's view of a Slurm job, from the SLURM_* variables of one node's task.

    FEDRUN_RDZV_HOST (the sbatch script sets it from `scontrol show hostnames`) and
    FEDRUN_RDZV_PORT override the rendezvous host and port.
    """
    job_id = _int_var(env, "SLURM_JOB_ID")
    nnodes = _int_var(env, "SLURM_NNODES", _int_var(env, "SLURM_JOB_NUM_NODES", 1))
    node_rank = _int_var(env, "SLURM_NODEID", 0)
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"SLURM_NODEID = {node_rank} is outside 0..{nnodes - 1} "
                          f"(SLURM_NNODES = {nnodes})")
    host = env.get("FEDRUN_RDZV_HOST", "").strip()
    if not host:
        host = first_host(env.get("SLURM_JOB_NODELIST", ""))
    port = _int_var(env, "FEDRUN_RDZV_PORT",
                    SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN)
    return {
        "nnodes": nnodes,
        "node_rank": node_rank,
        # The job id survives a requeue; c10d assigns agent ranks itself, so node_rank
        # only decides this node's share of the ranks.
        "rdzv_id": f"fedrun-{job_id}",
        "rdzv_endpoint": f"{host}:{port}",
        "restart_count": _int_var(env, "SLURM_RESTART_COUNT", 0),
        "job_id": job_id,
    }


def torchrun_args(layout: Mapping, nproc_per_node: int, max_restarts: int) -> list[str]:
    """torchrun's options for one node of `layout`, before the `-m fedrun ...` part."""
    return [
        f"--nnodes={layout['nnodes']}",
        f"--nproc-per-node={nproc_per_node}",
        f"--node-rank={layout['node_rank']}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={layout['rdzv_endpoint']}",
        f"--rdzv-id={layout['rdzv_id']}",
        f"--max-restarts={max_restarts}",
    ]


def _split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """`--config FILE` (or `--config=FILE`) and the rest, as `python -m fedrun` takes."""
    config, rest, i = None, [], 0
    while i < len(args):
        if args[i] == "--config" and i + 1 < len(args):
            config, i = args[i + 1], i + 2
            continue
        if args[i].startswith("--config="):
            config = args[i].partition("=")[2]
        else:
            rest.append(args[i])
        i += 1
    return config, rest


def slurm_main(args: list[str]) -> None:
    """Exec torchrun for this node of a Slurm job; never returns."""
    config, rest = _split_config_args(args)
    cfg = load(config, [a for a in rest if not a.startswith("--")])
    layout = slurm_layout(os.environ)
    local = procs_on_node(nproc(cfg), layout["nnodes"], layout["node_rank"])
    max_restarts = _int_var(os.environ, "MAX_RESTARTS", 3)
    # A restarted Gloo group must not find the last attempt's addresses in torchrun's
    # shared store (pytorch#135712): each attempt gets a fresh one.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    os.environ.setdefault(USER_THREADS_VAR, os.environ.get("OMP_NUM_THREADS", ""))

    argv = [sys.executable, "-m", "torch.distributed.run",
            *torchrun_args(layout, local, max_restarts), "-m", "fedrun"]
    if config is not None:
        argv += ["--config", config]
    argv += rest
    print(f"[launch node {layout['node_rank']}/{layout['nnodes']} job {layout['job_id']} "
          f"restart {layout['restart_count']}] {local} of {nproc(cfg)} ranks, rendezvous "
          f"{layout['rdzv_endpoint']}: {' '.join(argv[1:])}", flush=True)
    # exec, not a child: srun's signals (SIGTERM on preemption) reach torchrun directly.
    os.execv(sys.executable, argv)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("slurm", "port"):
        print("usage: python -m fedrun.launch slurm --config FILE [section.key=value]\n"
              "       python -m fedrun.launch port", file=sys.stderr)
        return 2
    if argv[0] == "port":
        print(free_port())
        return 0
    try:
        slurm_main(argv[1:])
    except ConfigError as exc:
        print(f"fedrun.launch: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
