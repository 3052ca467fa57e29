#!/usr/bin/env bash
# kiln-dist on Open MPI: the reference checks on 2 and 3 processes, and the dead-rank cases
# (panic, non-zero exit, a rank that stops issuing collectives) must end the job fast with a
# message naming the rank. Installs nothing: Open MPI (mpirun, libopenmpi-dev) and libclang
# come from .ci/run. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# Without the burn adapters: the MPI checks do not need burn, and this keeps the build small.
cargo build -p kiln-dist --no-default-features --features mpi --example mpi_check
bin=target/debug/examples/mpi_check
mpirun=(mpirun --allow-run-as-root --oversubscribe)
log=$(mktemp)
trap 'rm -f "$log"' EXIT

for np in 2 3; do
    echo "== mpi_check check, $np ranks"
    if ! timeout 300 "${mpirun[@]}" -np "$np" "$bin" check >"$log" 2>&1; then
        cat "$log"
        echo "FAIL: mpi_check check on $np ranks"
        exit 1
    fi
    grep "kiln-dist mpi check passed" "$log"
done

# mode, then a pattern the job's output must contain (it names rank 1).
cases=(
    "panic|rank 1 of 3 panicked; aborting the MPI job"
    "exit|rank 1 exits with status 7"
    "hang|timed out after 3s in all_reduce #3 (len 1024, f32, avg), waiting for rank(s) \[1\]"
)
for case in "${cases[@]}"; do
    mode=${case%%|*}
    want=${case#*|}
    echo "== mpi_check $mode, 3 ranks: the job must fail fast naming rank 1"
    start=$(date +%s)
    set +e
    timeout 60 "${mpirun[@]}" -np 3 "$bin" "$mode" >"$log" 2>&1
    rc=$?
    set -e
    took=$(( $(date +%s) - start ))
    if [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || ! grep -q "$want" "$log"; then
        cat "$log"
        echo "FAIL: mpi_check $mode: exit $rc after ${took}s (want non-zero, no timeout, '$want')"
        exit 1
    fi
    echo "job failed as it should: exit $rc after ${took}s: $(grep -m1 "$want" "$log")"
done

echo "mpi-dist: 5 passed, 0 failed"
