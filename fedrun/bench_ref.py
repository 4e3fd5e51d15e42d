"""The bench's references: a bare training loop, and plain writes of checkpoint bytes.

The bare loop does the local training steps of a fedrun job (the same config, shards,
batches in the same order, model, optimizer and clipping), one device after another,
with nothing else: no process group, no store, no evaluation, no checkpoints, no
per-batch checks or metrics. Batches are drawn before the clock starts from a
DataLoader built exactly as the device builds its own, so both sides see the same
indices. A job may take a part of the devices only (`part = [i, k]`: ranks i+1, i+1+k,
...), so that k processes on k cores share the work the way fedrun's ranks do.

Run as `python -m fedrun.bench_ref JOBS.json OUT.json` so that its memory and thread
settings are its own; `fedrun.bench` starts it.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

from .bench_jobs import DEFAULT_CONFIG, high_water
from .checkpoint import save
from .comm import FlatWeights
from .config import Config, digest, load, resume_values
from .data import load_dataset, partition
from .device import seed_for
from .models import build_model


class _Indices(torch.utils.data.Dataset):
    """Stands in for a shard of `n` samples: a batch comes back as its index tensor."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return torch.as_tensor(indices)


def _whole(batch):
    return batch


# TODO(bench-clients): assumes one client per device (data.clients = 0) and
# train.num_workers = 0, as the bench's workloads have; more would change the seeds.
def batches_for(cfg: Config, samples: int, server_round: int, rank: int) -> list:
    """The index batches device `rank` trains on in `server_round`, in order.

    The loader is built as `Device._attempt` builds it (generator seed, batch size,
    shuffle, collate), so the draws from the generator are the same.
    """
    gen = torch.Generator().manual_seed(seed_for(cfg.run.seed, server_round, rank, 1))
    loader = torch.utils.data.DataLoader(
        _Indices(samples), batch_size=cfg.train.batch_size, shuffle=True, generator=gen,
        num_workers=0, collate_fn=_whole)
    return [idx for _ in range(cfg.train.local_epochs) for idx in loader]


def bare_loop(cfg: Config, threads: int, rounds: int,
              part: tuple[int, int] = (0, 1)) -> dict:
    """Time the local training of `rounds` rounds of the devices in `part`, in turn."""
    torch.set_num_threads(threads)
    data = load_dataset(cfg.data, cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model.name, data.in_channels, data.train_x.shape[-1])
    start = {k: v.clone() for k, v in model.state_dict().items()}
    shards = partition(data.train_y.numpy(), cfg.devices.count, cfg.data, cfg.run.seed)
    train = cfg.train
    seconds, cpu, samples, steps = 0.0, 0.0, 0, 0
    for server_round in range(1, rounds + 1):
        for rank, shard in enumerate(shards, start=1):
            if (rank - 1) % part[1] != part[0]:
                continue
            index = torch.from_numpy(shard)
            x, y = data.normalise(data.train_x[index]), data.train_y[index]
            batches = batches_for(cfg, len(y), server_round, rank)
            # Every device starts a round from the same global weights; resetting them
            # is outside the clock, as the broadcast is on fedrun's side.
            model.load_state_dict(start)
            model.train()
            params = list(model.parameters())
            opt = torch.optim.SGD(params, lr=train.lr, momentum=train.momentum)
            t, c = time.perf_counter(), time.process_time()
            for idx in batches:
                xb, yb = x[idx], y[idx]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                if train.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
                opt.step()
            seconds += time.perf_counter() - t
            cpu += time.process_time() - c
            samples += len(y) * train.local_epochs
            steps += len(batches)
    return {"seconds": seconds, "cpu_s": cpu, "samples": samples, "steps": steps,
            "threads": threads, "rounds": rounds, "samples_per_s": samples / seconds}


# ---- checkpoints ---------------------------------------------------------------------


def server_state(model_name: str) -> dict:
    """A checkpoint like the server's: flat weights, strategy, rng, config digest."""
    cfg = load(None, [f"model.name={model_name}"])
    in_channels, size = (3, 32) if model_name == "resnet18" else (1, 28)
    model = build_model(model_name, in_channels, size)
    return {"weights": FlatWeights(model).pack(model), "strategy": {"name": "fedavg"},
            "history": [], "skipped_in_a_row": 0, "quarantined": {},
            "torch_rng": torch.get_rng_state(),
            "config_digest": digest(resume_values(cfg)),
            "resume_values": resume_values(cfg)}


def plain_write(path: Path, payload: bytes) -> None:
    """The reference write: one write and one fsync, the least a durable save needs."""
    with open(path, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_speed(folder: Path, model_name: str, repeats: int) -> dict:
    """MB/s of fedrun.checkpoint.save against a plain write of the same bytes.

    Both sides are timed in turn, `repeats` times each, and the medians compared, so
    that a burst of other disk traffic hurts both alike.
    """
    folder.mkdir(parents=True, exist_ok=True)
    state = server_state(model_name)
    buf = io.BytesIO()
    torch.save(dict(state, format=1, round=1, saved_at=time.time()), buf)
    payload = buf.getvalue()
    fedrun_s, plain_s = [], []
    for i in range(1, repeats + 1):
        t = time.perf_counter()
        save(folder / "fedrun", i, state, keep=2)
        fedrun_s.append(time.perf_counter() - t)
        # A new file each time and the one before last removed, as save() keeps two:
        # overwriting one file in place would time the file system's truncation too.
        t = time.perf_counter()
        plain_write(folder / f"plain-{i}.bin", payload)
        (folder / f"plain-{i - 2}.bin").unlink(missing_ok=True)
        plain_s.append(time.perf_counter() - t)
    megabytes = len(payload) / 1e6
    return {"bytes": len(payload),
            "fedrun_mb_s": megabytes / statistics.median(fedrun_s),
            "plain_mb_s": megabytes / statistics.median(plain_s),
            "fedrun_s": fedrun_s, "plain_s": plain_s}


# ---- entry ---------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """Run the bare-loop jobs listed in JOBS.json; write their timings to OUT.json."""
    if len(argv) != 2:
        print("usage: python -m fedrun.bench_ref JOBS.json OUT.json", file=sys.stderr)
        return 2
    jobs = json.loads(Path(argv[0]).read_text())
    born = psutil.Process().create_time()
    results: dict = {"jobs": {}}
    for job in jobs:
        cfg = load(DEFAULT_CONFIG, job["overrides"])
        result = bare_loop(cfg, job["threads"], job.get("rounds") or cfg.run.rounds,
                           tuple(job.get("part", (0, 1))))
        if not results["jobs"]:
            # The first job is the workload's: for it the process as a whole counts.
            results["wall_s"] = time.time() - born
            results["peak_rss_mib"] = max(high_water(os.getpid()),
                                          psutil.Process().memory_info().rss) / 2**20
        results["jobs"][job["label"]] = result
    Path(argv[1]).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
