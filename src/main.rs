//! The `kubekms` binary: parses the command line and runs the subcommand; `cli` holds
//! each subcommand's flags and wiring.

mod cli;

use clap::Parser;

/// Errors are printed as one line with their causes (no backtrace), and exit with code 1
/// or a client code (`cli::exit_code`); usage errors exit with code 2 (`cli::usage`).
fn main() -> std::process::ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return std::process::ExitCode::from(cli::usage(&e)),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli.run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(cli::exit_code(&e))
        }
    }
}
