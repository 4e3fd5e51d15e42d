#!/usr/bin/env bash
# make test-slurm: launch/slurm.sbatch on a real one-node Slurm (munge, slurmd, ...).
#
# Installs slurm-wlm and munge when missing (root only) and starts the daemons from a
# scratch directory. Then three jobs with a tiny config:
#   1. runs to completion;
#   2. gets `scontrol requeue` after its first checkpoint (Slurm sends SIGTERM to every
#      process of the job, then reruns it) and must resume and finish;
#   3. gets SIGTERM the way a time limit sends it with --signal=B:TERM (to the batch
#      shell only): the script must requeue itself, and the rerun resume and finish.
# Every daemon is stopped by its pid file at the end, also on failure. The last line is
# "N passed, M failed"; the exit code is 1 when a check failed, 0 when all passed or
# when the test was skipped (a SKIP line says why).
#
#   tests/slurm/run.sh        KEEP_SCRATCH=1 keeps the scratch directory with all logs
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=$repo/.venv/bin/python
[[ -x $python ]] || python=python3
passed=0
failed=0
skipped=0
scratch=""
jobs_submitted=()

pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
skip() { echo "SKIP: test-slurm: $*"; skipped=1; exit 0; }
log() { echo "[test-slurm] $*"; }

# wait_for SECONDS COMMAND...: poll COMMAND every 0.5 s until it succeeds or time is up.
wait_for() {
    local limit=$1 tries
    shift
    for ((tries = 0; tries < limit * 2; tries++)); do
        "$@" && return 0
        sleep 0.5
    done
    return 1
}

# --- the cluster ---------------------------------------------------------------------

install_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v munged >/dev/null && return 0
    log "installing slurm-wlm and munge with apt-get"
    if ! DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y slurm-wlm munge \
        >"$scratch/apt.log" 2>&1; then
        tail -n 5 "$scratch/apt.log"
        skip "apt-get install slurm-wlm munge failed (above): no Slurm to test on"
    fi
}

start_munge() {
    local dir=$scratch/munge
    mkdir -p "$dir"
    chown munge:munge "$dir"
    runuser -u munge -- munged --socket="$dir/munge.sock" --pid-file="$dir/munged.pid" \
        --log-file="$dir/munged.log" --seed-file="$dir/munged.seed" || return 1
    wait_for 10 test -S "$dir/munge.sock" || return 1
    munge -S "$dir/munge.sock" -n | unmunge -S "$dir/munge.sock" >/dev/null
}

free_port() { (cd "$repo" && "$python" -m fedrun.launch port); }

write_conf() {
    local mem
    # A little under the real memory, or slurmd refuses the node as smaller than said.
    mem=$(awk '/MemTotal/ { print int($2 / 1024 * 0.9) }' /proc/meminfo)
    mkdir -p "$scratch/state" "$scratch/spool"
    sed -e "s|@DIR@|$scratch|g" -e "s|@HOST@|$(hostname -s)|g" -e "s|@CPUS@|$(nproc)|g" \
        -e "s|@MEM@|$mem|g" -e "s|@CTLD_PORT@|$(free_port)|g" \
        -e "s|@SLURMD_PORT@|$(free_port)|g" \
        -e "s|@MUNGE_SOCKET@|$scratch/munge/munge.sock|g" \
        "$repo/tests/slurm/slurm.conf.in" >"$scratch/slurm.conf"
    # For sbatch, squeue, scontrol here, and srun inside the jobs (sbatch exports it).
    export SLURM_CONF=$scratch/slurm.conf
}

node_idle() { [[ $(sinfo -h -N -o '%T' 2>/dev/null) == idle ]]; }

start_slurm() {
    slurmctld -f "$SLURM_CONF" || return 1
    slurmd -f "$SLURM_CONF" || return 1
    wait_for 30 node_idle
}

stop_pidfile() {  # stop_pidfile NAME FILE: SIGTERM, up to 15 s, then SIGKILL
    local name=$1 file=$2 pid
    [[ -s $file ]] || return 0
    pid=$(<"$file")
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid"
    if ! wait_for 15 bash -c "! kill -0 $pid 2>/dev/null"; then
        log "$name (pid $pid) still running 15 s after SIGTERM; SIGKILL"
        kill -KILL "$pid" 2>/dev/null
    fi
}

# Processes with the test's config on their command line (batch shell, srun, torchrun,
# ranks). Once a job has ended, any of them escaped it: Slurm here tracks a job's
# processes by parent pid only, so one that double-forks away survives scancel.
leftovers() { pgrep -f -- "--config $scratch/tiny.toml" || true; }
no_leftovers() { [[ -z $(leftovers) ]]; }

