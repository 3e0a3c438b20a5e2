#!/usr/bin/env bash
# Data-parallel training on NPROC workers of this machine, launched by msrun with the project's interpreter:
#
#   scripts/run_train_parallel.sh NPROC [train_text_to_image.py options ...]
#
# Every worker runs examples/stable_diffusion_v2/train_text_to_image.py with the given options and
# `--use_parallel True`. msrun starts workers as `python ...`, so the project's .venv/bin goes first on PATH (a
# fresh shell's `python` would not find `ldm`). The script waits for all workers (`--join=True`), shows rank 0's log on
# the terminal, keeps every worker's log in MSRUN_LOG_DIR, and exits non-zero if any worker fails, after printing the
# last lines of the failed worker's log. An msrun failure after every worker finished (MindSpore's scheduler at
# cluster shutdown) is a warning, not a failure.
#
# Environment: MSRUN_LOG_DIR (default msrun_log), MASTER_PORT (default: a free port), LDM_VENV (default: .venv of
# this checkout).
set -uo pipefail

root="$(cd -P "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
venv="${LDM_VENV:-$root/.venv}"
log_dir="${MSRUN_LOG_DIR:-msrun_log}"
tail_lines=20

die() {
    echo "error: $*" >&2
    exit 2
}

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
    die "usage: $0 NPROC [train_text_to_image.py options]: NPROC must be a positive number of workers, got '${1:-}'"
fi
nproc=$1
shift
if [[ ! -x $venv/bin/python || ! -x $venv/bin/msrun ]]; then
    die "$venv has no python or msrun: run 'make demo' in $root first (or set LDM_VENV to an environment with ldm)"
fi
export PATH="$venv/bin:$PATH"
port="${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}"

# The last lines of a worker log, without MindSpore's own [WARNING]/[INFO] lines and with progress bars split.
show_log_tail() {
    echo "error: worker $1 failed; last lines of $2:" >&2
    tr '\r' '\n' <"$2" | grep -vE '^\[(WARNING|INFO|DEBUG)\] ' | grep -v '^\s*$' | tail -n "$tail_lines" |
        sed 's/^/    /' >&2
}

# A worker log with an error (`error: ...` from our CLIs or a Python traceback).
has_error() {
    [[ -f $1 ]] && grep -qE '^(error: |Traceback |[A-Za-z.]*(Error|Exception): )' "$1"
}

# A worker prints its summary (`last_loss: ...`) only after its training returned (rank 0 after writing its files).
has_summary() {
    [[ -f $1 ]] && tr '\r' '\n' <"$1" | grep -q '^last_loss: '
}

# Workers that printed an error failed and msrun killed the others; if none did (e.g. a worker was killed), the
# workers without a summary are shown, and if every worker has one, all of them.
report_failed_workers() {
    local rank log failed=() unfinished=()
    for ((rank = 0; rank < nproc; rank++)); do
        if has_error "$log_dir/worker_$rank.log"; then
            failed+=("$rank")
        elif ! has_summary "$log_dir/worker_$rank.log"; then
            unfinished+=("$rank")
        fi
    done
    [[ ${#failed[@]} -eq 0 ]] && failed=("${unfinished[@]}")
    if [[ ${#failed[@]} -eq 0 ]]; then
        for ((rank = 0; rank < nproc; rank++)); do failed+=("$rank"); done
    fi
    for rank in "${failed[@]}"; do
        log="$log_dir/worker_$rank.log"
        if [[ -f $log ]]; then
            show_log_tail "$rank" "$log"
        else
            echo "error: worker $rank failed before writing $log" >&2
        fi
    done
}

# Every worker printed its summary and none an error. MindSpore's scheduler can still fail at cluster shutdown after
# that (it declared an exited worker "timed out"); such a run's outputs are complete.
all_workers_finished() {
    local rank
    for ((rank = 0; rank < nproc; rank++)); do
        has_summary "$log_dir/worker_$rank.log" && ! has_error "$log_dir/worker_$rank.log" || return 1
    done
}

msrun --worker_num="$nproc" --local_worker_num="$nproc" --master_port="$port" --join=True --tail_worker_log=0 \
    --log_dir="$log_dir" "$root/examples/stable_diffusion_v2/train_text_to_image.py" "$@" --use_parallel True
status=$?
if [[ $status -ne 0 ]] && all_workers_finished; then
    echo "warning: msrun exited with status $status after every worker had finished training and printed its" \
        "summary (a MindSpore cluster shutdown error, see $log_dir/scheduler.log); the outputs are complete" >&2
    status=0
fi
if [[ $status -ne 0 ]]; then
    report_failed_workers
    echo "error: data-parallel training failed (msrun exit status $status); all logs are in $log_dir/" >&2
    exit "$status"
fi
