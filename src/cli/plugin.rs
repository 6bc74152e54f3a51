//! `kubekms plugin`: its flags, and the KMS v2 plugin's configuration built from them.

use std::net::SocketAddr;
use std::path::PathBuf;

use kubekms::domain::NamespacedName;

use super::args::{AuditRotationArgs, KubeArgs, RootKeyArgs, UsageArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    kube: KubeArgs,
    /// The KmsKey that encrypts the cluster's Secrets.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    key: NamespacedName,
    /// The unix socket kube-apiserver connects to (the `endpoint` of the EncryptionConfiguration,
    /// without `unix://`).
    #[arg(long, value_name = "PATH", default_value = "/var/run/kubekms/kms.sock")]
    socket: PathBuf,
    #[command(flatten)]
    root_key: RootKeyArgs,
    /// Where the plugin keeps its cache of wrapped material (never plaintext), so it can
    /// start and decrypt while the API server is down.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/kubekms")]
    state_dir: PathBuf,
    /// The audit log: one JSON line per Encrypt and Decrypt ("-" for standard output).
    /// Default: audit.log in the state directory.
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
    #[command(flatten)]
    audit_rotation: AuditRotationArgs,
    /// Address of the /healthz, /readyz and /metrics endpoints; none if not given.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    #[command(flatten)]
    usage: UsageArgs,
}

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        self.kube.init_logging();
        let (namespace, name) = self.key.into_parts();
        let config = kubekms::plugin::Config {
            namespace,
            name,
            socket: self.socket,
            root_key: self.root_key.source()?,
            audit_log: self.audit_log.unwrap_or_else(|| self.state_dir.join("audit.log")),
            audit_rotation: self.audit_rotation.rotation(),
            state_dir: self.state_dir,
            metrics_addr: self.metrics_addr,
            usage: self.usage.config("plugin", None),
        };
        let client = match self.kube.client().await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "no Kubernetes client; serving from the cache only");
                None
            }
        };
        kubekms::plugin::run(config, client, super::shutdown_on_signal()).await?;
        Ok(())
    }
}
