#!/usr/bin/env bash
# Peak memory of a real-size job next to what `kiln estimate` predicts for it: the 160M Llama
# of benches/memory/job.toml under ZeRO-3 on 2 thread ranks (bf16, 2 x 256 tokens per rank).
# RSS is sampled every 0.2 s and split into phases (setup, training steps, the end: checkpoint
# and evaluation); the process holds both ranks, so a rank's share is half of it.
#
#   benches/memory-160m.sh [--steps N]
#
# Not part of CI (a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
steps=4
[ "${1:-}" = "--steps" ] && steps=$2
cargo build --bin kiln >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
find crates benches -name '*.rs' -print0 | sort -z | xargs -0 cat > "$work/corpus.txt"
target/debug/kiln train --config benches/memory/job.toml --set "data.paths=[\"$work/corpus.txt\"]" \
    --set "train.steps=$steps" --set "train.output_dir=\"$work/run\"" > "$work/log" 2>&1 &
pid=$!
# phase: 0 until the first step's line, 1 while steps print, 2 after the last step.
while kill -0 $pid 2>/dev/null; do
    rss=$(awk '/VmRSS/{print $2}' /proc/$pid/status 2>/dev/null || true)
    phase=0
    grep -q "tok/s" "$work/log" && phase=1
    grep -q "^$steps/$steps\|kiln: $steps steps" <(tr '\r' '\n' < "$work/log") && phase=2
    [ -n "$rss" ] && echo "$phase $rss" >> "$work/rss"
    sleep 0.2
done
wait $pid || { cat "$work/log" >&2; exit 1; }
estimate=$(target/debug/kiln estimate --model benches/memory/llama-160m.json -n 2 --stage 3 --batch 2 --seq 256)
echo "$estimate" | sed -n '/^| 3 /p;/^activations/p'
python3 - "$work/rss" "$estimate" <<'PY'
import re, sys
rows = [l.split() for l in open(sys.argv[1])]
est = sys.argv[2]
state = float(re.search(r"^\| 3 \(FSDP\) \|.*\| ([0-9.]+) \|$", est, re.M).group(1))
act = float(re.search(r"([0-9.]+) GB with per-unit recompute", est).group(1))
per_rank = state + act
print(f"estimate per rank: {state:.2f} GB model state + {act:.3f} GB activations = {per_rank:.2f} GB")
print("| phase | peak RSS (process) | per rank | / estimate |")
print("| --- | --- | --- | --- |")
for phase, name in [("0", "setup"), ("1", "training steps"), ("2", "end (checkpoint, evaluation)")]:
    kb = [int(r[1]) for r in rows if r[0] == phase]
    if kb:
        gb = max(kb) * 1024 / 1e9
        print(f"| {name} | {gb:.2f} GB | {gb / 2:.2f} GB | {gb / 2 / per_rank:.2f}x |")
PY
grep "model state" "$work/log" || true
