"""Process groups, the control plane and the data plane.

Control plane: the c10d store (small JSON messages: round plans, device results,
heartbeats, the stop signal) and a Gloo group for monitored barriers. Data plane: the
default group (Gloo, or NCCL when every rank has its own GPU) moving the weights as one
flat tensor. Every wait here has a timeout; none is unbounded.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("fedrun")


class CommError(RuntimeError):
    """A collective, barrier or store wait that failed or timed out."""


# ---- flat weights -----------------------------------------------------------------------


class FlatWeights:
    """Packs a model's parameters and buffers into one float32 tensor and back.

    One flat tensor means one collective per round instead of one per parameter, and no
    pickling. Integer buffers (BatchNorm's num_batches_tracked) travel as float32, exact
    up to 2**24, and are rounded back on unpack.
    """

    def __init__(self, model: nn.Module):
        self.entries = [(k, v.shape, v.dtype, v.numel()) for k, v in model.state_dict().items()]
        self.numel = sum(n for *_, n in self.entries)

    def pack(self, model: nn.Module, out: torch.Tensor | None = None) -> torch.Tensor:
        state = model.state_dict()
        out = torch.empty(self.numel, dtype=torch.float32) if out is None else out
        offset = 0
        for name, _, _, n in self.entries:
            out[offset : offset + n].copy_(state[name].detach().reshape(-1))
            offset += n
        return out

    def unpack(self, flat: torch.Tensor, model: nn.Module) -> None:
        state = model.state_dict()
        offset = 0
        with torch.no_grad():
            for name, shape, dtype, n in self.entries:
                piece = flat[offset : offset + n].view(shape)
                if not dtype.is_floating_point:
                    piece = piece.round()
                state[name].copy_(piece)
                offset += n


def weights_sha256(flat: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(flat.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()


# ---- groups -----------------------------------------------------------------------------


@dataclass
class Comm:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    store: dist.Store
    control: Any  # the Gloo group for barriers
    timeout_s: float
    store_factory: Callable[[], dist.Store]

    def put(self, key: str, value: Any) -> None:
        self.store.set(key, json.dumps(value))

    def get(self, key: str) -> Any | None:
        """The value at `key`, or None when it is not there yet; never blocks."""
        if not self.store.check([key]):
            return None
        return json.loads(self.store.get(key))

    def broadcast(self, flat: torch.Tensor) -> torch.Tensor:
        """The server's flat weights to every rank; `flat` is filled in place on devices."""
        buf = flat.to(self.device) if self.device.type != "cpu" else flat
        _collective("broadcast", dist.broadcast, buf, src=0)
        if buf is not flat:
            flat.copy_(buf.cpu())
        return flat

    def gather(self, flat: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's flat tensor to the server; returns the list on rank 0 only."""
        buf = flat.to(self.device) if self.device.type != "cpu" else flat
        out = self._receive_buffers(buf) if self.rank == 0 else None
        _collective("gather", dist.gather, buf, out, dst=0)
        if out is None:
            return None
        return [t.cpu() for t in out]

    def _receive_buffers(self, like: torch.Tensor) -> list[torch.Tensor]:
        """The gather's receive tensors, kept across rounds: fresh ones cost a page fault
        per page as Gloo fills them, a third of a ResNet-18 gather. Safe because the
        server copies what it keeps (strategies return new tensors)."""
        kept = getattr(self, "_gather_out", None)
        if not kept or kept[0].shape != like.shape or kept[0].dtype != like.dtype:
            kept = [torch.empty_like(like) for _ in range(self.world_size)]
            self._gather_out = kept
        return kept

    def barrier(self, what: str) -> None:
        """A monitored barrier: on failure it names the ranks that did not arrive."""
        try:
            dist.monitored_barrier(self.control, timeout=timedelta(seconds=self.timeout_s),
                                   wait_all_ranks=True)
        except RuntimeError as exc:
            raise CommError(f"barrier after {what} failed: {_first_line(exc)}") from exc


def _collective(what: str, op, *args, **kwargs) -> None:
    """Run a collective; a peer that died or timed out becomes one CommError line."""
    try:
        op(*args, **kwargs)
    except RuntimeError as exc:  # Gloo and NCCL report lost peers as RuntimeError
        raise CommError(f"{what} failed: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def connect_store(timeout_s: float, rank: int, world_size: int,
                  host_server: bool) -> dist.Store:
    """A store client namespaced by restart attempt.

    torchrun keeps one rendezvous store across restarts; without a fresh namespace the
    restarted group would read the previous attempt's Gloo addresses and fail to connect
    (pytorch#135712). With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 every attempt has a fresh
    store anyway and the prefix costs nothing.
    """
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = _env_int("MASTER_PORT", 29500)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(host, port, world_size, is_master=host_server and not agent,
                          timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"fedrun/attempt-{attempt}/", store)


def init(backend: str, timeout_s: float) -> Comm:
    """Join the process groups that torchrun's environment describes."""
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if backend == "nccl":
        # Before any other CUDA call, so that no rank creates a context on GPU 0.
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    store = connect_store(timeout_s, rank, world_size, host_server=rank == 0)
    dist.init_process_group(backend, store=dist.PrefixStore("pg/", store), rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))
    control = dist.group.WORLD if backend == "gloo" else dist.new_group(
        backend="gloo", timeout=timedelta(seconds=timeout_s))

    def factory() -> dist.Store:
        return connect_store(timeout_s, rank, world_size, host_server=False)

    return Comm(rank, world_size, local_rank, backend, device, store, control,
                timeout_s, factory)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- heartbeats -------------------------------------------------------------------------


class Heartbeat(threading.Thread):
    """Posts this rank's state every `interval` seconds and reads the peer's.

    It runs on its own store connection so it never waits behind the main thread's store
    calls, and it keeps beating while the main thread is busy training or stuck: the
    server tells "slow but alive" from "dead" by whether the beats keep coming.
    """

    def __init__(self, comm: Comm, interval: float, state: Callable[[], dict],
                 on_beat: Callable[[dist.Store], None] | None = None):
        super().__init__(name=f"heartbeat-{comm.rank}", daemon=True)
        self.comm, self.interval, self.state, self.on_beat = comm, interval, state, on_beat
        self.halt = threading.Event()
        self.seq = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        store = None
        try:
            store = self.comm.store_factory()
            while not self.halt.is_set():
                self.seq += 1
                payload = dict(self.state(), seq=self.seq, time=time.time())
                store.set(f"hb/{self.comm.rank}", json.dumps(payload))
                if self.on_beat is not None:
                    self.on_beat(store)
                self.halt.wait(self.interval)
        except Exception as exc:  # a store that went away: the peer or agent is gone
            self.error = exc
            if self.on_beat is not None:
                self.on_beat(None)
        finally:
            # Release the store connection here, not in interpreter teardown, where a
            # C++ object destroyed with a live thread aborts the process.
            del store

    def stop(self) -> None:
        """Stop beating and wait (bounded) for the thread to let go of its store."""
        self.halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=self.interval + self.comm.timeout_s)


class BeatWatch:
    """Tracks when each rank's heartbeat last changed, on the reader's own clock (clocks
    of different nodes need not agree)."""

    def __init__(self, ranks: list[int], timeout_s: float, every_s: float = 0.5):
        self.timeout_s, self.every_s = timeout_s, every_s
        self.latest: dict[int, dict | None] = {r: None for r in ranks}
        self.changed = {r: time.monotonic() for r in ranks}
        self._last_read = 0.0

    def read(self, comm: Comm) -> None:
        now = time.monotonic()
        if now - self._last_read < self.every_s:
            return
        self._last_read = now
        for rank in self.latest:
            beat = comm.get(f"hb/{rank}")
            if beat is not None and (self.latest[rank] or {}).get("seq") != beat["seq"]:
                self.latest[rank] = beat
                self.changed[rank] = now

    def fresh(self) -> set[int]:
        now = time.monotonic()
        return {r for r, t in self.changed.items() if now - t <= self.timeout_s}
