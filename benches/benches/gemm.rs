//! The bf16 matrix product (kiln-gemm, on every path this CPU has) next to the f32 product of
//! the `gemm` crate (what burn-flex and kiln's f32 linear layers use), on 1024³ and the reference
//! Llama's linear shapes (1024 tokens; hidden 256, MLP 688, vocab 4096), both threads.
//! Throughput is in FLOP (2·m·n·k), so criterion's elements/s read as FLOP/s.
//!
//! Run: `cargo bench -p kiln-benches --bench gemm`. torch's `matmul` on the same shapes, for the
//! same sitting: `benches/compare-gemm.sh` (runs this file's shapes through kiln-gemm's
//! `gemm_speed` example and `benches/gemm_torch.py` back to back).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln_gemm::{MatRef, Out, available_isas, bf16, matmul_bf16_on};

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2001) as f32 - 1000.0) * 1e-3)
        .collect()
}

fn gemm(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut group = c.benchmark_group("gemm");
    group.sample_size(10);
    // (label, m, k, n): y = x·Wᵀ for the Llama's projections, and the square product.
    let shapes = [
        ("square", 1024, 1024, 1024),
        ("attn_proj", 1024, 256, 256),
        ("mlp_up", 1024, 256, 688),
        ("mlp_down", 1024, 688, 256),
        ("lm_head", 1024, 256, 4096),
        ("lm_head_dx", 1024, 4096, 256),
    ];
    for (label, m, k, n) in shapes {
        let (a32, b32) = (values(m * k, 1), values(k * n, 2));
        let (a16, b16): (Vec<bf16>, Vec<bf16>) = (
            a32.iter().map(|&x| bf16::from_f32(x)).collect(),
            b32.iter().map(|&x| bf16::from_f32(x)).collect(),
        );
        let mut out = vec![0f32; m * n];
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        group.bench_function(format!("f32_gemm_crate/{label}"), |bench| {
            bench.iter(|| {
                // SAFETY: row-major m×k, k×n and m×n buffers of exactly those sizes.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        out.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a32.as_ptr(),
                        1,
                        k as isize,
                        b32.as_ptr(),
                        1,
                        n as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(threads),
                    )
                };
                black_box(&mut out);
            })
        });
        for isa in available_isas() {
            group.bench_function(format!("bf16_{isa:?}/{label}"), |bench| {
                bench.iter(|| {
                    let c = Out::F32 {
                        data: &mut out,
                        row_stride: n,
                        accumulate: false,
                    };
                    matmul_bf16_on(
                        isa,
                        MatRef::row_major(&a16, m, k),
                        MatRef::row_major(&b16, k, n),
                        c,
                        threads,
                    )
                    .expect("valid shapes");
                    black_box(&mut out);
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, gemm);
criterion_main!(benches);
