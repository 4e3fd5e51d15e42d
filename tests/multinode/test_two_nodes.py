"""Two torchrun agents as two nodes, each in its own network namespace.

Node a hosts the c10d rendezvous at 10.231.0.2; node b is 10.231.0.1, so the rendezvous
(which ranks agents by address) puts rank 0, the server, on node b: not on the host of
the rendezvous. Three ranks per node, devices.count = 5. Run alone with
`pytest tests/multinode`; skipped with the reason where namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import netns

pytestmark = pytest.mark.multinode

REPO = Path(__file__).resolve().parents[2]
PORT = 29400  # inside fresh namespaces nothing else listens
# The SmallCNN is about 0.8 MB of float32 weights, the rendezvous about 30 kB: this
# much on each veth end means weights and updates crossed the interface.
MODEL_TRAFFIC = 500_000


def write_config(tmp_path: Path, name: str, rounds: int) -> Path:
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
train_samples = 600
test_samples = 200

[model]
name = "cnn"

[train]
local_epochs = 1

[devices]
count = 5

[comm]
timeout_s = 20.0
""")
    return path


class Agent:
    """One node's torchrun agent, its output in a file, in its own session."""

    def __init__(self, node: netns.Node, nodes: netns.TwoNodes, config: Path,
                 rdzv_id: str, log: Path):
        self.node, self.log = node, log
        cmd = [*node.run_prefix(), sys.executable, "-m", "torch.distributed.run",
               "--nnodes=2", "--nproc-per-node=3", "--rdzv-backend=c10d",
               f"--rdzv-endpoint={nodes.a.addr}:{PORT}", f"--rdzv-id={rdzv_id}",
               # Both namespaces share one hostname: say which node hosts the store,
               # and which address each node's ranks are reached at.
               f"--rdzv-conf=is_host={int(node is nodes.a)}", f"--local-addr={node.addr}",
               "--max-restarts=0", "--monitor-interval=0.2",
               "-m", "fedrun", "--config", str(config)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": "1", "FEDRUN_NO_DASHBOARD": "1",
               "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
               # Gloo would otherwise resolve the shared hostname to a loopback address.
               "GLOO_SOCKET_IFNAME": node.veth}
        with log.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env=env, cwd=log.parent, start_new_session=True)

    def wait(self, deadline: float) -> int:
        """The agent's exit code; past the deadline the node is killed, the test fails."""
        try:
            return self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.node.kill_all()
            self.proc.wait(timeout=10)
            pytest.fail(f"node {self.node.name} still running at its deadline:\n"
                        f"{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log.read_text()


def run_both(nodes, config, rdzv_id, tmp_path, tag) -> dict[str, Agent]:
    return {name: Agent(getattr(nodes, name), nodes, config, rdzv_id,
                        tmp_path / f"{tag}-{name}.log")
            for name in ("a", "b")}


def finish_all(agents: dict[str, Agent], timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    return {name: agent.wait(deadline) for name, agent in agents.items()}


def read_summary(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / "runs" / name / "summary.json").read_text())


def checkpoint_round(tmp_path: Path, name: str) -> int:
    folder = tmp_path / "checkpoints" / name
    rounds = [int(m.group(1)) for p in folder.glob("round-*.pt")
              if (m := re.fullmatch(r"round-(\d+)\.pt", p.name))]
    return max(rounds, default=0)


@pytest.fixture
def nodes():
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    with netns.TwoNodes() as two:
        yield two


def test_two_nodes_complete_a_run_with_the_server_off_the_host(nodes, tmp_path):
    """Three ranks per node finish a run; rank 0 serves from node b; traffic crosses."""
    config = write_config(tmp_path, "two-nodes", rounds=3)
    agents = run_both(nodes, config, "two-nodes", tmp_path, "run")
    codes = finish_all(agents, timeout=300)

    for name, code in codes.items():
        assert code == 0, f"node {name} exited {code}:\n{agents[name].output()[-3000:]}"
    summary = read_summary(tmp_path, "two-nodes")
    assert summary["rounds_completed"] == 3
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert "[server round" in agents["b"].output()
    assert "[server round" not in agents["a"].output()
    for node in (nodes.a, nodes.b):
        assert node.tx_bytes() > MODEL_TRAFFIC, f"little traffic left {node.veth}"


@pytest.mark.parametrize("lost", ["a", "b"], ids=["rendezvous-host-lost",
                                                  "server-node-lost"])
def test_a_lost_node_ends_both_and_the_next_start_resumes(nodes, tmp_path, lost):
    """SIGKILL to one node's agent and ranks ends the other node; a restart resumes."""
    rounds = 4
    config = write_config(tmp_path, "loss", rounds=rounds)
    agents = run_both(nodes, config, "loss-1", tmp_path, "first")
    deadline = time.monotonic() + 240
    while checkpoint_round(tmp_path, "loss") < 1:
        if time.monotonic() > deadline or any(a.proc.poll() is not None
                                              for a in agents.values()):
            for node in (nodes.a, nodes.b):
                node.kill_all()
            pytest.fail("no checkpoint before the node loss:\n"
                        + "\n".join(a.output()[-2000:] for a in agents.values()))
        time.sleep(0.2)
    saved = checkpoint_round(tmp_path, "loss")
    assert saved < rounds, "the run finished before a node could be lost; more rounds"

    getattr(nodes, lost).kill_all()
    survivor = "b" if lost == "a" else "a"
    code = agents[survivor].wait(time.monotonic() + 90)
    agents[lost].proc.wait(timeout=10)
    assert code != 0, "the surviving node should report the lost one"
    # No rank of the surviving node may outlive its agent.
    survivor_node = getattr(nodes, survivor)
    for _ in range(50):
        if not survivor_node.pids():
            break
        time.sleep(0.2)
    assert not survivor_node.pids(), f"processes left on node {survivor}"
    assert not (tmp_path / "runs" / "loss" / "summary.json").exists() or \
        read_summary(tmp_path, "loss")["rounds_completed"] < rounds

    again = run_both(nodes, config, "loss-2", tmp_path, "second")
    codes = finish_all(again, timeout=300)
    for name, code in codes.items():
        tail = again[name].output()[-3000:]
        assert code == 0, f"node {name} exited {code} on resume:\n{tail}"
    found = re.findall(r"resuming from round (\d+)", again["b"].output())
    assert len(found) == 1 and int(found[0]) >= saved, again["b"].output()[-3000:]
    summary = read_summary(tmp_path, "loss")
    assert summary["rounds_completed"] == rounds
    assert [r["round"] for r in summary["rounds"]] == list(range(1, rounds + 1))
