use std::process::ExitCode;

use clap::Parser;
use msgpipe::cli::{Cli, run};

// jemalloc, purging freed pages at once (src/controller/heap.rs: why).
msgpipe::use_jemalloc!();

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line: "error: <what> : <why>", never a backtrace or a serde dump.
            let message = format!("{error:#}")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
