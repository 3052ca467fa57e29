//! What can be wrong with a product's arguments.

use std::fmt;

use thiserror::Error;

use crate::Isa;

/// One of the three matrices of C = A·B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    A,
    B,
    C,
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operand::A => "A",
            Operand::B => "B",
            Operand::C => "C",
        })
    }
}

/// Why a product was refused. Nothing is written to C when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GemmError {
    /// A is m×k but B is k'×n with k' ≠ k.
    #[error("inner dimensions differ: A has {a_cols} columns, B has {b_rows} rows")]
    InnerDimMismatch { a_cols: usize, b_rows: usize },
    /// The slice ends before the last element its shape and strides address.
    #[error(
        "{operand}: a {rows}×{cols} matrix with strides ({row_stride}, {col_stride}) needs \
         {needed} elements, the slice has {len}"
    )]
    SliceTooShort {
        operand: Operand,
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
        needed: usize,
        len: usize,
    },
    /// The offset of the last element does not fit in a `usize`.
    #[error(
        "{operand}: the extent of a {rows}×{cols} matrix with strides ({row_stride}, \
         {col_stride}) overflows usize"
    )]
    ShapeOverflow {
        operand: Operand,
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    },
    /// C's rows would overlap (row stride below the column count with more than one row).
    #[error("C's rows overlap: row stride {row_stride} is below its {cols} columns")]
    OutputRowsOverlap { row_stride: usize, cols: usize },
    /// The packed copy of an operand (padded to whole tiles) cannot be allocated.
    #[error("{operand}: cannot allocate a packed copy of a {rows}×{cols} matrix")]
    TooLarge {
        operand: Operand,
        rows: usize,
        cols: usize,
    },
    /// The requested path is not available on this CPU or OS.
    #[error("{0:?} is not available on this machine")]
    Unavailable(Isa),
}
