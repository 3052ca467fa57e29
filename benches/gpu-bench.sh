#!/usr/bin/env bash
# kiln next to PyTorch on one NVIDIA GPU, in one command: builds kiln with burn's `vulkan`
# backend (and `wgpu`; `cuda` too with --cuda, which needs internet at build time for
# cubecl's LLVM bundle), trains a 1.1B Llama (TinyLlama's shape: hidden 2048, 22 layers,
# 32 heads, 4 kv heads, vocab 32000) for a few steps on each, and prints tokens/s, peak GPU
# memory and MFU next to torch (transformers' LlamaForCausalLM + AdamW, eager) on the same GPU.
#
#   benches/gpu-bench.sh [--steps N] [--batch B] [--seq S] [--dtype f32|bf16] [--cuda]
#                        [--peak-tflops T]
#
# Defaults: 12 steps (median after 3), 16 x 1024 tokens per step (sized for an 80-141 GB GPU;
# lower --batch on a smaller one), f32 on both sides (torch without TF32, as kiln's products).
# MFU = (6·N + 12·layers·hidden·seq) FLOPs per token x tokens/s / the GPU's peak for the dtype
# (N: every parameter but the input embedding), the peak from --peak-tflops or the GPU's name.
# Peak memory: the most `nvidia-smi` reported used on the GPU while the job ran (both sides),
# and torch's own max_memory_allocated.
#
# Needs nvidia-smi, a Vulkan driver (the NVIDIA one: libvulkan1 + the driver's ICD), and torch
# with CUDA + transformers at $KILN_TORCH_PYTHON (else ~/.cache/refenv/bin/python). Not part of
# CI (it has no GPU); kiln's GPU path is tested there on lavapipe (README, "GPU backends").
set -euo pipefail
cd "$(dirname "$0")/.."
steps=12 batch=16 seq=1024 dtype=f32 cuda=0 peak=""
while [ $# -gt 0 ]; do
    case "$1" in
        --steps) steps="$2"; shift 2 ;;
        --batch) batch="$2"; shift 2 ;;
        --seq) seq="$2"; shift 2 ;;
        --dtype) dtype="$2"; shift 2 ;;
        --cuda) cuda=1; shift ;;
        --peak-tflops) peak="$2"; shift 2 ;;
        *) echo "usage: $0 [--steps N] [--batch B] [--seq S] [--dtype f32|bf16] [--cuda] [--peak-tflops T]" >&2; exit 2 ;;
    esac
done
warmup=3
[ "$steps" -gt $((warmup + 2)) ] || { echo "gpu-bench: --steps must exceed $((warmup + 2))" >&2; exit 2; }
command -v nvidia-smi >/dev/null || { echo "gpu-bench: no nvidia-smi (this needs an NVIDIA GPU)" >&2; exit 1; }
python=${KILN_TORCH_PYTHON:-$HOME/.cache/refenv/bin/python}
if ! "$python" -c "import torch, transformers; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "gpu-bench: no torch with CUDA + transformers at $python" >&2
    echo "  python3 -m venv ~/.cache/refenv && ~/.cache/refenv/bin/pip install torch transformers" >&2
    exit 1
fi
gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader -i 0)
echo "gpu-bench: $gpu; $batch x $seq tokens per step, $dtype, $steps steps" >&2

features=vulkan
[ "$cuda" = 1 ] && features=vulkan,cuda
cargo build --bin kiln --features "$features" >&2

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/model.json" <<'EOF'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
 "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
 "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 4096,
 "rms_norm_eps": 1e-5, "tie_word_embeddings": false,
 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "hidden_act": "silu"}
EOF
# A text corpus from the repository's sources, repeated until it covers every step's tokens.
find crates benches -name '*.rs' -print0 | sort -z | xargs -0 cat > "$work/one.txt"
need=$(( (steps + 2) * batch * (seq + 1) ))
: > "$work/corpus.txt"
while [ "$(stat -c %s "$work/corpus.txt")" -lt "$need" ]; do cat "$work/one.txt" >> "$work/corpus.txt"; done

# The most memory nvidia-smi reports used on GPU 0 while "$@" runs, in bytes (to $work/peak).
with_peak() {
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 200 > "$work/smi" &
    local smi=$!
    local rc=0
    "$@" || rc=$?
    kill "$smi" 2>/dev/null || true
    wait "$smi" 2>/dev/null || true
    sort -n "$work/smi" | tail -n 1 | awk '{print $1 * 1048576}' > "$work/peak"
    return $rc
}

