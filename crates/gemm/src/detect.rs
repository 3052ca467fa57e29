//! Which paths this CPU and OS allow, found once per process.

use std::sync::OnceLock;

use crate::Isa;

/// The available paths, best first (Portable last, always there).
pub(crate) fn available() -> &'static [Isa] {
    static AVAILABLE: OnceLock<Vec<Isa>> = OnceLock::new();
    AVAILABLE.get_or_init(|| {
        let mut isas = Vec::with_capacity(3);
        if amx() {
            isas.push(Isa::Amx);
        }
        if avx512_bf16() {
            isas.push(Isa::Avx512Bf16);
        }
        isas.push(Isa::Portable);
        isas
    })
}

/// AVX512-BF16 plus the AVX512F/BW the packing uses. `is_x86_feature_detected!` also checks that
/// the OS saves the 512-bit state (XCR0).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512_bf16() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn avx512_bf16() -> bool {
    false
}

/// AMX-TILE and AMX-BF16 in CPUID, AVX512 for the packing, and Linux's permission to use the
/// tile data state. Asks for the permission (process-wide) as a side effect.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn amx() -> bool {
    use core::arch::x86_64::{__cpuid, __cpuid_count};
    /// `arch_prctl` codes and the tile data's XSAVE feature number, from `asm/prctl.h`.
    const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;

    if __cpuid(0).eax < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    let (amx_bf16, amx_tile) = (edx >> 22 & 1 == 1, edx >> 24 & 1 == 1);
    if !(amx_bf16 && amx_tile && avx512_bf16()) {
        return false;
    }
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM takes a feature number and touches no memory
    // of ours; an old kernel or a refused request returns -1, which we read as "no AMX".
    let requested = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if requested != 0 {
        return false;
    }
    let mut permitted: u64 = 0;
    // SAFETY: ARCH_GET_XCOMP_PERM writes one u64 (the permitted feature mask) to the pointer,
    // which points at a live local.
    let got = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_GET_XCOMP_PERM,
            &mut permitted as *mut u64,
        )
    };
    got == 0 && permitted >> XFEATURE_XTILEDATA & 1 == 1
}

/// Only Linux is known to need (and grant) the permission; elsewhere AMX stays off.
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn amx() -> bool {
    false
}
