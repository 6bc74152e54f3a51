//! `kubekms server`: its flags, and the key API server's configuration built from them.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use jiff::SignedDuration;

use kubekms::server::Config;

use super::args::{KubeArgs, RootKeyArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    kube: KubeArgs,
    /// Address to serve gRPC over TLS on.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// The server's TLS certificate chain (PEM).
    #[arg(long, value_name = "FILE")]
    tls_cert: PathBuf,
    /// The server's TLS private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: PathBuf,
    #[command(flatten)]
    root_key: RootKeyArgs,
    /// Token audience callers' tokens must be issued for (repeatable).
    #[arg(long = "audience", value_name = "AUDIENCE", default_value = "kubekms")]
    audiences: Vec<String>,
    /// How long a TokenReview result is reused (never past the token's expiry).
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    token_cache_ttl: SignedDuration,
    /// How long a SubjectAccessReview result is reused, and so how long an RBAC change takes
    /// to apply.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    rbac_cache_ttl: SignedDuration,
    /// The audit log: one JSON line per call ("-" for standard output).
    #[arg(long, value_name = "FILE", default_value = "-")]
    audit_log: PathBuf,
    /// Address of the /healthz, /readyz and /metrics endpoints; none if not given.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
}

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        self.kube.init_logging();
        let config = Config {
            listen: self.listen,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            root_key_file: self.root_key.root_key_file,
            audiences: self.audiences,
            token_cache_ttl: Config::cache_ttl("token", self.token_cache_ttl)
                .context("invalid --token-cache-ttl")?,
            rbac_cache_ttl: Config::cache_ttl("RBAC", self.rbac_cache_ttl)
                .context("invalid --rbac-cache-ttl")?,
            audit_log: self.audit_log,
            metrics_addr: self.metrics_addr,
        };
        let client = self.kube.client().await?;
        kubekms::server::run(config, client, super::shutdown_on_signal()).await?;
        Ok(())
    }
}
