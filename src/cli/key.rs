//! `kubekms key import`: bring your own key material into a KmsKey with origin EXTERNAL,
//! without the root key: the material is wrapped here under the wrapping key the
//! controller published, and only the controller unwraps it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Subcommand;
use jiff::SignedDuration;
use kube::Api;
use kube::api::{Patch, PatchParams};

use kubekms::api::KmsKeyImport;
use kubekms::domain::NamespacedName;

use super::args::KubeArgs;

#[derive(Subcommand)]
pub enum Command {
    /// Import your own 256-bit key material into a KmsKey with origin EXTERNAL that is
    /// PendingImport. The material is wrapped here (RSAES_OAEP_SHA_256) under the wrapping
    /// key the controller published in the KmsKeyImport of the same name, submitted there
    /// with its import token, and stored by the controller as version 1.
    ///
    /// Needs only the right to update that KmsKeyImport (get and patch on kmskeyimports,
    /// resourceNames NAME) — not the root key. Keep your own copy of the material: kubekms
    /// cannot export it, and once material imported with --valid-to has expired, the key
    /// takes only that same material again.
    Import {
        /// The key, as NAMESPACE/NAME.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        key: NamespacedName,
        /// A file with exactly 32 bytes of raw key material, or - for standard input.
        #[arg(long, value_name = "FILE")]
        material: PathBuf,
        /// When the imported material expires (RFC 3339, e.g. 2027-06-30T00:00:00Z): from
        /// then on the key refuses every operation, the controller deletes the material,
        /// and the key is PendingImport until the same material is imported again.
        /// Without it, the material never expires.
        #[arg(long, value_name = "TIME")]
        valid_to: Option<jiff::Timestamp>,
        /// How long to wait for the wrapping key to be published and for the controller's
        /// answer.
        #[arg(long, value_name = "DURATION", default_value = "60s")]
        timeout: SignedDuration,
        #[command(flatten)]
        kube: KubeArgs,
    },
}

impl Command {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Import { key, material, valid_to, timeout, kube } => {
                import_key(key, material, valid_to, timeout, kube).await?
            }
        }
        Ok(())
    }
}

async fn import_key(
    key: NamespacedName,
    material: PathBuf,
    valid_to: Option<jiff::Timestamp>,
    timeout: SignedDuration,
    kube: KubeArgs,
) -> anyhow::Result<()> {
    if let Some(at) = valid_to.filter(|at| *at <= jiff::Timestamp::now()) {
        bail!(
            "--valid-to {at} is not in the future; give a later time, or leave it out for material that never expires"
        );
    }
    let material = if material.as_os_str() == "-" {
        kubekms::keyring::read_material(std::io::stdin().lock())?
    } else {
        let file = std::fs::File::open(&material)
            .with_context(|| format!("failed to open {}", material.display()))?;
        kubekms::keyring::read_material(file)?
    };
    let deadline = Instant::now() + Duration::try_from(timeout).unwrap_or(Duration::from_secs(60));
    let imports: Api<KmsKeyImport> = Api::namespaced(kube.client().await?, key.namespace());
    let (public_key, token) = loop {
        let published = imports
            .get_opt(key.name())
            .await
            .with_context(|| format!("failed to read KmsKeyImport {key}"))?
            .and_then(|i| i.status)
            .and_then(|s| Some((s.public_key?, s.import_token?)));
        if let Some(published) = published {
            break published;
        }
        if Instant::now() >= deadline {
            bail!(
                "no wrapping key is published for {key} (KmsKeyImport {key}, status.publicKey): the key does not exist, does not have origin EXTERNAL, is not PendingImport, or the controller is not running"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let public_der = B64
        .decode(&public_key)
        .with_context(|| format!("KmsKeyImport {key} has a status.publicKey that is not base64"))?;
    let wrapped = kubekms::crypto::wrap_material(&public_der, &material)
        .with_context(|| format!("failed to wrap the material under the wrapping key of {key}"))?;
    // validTo is always written (null clears one an earlier submission gave).
    let body = serde_json::json!({ "spec": {
        "importToken": token,
        "encryptedKeyMaterial": B64.encode(wrapped),
        "validTo": valid_to.map(|t| t.to_string()),
    } });
    let submitted = imports
        .patch(key.name(), &PatchParams::default(), &Patch::Merge(&body))
        .await
        .with_context(|| format!("failed to submit the wrapped material to KmsKeyImport {key}"))?;
    let generation = submitted.metadata.generation.unwrap_or(0);
    let message = loop {
        let answer = imports
            .get_opt(key.name())
            .await
            .with_context(|| format!("failed to read KmsKeyImport {key}"))?
            .and_then(|i| i.status)
            .filter(|s| s.observed_generation >= Some(generation))
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Imported"))
            .filter(|c| c.observed_generation >= Some(generation));
        match answer {
            Some(c) if c.status == "True" => break c.message,
            Some(c) => bail!("the controller refused the import into {key}: {} ({})", c.message, c.reason),
            None if Instant::now() >= deadline => bail!(
                "submitted the wrapped material to KmsKeyImport {key} (generation {generation}), but the controller did not answer within {timeout:#}"
            ),
            None => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    println!(
        "imported key material into {key}: {message} (wrapped here with RSAES_OAEP_SHA_256; the root key never left the controller)"
    );
    Ok(())
}
