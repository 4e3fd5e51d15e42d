"""Entry point: `python -m fedrun --config X.toml [section.key=value ...] [--fresh]`.

Parse and check the config, form the groups, run this rank's role, always tear down.
Also `python -m fedrun watch RUN_DIR [--once]` (the dashboard from another terminal) and
`python -m fedrun nproc --config X.toml` (checks the config and prints the process count
a launcher must start).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from pathlib import Path

from .config import ConfigError, check_world_size, load

log = logging.getLogger("fedrun")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedrun", description="Federated training on torch.distributed: rank 0 is "
        "the server, ranks 1..N are devices. Run under torchrun with N+1 processes.",
        epilog="other commands: `fedrun watch RUN_DIR [--once]` follows a run's dashboard; "
        "`fedrun nproc --config X` checks a config and prints its process count")
    parser.add_argument("--config", help="a TOML config, e.g. configs/default.toml")
    parser.add_argument("--fresh", action="store_true",
                        help="start over instead of resuming this run's checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override single config values, e.g. run.rounds=30")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["watch"]:
        return _watch(argv[1:])
    nproc_only = argv[:1] == ["nproc"]
    args = _parser().parse_args(argv[1:] if nproc_only else argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg = load(args.config, args.overrides)
        if nproc_only:
            _preflight(cfg, args.fresh)
            print(cfg.world_size)
            return 0
        check_world_size(cfg, int(os.environ.get("WORLD_SIZE", 1)))
        return _run(cfg, rank, args.fresh)
    except ConfigError as exc:
        # Every rank sees the same bad input; one line from rank 0 is enough.
        if rank == 0:
            print(f"fedrun: error: {exc}", file=sys.stderr)
        return 2


def _watch(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedrun watch",
                                     description="Follow a run's dashboard from its status file.")
    parser.add_argument("run_dir", help="the run's folder, e.g. runs/default")
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    args = parser.parse_args(argv)
    from .monitor.dashboard import watch

    return watch(Path(args.run_dir), once=args.once, interval=args.interval)


def _preflight(cfg, fresh: bool) -> None:
    """The checks a launcher runs once before torchrun, so that a bad config or a
    checkpoint that cannot be resumed is one error, not one per restart attempt."""
    import torch

    from .data import load_dataset
    from .launch import choose_backend

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.world_size))
    choose_backend(cfg.comm.backend, local, gpus)
    _check_strategy(cfg)
    load_dataset(cfg.data, cfg.run.seed)
    if cfg.run.resume and not fresh:
        # The server reports an unreadable checkpoint itself; here only a refusal counts.
        logging.getLogger("fedrun").setLevel(logging.ERROR)
        _check_resumable(cfg)


def _check_strategy(cfg) -> None:
    """A strategy the devices can never satisfy (Krum needs 2f+3) is refused at start."""
    from .strategies import build_strategy

    build_strategy(cfg.server).check(cfg.devices.count)


def _check_resumable(cfg) -> None:
    from . import checkpoint

    found = checkpoint.load_latest(cfg.checkpoint_path())
    if found is not None:
        checkpoint.check_compatible(cfg, found[1], found[0])


def _run(cfg, rank: int, fresh: bool) -> int:
    import torch

    from . import comm as comm_mod
    from .data import load_dataset
    from .logs import setup_logging
    from .models import build_model

    backend, why = _runtime(cfg)
    # --fresh and run.resume=false mean "start over" for the first attempt only: a
    # torchrun restart after a crash must resume, not throw the run away.
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    fresh = (fresh or not cfg.run.resume) and attempt == 0

    data = load_dataset(cfg.data, cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model.name, data.in_channels, data.train_x.shape[-1])
    roles: dict = {}
    setup_logging(cfg, rank, roles)
    log.info("backend %s (%s); %s; attempt %d", backend, why[0], why[1], attempt)
    if rank == 0:
        _check_strategy(cfg)  # before the group forms: a refusal is one clean error
        if not fresh:
            _check_resumable(cfg)

    comm = comm_mod.init(backend, cfg.comm.timeout_s)
    try:
        if rank == 0:
            from .server import Server

            roles["server"] = Server(cfg, comm, model, data, fresh=fresh)
            _freeze_heap()
            return roles["server"].run()
        roles["device"] = _device(cfg, comm, model, data, rank)
        del data
        _freeze_heap()
        roles["device"].run()
        return 0
    finally:
        comm_mod.shutdown()


def _runtime(cfg) -> tuple[str, tuple[str, str]]:
    """Backend, CUDA settings and threads, all before CUDA or any group starts."""
    import torch

    from .launch import available_cpus, choose_backend, threads_per_rank

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend, why = choose_backend(cfg.comm.backend, local_world, gpus)
    if backend == "nccl":
        # Both must be set before CUDA starts; a user's own value wins.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
        torch.backends.cudnn.benchmark = True
    threads, threads_why = threads_per_rank(os.environ, available_cpus(), local_world)
    torch.set_num_threads(threads)
    return backend, (why, f"{threads} thread(s) per rank ({threads_why})")


def _device(cfg, comm, model, data, rank: int):
    """This rank's device, holding the shards of the clients dealt to it."""
    import torch

    from .data import describe, partition
    from .device import Device, client_ranks

    owner = client_ranks(cfg)
    shards = partition(data.train_y.numpy(), len(owner), cfg.data, cfg.run.seed)
    clients = {}
    for client in (c for c, r in owner.items() if r == rank):
        shard = torch.from_numpy(shards[client])
        who = cfg.device_label(rank) + (f" client {client}" if cfg.data.clients else "")
        log.info("%s: shard of %s; on %s", who, describe(
            shards[client], data.train_y.numpy(), data.num_classes), comm.device)
        clients[client] = (data.normalise(data.train_x[shard]), data.train_y[shard])
    return Device(cfg, comm, model, clients)


def _freeze_heap() -> None:
    """Later full collections (the periodic cleanup) skip everything alive now, so a
    gc.collect() costs microseconds instead of a scan of every object torch created."""
    # The first optimizer imports torch._dynamo (~135k objects); imported after the
    # freeze, every periodic gc.collect() would scan them: 25 ms, 4x a batch-8 step.
    import torch._dynamo  # noqa: F401

    gc.collect()
    gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
