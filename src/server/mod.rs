//! The key API for workloads: gRPC over TLS, callers authenticated by ServiceAccount token
//! (TokenReview), authorized by key policy, RBAC and KmsGrant, every call audited.

pub mod auth;
pub mod authz;
pub mod blob;
#[cfg(test)]
mod component_tests;
pub mod directory;
pub mod grant_request;
pub mod k8s;
pub mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jiff::SignedDuration;
use kube::Client;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Identity as TlsIdentity, ServerTlsConfig};

use crate::audit::{AuditError, AuditLog};
use crate::crypto::{RootKey, RootKeyError};
use crate::metering::OperationMetrics;
use crate::proto::keyapi::key_service_server::KeyServiceServer;
use crate::telemetry::{self, Health};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub root_key_file: PathBuf,
    /// Token audiences accepted (a token must be issued for one of them).
    pub audiences: Vec<String>,
    /// How long a TokenReview result is reused (never past the token's expiry).
    pub token_cache_ttl: Duration,
    /// How long a SubjectAccessReview result is reused.
    pub rbac_cache_ttl: Duration,
    pub audit_log: PathBuf,
    pub metrics_addr: Option<SocketAddr>,
}

/// Why a configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("the {cache} cache lifetime must not be negative")]
    NegativeTtl { cache: &'static str, ttl: SignedDuration },
}

impl Config {
    /// A cache lifetime (`token_cache_ttl`, `rbac_cache_ttl`) from a signed duration, as a
    /// command line gives it: a result cannot be reused for a negative time.
    pub fn cache_ttl(cache: &'static str, ttl: SignedDuration) -> Result<Duration, ConfigError> {
        Duration::try_from(ttl).map_err(|_| ConfigError::NegativeTtl { cache, ttl })
    }
}

/// Why the server stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("failed to load the root key")]
    RootKey(#[source] RootKeyError),
    #[error("failed to open the audit log")]
    Audit(#[source] AuditError),
    #[error("failed to read the TLS {what} {path}")]
    Tls {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
}

/// A call to a backend (the API server) failed; the cause is kept for the log, never
/// shown to the caller.
#[derive(Debug, thiserror::Error)]
#[error("the call to the API server failed")]
pub struct BackendError(#[source] Box<dyn std::error::Error + Send + Sync>);

impl BackendError {
    pub fn new(cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        BackendError(Box::new(cause))
    }
}

/// Runs the server until `shutdown`.
pub async fn run(config: Config, client: Client, shutdown: CancellationToken) -> Result<(), RunError> {
    let root = Arc::new(RootKey::load(&config.root_key_file).map_err(RunError::RootKey)?);
    tracing::info!(root_key = root.fingerprint(), listen = %config.listen, "starting the key API server");
    let audit = Arc::new(AuditLog::open(&config.audit_log, &root).map_err(RunError::Audit)?);
    let read = |what, path: &PathBuf| {
        std::fs::read(path).map_err(|source| RunError::Tls { what, path: path.clone(), source })
    };
    let tls = ServerTlsConfig::new().identity(TlsIdentity::from_pem(
        read("certificate", &config.tls_cert)?,
        read("key", &config.tls_key)?,
    ));

    let mut registry = Registry::default();
    let metrics = OperationMetrics::register(&mut registry);
    audit.register(&mut registry);
    let health = Health::new(i64::MAX);
    let metrics_task =
        telemetry::spawn_endpoints(config.metrics_addr, registry, health.clone(), shutdown.clone())
            .await
            .map_err(|source| RunError::Listen {
                addr: config.metrics_addr.unwrap_or(([0, 0, 0, 0], 0).into()),
                source,
            })?;

    // Serve only once every watch has listed, so that no call sees an empty directory.
    let directory = Arc::new(directory::Directory::new(root.clone()));
    tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        () = k8s::watch_directory(&client, &directory, &shutdown) => {}
    }
    tracing::info!("keys, material and grants are in sync; serving");
    let sweeper = directory.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(30)) => sweeper.sweep(),
            }
        }
    });
    let api = service::KeyApi::new(
        auth::Authenticator::new(
            k8s::KubeTokenReviewer(client.clone()),
            config.audiences.clone(),
            config.token_cache_ttl,
        ),
        k8s::SarChecker::new(client.clone(), config.rbac_cache_ttl),
        directory,
        k8s::KubeGrantWriter(client),
        audit,
        metrics,
    );
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| RunError::Listen { addr: config.listen, source })?;
    health.set_ready(true);
    let served = tonic::transport::Server::builder()
        .tls_config(tls)
        .map_err(RunError::Serve)?
        .timeout(Duration::from_secs(30))
        .concurrency_limit_per_connection(256)
        // Requests are small (4 KiB of plaintext, 8 KiB of context): refuse anything larger
        // before it is decoded.
        .add_service(KeyServiceServer::new(api).max_decoding_message_size(64 * 1024))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown.clone().cancelled_owned(),
        )
        .await;
    shutdown.cancel();
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    served.map_err(RunError::Serve)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_lifetime_is_not_negative() {
        assert_eq!(Config::cache_ttl("token", SignedDuration::from_secs(60)), Ok(Duration::from_secs(60)));
        assert_eq!(Config::cache_ttl("RBAC", SignedDuration::ZERO), Ok(Duration::ZERO));
        let ttl = SignedDuration::from_millis(-1500);
        let err = Config::cache_ttl("RBAC", ttl).unwrap_err();
        assert_eq!(err, ConfigError::NegativeTtl { cache: "RBAC", ttl });
        assert_eq!(err.to_string(), "the RBAC cache lifetime must not be negative");
    }
}
