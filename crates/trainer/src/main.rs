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

/// By default mimalloc hands freed memory back to the kernel after 10 ms (purge) and commits
/// arena memory on demand, so the next step's buffers fault in as fresh zeroed pages again
/// (~800 page faults a step on the reference Llama, `clear_page` 10% of samples). A training
/// step frees and takes the same sizes again within the step and from one step to the next:
/// keep freed memory for a second before handing it back (so what only setup or the last
/// evaluation used is still returned) and commit arenas at once. Measured: page faults 36k ->
/// 580 over 40 steps, +3-5% tokens/s; never purging measured the same within noise.
fn keep_freed_memory() {
    // SAFETY: plain setters of mimalloc's global options, valid at any time.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000);
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
