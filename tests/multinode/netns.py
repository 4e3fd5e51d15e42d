"""Two network namespaces joined by a veth pair: two "nodes" on one machine.

Each node has its own loopback and one veth end with an address of this test's own;
traffic between the nodes crosses the veth pair and never leaves the machine. Both
namespaces are deleted again on exit, with every process still running inside them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.231.0"


@dataclass
class Node:
    name: str  # namespace
    veth: str  # this node's end of the pair
    addr: str

    def run_prefix(self) -> list[str]:
        """Put before a command to run it on this node."""
        return ["ip", "netns", "exec", self.name]

    def pids(self) -> list[int]:
        done = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                              text=True, timeout=10)
        return [int(p) for p in done.stdout.split()]

    def tx_bytes(self) -> int:
        """Bytes sent out of this node's veth end so far."""
        counter = f"/sys/class/net/{self.veth}/statistics/tx_bytes"
        done = subprocess.run([*self.run_prefix(), "cat", counter], capture_output=True,
                              text=True, timeout=10, check=True)
        return int(done.stdout)

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL every process of this node, as when the machine dies."""
        deadline = time.monotonic() + timeout
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if not Path("/usr/sbin/ip").exists() and not Path("/sbin/ip").exists():
        return "the ip command (iproute2) is not installed"
    probe = f"fedrun-probe-{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          timeout=10)
    if done.returncode != 0:
        return f"ip netns add is not allowed here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class TwoNodes:
    """Nodes `a` (.2, hosts the rendezvous) and `b` (.1), joined by a veth pair.

    Names carry the test process's pid, so two test runs at once do not meet; the
    addresses only exist inside these namespaces, so they can repeat between runs.
    """

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.a = Node(f"fedrun-a-{tag}", f"fra{tag}", f"{SUBNET}.2")
        self.b = Node(f"fedrun-b-{tag}", f"frb{tag}", f"{SUBNET}.1")

    def __enter__(self) -> TwoNodes:
        try:
            for node in (self.a, self.b):
                _ip("netns", "add", node.name)
            _ip("link", "add", self.a.veth, "type", "veth", "peer", "name", self.b.veth)
            for node in (self.a, self.b):
                _ip("link", "set", node.veth, "netns", node.name)
                _ip("-n", node.name, "addr", "add", f"{node.addr}/24", "dev", node.veth)
                _ip("-n", node.name, "link", "set", "lo", "up")
                _ip("-n", node.name, "link", "set", node.veth, "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for node in (self.a, self.b):
            node.kill_all()
            # Deleting a namespace also deletes the veth end inside it.
            subprocess.run(["ip", "netns", "del", node.name], capture_output=True,
                           timeout=10)
