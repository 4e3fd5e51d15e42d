"""End to end: real torchrun runs on Gloo with tiny shards of real Fashion-MNIST."""

from __future__ import annotations

import re

from conftest import needs_fashion_mnist, run_fedrun


@needs_fashion_mnist
def test_short_run_on_fashion_mnist(tmp_path, tiny):
    """Two rounds on a few thousand real samples: summary, records and logs are right."""
    cfg = tiny(run={"rounds": 2}, data={"train_samples": 3000, "test_samples": 1000,
                                        "partition": "dirichlet", "alpha": 1.0},
               train={"batch_size": 16})
    run = run_fedrun(tmp_path, cfg, timeout=240)
    assert run.returncode == 0, run.output[-3000:]
    summary = run.summary
    assert summary["rounds_completed"] == 2 and summary["finished"]
    assert summary["devices"] == [{"rank": 1, "name": "Hospital"}, {"rank": 2, "name": "Lab"}]
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for record in summary["rounds"]:
        assert record["participants"] == [1, 2] and record["masked"] == {}
        assert 0 <= record["loss"] and record["seconds"] > 0
    assert summary["final_accuracy"] > 0.5  # chance is 0.1
    assert re.fullmatch(r"[0-9a-f]{64}", summary["final_weights_sha256"])
    line = re.search(r"\[server round 2/2\] round 2/2: 2/2 devices aggregated; "
                     r"accuracy \d+\.\d%", run.output)
    assert line, run.output[-3000:]
    assert "\x1b[" not in run.output  # piped output carries no escape codes
    assert (run.checkpoint_dir / "round-0002.pt").is_file()
