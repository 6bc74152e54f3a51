//! `kubekms keyring`: back up every key's spec and wrapped material to one file, and
//! restore them into another cluster with the same root key.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;

use kubekms::keyring::{MAX_BACKUP_LEN, collect, open_backup, restore, seal_backup};

use super::args::{KubeArgs, RootKeyArgs};

#[derive(Subcommand)]
pub enum Command {
    /// Write every KmsKey's spec, keyId, versions and wrapped material (never plaintext)
    /// to one encrypted, authenticated file (mode 0600; refuses to overwrite).
    ///
    /// Destroyed keys are left out. Run it where the root key lives, as an identity that
    /// may list kmskeys and kmskeymaterials. The file opens only with the same root key.
    Backup {
        /// Where to write the backup.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Back up only the keys of this namespace (repeatable; default: every namespace).
        #[arg(long = "namespace", short = 'n', value_name = "NAMESPACE")]
        namespaces: Vec<String>,
        #[command(flatten)]
        root_key: RootKeyArgs,
        #[command(flatten)]
        kube: KubeArgs,
    },
    /// Recreate the keys of a backup in this cluster, with their keyIds and versions, so
    /// that what they encrypted before decrypts here.
    ///
    /// Checks the whole file first (it must authenticate under this root key, and every
    /// version must unwrap) and refuses everything if a key of the same namespace/name is
    /// another key here, or any keyId is in use by another key. Keys restored before (same
    /// name, same keyId) are left alone, so a restore that was interrupted can be run
    /// again. Creates missing namespaces. Run it as an identity that may
    /// create kmskeys and kmskeymaterials (a cluster administrator).
    Restore {
        /// The backup to restore.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        #[command(flatten)]
        root_key: RootKeyArgs,
        #[command(flatten)]
        kube: KubeArgs,
    },
}

impl Command {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Backup { out, namespaces, root_key, kube } => {
                let root = root_key.load()?;
                let backup = collect(kube.client().await?, &root, &namespaces).await?;
                let file = seal_backup(&root, &backup)?;
                write_new(&out, &file)?;
                let versions: usize =
                    backup.keys.iter().filter_map(|k| k.material.as_ref()).map(|m| m.versions.len()).sum();
                println!(
                    "backed up {} keys ({versions} versions) to {}, under root key {}",
                    backup.keys.len(),
                    out.display(),
                    root.fingerprint()
                );
            }
            Command::Restore { input, root_key, kube } => {
                let root = root_key.load()?;
                let mut bytes = Vec::new();
                std::fs::File::open(&input)
                    .and_then(|f| f.take(MAX_BACKUP_LEN as u64 + 1).read_to_end(&mut bytes))
                    .with_context(|| format!("failed to read {}", input.display()))?;
                let backup =
                    open_backup(&root, &bytes).with_context(|| format!("refused {}", input.display()))?;
                let done = restore(kube.client().await?, &backup).await?;
                println!("restored {} keys: {}", done.restored.len(), done.restored.join(", "));
                if !done.already_here.is_empty() {
                    println!(
                        "already here with the same keyId, left alone: {}",
                        done.already_here.join(", ")
                    );
                }
            }
        }
        Ok(())
    }
}

/// Writes `bytes` to a new file `path` with mode 0600, refusing an existing one; a failed
/// write leaves no file.
fn write_new(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("failed to create {} (it must not exist yet)", path.display()))?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(path);
        return Err(e).with_context(|| format!("failed to write {}", path.display()));
    }
    Ok(())
}
