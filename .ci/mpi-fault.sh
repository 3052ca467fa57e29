#!/usr/bin/env bash
# A rank killed under mpirun: `kiln train` on 2 MPI processes, checkpointing every 2 steps; rank 1
# gets SIGKILL in the middle of the run. The whole job must end fast (well inside the timeout)
# with a message naming rank 1, never exit 0, and `kiln train --resume` from the newest complete
# checkpoint must log the same losses as the uninterrupted run, bit for bit.
# Installs nothing (Open MPI comes from .ci/run). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# The workspace-wide feature set (as the tests) plus mpi, shared with the other MPI checks.
cargo build --workspace --features kiln-zero/mpi,kiln-trainer/mpi --examples --bins
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mpirun=(mpirun --allow-run-as-root --oversubscribe -np 2)
steps=40
set_args=(--set train.steps=$steps --set train.global_batch=8 --set train.micro_batch=2
          --set data.digits=2 --set data.seq_len=16 --set data.eval_examples=8
          --set zero.stage=3 --set precision.compute=bf16 --set train.log_interval=1
          --set train.checkpoint_interval=2)
losses() { grep -o '"step":[0-9]*,"loss":[^,]*' "$1/metrics.jsonl"; }
records() {
    local n=0
    [ -f "$1/metrics.jsonl" ] && n=$(grep -c '"kind":"train"' "$1/metrics.jsonl" || true)
    echo "${n:-0}"
}

# The pid of MPI rank $1 of the job writing to $2 (Open MPI puts the rank in the environment).
rank_pid() {
    local p
    for p in $(pgrep -f "target/debug/kiln train .*$2" || true); do
        if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$1"; then
            echo "$p"
            return
        fi
    done
}

echo "== uninterrupted: $steps steps on 2 MPI processes"
timeout 600 "${mpirun[@]}" target/debug/kiln train "${set_args[@]}" \
    --set train.output_dir="$out/straight" >"$out/straight.log" 2>&1 \
    || { cat "$out/straight.log"; echo "FAIL: the uninterrupted run"; exit 1; }

echo "== the same run, rank 1 killed with SIGKILL after step 5"
timeout 600 "${mpirun[@]}" target/debug/kiln train "${set_args[@]}" \
    --set train.output_dir="$out/killed" >"$out/killed.log" 2>&1 &
job=$!
start=$(date +%s)
while [ "$(records "$out/killed")" -lt 5 ]; do
    if ! kill -0 "$job" 2>/dev/null || [ $(( $(date +%s) - start )) -gt 300 ]; then
        cat "$out/killed.log"
        echo "FAIL: the run ended or stalled before step 5"
        exit 1
    fi
    sleep 0.02
done
victim=$(rank_pid 1 "$out/killed")
[ -n "$victim" ] || { echo "FAIL: rank 1's process not found"; exit 1; }
kill -KILL "$victim"
killed_at=$(date +%s)
set +e
wait "$job"
rc=$?
set -e
took=$(( $(date +%s) - killed_at ))
cat "$out/killed.log"
done_steps=$(records "$out/killed")
if [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || [ "$took" -gt 60 ]; then
    echo "FAIL: after rank 1 was killed the job exited $rc after ${took}s (want non-zero within 60s)"
    exit 1
fi
if ! grep -Eq "rank 1\b|rank\(s\) \[?1\]?" "$out/killed.log"; then
    echo "FAIL: the job's output does not name rank 1"
    exit 1
fi
if [ "$done_steps" -ge "$steps" ]; then
    echo "FAIL: the run finished all $steps steps before the kill landed"
    exit 1
fi
echo "job ended as it should: exit $rc ${took}s after the kill, at step $done_steps of $steps:" \
    "$(grep -Em1 "rank 1\b|rank\(s\) \[?1\]?" "$out/killed.log")"
latest=$(cat "$out/killed/checkpoints/latest")
echo "newest complete checkpoint: $latest"

echo "== kiln train --resume"
timeout 600 "${mpirun[@]}" target/debug/kiln train "${set_args[@]}" \
    --set train.output_dir="$out/killed" --resume >"$out/resumed.log" 2>&1 \
    || { cat "$out/resumed.log"; echo "FAIL: the resumed run"; exit 1; }
grep -q "resumed from" "$out/resumed.log" || { cat "$out/resumed.log"; echo "FAIL: did not resume"; exit 1; }
if ! diff <(losses "$out/straight") <(losses "$out/killed"); then
    echo "FAIL: the resumed run's losses differ from the uninterrupted run's"
    exit 1
fi
echo "resumed from $latest: $(losses "$out/killed" | wc -l) steps, losses identical to the uninterrupted run"
echo "mpi-fault: 2 passed, 0 failed"