cleanup() {
    local job pid
    set +e
    if [[ -n ${SLURM_CONF:-} && -s $scratch/slurmctld.pid ]]; then
        for job in "${jobs_submitted[@]}"; do scancel "$job" 2>/dev/null; done
        wait_for 30 bash -c '[[ -z $(squeue -h 2>/dev/null) ]]' ||
            log "jobs still listed by squeue 30 s after scancel"
    fi
    stop_pidfile slurmd "$scratch/slurmd.pid"
    stop_pidfile slurmctld "$scratch/slurmctld.pid"
    stop_pidfile munged "$scratch/munge/munged.pid"
    for pid in $(leftovers); do
        log "SIGKILL to leftover $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"
        kill -KILL "$pid" 2>/dev/null
    done
    if [[ ${KEEP_SCRATCH:-0} == 1 ]]; then
        log "scratch directory kept: $scratch"
    else
        rm -rf "$scratch"
    fi
    ((skipped)) && exit 0
    echo "$passed passed, $failed failed"
    ((failed == 0)) || exit 1
    exit 0
}

# --- jobs ----------------------------------------------------------------------------

job_field() {  # job_field JOB FIELD: one field of `scontrol show job`, e.g. JobState
    scontrol show job "$1" -o 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1
}
job_in_state() { [[ $(job_field "$1" JobState) == "$2" ]]; }
job_finished() {
    case $(job_field "$1" JobState) in
        COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | \
            BOOT_FAIL | DEADLINE | PREEMPTED) return 0 ;;
    esac
    return 1
}
restarted() { [[ $(job_field "$1" Restarts) -ge 1 ]]; }

write_tiny_config() {
    cat >"$scratch/tiny.toml" <<EOF
[run]
rounds = 4
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
count = 2
names = ["Hospital", "Lab"]
EOF
}

submit() {  # submit NAME [overrides...]: prints the job id
    local name=$1
    shift
    (cd "$repo" && sbatch --parsable --time=10 --output="$scratch/$name.out" \
        launch/slurm.sbatch "$scratch/tiny.toml" "run.name=$name" "$@")
}

