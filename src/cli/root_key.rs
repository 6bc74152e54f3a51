//! `kubekms root-key`: create, copy and fingerprint the root key that wraps every key
//! version, and follow its rotation.

use std::path::PathBuf;

use clap::Subcommand;

use kubekms::crypto::{RootKey, copy_pin};
use kubekms::keyring::RotationReport;

use super::args::{KubeArgs, Pkcs11Args, RootKeyArgs};

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
    /// Show how far a root-key rotation is: how many key versions each root key wraps
    /// (read from every KmsKeyMaterial, which needs a cluster administrator's access), and
    /// whether any is still wrapped by another root key than the primary. Once it says
    /// "complete", the previous root keys may be removed from the controller, the plugins
    /// and the key API servers.
    Status {
        /// The primary root key's fingerprint (`kubekms root-key fingerprint`, or the
        /// controller's log); instead, give the root key itself with its flags.
        #[arg(long, value_name = "FINGERPRINT")]
        primary: Option<String>,
        #[command(flatten)]
        root_key: RootKeyArgs,
        #[command(flatten)]
        kube: KubeArgs,
    },
}

impl Command {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Status { primary, root_key, kube } => {
                let primary = match primary {
                    Some(fp)
                        if fp.strip_prefix("rk1-").is_some_and(|h| {
                            h.len() == 16
                                && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                        }) =>
                    {
                        fp
                    }
                    Some(fp) => anyhow::bail!(
                        "--primary {fp:?} is not a root key fingerprint (rk1- and 16 hex digits, as `kubekms root-key fingerprint` prints)"
                    ),
                    None => root_key
                        .source_opt()?
                        .map(|config| RootKey::open_config(&config))
                        .transpose()?
                        .map(|root| root.fingerprint().to_owned())
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "give --primary FINGERPRINT, or the root key's flags (--root-key-file …)"
                            )
                        })?,
                };
                let api = kube::Api::<kubekms::api::KmsKeyMaterial>::all(kube.client().await?);
                let materials = api
                    .list(&Default::default())
                    .await
                    .map_err(|e| anyhow::anyhow!(e).context("failed to list KmsKeyMaterials"))?;
                print!("{}", RotationReport::new(&primary, &materials.items));
            }
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
