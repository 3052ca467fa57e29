//! This machine's memory, and the check that a size asked for fits in it before anything is
//! allocated.

use crate::error::{Result, TrainerError};

/// This machine's physical memory in bytes (Linux `/proc/meminfo` `MemTotal`); 1 PiB where it
/// cannot be read, so that only absurd sizes are refused there.
pub fn machine_memory() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024.0)
        })
        .unwrap_or(2f64.powi(50))
}

/// Errors, naming `field`, when `bytes` of `what` cannot fit in this machine's memory: checked
/// before allocating, so a typo (`1000000000000`) is an error instead of an allocation abort.
pub fn check_fits(field: &str, what: &str, bytes: f64) -> Result<()> {
    let memory = machine_memory();
    if bytes.is_finite() && bytes <= memory {
        return Ok(());
    }
    Err(TrainerError::invalid(
        field,
        format!(
            "{what} need {}, more than this machine's memory ({})",
            gigabytes(bytes),
            gigabytes(memory)
        ),
    ))
}

fn gigabytes(bytes: f64) -> String {
    match bytes {
        b if !b.is_finite() || b >= 1e15 => format!("{:.2e} GB", b / 1e9),
        b => format!("{:.1} GB", b / 1e9),
    }
}
