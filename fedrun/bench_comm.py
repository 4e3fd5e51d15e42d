"""The bench's communication job: fedrun's data plane against raw Gloo, on one group.

Run under torchrun with devices + 1 ranks: `python -m fedrun.bench_comm OUT.json
MODEL[,MODEL...] SECONDS`. For each model, every rank packs the model's weights into one
flat tensor, then three ways of moving it take turns on the same process group:

- fedrun: `Comm.broadcast` then `Comm.gather`, as a round of the server and devices;
- fedrun+pack: the same with the devices' `FlatWeights.unpack` after the broadcast and
  `pack` before the gather, the copies a real round adds on each device;
- raw: `dist.broadcast` and `dist.gather` of the same tensor into buffers made once.

Rank 0 times each from a barrier to the end of its gather: the round trip. Bytes sent
are counted by the kernel (`wchar` in /proc/self/io: Gloo writes its sockets with
write/writev) over one round of the data plane, the monitored barrier included.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import comm as comm_mod
from .comm import FlatWeights
from .models import build_model


# TODO(bench-store-bytes): the control plane's store traffic (plans, headers,
# heartbeats) is not counted: TCPStore uses send(), which /proc/self/io leaves out.
def written_bytes() -> int:
    """Bytes this process passed to write-like system calls so far; 0 off Linux."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    in_channels, size = (3, 32) if name == "resnet18" else (1, 28)
    return build_model(name, in_channels, size)


def measure(comm: comm_mod.Comm, name: str, budget_s: float) -> dict | None:
    """Time the three ways for one model for about `budget_s` seconds on rank 0."""
    model = _model(name)
    flat = FlatWeights(model)
    weights = flat.pack(model)
    rank, world = comm.rank, comm.world_size
    raw_out = [torch.empty_like(weights) for _ in range(world)] if rank == 0 else None

    def fedrun() -> None:
        comm.broadcast(weights)
        comm.gather(weights)

    def fedrun_pack() -> None:
        comm.broadcast(weights)
        if rank == 0:
            comm.gather(weights)
            return
        flat.unpack(weights, model)
        comm.gather(flat.pack(model))

    def raw() -> None:
        dist.broadcast(weights, src=0)
        dist.gather(weights, raw_out, dst=0)

    ways = {"fedrun": fedrun, "fedrun+pack": fedrun_pack, "raw": raw}
    times: dict[str, list[float]] = {k: [] for k in ways}
    # One untimed turn each first: the first collective of a size sets up buffers.
    for way in ways.values():
        way()
    started, rounds = time.perf_counter(), 0
    while _go_on(rounds, time.perf_counter() - started, budget_s):
        order = list(ways)[rounds % 3:] + list(ways)[:rounds % 3]
        for key in order:
            dist.barrier()
            t = time.perf_counter()
            ways[key]()
            times[key].append(time.perf_counter() - t)
        rounds += 1

    dist.barrier()
    before = written_bytes()
    comm.broadcast(weights)
    comm.gather(weights)
    comm.barrier("the byte count")
    sent = written_bytes() - before
    counts = [None] * world if rank == 0 else None
    dist.gather_object(sent, counts, dst=0)
    if rank != 0:
        return None
    payload = weights.numel() * weights.element_size()
    model_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    return {"model": name, "devices": world - 1, "flat_bytes": payload,
            "model_bytes": model_bytes, "rounds": rounds,
            "sent_bytes_per_rank": counts, "sent_bytes": sum(counts),
            "seconds": {k: statistics.median(v) for k, v in times.items()},
            "samples": times}


def _go_on(rounds: int, elapsed: float, budget_s: float) -> bool:
    """Another turn of every way? At least 3, at most 300, else until the budget is
    spent; rank 0 decides for all, since every rank must join each collective."""
    more = rounds < 3 or (rounds < 300 and elapsed < budget_s)
    flag = torch.tensor([int(more)])
    dist.broadcast(flag, src=0)
    return bool(flag)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m fedrun.bench_comm OUT.json MODEL[,MODEL...] SECONDS",
              file=sys.stderr)
        return 2
    out, models, budget_s = Path(argv[0]), argv[1].split(","), float(argv[2])
    # One thread per rank: moving bytes is not compute, and six ranks share two cores.
    torch.set_num_threads(1)
    comm = comm_mod.init("gloo", 120.0)
    try:
        results = [measure(comm, name, budget_s) for name in models]
        if comm.rank == 0:
            out.write_text(json.dumps({"models": results}, indent=1))
    finally:
        comm_mod.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
