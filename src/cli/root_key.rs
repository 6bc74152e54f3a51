//! `kubekms root-key`: create, copy and fingerprint the root key that wraps every key
//! version.

use std::path::PathBuf;

use clap::Subcommand;

use kubekms::crypto::RootKey;

use super::args::RootKeyArgs;

#[derive(Subcommand)]
pub enum Command {
    /// Write a new random 256-bit root key to a file with mode 0600.
    ///
    /// Refuses to overwrite an existing file. Keep the file safe and backed up: every key
    /// version is wrapped by it, and without it no key material can be recovered.
    Create {
        /// Where to write the key.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Copy a root key into a private file (mode 0600), for example from a Secret volume
    /// that only the pod's group can read: the init container of the Helm chart does this.
    Copy {
        /// The root key to copy (checked for length only).
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// Where to write it (replaced atomically).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the fingerprint of a root key (a one-way identifier, safe to share).
    Fingerprint {
        #[command(flatten)]
        root_key: RootKeyArgs,
    },
}

impl Command {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Create { out } => {
                let key = RootKey::create(&out)?;
                println!("wrote a new root key to {} (fingerprint {})", out.display(), key.fingerprint());
            }
            Command::Copy { from, out } => {
                let key = RootKey::copy(&from, &out)?;
                println!("copied the root key {} to {}", key.fingerprint(), out.display());
            }
            Command::Fingerprint { root_key } => {
                println!("{}", root_key.load()?.fingerprint());
            }
        }
        Ok(())
    }
}
