#!/usr/bin/env bash
# Check fedrun's NCCL path on a machine with GPUs: a few rounds with comm.backend=nccl,
# one GPU per rank (the server included), tiny data; prints PASS or FAIL and why.
#
#   launch/check_nccl.sh            uses up to 5 visible GPUs (4 devices + the server)
#   CUDA_VISIBLE_DEVICES=2,3 launch/check_nccl.sh
#
# Exit code 0 on PASS, 1 on FAIL (including no GPU, or too few for two ranks).
# TODO(nccl-check): not yet run on a machine with GPUs; run it on one and record the
# result in the README.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python3
    [[ -x $root/.venv/bin/python ]] && PYTHON=$root/.venv/bin/python
fi
export PYTHON

say() { echo "check_nccl: $*"; }

gpus=$("$PYTHON" -c 'import torch
print(torch.cuda.device_count() if torch.cuda.is_available() else 0)') || {
    say "FAIL: cannot import torch with $PYTHON"; exit 1; }
visible=${CUDA_VISIBLE_DEVICES-unset}
if ((gpus == 0)); then
    say "FAIL: no CUDA GPU visible (torch.cuda.device_count() = 0," \
        "CUDA_VISIBLE_DEVICES=$visible); run this on a machine with GPUs"
    exit 1
fi
if ((gpus < 2)); then
    say "FAIL: 1 GPU visible (CUDA_VISIBLE_DEVICES=$visible); NCCL needs one GPU per" \
        "rank and a run has at least 2 ranks (the server and one device)"
    exit 1
fi

devices=$((gpus - 1 < 4 ? gpus - 1 : 4))
scratch=$(mktemp -d /tmp/fedrun-nccl.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
names=$(seq -f '"GPU%g"' 1 "$devices" | paste -sd, -)
cat >"$scratch/nccl.toml" <<EOF
[run]
name = "check-nccl"
rounds = 3
checkpoint_every = 1
dashboard = false
output_dir = "$scratch/runs"
checkpoint_dir = "$scratch/checkpoints"

[data]
train_samples = 600
test_samples = 200

[model]
name = "cnn"

[train]
local_epochs = 1

[devices]
count = $devices
names = [$names]

[comm]
backend = "nccl"
EOF

say "$gpus GPU(s) visible (CUDA_VISIBLE_DEVICES=$visible): $devices device(s) + the" \
    "server, 3 rounds on NCCL"
started=$SECONDS
MAX_RESTARTS=0 FEDRUN_NO_DASHBOARD=1 timeout 600 \
    "$root/launch/local.sh" "$scratch/nccl.toml" >"$scratch/run.log" 2>&1
rc=$?
elapsed=$((SECONDS - started))

# The summary and the device each rank logged, as one line of facts.
verdict=$("$PYTHON" - "$scratch" "$devices" <<'EOF'
import json, re, sys
from pathlib import Path
scratch, devices = Path(sys.argv[1]), int(sys.argv[2])
log = (scratch / "run.log").read_text()
problems = []
if not re.search(r"backend nccl", log):
    problems.append("no rank logged 'backend nccl'")
gpus = sorted(set(re.findall(r"Device (\d+) \[[^\]]*\]: .*; on (cuda:\d+)", log)))
used = {gpu for _, gpu in gpus}
if len(gpus) != devices or len(used) != devices or "cuda:0" in used:
    problems.append(f"devices on {gpus or 'no GPU'}: want {devices} distinct GPUs "
                    "besides the server's cuda:0")
try:
    summary = json.loads((scratch / "runs" / "check-nccl" / "summary.json").read_text())
except (OSError, ValueError) as exc:
    summary = {}
    problems.append(f"no summary.json ({exc})")
if summary and summary.get("rounds_completed") != 3:
    problems.append(f"rounds_completed = {summary.get('rounds_completed')}, want 3")
if problems:
    print("FAIL: " + "; ".join(problems))
else:
    print(f"PASS: 3 rounds, accuracy {summary['final_accuracy']:.3f}, devices on "
          + ", ".join(gpu for _, gpu in gpus) + ", the server on cuda:0")
EOF
)
if [[ $rc != 0 ]]; then
    verdict="FAIL: the run exited $rc${verdict:+ (${verdict#*: })}"
fi
say "$verdict (${elapsed}s; torch $("$PYTHON" -c 'import torch; print(torch.__version__,
"CUDA", torch.version.cuda, "NCCL", ".".join(map(str, torch.cuda.nccl.version())))'))"
if [[ $verdict != PASS* ]]; then
    tail -n 40 "$scratch/run.log"
    exit 1
fi
