//! Products of the small f32 blocks inside attention (a block of query rows against one head's
//! keys or values: tens to hundreds of rows and columns, a head dimension of 32 to 128).
//!
//! At these sizes a general gemm spends more time deciding, packing and dispatching than
//! multiplying; this kernel keeps a 4 × 64 block of the output in registers, reads `B` in its
//! row-major layout and broadcasts `A`'s elements (any strides, so `Aᵀ` costs nothing).

use super::elem::kernel;

/// `C[m × n] (+)= A[m × k] · B[k × n]`: `A(i, p) = a[i·ars + p·acs]`, `B` row-major with row
/// stride `ldb`, `C` row-major with row stride `ldc`; `accumulate` adds to `C`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    a: &[f32],
    ars: usize,
    acs: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        k == 0 || (m - 1) * ars + (k - 1) * acs < a.len(),
        "small matmul: A"
    );
    assert!(k == 0 || (k - 1) * ldb + n <= b.len(), "small matmul: B");
    assert!((m - 1) * ldc + n <= c.len(), "small matmul: C");
    product(a, ars, acs, b, ldb, c, ldc, m, n, k, accumulate);
}

kernel! {
    #[allow(clippy::too_many_arguments)]
    fn product(a: &[f32], ars: usize, acs: usize, b: &[f32], ldb: usize, c: &mut [f32], ldc: usize, m: usize, n: usize, k: usize, accumulate: bool) {
        let mut j = 0;
        while j < n {
            let left = n - j;
            // The widest column block that fits, with as many rows as keep its accumulators in
            // 16 registers; single rows at the bottom, a scalar edge for the last < 16 columns.
            let cols = if left >= 64 { 64 } else if left >= 32 { 32 } else if left >= 16 { 16 } else { left };
            let mut i = 0;
            while i < m {
                let rows = m - i;
                match cols {
                    64 if rows >= 4 => tile::<4, 64>(a, ars, acs, b, ldb, c, ldc, i, j, k, accumulate),
                    32 if rows >= 8 => tile::<8, 32>(a, ars, acs, b, ldb, c, ldc, i, j, k, accumulate),
                    16 if rows >= 8 => tile::<8, 16>(a, ars, acs, b, ldb, c, ldc, i, j, k, accumulate),
                    64 => tile::<1, 64>(a, ars, acs, b, ldb, c, ldc, i, j, k, accumulate),
                    32 => tile::<1, 32>(a, ars, acs, b, ldb, c, ldc, i, j, k, accumulate),
                    16 => tile::<1, 16>(a, ars, acs, b, ldb, c, ldc, i, j, k, accumulate),
                    _ => edge(a, ars, acs, b, ldb, c, ldc, (i, 1), (j, cols), k, accumulate),
                }
                i += match cols {
                    64 if rows >= 4 => 4,
                    32 | 16 if rows >= 8 => 8,
                    _ => 1,
                };
            }
            j += cols;
        }
    }
}

/// The widest block [`edge`] handles (below the 16 columns of the narrowest tile).
const COLS: usize = 16;

/// One full `R × N` tile with its accumulators in registers (16 zmm for 4 × 64).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile<const R: usize, const N: usize>(
    a: &[f32],
    ars: usize,
    acs: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    i: usize,
    j: usize,
    k: usize,
    accumulate: bool,
) {
    let mut acc = [[0.0f32; N]; R];
    for p in 0..k {
        let brow: &[f32; N] = b[p * ldb + j..p * ldb + j + N]
            .try_into()
            .expect("N columns");
        for (r, acc) in acc.iter_mut().enumerate() {
            let av = a[(i + r) * ars + p * acs];
            for q in 0..N {
                acc[q] = av.mul_add(brow[q], acc[q]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let crow = &mut c[(i + r) * ldc + j..(i + r) * ldc + j + N];
        if accumulate {
            for q in 0..N {
                crow[q] += acc[q];
            }
        } else {
            crow.copy_from_slice(acc);
        }
    }
}

/// A partial tile at the bottom or right edge (same arithmetic, one row at a time).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn edge(
    a: &[f32],
    ars: usize,
    acs: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    (i, rows): (usize, usize),
    (j, cols): (usize, usize),
    k: usize,
    accumulate: bool,
) {
    for r in i..i + rows {
        let mut acc = [0.0f32; COLS];
        let acc = &mut acc[..cols];
        for p in 0..k {
            let av = a[r * ars + p * acs];
            let brow = &b[p * ldb + j..p * ldb + j + cols];
            for (x, &bv) in acc.iter_mut().zip(brow) {
                *x = av.mul_add(bv, *x);
            }
        }
        let crow = &mut c[r * ldc + j..r * ldc + j + cols];
        if accumulate {
            for (x, &v) in crow.iter_mut().zip(acc.iter()) {
                *x += v;
            }
        } else {
            crow.copy_from_slice(acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_the_naive_product_with_strides() {
        for (m, n, k) in [(1, 1, 1), (4, 64, 32), (7, 70, 33), (33, 130, 5), (5, 3, 0)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 17) % 7) as f32 - 3.0).collect();
            for transposed in [false, true] {
                // A stored as Aᵀ (k × m) when `transposed`.
                let (data, ars, acs) = if transposed {
                    let mut t = vec![0.0; m * k];
                    for i in 0..m {
                        for p in 0..k {
                            t[p * m + i] = a[i * k + p];
                        }
                    }
                    (t, 1, m)
                } else {
                    (a.clone(), k, 1)
                };
                for accumulate in [false, true] {
                    let mut c = vec![1.0f32; m * n];
                    matmul(&data, ars, acs, &b, n, &mut c, n, (m, n, k), accumulate);
                    for i in 0..m {
                        for j in 0..n {
                            let want: f32 =
                                (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum::<f32>()
                                    + if accumulate { 1.0 } else { 0.0 };
                            assert_eq!(c[i * n + j], want, "{m}x{n}x{k} at ({i},{j})");
                        }
                    }
                }
            }
        }
    }
}
