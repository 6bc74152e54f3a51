//! `kubekms root-key`: create, copy and fingerprint the root key that wraps every key
//! version.

use std::path::PathBuf;

use clap::Subcommand;

use kubekms::crypto::{RootKey, copy_pin};

use super::args::{Pkcs11Args, RootKeyArgs};

#[derive(Subcommand)]
pub enum Command {
    /// Write a new random 256-bit root key to a file with mode 0600, or (with the
    /// `--pkcs11-…` flags) generate one inside a PKCS#11 token, where it never leaves.
    ///
    /// Refuses to overwrite an existing file or a key of the same label. Keep the file (or
    /// the HSM's backup) safe: every key version is wrapped by it, and without it no key
    /// material can be recovered.
    Create {
        /// Where to write the key.
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "pkcs11_module",
            conflicts_with = "pkcs11_module"
        )]
        out: Option<PathBuf>,
        #[command(flatten)]
        pkcs11: Pkcs11Args,
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
    /// Copy a PKCS#11 PIN file into a private file (mode 0400), for example from a Secret
    /// volume that only the pod's group can read: the Helm chart's init container does this.
    CopyPin {
        /// The PIN file to copy (one line).
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
            Command::Create { out, pkcs11 } => match (out, pkcs11.config()?) {
                (Some(out), _) => {
                    let key = RootKey::create(&out)?;
                    println!("wrote a new root key to {} (fingerprint {})", out.display(), key.fingerprint());
                }
                (None, Some(config)) => {
                    let key = RootKey::create_pkcs11(&config)?;
                    println!(
                        "generated a new root key labelled {:?} in the {} (fingerprint {})",
                        config.key_label,
                        config.token,
                        key.fingerprint()
                    );
                }
                (None, None) => anyhow::bail!("give --out FILE, or --pkcs11-module and its flags"),
            },
            Command::Copy { from, out } => {
                let key = RootKey::copy(&from, &out)?;
                println!("copied the root key {} to {}", key.fingerprint(), out.display());
            }
            Command::CopyPin { from, out } => {
                copy_pin(&from, &out)?;
                println!("copied the PIN file {} to {}", from.display(), out.display());
            }
            Command::Fingerprint { root_key } => {
                println!("{}", root_key.load()?.fingerprint());
            }
        }
        Ok(())
    }
}
