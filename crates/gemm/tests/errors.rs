//! Bad input is an error (and leaves C alone), never a panic or a stray memory access.

use kiln_gemm::{GemmError, Isa, MatRef, Operand, Out, available_isas, bf16, matmul_bf16_on};

fn f32_out(data: &mut [f32], row_stride: usize) -> Out<'_> {
    Out::F32 {
        data,
        row_stride,
        accumulate: false,
    }
}

/// Runs the product on every path and checks each gives `want` and leaves C untouched.
fn refused(a: MatRef<bf16>, b: MatRef<bf16>, c_len: usize, c_stride: usize, want: GemmError) {
    for isa in available_isas() {
        let mut c = vec![5f32; c_len];
        let got = matmul_bf16_on(isa, a, b, f32_out(&mut c, c_stride), 2);
        assert_eq!(got, Err(want.clone()), "{isa:?}");
        assert!(c.iter().all(|&v| v == 5.0), "{isa:?} wrote C on error");
    }
}

#[test]
fn mismatched_inner_dimensions() {
    let x = [bf16::ONE; 12];
    let a = MatRef::row_major(&x, 3, 4);
    let b = MatRef::row_major(&x, 3, 4);
    refused(
        a,
        b,
        12,
        4,
        GemmError::InnerDimMismatch {
            a_cols: 4,
            b_rows: 3,
        },
    );
}

#[test]
fn short_slices() {
    let x = [bf16::ONE; 12];
    // A is 3 × 4 with a row stride of 5: its last element is at 2·5 + 3 = 13.
    let a = MatRef {
        data: &x,
        rows: 3,
        cols: 4,
        row_stride: 5,
        col_stride: 1,
    };
    let b = MatRef::row_major(&x, 4, 3);
    let want = GemmError::SliceTooShort {
        operand: Operand::A,
        rows: 3,
        cols: 4,
        row_stride: 5,
        col_stride: 1,
        needed: 14,
        len: 12,
    };
    refused(a, b, 9, 3, want);

    // B transposed from a 3 × 4 buffer that lost its last element.
    let a = MatRef::row_major(&x, 3, 4);
    let b = MatRef {
        data: &x[..11],
        rows: 4,
        cols: 3,
        row_stride: 1,
        col_stride: 4,
    };
    let want = GemmError::SliceTooShort {
        operand: Operand::B,
        rows: 4,
        cols: 3,
        row_stride: 1,
        col_stride: 4,
        needed: 12,
        len: 11,
    };
    refused(a, b, 9, 3, want);

    // C is 3 × 3 with a row stride of 4: it needs 2·4 + 3 = 11 elements.
    let b = MatRef::row_major(&x, 4, 3);
    let want = GemmError::SliceTooShort {
        operand: Operand::C,
        rows: 3,
        cols: 3,
        row_stride: 4,
        col_stride: 1,
        needed: 11,
        len: 10,
    };
    refused(a, b, 10, 4, want);

    // The bf16 output is checked the same way.
    for isa in available_isas() {
        let mut h = [bf16::ZERO; 8];
        let got = matmul_bf16_on(
            isa,
            a,
            b,
            Out::Bf16 {
                data: &mut h,
                row_stride: 3,
            },
            1,
        );
        assert!(matches!(
            got,
            Err(GemmError::SliceTooShort {
                operand: Operand::C,
                ..
            })
        ));
        assert_eq!(h, [bf16::ZERO; 8]);
    }
}

#[test]
fn overlapping_output_rows() {
    let x = [bf16::ONE; 12];
    let a = MatRef::row_major(&x, 3, 4);
    let b = MatRef::row_major(&x, 4, 3);
    refused(
        a,
        b,
        64,
        2,
        GemmError::OutputRowsOverlap {
            row_stride: 2,
            cols: 3,
        },
    );
}

#[test]
fn strides_whose_product_overflows() {
    let x = [bf16::ONE; 16];
    let huge = usize::MAX / 2;
    // (rows - 1) · row_stride overflows.
    let a = MatRef {
        data: &x,
        rows: huge,
        cols: 2,
        row_stride: 4,
        col_stride: 1,
    };
    let b = MatRef::row_major(&x, 2, 2);
    let want = GemmError::ShapeOverflow {
        operand: Operand::A,
        rows: huge,
        cols: 2,
        row_stride: 4,
        col_stride: 1,
    };
    refused(a, b, 4, 2, want);

    // Each term fits, their sum does not.
    let a = MatRef::row_major(&x, 2, 2);
    let b = MatRef {
        data: &x,
        rows: 2,
        cols: 3,
        row_stride: huge,
        col_stride: huge,
    };
    let want = GemmError::ShapeOverflow {
        operand: Operand::B,
        rows: 2,
        cols: 3,
        row_stride: huge,
        col_stride: huge,
    };
    refused(a, b, 6, 3, want);

    // C's extent overflows.
    let b = MatRef::row_major(&x, 2, 2);
    for isa in available_isas() {
        let mut c = [0f32; 4];
        let out = Out::F32 {
            data: &mut c,
            row_stride: usize::MAX,
            accumulate: false,
        };
        let got = matmul_bf16_on(isa, a, b, out, 1);
        assert!(matches!(
            got,
            Err(GemmError::ShapeOverflow {
                operand: Operand::C,
                ..
            })
        ));
    }
}

/// A huge k with zero strides passes the slice check (one element covers it) but its packed copy
/// cannot exist: an error, not an abort.
#[test]
fn unpackable_sizes() {
    let x = [bf16::ONE];
    let k = 1usize << 60;
    let a = MatRef {
        data: &x,
        rows: 1,
        cols: k,
        row_stride: 0,
        col_stride: 0,
    };
    let b = MatRef {
        data: &x,
        rows: k,
        cols: 1,
        row_stride: 0,
        col_stride: 0,
    };
    let want = GemmError::TooLarge {
        operand: Operand::A,
        rows: 1,
        cols: k,
    };
    refused(a, b, 1, 1, want);
}

/// A path this machine lacks is refused by name.
#[test]
fn unavailable_paths() {
    let x = [bf16::ONE; 4];
    let a = MatRef::row_major(&x, 2, 2);
    for isa in [Isa::Amx, Isa::Avx512Bf16] {
        if available_isas().contains(&isa) {
            continue;
        }
        let mut c = [0f32; 4];
        let got = matmul_bf16_on(isa, a, a, f32_out(&mut c, 2), 1);
        assert_eq!(got, Err(GemmError::Unavailable(isa)));
    }
}

/// The paths found match what the kernel reports in /proc/cpuinfo (which lists AMX and
/// AVX512-BF16 only when it also supports their register state), so a broken detection cannot
/// silently leave a path untested.
#[test]
fn detection_matches_cpuinfo() {
    let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
        return;
    };
    let Some(flags) = cpuinfo.lines().find(|l| l.starts_with("flags")) else {
        return;
    };
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    let isas = available_isas();
    println!("available: {isas:?}");
    assert_eq!(
        isas.contains(&Isa::Avx512Bf16),
        has("avx512_bf16") && has("avx512bw")
    );
    assert_eq!(
        isas.contains(&Isa::Amx),
        has("amx_bf16") && has("amx_tile") && has("avx512_bf16")
    );
}
