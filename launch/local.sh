#!/usr/bin/env bash
# Run fedrun on this machine: one torchrun agent with devices.count + 1 ranks.
#
#   launch/local.sh CONFIG [section.key=value ...] [--fresh]
#
# Environment (all optional):
#   MAX_RESTARTS  torchrun restarts of the whole group after a rank fails (default 3);
#                 each restart resumes from the server's last checkpoint
#   RDZV_PORT     rendezvous port (default 0: the kernel picks a free one when the store
#                 binds, so two runs side by side never race for a port)
#   PYTHON        interpreter (default: the repo's .venv/bin/python, else python3)
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: launch/local.sh CONFIG [section.key=value ...] [--fresh]" >&2
    exit 2
fi
config=$1
shift

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python3
    [[ -x $root/.venv/bin/python ]] && PYTHON=$root/.venv/bin/python
fi
# Outputs land relative to the caller's directory, as with `python -m fedrun`.
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}

# The preflight sees every argument, flags included: a typo is one error, not a job.
nproc=$("$PYTHON" -m fedrun nproc --config "$config" "$@")

# A restarted Gloo group must not read the last attempt's addresses from torchrun's
# shared store (pytorch#135712): with this set each attempt gets a fresh one.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# torchrun replaces an unset OMP_NUM_THREADS by 1; keep the user's choice visible to the
# ranks, which otherwise share the cores (fedrun.launch.threads_per_rank).
export FEDRUN_USER_OMP_NUM_THREADS=${OMP_NUM_THREADS-}

exec "$PYTHON" -m torch.distributed.run \
    --nnodes=1 \
    --nproc-per-node="$nproc" \
    --max-restarts="${MAX_RESTARTS:-3}" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="127.0.0.1:${RDZV_PORT:-0}" \
    --rdzv-id="local-$$" \
    -m fedrun --config "$config" "$@"
