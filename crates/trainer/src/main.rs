//! The `kiln` binary: see `kiln --help` and the README.

use std::process::ExitCode;

use clap::Parser;
use kiln_trainer::cli::{Cli, Command};
use kiln_trainer::commands;

/// mimalloc keeps freed pages for the next allocation of the same size: a training step
/// allocates and frees the same activation-sized buffers every step, which glibc's malloc hands
/// back to the kernel and takes again as fresh (zeroed, faulting) pages. Measured on the
/// reference Llama: see the README's speed table.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Train(a) => commands::run_train(a).map(|_| ()),
        Command::Eval(a) => commands::run_eval(a).map(|_| ()),
        Command::Generate(a) => commands::run_generate(a).map(|_| ()),
        Command::Estimate(a) => commands::run_estimate(a).map(|_| ()),
        Command::Export(a) => commands::run_export(a).map(|_| ()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln: error: {e}");
            ExitCode::FAILURE
        }
    }
}
