#!/usr/bin/env bash
# kiln-zero on Open MPI: stages Two and Three (Three also with gradients reduced in bf16) with ranks
# as processes must equal the same run on thread ranks.
# Installs nothing (Open MPI comes from .ci/run). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# The workspace-wide feature set (as the tests) plus mpi: burn is not rebuilt, and both MPI
# checks share this one build.
cargo build --workspace --features kiln-zero/mpi,kiln-trainer/mpi --examples --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for np in 2 3; do
    echo "== mpi_zero, $np ranks"
    if ! timeout 600 mpirun --allow-run-as-root --oversubscribe -np "$np" target/debug/examples/mpi_zero >"$log" 2>&1; then
        cat "$log"
        echo "FAIL: mpi_zero on $np ranks"
        exit 1
    fi
    cat "$log"
    passed=$(grep -c "matches $np thread ranks" "$log" || true)
    if [ "$passed" -ne $((3 * np)) ]; then
        echo "FAIL: $passed of $((3 * np)) rank runs (Two, Three, Three with bf16 reduction) reported a match"
        exit 1
    fi
done
echo "mpi-zero: 3 passed, 0 failed"
