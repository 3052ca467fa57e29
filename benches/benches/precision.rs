//! kiln-precision kernels next to a plain memcpy of the same buffer.
//!
//! Throughput counts the bytes of the f32 buffer (4 per element) for every kernel, so the GB/s are
//! directly comparable: memcpy reads and writes 4 B/elem, casts read 4 and write 2, the fused
//! unscale reads and writes 4 in place. Run: `cargo bench -p kiln-benches --bench precision`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use half::{bf16, f16};
use kiln_precision::{f32_to_bf16, f32_to_f16, unscale_and_check};

const MB: usize = 1 << 20;

fn precision(c: &mut Criterion) {
    let mut group = c.benchmark_group("precision");
    group.sample_size(20);
    for mb in [1usize, 16, 64] {
        let n = mb * MB / 4;
        let src: Vec<f32> = (0..n).map(|i| (i as f32 * 1e-3).sin() * 100.0).collect();
        let mut dst32 = vec![0f32; n];
        let mut dst16 = vec![f16::ZERO; n];
        let mut dstb16 = vec![bf16::ZERO; n];
        let mut grads = src.clone();
        group.throughput(Throughput::Bytes((n * 4) as u64));
        group.bench_function(format!("memcpy_f32/{mb}MB"), |b| {
            b.iter(|| dst32.copy_from_slice(black_box(&src)))
        });
        group.bench_function(format!("cast_f32_to_bf16/{mb}MB"), |b| {
            b.iter(|| f32_to_bf16(black_box(&src), &mut dstb16).unwrap())
        });
        group.bench_function(format!("cast_f32_to_f16/{mb}MB"), |b| {
            b.iter(|| f32_to_f16(black_box(&src), &mut dst16).unwrap())
        });
        // Multiplying by 1.0 keeps the buffer unchanged across iterations.
        group.bench_function(format!("unscale_check_f32/{mb}MB"), |b| {
            b.iter(|| black_box(unscale_and_check(black_box(&mut grads), black_box(1.0))))
        });
    }
    group.finish();
}

criterion_group!(benches, precision);
criterion_main!(benches);
