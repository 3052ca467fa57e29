//! GFLOP/s of every kiln-gemm path next to the f32 product of the `gemm` crate (the one burn uses
//! on the CPU), at 1 and 2 threads, on Llama linear-layer shapes and 1024³.
//!
//! ```text
//! cargo run -p kiln-gemm --release --example gemm_speed [-- SECONDS_PER_POINT [FILTER]]
//! ```
//!
//! Each point runs the product repeatedly for about SECONDS_PER_POINT (default 0.3) after a
//! warm-up and reports the best repetition (the least disturbed by other work on the machine).
//! FILTER keeps only the shapes whose label contains it. Every path writes an f32 C, except
//! `best→bf16`: the best path writing a bf16 C. `bf16/f32` is the best path's GFLOP/s (f32 C)
//! over the f32 gemm's at the same thread count.

use std::hint::black_box;
use std::time::{Duration, Instant};

use gemm::Parallelism;
use kiln_gemm::{Isa, MatRef, Out, available_isas, bf16, matmul_bf16_on};

/// One product to time: C[m×n] = A[m×k]·B[k×n] with the given strides into row-major C.
struct Case {
    label: String,
    m: usize,
    k: usize,
    n: usize,
    /// (row_stride, col_stride) of A and B inside their buffers.
    a_strides: (usize, usize),
    b_strides: (usize, usize),
}

/// The three linear-layer products for x[M×K], W[N×K] (Hugging Face's [out, in]), dy[M×N].
fn linear_cases(tokens: usize, d_in: usize, d_out: usize) -> [Case; 3] {
    let (m, k, n) = (tokens, d_in, d_out);
    [
        // y[M×N] = x · Wᵀ: B(k, n) = W[n, k].
        Case {
            label: format!("fwd  x·Wᵀ  M={m} K={k} N={n}"),
            m,
            k,
            n,
            a_strides: (k, 1),
            b_strides: (1, k),
        },
        // dx[M×K] = dy · W: both row-major.
        Case {
            label: format!("dx   dy·W  M={m} K={k} N={n}"),
            m,
            k: n,
            n: k,
            a_strides: (n, 1),
            b_strides: (k, 1),
        },
        // dW[N×K] = dyᵀ · x: A(i, t) = dy[t, i].
        Case {
            label: format!("dW  dyᵀ·x  M={m} K={k} N={n}"),
            m: n,
            k: m,
            n: k,
            a_strides: (1, n),
            b_strides: (k, 1),
        },
    ]
}

/// The best time of `f` over repetitions filling about `budget` (after one warm-up call).
fn best_time(budget: Duration, mut f: impl FnMut()) -> Duration {
    f();
    let start = Instant::now();
    let mut best = Duration::MAX;
    let mut reps = 0;
    while reps < 3 || (start.elapsed() < budget && reps < 10_000) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
        reps += 1;
    }
    best
}

fn gflops(case: &Case, t: Duration) -> f64 {
    2.0 * (case.m * case.k * case.n) as f64 / t.as_secs_f64() / 1e9
}

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: f64 = args
        .next()
        .map_or(0.3, |s| s.parse().expect("seconds per point"));
    let filter = args.next().unwrap_or_default();
    let budget = Duration::from_secs_f64(seconds);
    let isas = available_isas();

    let mut cases = Vec::new();
    for (k, n) in [(256, 256), (256, 688), (688, 256), (256, 4096)] {
        cases.extend(linear_cases(1024, k, n));
    }
    cases.push(Case {
        label: "square     M=K=N=1024".into(),
        m: 1024,
        k: 1024,
        n: 1024,
        a_strides: (1024, 1),
        b_strides: (1024, 1),
    });
    cases.retain(|c| c.label.contains(&filter));

    println!("kiln-gemm GFLOP/s (best of repetitions over {seconds} s per point)");
    print!("{:<30} {:>3}", "product", "thr");
    for isa in &isas {
        print!(" {:>11}", format!("{isa:?}"));
    }
    println!(" {:>11} {:>11} {:>9}", "best→bf16", "f32 gemm", "bf16/f32");
    for case in &cases {
        let (m, k, n) = (case.m, case.k, case.n);
        // Buffers sized for the strides (both layouts here are dense).
        let a_len = (m - 1) * case.a_strides.0 + (k - 1) * case.a_strides.1 + 1;
        let b_len = (k - 1) * case.b_strides.0 + (n - 1) * case.b_strides.1 + 1;
        let a16: Vec<bf16> = (0..a_len)
            .map(|i| bf16::from_f32(((i % 97) as f32 - 48.0) / 64.0))
            .collect();
        let b16: Vec<bf16> = (0..b_len)
            .map(|i| bf16::from_f32(((i % 89) as f32 - 44.0) / 64.0))
            .collect();
        let a32: Vec<f32> = a16.iter().map(|v| v.to_f32()).collect();
        let b32: Vec<f32> = b16.iter().map(|v| v.to_f32()).collect();
        let a = MatRef {
            data: &a16,
            rows: m,
            cols: k,
            row_stride: case.a_strides.0,
            col_stride: case.a_strides.1,
        };
        let b = MatRef {
            data: &b16,
            rows: k,
            cols: n,
            row_stride: case.b_strides.0,
            col_stride: case.b_strides.1,
        };
        let mut c = vec![0f32; m * n];
        let mut h = vec![bf16::ZERO; m * n];
        for threads in [1, 2] {
            print!("{:<30} {:>3}", case.label, threads);
            let mut best_bf16 = 0f64;
            for &isa in &isas {
                let t = best_time(budget, || {
                    let out = Out::F32 {
                        data: &mut c,
                        row_stride: n,
                        accumulate: false,
                    };
                    matmul_bf16_on(isa, a, b, out, threads).expect("valid product");
                    black_box(&mut c);
                });
                let g = gflops(case, t);
                best_bf16 = best_bf16.max(g);
                print!(" {g:>11.1}");
            }
            // The best path again, rounding C to bf16 (what a bf16 model's linear layer keeps).
            let t = best_time(budget, || {
                let out = Out::Bf16 {
                    data: &mut h,
                    row_stride: n,
                };
                matmul_bf16_on(isas[0], a, b, out, threads).expect("valid product");
                black_box(&mut h);
            });
            print!(" {:>11.1}", gflops(case, t));
            let par = if threads == 1 {
                Parallelism::None
            } else {
                Parallelism::Rayon(threads)
            };
            let t = best_time(budget, || {
                // SAFETY: the pointers cover m × k, k × n and m × n elements at these strides
                // (the buffers were sized for them), and C is not aliased.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        c.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a32.as_ptr(),
                        case.a_strides.1 as isize,
                        case.a_strides.0 as isize,
                        b32.as_ptr(),
                        case.b_strides.1 as isize,
                        case.b_strides.0 as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    )
                };
                black_box(&mut c);
            });
            let g = gflops(case, t);
            println!(" {g:>11.1} {:>8.2}x", best_bf16 / g);
        }
    }
    if !isas.contains(&Isa::Amx) {
        println!("(no AMX on this machine)");
    }
}
