//! The subcommands of the `kubekms` binary: their arguments and what each runs.

pub mod bench;
