"""The data plane: flat weights and real Gloo collectives between processes."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
from torch import nn

from fedrun.comm import FlatWeights, weights_sha256
from fedrun.launch import free_port


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def test_flat_round_trip_includes_batchnorm_buffers():
    """Packing then unpacking restores every parameter and buffer, integers included."""
    source = _bn_model()
    source(torch.randn(5, 1, 8, 8))  # moves running stats and num_batches_tracked
    source[1].num_batches_tracked.fill_(12345)
    flat = FlatWeights(source)
    packed = flat.pack(source)
    assert packed.dtype == torch.float32 and packed.numel() == flat.numel
    target = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                           nn.Linear(4 * 6 * 6, 3))
    flat.unpack(packed, target)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert weights_sha256(flat.pack(target)) == weights_sha256(packed)


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fedrun import comm

    c = comm.init("gloo", timeout_s=30)
    try:
        weights = torch.arange(10, dtype=torch.float32) if rank == 0 else torch.zeros(10)
        c.broadcast(weights)
        gathered = c.gather(weights + rank)
        c.barrier("test")
        queue.put((rank, weights.tolist(), None if gathered is None
                   else [t.tolist() for t in gathered]))
    finally:
        comm.shutdown()


def test_broadcast_and_gather_over_gloo():
    """Three real processes: broadcast from rank 0 and gather back, one flat tensor."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 3, port, queue)) for r in range(3)]
    for p in procs:
        p.start()
    try:
        results = {}
        for _ in procs:
            rank, weights, gathered = queue.get(timeout=90)
            results[rank] = (weights, gathered)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    base = list(map(float, range(10)))
    assert all(results[r][0] == base for r in range(3))
    assert results[0][1] == [[b + r for b in base] for r in range(3)]
    assert all(p.exitcode == 0 for p in procs)
