//! Every path in `available_isas()`, forced one by one, against an f64 reference computed from
//! the same bf16 inputs, over odd shapes, transposed and strided operands and all three outputs.

use kiln_gemm::{Isa, MatRef, Out, available_isas, bf16, matmul_bf16, matmul_bf16_on};

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [-2, 2), rounded to bf16 (never subnormal: the hardware paths flush those).
    fn bf16(&mut self) -> bf16 {
        bf16::from_f32((self.next() >> 40) as f32 / (1u64 << 22) as f32 - 2.0)
    }

    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 22) as f32 - 2.0
    }
}

/// How an operand is laid out in memory.
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// Rows `cols` apart, columns contiguous.
    RowMajor,
    /// Stored as its transpose (columns contiguous in the other direction): swapped strides.
    Transposed,
    /// A sub-matrix of a bigger row-major buffer: an offset and a row stride of cols + 5.
    Sub,
    /// A transposed sub-matrix of a bigger buffer.
    SubTransposed,
    /// Neither stride is 1 (every other element of a row-major buffer): the generic packers.
    Gapped,
}

const LAYOUTS: [Layout; 5] = [
    Layout::RowMajor,
    Layout::Transposed,
    Layout::Sub,
    Layout::SubTransposed,
    Layout::Gapped,
];

/// A random `rows × cols` operand stored in `layout`.
struct Operand {
    data: Vec<bf16>,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl Operand {
    fn random(rows: usize, cols: usize, layout: Layout, rng: &mut Rng) -> Operand {
        let (offset, row_stride, col_stride, len) = match layout {
            Layout::RowMajor => (0, cols, 1, rows * cols),
            Layout::Transposed => (0, 1, rows, rows * cols),
            Layout::Sub => (3, cols + 5, 1, 3 + rows * (cols + 5)),
            Layout::SubTransposed => (7, 1, rows + 2, 7 + cols * (rows + 2)),
            Layout::Gapped => (1, 2 * cols + 1, 2, 1 + rows * (2 * cols + 1)),
        };
        let data: Vec<bf16> = (0..len).map(|_| rng.bf16()).collect();
        Operand {
            data: data[offset..].to_vec(),
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    fn mat(&self) -> MatRef<'_, bf16> {
        MatRef {
            data: &self.data,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }

    fn at(&self, i: usize, j: usize) -> f64 {
        f64::from(self.data[i * self.row_stride + j * self.col_stride].to_f32())
    }
}

/// The reference: C = A·B in f64 (exact products; the f64 sum's own error is ~2⁻⁵³ relative, far
/// below the bound), and Σ|a||b| per element for the error bound.
fn reference(a: &Operand, b: &Operand) -> (Vec<f64>, Vec<f64>) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let (mut c, mut abs) = (vec![0f64; m * n], vec![0f64; m * n]);
    for i in 0..m {
        for kk in 0..k {
            let x = a.at(i, kk);
            for j in 0..n {
                let p = x * b.at(kk, j);
                c[i * n + j] += p;
                abs[i * n + j] += p.abs();
            }
        }
    }
    (c, abs)
}

/// The f32-accumulation error bound for one element of C = C₀ + Σₖ aₖbₖ.
///
/// Each product of two bf16 (8-bit significands) is exact in f32 (24 bits). Summing the k products
/// and C₀ in f32, in any order or grouping (the kernels use pairs, tiles and K chunks, and the
/// partial sums pass through C exactly as f32), takes at most k roundings on the way to the
/// result, each off by at most 2⁻²⁴ of a partial sum whose magnitude is at most
/// |C₀| + Σ|a||b|; so |c − ref| ≤ k·2⁻²⁴·(|C₀| + Σ|a||b|) to first order. The bound below allows
/// 4× that (2⁻²²) for the second-order term and the hardware's rounding of its internal sums.
fn bound(k: usize, c0: f64, abs: f64) -> f64 {
    (k as f64 + 1.0) * (-22f64).exp2() * (c0.abs() + abs) + f64::from(f32::MIN_POSITIVE)
}

/// Row stride of the outputs: wider than n, so writes past a row's end would show.
fn out_stride(n: usize) -> usize {
    n + 3
}

/// What one product left in a strided output, and the untouched gaps checked.
fn check_gaps<T: PartialEq + std::fmt::Debug>(out: &[T], m: usize, n: usize, fill: T, what: &str) {
    for (idx, v) in out.iter().enumerate() {
        let (i, j) = (idx / out_stride(n), idx % out_stride(n));
        if i >= m || j >= n {
            assert_eq!(*v, fill, "{what}: C's padding at ({i}, {j}) was written");
        }
    }
}

/// Runs C = A·B on `isa` into all three outputs and checks them against the reference; returns
/// the plain f32 result (m × out_stride(n)) for the cross-path comparison.
fn check_product(
    isa: Isa,
    (a, b): (&Operand, &Operand),
    (want, abs): (&[f64], &[f64]),
    threads: usize,
    rng: &mut Rng,
) -> Vec<f32> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let what = format!("{isa:?} m={m} k={k} n={n} threads={threads}");
    let len = if m == 0 {
        0
    } else {
        (m - 1) * out_stride(n) + n
    } + 2;
    let sentinel = -1234.5f32;

    // C = A·B into garbage.
    let mut c = vec![sentinel; len];
    for i in 0..m {
        c[i * out_stride(n)..][..n].fill(f32::NAN);
    }
    let out = Out::F32 {
        data: &mut c,
        row_stride: out_stride(n),
        accumulate: false,
    };
    matmul_bf16_on(isa, a.mat(), b.mat(), out, threads).unwrap();
    check_gaps(&c, m, n, sentinel, &what);
    for i in 0..m {
        for j in 0..n {
            let (got, want, abs) = (c[i * out_stride(n) + j], want[i * n + j], abs[i * n + j]);
            let err = (f64::from(got) - want).abs();
            assert!(
                err <= bound(k, 0.0, abs),
                "{what}: C({i}, {j}) = {got}, want {want}"
            );
        }
    }

    // C += A·B onto random values.
    let mut acc = vec![sentinel; len];
    let mut c0 = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            c0[i * n + j] = rng.f32();
            acc[i * out_stride(n) + j] = c0[i * n + j];
        }
    }
    let out = Out::F32 {
        data: &mut acc,
        row_stride: out_stride(n),
        accumulate: true,
    };
    matmul_bf16_on(isa, a.mat(), b.mat(), out, threads).unwrap();
    check_gaps(&acc, m, n, sentinel, &what);
    for i in 0..m {
        for j in 0..n {
            let got = acc[i * out_stride(n) + j];
            let c0 = f64::from(c0[i * n + j]);
            let want = c0 + want[i * n + j];
            let err = (f64::from(got) - want).abs();
            let ok = err <= bound(k, c0, abs[i * n + j]);
            assert!(ok, "{what}: accumulated C({i}, {j}) = {got}, want {want}");
        }
    }

    // C = bf16(A·B): the f32 result rounded once, to nearest even.
    let fill = bf16::from_f32(sentinel);
    let mut h = vec![fill; len];
    for i in 0..m {
        h[i * out_stride(n)..][..n].fill(bf16::NAN);
    }
    let out = Out::Bf16 {
        data: &mut h,
        row_stride: out_stride(n),
    };
    matmul_bf16_on(isa, a.mat(), b.mat(), out, threads).unwrap();
    check_gaps(&h, m, n, fill, &what);
    for i in 0..m {
        for j in 0..n {
            let idx = i * out_stride(n) + j;
            let rounded = bf16::from_f32(c[idx]);
            assert_eq!(
                h[idx].to_bits(),
                rounded.to_bits(),
                "{what}: bf16 C({i}, {j})"
            );
        }
    }
    c
}

