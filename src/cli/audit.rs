//! `kubekms audit verify`: check that an audit log is intact.

use std::path::PathBuf;

use clap::Subcommand;

use kubekms::audit::VerifyError;
use kubekms::crypto::RootKey;

use super::args::RootKeyArgs;

#[derive(Subcommand)]
pub enum Command {
    /// Verify that no line of an audit log was edited, removed or reordered. With the root
    /// key it also checks every line's MAC, which catches a forged or edited last line. A
    /// log that rotated (FILE.<N> beside FILE, N the sequence number of each file's first
    /// line) is checked as one chain, oldest file first: a removed file is named by the
    /// records it held. Exits 0 when the log is intact, 1 with the first broken line
    /// otherwise.
    Verify {
        /// The audit log file (the current one of a rotated series).
        file: PathBuf,
        /// The root key of the component that wrote the log (a file or a PKCS#11 token).
        #[command(flatten)]
        root_key: RootKeyArgs,
        /// The sequence number the log must reach: `kubekms_audit_sequence` of the component
        /// as your monitoring recorded it. Lines cut from the end leave the chain intact, so
        /// only this shows them.
        #[arg(long, value_name = "N")]
        expect_seq: Option<u64>,
        /// Let the log begin after sequence 1, at N at the latest: the files before it were
        /// removed by --audit-log-max-files (or archived). Without it, a log must begin at
        /// the first line its component ever wrote.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        from_seq: Option<u64>,
    },
}

impl Command {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Verify { file, root_key, expect_seq, from_seq } => {
                let root = root_key.source_opt()?.map(|config| RootKey::open_config(&config)).transpose()?;
                let series = kubekms::audit::verify_series(&file, root.as_ref(), from_seq).map_err(|e| {
                    let hint = match e.error {
                        VerifyError::Start(_, seq) if from_seq.is_none() => format!(
                            "; if the files before it were rotated away, verify from there with --from-seq {seq}"
                        ),
                        _ => String::new(),
                    };
                    anyhow::anyhow!("{e}{hint}").context(format!("{} is not intact", file.display()))
                })?;
                let (first, last) = series.range().unwrap_or((0, 0));
                if let Some(expected) = expect_seq
                    && last < expected
                {
                    anyhow::bail!(
                        "{} is not intact: it ends at sequence {last}, but sequence {expected} was written (lines were cut from the end)",
                        file.display(),
                    );
                }
                let how = if series.macs_checked {
                    "chain and MACs"
                } else {
                    "chain only; give --root-key-file to check MACs"
                };
                // The current file may be missing (a crash right after a rotation).
                let rotated = series.files.iter().filter(|(path, _)| *path != file).count();
                if rotated > 0 {
                    for (path, part) in &series.files {
                        match (part.first, part.last) {
                            (Some(a), Some(b)) => println!("{}: sequences {a} to {b}", path.display()),
                            _ => println!("{}: no record", path.display()),
                        }
                    }
                }
                let count = if last == 0 { 0 } else { last - first + 1 };
                let what = match rotated {
                    0 => String::new(),
                    1 => " and 1 rotated file".to_owned(),
                    n => format!(" and {n} rotated files"),
                };
                let from = if first > 1 { format!(" (sequences {first} to {last})") } else { String::new() };
                println!("{}{what}: {count} lines{from} intact ({how})", file.display());
                for (path, part) in &series.files {
                    for line in &part.cut {
                        println!(
                            "{}: line {line} was cut short during its write (by a crash or a full disk): it holds no record, and the chain goes on across it",
                            path.display()
                        );
                    }
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
    fn sequence_flags_take_sequence_numbers() {
        // --expect-seq takes any count, --from-seq a sequence number (from 1).
        for (flag, good, bad) in
            [("--expect-seq", "0", &["-1", "x", ""]), ("--from-seq", "1", &["0", "-3", "x"])]
        {
            assert!(parse(&["audit", "verify", "f", flag, good]).is_ok(), "{flag} {good}");
            for bad in bad {
                let arg = format!("{flag}={bad}");
                let err = parse(&["audit", "verify", "f", &arg]).err().expect(bad);
                assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{flag} {bad:?}");
            }
        }
    }

    #[test]
    fn audit_log_sizes_take_bytes_or_binary_units() {
        let plugin = ["plugin", "--key", "a/b", "--root-key-file", "/k"];
        for good in ["0", "4096", "64Ki", "100Mi", "2Gi"] {
            let arg = format!("--audit-log-max-size={good}");
            assert!(parse(&[&plugin[..], &[&arg]].concat()).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("1G", "Ki, Mi or Gi"),
            ("Mi", "whole number"),
            ("1.5Mi", "Ki, Mi or Gi"),
            ("-1", "whole number"),
            ("99999999999Gi", "too large"),
        ] {
            let arg = format!("--audit-log-max-size={bad}");
            let err = parse(&[&plugin[..], &[&arg]].concat()).err().expect(bad);
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{bad:?}");
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
        for component in [
            &["server", "--tls-cert", "c", "--tls-key", "k", "--root-key-file", "/k"][..],
            &["controller", "--root-key-file", "/k"],
        ] {
            let args = [component, &["--audit-log-max-size", "1Mi", "--audit-log-max-files", "0"]].concat();
            assert!(parse(&args).is_ok(), "{args:?}");
        }
    }
}
