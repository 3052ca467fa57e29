#!/usr/bin/env bash
# The bf16 matrix product next to the f32 one and to torch's, in one sitting: kiln-gemm's
# `gemm_speed` example (every kiln-gemm path and the `gemm` crate's f32 product, 1 and 2
# threads) and `benches/gemm_torch.py` (torch.matmul in bf16 and f32) on the same shapes.
#
#   benches/compare-gemm.sh [SECONDS_PER_POINT [FILTER]]
#
# Needs torch outside the repo (the reference README): $KILN_TORCH_PYTHON, else
# ~/.cache/refenv/bin/python. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${KILN_TORCH_PYTHON:-$HOME/.cache/refenv/bin/python}
"$python" -c "import torch" 2>/dev/null || {
    echo "compare-gemm: no torch at $python (python3 -m venv ~/.cache/refenv && ~/.cache/refenv/bin/pip install torch)" >&2
    exit 1
}
cargo build -p kiln-gemm --release --example gemm_speed >&2
echo "## kiln-gemm and the gemm crate (GFLOP/s)"
target/release/examples/gemm_speed "$@"
echo
echo "## torch $("$python" -c 'import torch; print(torch.__version__)') matmul (GFLOP/s)"
"$python" benches/gemm_torch.py "$@"
echo
echo "$(date -u +%Y-%m-%d), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
