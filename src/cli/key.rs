//! `kubekms key import`: bring your own key material into a KmsKey with origin EXTERNAL.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use kubekms::domain::NamespacedName;

use super::args::{KubeArgs, RootKeyArgs};

#[derive(Subcommand)]
pub enum Command {
    /// Import your own 256-bit key material into a KmsKey with origin EXTERNAL that is
    /// PendingImport. The material is wrapped by the root key here and stored as version 1.
    ///
    /// Run it where the root key lives, as an identity allowed to create kmskeymaterials.
    /// Keep your own copy of the material: kubekms cannot export it.
    Import {
        /// The key, as NAMESPACE/NAME.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        key: NamespacedName,
        /// A file with exactly 32 bytes of raw key material, or - for standard input.
        #[arg(long, value_name = "FILE")]
        material: PathBuf,
        #[command(flatten)]
        root_key: RootKeyArgs,
        #[command(flatten)]
        kube: KubeArgs,
    },
}

impl Command {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Import { key, material, root_key, kube } => {
                import_key(key, material, root_key, kube).await?
            }
        }
        Ok(())
    }
}

async fn import_key(
    key: NamespacedName,
    material: PathBuf,
    root_key: RootKeyArgs,
    kube: KubeArgs,
) -> anyhow::Result<()> {
    let root = root_key.load()?;
    let material = if material.as_os_str() == "-" {
        kubekms::keyring::read_material(std::io::stdin().lock())?
    } else {
        let file = std::fs::File::open(&material)
            .with_context(|| format!("failed to open {}", material.display()))?;
        kubekms::keyring::read_material(file)?
    };
    let client = kube.client().await?;
    let key_id = kubekms::keyring::import(client, &root, key.namespace(), key.name(), &material).await?;
    println!(
        "imported key material into {key} (keyId {key_id}) as version 1, wrapped by root key {}",
        root.fingerprint()
    );
    Ok(())
}