# kiln DEVICE: prints "tokens/s peak_gpu_bytes".
kiln() {
    local out="$work/kiln-$1"
    with_peak target/debug/kiln train --config benches/compare/job.toml \
        --set "model.config=\"$work/model.json\"" --set "dist.device=\"$1\"" \
        --set "data.paths=[\"$work/corpus.txt\"]" --set "data.seq_len=$seq" \
        --set "train.global_batch=$batch" --set "train.micro_batch=$batch" \
        --set "train.steps=$steps" --set train.log_interval=1 \
        --set "precision.compute=\"$dtype\"" --set "train.output_dir=\"$out\"" > "$out.log" 2>&1 \
        || { cat "$out.log" >&2; return 1; }
    "$python" - "$out" "$warmup" "$(cat "$work/peak")" <<'EOF'
import json, statistics, sys
out, warmup, peak = sys.argv[1], int(sys.argv[2]), sys.argv[3]
recs = [json.loads(l) for l in open(out + "/metrics.jsonl")]
tps = [r["tokens_per_s"] for r in recs if r["kind"] == "train"][warmup:]
print(statistics.median(tps), peak)
EOF
}

torch_dtype=float32
[ "$dtype" = bf16 ] && torch_dtype=bf16
with_peak "$python" benches/compare/torch_llama.py --device cuda --config "$work/model.json" \
    --batch "$batch" --seq "$seq" --dtype "$torch_dtype" --warmup $warmup \
    --steps $((steps - warmup)) > "$work/torch.json"
torch_peak=$(cat "$work/peak")

"$python" - "$work/model.json" "$seq" "$dtype" "$gpu" "$peak" > "$work/flops" <<'EOF'
import json, sys
cfg, seq, dtype, gpu, peak = json.load(open(sys.argv[1])), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
h, i, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
n = L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h + v * h  # blocks, final norm, head
flops = 6 * n + 12 * L * h * seq
# Dense peaks (no sparsity), TFLOP/s: FP32 on the CUDA cores, BF16 on the tensor cores.
table = {"H200": (67, 989), "H100 SXM": (67, 989), "H100 PCIe": (51, 756), "H100": (67, 989),
         "A100": (19.5, 312), "L40S": (91.6, 362), "A10": (31.2, 125), "L4": (30.3, 121)}
if peak:
    tflops = float(peak)
else:
    tflops = next((p for k, p in table.items() if k in gpu), (0, 0))[dtype == "bf16"]
print(flops, tflops * 1e12)
EOF
read -r flops peak_flops < "$work/flops"
mfu() { "$python" -c "p = $peak_flops; print(f'{100 * $flops * $1 / p:.1f}%' if p else 'n/a (--peak-tflops)')"; }
gb() { "$python" -c "print(f'{$1 / 1e9:.1f}')"; }

printf '| job (%s) | tokens/s | peak GPU memory (nvidia-smi) | MFU |\n' "$dtype"
printf '| --- | --- | --- | --- |\n'
ttps=$("$python" -c "import json; print(json.load(open('$work/torch.json'))['tokens_per_s'])")
talloc=$("$python" -c "import json; print(json.load(open('$work/torch.json'))['peak_gpu_bytes'])")
printf '| torch %s (eager) | %.0f | %s GB (allocated %s GB) | %s |\n' \
    "$("$python" -c 'import torch; print(torch.__version__)')" "$ttps" "$(gb "$torch_peak")" "$(gb "$talloc")" "$(mfu "$ttps")"
for device in vulkan wgpu $([ "$cuda" = 1 ] && echo cuda); do
    if read -r ktps kpeak < <(kiln "$device"); then
        printf '| kiln, dist.device = %s | %.0f (%.2fx torch) | %s GB | %s |\n' "$device" "$ktps" \
            "$("$python" -c "print($ktps / $ttps)")" "$(gb "$kpeak")" "$(mfu "$ktps")"
    else
        printf '| kiln, dist.device = %s | failed (log above) | | |\n' "$device"
    fi
done
echo
echo "$(date -u +%Y-%m-%d), $gpu, $(nproc) cores, $batch x $seq tokens per step," \
    "$steps steps (median after $warmup), $flops FLOPs per token"
