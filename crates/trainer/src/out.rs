//! Output on stdout that survives its reader going away.
//!
//! `println!` panics when stdout is a closed pipe (`kiln eval ... | head -1`: "failed printing
//! to stdout: Broken pipe"). kiln writes its results through [`print`] instead, which returns the
//! failure as a value: `main` ends a command whose output is its product (eval, generate,
//! estimate) quietly with exit code 141, what a shell reports for a process ended by SIGPIPE;
//! train and export, whose products are files, keep the exit code of their work.

use std::io::Write;

use crate::{Result, TrainerError};

/// Exit code of a command whose stdout reader went away: 128 + SIGPIPE (13).
pub const BROKEN_PIPE_EXIT: u8 = 141;

/// Writes `text` to stdout and flushes it.
pub fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|source| TrainerError::Stdout {
            broken_pipe: source.kind() == std::io::ErrorKind::BrokenPipe,
            source,
        })
}

/// `print!` through [`print`]: `say!("x {}", 1)?`.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::out::print(&format!($($arg)*))
    };
}

/// Creates the folder `dir` (and its parents) that `what` (a config field or a flag) names; a
/// file in the way is named as such rather than as `File exists (os error 17)`.
pub fn create_dir(dir: &std::path::Path, what: &str) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(TrainerError::Argument(format!(
            "{what} {}: exists and is not a folder",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))
}
