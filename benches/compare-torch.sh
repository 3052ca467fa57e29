#!/usr/bin/env bash
# kiln next to PyTorch on this machine, in one sitting: the reference Llama (benches/compare/
# llama-ref.json: hidden 256, 4 layers, vocab 4096), 8 x 128 tokens per step, AdamW.
#
#   benches/compare-torch.sh [--steps N] [--quick]
#
# Rows: f32 on 1 rank (torch: one process, every core), f32 on 2 ranks (kiln: ZeRO-3 over 2
# thread ranks, with and without activation recompute; torch: DDP over gloo, 2 processes of 1
# thread), bf16 on 1 rank (torch: autocast). Each row prints tokens/s (median step), peak RSS
# and kiln/torch; kiln's peak is broken down into model state (its own report), activations
# (`kiln estimate`'s formula) and the rest (the binary, allocator, temporaries).
#
# Needs torch and transformers outside the repo (the reference README): it uses
# $KILN_TORCH_PYTHON, else ~/.cache/refenv/bin/python. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=30
while [ $# -gt 0 ]; do
    case "$1" in
        --steps) steps="$2"; shift 2 ;;
        --quick) steps=12; shift ;;
        *) echo "usage: $0 [--steps N] [--quick]" >&2; exit 2 ;;
    esac
done
python=${KILN_TORCH_PYTHON:-$HOME/.cache/refenv/bin/python}
if ! "$python" -c "import torch, transformers" 2>/dev/null; then
    echo "compare-torch: no torch + transformers at $python" >&2
    echo "  python3 -m venv ~/.cache/refenv && ~/.cache/refenv/bin/pip install torch transformers" >&2
    exit 1
fi
cargo build --bin kiln >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A text corpus from the repository's own sources (about 1 MB, enough for the steps).
find crates benches -name '*.rs' -print0 | sort -z | xargs -0 cat > "$work/corpus.txt"
warmup=3
[ "$steps" -gt $((warmup + 2)) ] || { echo "compare-torch: --steps must exceed $((warmup + 2))" >&2; exit 2; }

# kiln ROW-NAME [--set ...]: prints "tokens/s peak_rss model_state_bytes activation_bytes".
kiln() {
    local name=$1; shift
    local out="$work/$name"
    /usr/bin/time -f "%M" -o "$out.time" target/debug/kiln train --config benches/compare/job.toml \
        --set "data.paths=[\"$work/corpus.txt\"]" --set "train.steps=$steps" \
        --set "train.output_dir=\"$out\"" --set train.checkpoint_interval=0 "$@" > "$out.log" 2>&1 \
        || { cat "$out.log" >&2; exit 1; }
    "$python" - "$out" "$warmup" <<'EOF'
import json, statistics, sys
out, warmup = sys.argv[1], int(sys.argv[2])
recs = [json.loads(l) for l in open(out + "/metrics.jsonl")]
tps = [r["tokens_per_s"] for r in recs if r["kind"] == "train"][warmup:]
summary = json.load(open(out + "/summary.json"))
rss = int(open(out + ".time").read().split()[-1]) * 1024
print(statistics.median(tps), rss, summary["model_state_bytes"])
EOF
}

torch() {
    "$python" benches/compare/torch_llama.py --warmup $warmup --steps $((steps - warmup)) "$@" 2>/dev/null | tail -n 1
}

activations() {  # ranks dtype-bytes recompute -> bytes per rank of the estimate
    target/debug/kiln estimate --model benches/compare/llama-ref.json -n "$1" --batch $((8 / $1)) --seq 128 \
        --activation-bytes "$2" | "$python" -c "
import re, sys
m = re.search(r'micro-batch[^:]*: ([0-9.]+) GB[^,]*, ([0-9.]+) GB', sys.stdin.read())
print(float(m.group(2 if '$3' == 'on' else 1)) * 1e9)"
}

mb() { "$python" -c "print(f'{$1 / 1e6:.0f}')"; }

printf '| job | kiln tokens/s | torch tokens/s | kiln / torch | kiln peak RSS (model state + activations + rest) | torch peak RSS |\n'
printf '| --- | --- | --- | --- | --- | --- |\n'
row() {  # label kiln-name torch-json kiln-args...
    local label=$1 name=$2 tj=$3; shift 3
    read -r ktps krss kstate < <(kiln "$name" "$@")
    local ttps trss
    ttps=$("$python" -c "import json; print(json.loads('''$tj''')['tokens_per_s'])")
    trss=$("$python" -c "import json; print(max(json.loads('''$tj''')['peak_rss_bytes']))")
    local ranks=1 bytes=4 rec=off
    case "$name" in *2r*) ranks=2 ;; esac
    case "$name" in *bf16*) bytes=2 ;; esac
    case "$name" in *recompute*) rec=on ;; esac
    local act rest
    act=$(activations $ranks $bytes $rec)
    rest=$("$python" -c "print(max(0, $krss - $kstate - $act))")
    printf '| %s | %.0f | %.0f | %.2fx | %s MB (%s + %s + %s) | %s MB |\n' "$label" "$ktps" "$ttps" \
        "$("$python" -c "print($ktps / $ttps)")" "$(mb "$krss")" "$(mb "$kstate")" "$(mb "$act")" \
        "$(mb "$rest")" "$(mb "$trss")"
}

t1=$(torch --ranks 1)
row "f32, 1 rank" f32-1r "$t1"
t2=$(torch --ranks 2)
row "f32, 2 ranks (kiln ZeRO-3, torch DDP)" f32-2r "$t2" --set dist.world_size=2 --set train.micro_batch=4 --set zero.stage=3 --set zero.recompute=false
row "f32, 2 ranks, kiln with recompute" f32-2r-recompute "$t2" --set dist.world_size=2 --set train.micro_batch=4 --set zero.stage=3 --set zero.recompute=true
tb=$(torch --ranks 1 --dtype bf16)
row "bf16, 1 rank (torch autocast)" bf16-1r "$tb" --set precision.compute=\"bf16\"
echo
echo "$(date -u +%Y-%m-%d), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores," \
    "torch $("$python" -c 'import torch; print(torch.__version__)'), $steps steps (median after $warmup)"
