#!/usr/bin/env python3
"""torch.matmul GFLOP/s on the shapes of kiln-gemm's `gemm_speed` example, in bf16 and f32.

    ~/.cache/refenv/bin/python benches/gemm_torch.py [SECONDS_PER_POINT [FILTER]]

The same products as `cargo run -p kiln-gemm --release --example gemm_speed`: the three
linear-layer forms for x[M×K], W[N×K] (Hugging Face's [out, in]) and dy[M×N] with M = 1024
tokens, and a square 1024³, each written into a preallocated output (`out=`), as the Rust
benchmark writes into a preallocated C. bf16 products return bf16 (oneDNN uses AMX where the CPU
has it); f32 products go to MKL. Each point is the best repetition over about SECONDS_PER_POINT
(default 0.3) after a warm-up, at 1 and 2 threads (torch.set_num_threads).
"""

import sys
import time

import torch


def cases():
    """(label, make(dtype) -> (a, b)) for every product, A and B as the views torch sees."""
    out = []
    for k, n in [(256, 256), (256, 688), (688, 256), (256, 4096)]:
        m = 1024

        def fwd(dtype, m=m, k=k, n=n):
            x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            return x, w.t()  # y = x · Wᵀ

        def dx(dtype, m=m, k=k, n=n):
            dy, w = torch.randn(m, n, dtype=dtype), torch.randn(n, k, dtype=dtype)
            return dy, w  # dx = dy · W

        def dw(dtype, m=m, k=k, n=n):
            dy, x = torch.randn(m, n, dtype=dtype), torch.randn(m, k, dtype=dtype)
            return dy.t(), x  # dW = dyᵀ · x

        out.append((f"fwd  x·Wᵀ  M={m} K={k} N={n}", fwd))
        out.append((f"dx   dy·W  M={m} K={k} N={n}", dx))
        out.append((f"dW  dyᵀ·x  M={m} K={k} N={n}", dw))
    out.append(("square     M=K=N=1024", lambda dtype: (torch.randn(1024, 1024, dtype=dtype),) * 2))
    return out


def best_time(budget, f):
    f()
    start, best, reps = time.perf_counter(), float("inf"), 0
    while reps < 3 or (time.perf_counter() - start < budget and reps < 10_000):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
        reps += 1
    return best


def main():
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 0.3
    flt = sys.argv[2] if len(sys.argv) > 2 else ""
    torch.manual_seed(0)
    print(f"torch {torch.__version__} matmul GFLOP/s (best of repetitions over {budget} s per point)")
    print(f"{'product':<30} {'thr':>3} {'bf16':>9} {'f32':>9} {'bf16/f32':>9}")
    for label, make in cases():
        if flt not in label:
            continue
        for threads in [1, 2]:
            torch.set_num_threads(threads)
            g = {}
            for dtype in [torch.bfloat16, torch.float32]:
                a, b = make(dtype)
                c = torch.empty(a.shape[0], b.shape[1], dtype=dtype)
                flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
                g[dtype] = flops / best_time(budget, lambda: torch.matmul(a, b, out=c)) / 1e9
            bf, f = g[torch.bfloat16], g[torch.float32]
            print(f"{label:<30} {threads:>3} {bf:>9.1f} {f:>9.1f} {bf / f:>8.2f}x")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