/// The shapes: rows 1, 3, 17, 255, 1024; k below, at and above 32 and not a multiple of it, and
/// above one K chunk (1024 values, so partial sums go through C and through the scratch block);
/// n odd and even; some big enough for several blocks and workers.
const SHAPES: [(usize, usize, usize); 16] = [
    (1, 1, 1),
    (1, 33, 7),
    (3, 2, 5),
    (3, 31, 16),
    (3, 64, 33),
    (17, 7, 64),
    (17, 100, 1),
    (17, 300, 34),
    (40, 96, 40),
    (255, 45, 66),
    (255, 64, 31),
    (1024, 33, 18),
    (1024, 3, 64),
    (70, 600, 48),
    (64, 1100, 64),
    (33, 1057, 70),
];

/// All paths, every shape, every layout of A (and a rotating layout of B), 1 and 2 threads;
/// the paths also agree with each other.
#[test]
fn every_path_matches_the_f64_reference() {
    let isas = available_isas();
    assert_eq!(isas.last(), Some(&Isa::Portable));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for (case, &(m, k, n)) in SHAPES.iter().enumerate() {
        for (l, &la) in LAYOUTS.iter().enumerate() {
            let lb = LAYOUTS[(l + case) % LAYOUTS.len()];
            let a = Operand::random(m, k, la, &mut rng);
            let b = Operand::random(k, n, lb, &mut rng);
            let threads = 1 + (l + case) % 2;
            let (want, abs) = reference(&a, &b);
            let results: Vec<(Isa, Vec<f32>)> = isas
                .iter()
                .map(|&isa| {
                    let c = check_product(isa, (&a, &b), (&want, &abs), threads, &mut rng);
                    (isa, c)
                })
                .collect();
            // The paths agree: each is within `bound` of the reference, so within twice it of
            // each other; checked directly so a drift between paths is named.
            for (isa, c) in &results[1..] {
                for i in 0..m {
                    for j in 0..n {
                        let idx = i * out_stride(n) + j;
                        let (x, y) = (f64::from(c[idx]), f64::from(results[0].1[idx]));
                        let tol = 2.0 * bound(k, 0.0, abs[i * n + j]);
                        let what = format!("{isa:?} vs {:?} ({la:?}, {lb:?})", results[0].0);
                        assert!((x - y).abs() <= tol, "{what} m={m} k={k} n={n}: ({i}, {j})");
                    }
                }
            }
        }
    }
}