latest_checkpoint() {  # the highest round with a checkpoint of run $1, or 0
    local file
    file=$(ls "$scratch/checkpoints/$1" 2>/dev/null | grep -E '^round-[0-9]+\.pt$' |
        sort | tail -n 1)
    [[ -n $file ]] || { echo 0; return; }
    file=${file#round-}
    echo $((10#${file%.pt}))
}
has_checkpoint() { (($(latest_checkpoint "$1") >= 1)); }

# check_summary NAME ROUNDS: summary.json of a run that completed all ROUNDS rounds once.
check_summary() {
    "$python" - "$scratch/runs/$1/summary.json" "$2" <<'EOF'
import json, math, re, sys
path, rounds = sys.argv[1], int(sys.argv[2])
try:
    summary = json.load(open(path))
except (OSError, ValueError) as exc:
    sys.exit(f"cannot read {path}: {exc}")
problems = []
if summary.get("rounds_completed") != rounds:
    problems.append(f"rounds_completed {summary.get('rounds_completed')} != {rounds}")
numbers = [r.get("round") for r in summary.get("rounds", [])]
if numbers != list(range(1, rounds + 1)):
    problems.append(f"rounds listed {numbers}, not 1..{rounds} once each")
accuracy = summary.get("final_accuracy")
if not isinstance(accuracy, (int, float)) or math.isnan(accuracy) \
        or not 0 <= accuracy <= 1:
    problems.append(f"final_accuracy {accuracy!r} is not in [0, 1]")
devices = summary.get("devices")
if (len(devices) if isinstance(devices, (list, dict)) else devices) != 2:
    problems.append(f"devices {devices!r} is not the 2 devices of the config")
if not re.fullmatch(r"[0-9a-f]{64}", str(summary.get("final_weights_sha256"))):
    problems.append("final_weights_sha256 is not a sha256 hex digest")
if problems:
    sys.exit("; ".join(problems))
EOF
}

check_ended() {  # check_ended JOB NAME ROUNDS: the summary, and no process left behind
    local problem
    if problem=$(check_summary "$2" "$3" 2>&1); then
        pass "summary.json of job $1: all $3 rounds once, accuracy, 2 devices, digest"
    else
        fail "summary.json of job $1: $problem"
    fi
    if wait_for 10 no_leftovers; then
        pass "no process of job $1 left after it ended"
    else
        fail "processes left after job $1: $(leftovers | tr '\n' ' ')"
    fi
}

test_job_completes() {
    local job name=slurm-complete state
    job=$(submit $name) || { fail "sbatch of job $name"; return; }
    jobs_submitted+=("$job")
    log "job $job submitted: 4 rounds to completion"
    if ! wait_for 300 job_finished "$job"; then
        fail "job $job did not finish within 300 s (state $(job_field "$job" JobState))"
        tail -n 30 "$scratch/$name.out"
        return
    fi
    state=$(job_field "$job" JobState)
    if [[ $state == COMPLETED ]]; then
        pass "job $job COMPLETED (exit $(job_field "$job" ExitCode))"
    else
        fail "job $job ended $state, exit $(job_field "$job" ExitCode); output:"
        tail -n 30 "$scratch/$name.out"
    fi
    check_ended "$job" $name 4
}

# test_requeued_job_resumes NAME HOW: SIGTERM after the first checkpoint; the job must
# come back once and finish the run from its checkpoint. HOW: "requeue" (scontrol
# requeue) or "time-limit" (scancel --batch --signal=TERM, what --signal=B:TERM sends).
test_requeued_job_resumes() {
    local name=$1 how=$2 rounds=10 job before resumed out
    out=$scratch/$name.out
    job=$(submit "$name" run.rounds=$rounds) || { fail "sbatch of job $name"; return; }
    jobs_submitted+=("$job")
    log "job $job submitted: $rounds rounds, SIGTERM ($how) after its first checkpoint"
    if ! wait_for 300 has_checkpoint "$name"; then
        fail "job $job: no checkpoint within 300 s (state $(job_field "$job" JobState))"
        tail -n 30 "$out"
        return
    fi
    before=$(latest_checkpoint "$name")
    if ((before >= rounds)) || ! job_in_state "$job" RUNNING; then
        fail "job $job finished before its SIGTERM; give it more rounds"
        return
    fi
    log "job $job has the checkpoint of round $before; SIGTERM by $how"
    if [[ $how == requeue ]]; then
        scontrol requeue "$job"
    else
        scancel --batch --signal=TERM "$job"
    fi
    # A requeued job may start again only after a delay; ask for now once it waits.
    if wait_for 120 restarted "$job" && job_in_state "$job" PENDING; then
        scontrol update jobid="$job" StartTime=now
    fi
    if ! wait_for 300 job_finished "$job"; then
        fail "job $job not finished 300 s after its SIGTERM (state" \
            "$(job_field "$job" JobState), restarts $(job_field "$job" Restarts))"
        tail -n 30 "$out"
        return
    fi

    if job_in_state "$job" COMPLETED && [[ $(job_field "$job" Restarts) == 1 ]]; then
        pass "job $job ($how) requeued once and COMPLETED"
    else
        fail "job $job ($how): state $(job_field "$job" JobState)," \
            "restarts $(job_field "$job" Restarts)"
        tail -n 40 "$out"
    fi
    if grep -q "^\[slurm job $job restart 0\]" "$out" &&
        grep -q "^\[slurm job $job restart 1\]" "$out"; then
        pass "both runs of job $job appended to one output file"
    else
        fail "output of job $job lacks the lines of run 0 and run 1 (--open-mode=append)"
    fi
    if grep -q "stopped by SIGTERM" "$out"; then
        pass "the server of job $job stopped cleanly on SIGTERM"
    else
        fail "job $job: no 'stopped by SIGTERM' from the server; it did not stop cleanly"
        grep -n -E 'received SIGTERM|SIGTERM from|before the time limit' "$out" | head
    fi
    resumed=$(grep -o 'resuming from round [0-9]*' "$out" | grep -o '[0-9]*$')
    if [[ $(wc -w <<<"$resumed") == 1 ]] && ((resumed >= before)); then
        pass "job $job resumed from round $resumed (checkpoint $before before SIGTERM)"
    else
        fail "job $job: want one 'resuming from round N' with N >= $before, found" \
            "rounds [${resumed//$'\n'/ }]"
        grep -n -E 'resuming|attempt [1-9]|Error|error' "$out" | head -n 20
    fi
    check_ended "$job" "$name" $rounds
}

main() {
    [[ $(id -u) == 0 ]] ||
        skip "needs root to install and start munge, slurmctld and slurmd (running" \
            "as $(id -un))"
    scratch=$(mktemp -d /tmp/fedrun-slurm.XXXXXX)
    # munged runs as user munge and must reach its socket directory inside.
    chmod 0755 "$scratch"
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    install_slurm

    if ! start_munge; then
        fail "munged did not start (log: $scratch/munge/munged.log)"
        return
    fi
    write_conf
    if ! start_slurm; then
        fail "node not idle within 30 s: $(sinfo -h -N -o '%T %E' 2>&1)"
        tail -n 20 "$scratch/slurmctld.log" "$scratch/slurmd.log"
        return
    fi
    pass "munge, slurmctld and slurmd up, node $(hostname -s) idle"
    write_tiny_config

    test_job_completes
    test_requeued_job_resumes slurm-requeue requeue
    test_requeued_job_resumes slurm-time-limit time-limit
}

# Sourced (to try single functions), it only defines them.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main
fi
