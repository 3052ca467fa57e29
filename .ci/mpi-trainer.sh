#!/usr/bin/env bash
# `kiln train` under mpirun: 2 processes detect the MPI environment, train the tiny addition job
# under ZeRO-3 + bf16 (full, and LoRA with lora_dropout), and must log the same losses as the same
# config on 2 thread ranks.
# Installs nothing (Open MPI comes from .ci/run). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# The workspace-wide feature set (as the tests) plus mpi: burn is not rebuilt, and both MPI
# checks share this one build.
cargo build --workspace --features kiln-zero/mpi,kiln-trainer/mpi --examples --bins
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
set_args=(--set train.steps=6 --set train.global_batch=8 --set train.micro_batch=2
          --set data.digits=2 --set data.seq_len=16 --set data.eval_examples=8
          --set zero.stage=3 --set precision.compute=bf16)
losses() { grep -o '"loss":[^,}]*' "$1/metrics.jsonl"; }

# compare NAME [--set k=v ...]: the job on 2 MPI processes and on 2 thread ranks.
compare() {
    local name=$1
    shift
    echo "== $name: kiln train, 2 MPI processes"
    if ! timeout 600 mpirun --allow-run-as-root --oversubscribe -np 2 target/debug/kiln train \
            "${set_args[@]}" "$@" --set train.output_dir="$out/$name-mpi" >"$out/$name-mpi.log" 2>&1; then
        cat "$out/$name-mpi.log"
        echo "FAIL: $name: kiln train under mpirun"
        exit 1
    fi
    cat "$out/$name-mpi.log"
    grep -q "2 ranks (mpi)" "$out/$name-mpi.log" || { echo "FAIL: $name did not use the MPI backend"; exit 1; }

    echo "== $name: kiln train, 2 thread ranks"
    target/debug/kiln train "${set_args[@]}" "$@" --set dist.world_size=2 \
        --set train.output_dir="$out/$name-threads" >"$out/$name-threads.log" 2>&1 \
        || { cat "$out/$name-threads.log"; exit 1; }

    if ! diff <(losses "$out/$name-mpi") <(losses "$out/$name-threads"); then
        echo "FAIL: $name: MPI and thread-rank losses differ"
        exit 1
    fi
    echo "$name: $(losses "$out/$name-mpi" | wc -l) steps, identical losses"
}

compare full
compare lora-dropout --set lora.enabled=true --set lora.dropout=0.1 \
    --set 'lora.target_modules=["q_proj", "v_proj", "down_proj"]' --set optim.lr=1e-2
echo "mpi-trainer: 2 passed, 0 failed"
