//! The x86-64 kernels and packers: AMX tiles, AVX512-BF16, AVX512BW shuffles.

pub(crate) mod amx;
pub(crate) mod avx512;
pub(crate) mod pack;