/// Big enough to go parallel on every path (above each path's threshold, 2²⁴ multiply-adds for
/// AMX) with several blocks and a ragged edge in every dimension, in the three linear-layer forms.
#[test]
fn linear_layer_forms_on_two_threads() {
    let mut rng = Rng(42);
    let (tokens, d_in, d_out) = (300, 290, 200);
    let x = Operand::random(tokens, d_in, Layout::RowMajor, &mut rng);
    let w = Operand::random(d_out, d_in, Layout::RowMajor, &mut rng);
    let dy = Operand::random(tokens, d_out, Layout::RowMajor, &mut rng);
    let t = |o: &Operand| Operand {
        data: o.data.clone(),
        rows: o.cols,
        cols: o.rows,
        row_stride: o.col_stride,
        col_stride: o.row_stride,
    };
    let forms = [
        ("y = x·Wᵀ", &x, &t(&w)),
        ("dx = dy·W", &dy, &w),
        ("dW = dyᵀ·x", &t(&dy), &x),
    ];
    for (name, a, b) in forms {
        let (want, abs) = reference(a, b);
        for isa in available_isas() {
            let c = check_product(isa, (a, b), (&want, &abs), 2, &mut rng);
            assert!(c.iter().all(|v| v.is_finite()), "{name} on {isa:?}");
        }
    }
}

/// k = 0: C = 0 for the overwriting outputs, unchanged when accumulating; m or n = 0: nothing.
#[test]
fn empty_dimensions() {
    let one = [bf16::ONE; 4];
    for isa in available_isas() {
        let a = MatRef {
            data: &one,
            rows: 2,
            cols: 0,
            row_stride: 0,
            col_stride: 1,
        };
        let b = MatRef {
            data: &one,
            rows: 0,
            cols: 2,
            row_stride: 2,
            col_stride: 1,
        };
        let mut c = [7f32; 4];
        matmul_bf16_on(
            isa,
            a,
            b,
            Out::F32 {
                data: &mut c,
                row_stride: 2,
                accumulate: true,
            },
            1,
        )
        .unwrap();
        assert_eq!(c, [7.0; 4]);
        matmul_bf16_on(
            isa,
            a,
            b,
            Out::F32 {
                data: &mut c,
                row_stride: 2,
                accumulate: false,
            },
            1,
        )
        .unwrap();
        assert_eq!(c, [0.0; 4]);
        let mut h = [bf16::ONE; 4];
        matmul_bf16_on(
            isa,
            a,
            b,
            Out::Bf16 {
                data: &mut h,
                row_stride: 2,
            },
            1,
        )
        .unwrap();
        assert_eq!(h, [bf16::ZERO; 4]);

        let a = MatRef {
            data: &[],
            rows: 0,
            cols: 3,
            row_stride: 3,
            col_stride: 1,
        };
        let b = MatRef {
            data: &one[..3],
            rows: 3,
            cols: 1,
            row_stride: 1,
            col_stride: 1,
        };
        matmul_bf16_on(
            isa,
            a,
            b,
            Out::F32 {
                data: &mut [],
                row_stride: 1,
                accumulate: false,
            },
            2,
        )
        .unwrap();
        let a = MatRef {
            data: &one[..3],
            rows: 1,
            cols: 3,
            row_stride: 3,
            col_stride: 1,
        };
        let b = MatRef {
            data: &[],
            rows: 3,
            cols: 0,
            row_stride: 0,
            col_stride: 1,
        };
        matmul_bf16_on(
            isa,
            a,
            b,
            Out::Bf16 {
                data: &mut [],
                row_stride: 0,
            },
            2,
        )
        .unwrap();
    }
}

/// Zero strides (a broadcast row/column) are valid read-only views.
#[test]
fn broadcast_operands() {
    let two = [bf16::from_f32(2.0)];
    let three = [bf16::from_f32(3.0)];
    for isa in available_isas() {
        let (m, k, n) = (33, 70, 40);
        let a = MatRef {
            data: &two,
            rows: m,
            cols: k,
            row_stride: 0,
            col_stride: 0,
        };
        let b = MatRef {
            data: &three,
            rows: k,
            cols: n,
            row_stride: 0,
            col_stride: 0,
        };
        let mut c = vec![0f32; m * n];
        matmul_bf16_on(
            isa,
            a,
            b,
            Out::F32 {
                data: &mut c,
                row_stride: n,
                accumulate: false,
            },
            2,
        )
        .unwrap();
        assert!(c.iter().all(|&v| v == 6.0 * k as f32), "{isa:?}");
    }
}

/// `matmul_bf16` runs on `best_isa()`, the first available path.
#[test]
fn best_isa_is_first_available() {
    assert_eq!(kiln_gemm::best_isa(), available_isas()[0]);
    let x = [bf16::ONE; 6];
    let a = MatRef::row_major(&x, 2, 3);
    let b = MatRef::row_major(&x, 3, 2);
    let mut c = [0f32; 4];
    matmul_bf16(
        a,
        b,
        Out::F32 {
            data: &mut c,
            row_stride: 2,
            accumulate: false,
        },
        1,
    )
    .unwrap();
    assert_eq!(c, [3.0; 4]);
}
