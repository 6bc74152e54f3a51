//! `kubekms audit verify`: check that an audit log is intact.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use kubekms::crypto::RootKey;

use super::args::RootKeyArgs;

#[derive(Subcommand)]
pub enum Command {
    /// Verify that no line of an audit log was edited, removed or reordered. With the root
    /// key it also checks every line's MAC, which catches a forged or edited last line.
    /// Exits 0 when the log is intact, 1 with the first broken line otherwise.
    Verify {
        /// The audit log file.
        file: PathBuf,
        /// The root key of the component that wrote the log (a file or a PKCS#11 token).
        #[command(flatten)]
        root_key: RootKeyArgs,
        /// The sequence number the log must reach: `kubekms_audit_sequence` of the component
        /// as your monitoring recorded it. Lines cut from the end leave the chain intact, so
        /// only this shows them.
        #[arg(long, value_name = "N")]
        expect_seq: Option<u64>,
    },
}

impl Command {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Verify { file, root_key, expect_seq } => {
                let root = root_key.source_opt()?.map(|config| RootKey::open_config(&config)).transpose()?;
                let verified = kubekms::audit::verify_file(&file, root.as_ref())
                    .with_context(|| format!("{} is not intact", file.display()))?;
                // A verified chain starts at 1 and counts up by one: its last line is line N.
                if let Some(expected) = expect_seq
                    && verified.lines < expected
                {
                    anyhow::bail!(
                        "{} is not intact: it ends at sequence {}, but sequence {expected} was written (lines were cut from the end)",
                        file.display(),
                        verified.lines
                    );
                }
                let how = if verified.macs_checked {
                    "chain and MACs"
                } else {
                    "chain only; give --root-key-file to check MACs"
                };
                println!("{}: {} lines intact ({how})", file.display(), verified.lines);
                for line in &verified.cut {
                    println!(
                        "{}: line {line} was cut short by a crash during its write: it holds no record, and the chain goes on across it",
                        file.display()
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::parse;

    #[test]
    fn expect_seq_takes_a_count() {
        assert!(parse(&["audit", "verify", "f", "--expect-seq", "12"]).is_ok());
        for bad in ["-1", "x", ""] {
            let arg = format!("--expect-seq={bad}");
            let err = parse(&["audit", "verify", "f", &arg]).err().expect(bad);
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{bad:?}");
        }
    }
}
