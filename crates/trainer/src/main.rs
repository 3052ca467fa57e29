//! The `kiln` binary: see `kiln --help` and the README.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use kiln_trainer::cli::{Cli, Command};
use kiln_trainer::{commands, out};

/// mimalloc keeps freed pages for the next allocation of the same size: a training step
/// allocates and frees the same activation-sized buffers every step, which glibc's malloc hands
/// back to the kernel and takes again as fresh (zeroed, faulting) pages. Measured on the
/// reference Llama: see the README's speed table.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc v3's option numbers (`mi_option_e` in its `mimalloc.h`; the Rust bindings name only
/// v2's).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const MI_OPTION_ARENA_PURGE_MULT: libmimalloc_sys::mi_option_t = 24;

/// mimalloc hands freed memory back to the kernel after a delay (purge) and may commit arena
/// memory on demand; a buffer that comes back faults in as fresh zeroed pages (~800 page faults
/// a step on the reference Llama, `clear_page` 10% of samples). A training step frees and takes
/// the same sizes again within the step and from one step to the next: keep freed memory for a
/// second before handing it back (so what only setup or the last evaluation used is still
/// returned) and commit arenas at once. The delay is v3's default (v2's was 10 ms), set here so
/// that a change of the library's default cannot move it. Measured: page faults 36k -> 580 over
/// 40 steps, +3-5% tokens/s; never purging measured the same within noise.
///
/// An arena's purge is due one delay after the *first* free it scheduled, and then purges every
/// free range, also those freed a moment ago: with mimalloc's arena multiplier of 1 that is every
/// second, and each purge re-faults the step's working set (measured on an AMD EPYC, 40 steps of
/// the reference Llama: 13.5k-21k page faults, half of them 2 MiB pages cleared). Arenas purge
/// after 10 s instead: 640 page faults, sys time 0.5-1.3 s -> 0.3-0.45 s, wall time -9% over a
/// 60-step run; the 160M job's peak RSS +1-3%.
fn keep_freed_memory() {
    // SAFETY: plain setters of mimalloc's global options, valid at any time.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000);
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_PURGE_MULT, 10);
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 1);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        // 0 only for a run that finished: an interrupted one (Ctrl-C, after its checkpoint)
        // exits 130 like any program stopped by SIGINT, so `kiln train && kiln export` stops.
        Command::Train(a) => commands::run_train(a).map(|s| match s.interrupted {
            true => ExitCode::from(INTERRUPTED),
            false => ExitCode::SUCCESS,
        }),
        Command::Eval(a) => commands::run_eval(a).map(|_| ExitCode::SUCCESS),
        Command::Generate(a) => commands::run_generate(a).map(|_| ExitCode::SUCCESS),
        Command::Estimate(a) => commands::run_estimate(a).map(|_| ExitCode::SUCCESS),
        Command::Export(a) => commands::run_export(a).map(|_| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        // The reader of our output went away (`kiln eval | head -1`): nothing to say to it.
        Err(e) if e.is_broken_pipe() => ExitCode::from(out::BROKEN_PIPE_EXIT),
        Err(e) => {
            // Not eprintln!: a closed stderr must not turn an error into a panic.
            let _ = writeln!(std::io::stderr(), "kiln: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Exit code of a run stopped by Ctrl-C: 128 + SIGINT (2), as shells report it.
const INTERRUPTED: u8 = 130;
