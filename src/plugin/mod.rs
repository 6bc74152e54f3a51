//! The KMS v2 plugin: serves kube-apiserver's `v2.KeyManagementService` on a unix socket
//! and wraps its DEK seed under the current version of one configured KmsKey.

pub mod cache;
pub mod client;
pub mod format;
pub mod service;
pub mod socket;
pub mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditError, AuditLimits, AuditLog, Rotation};
use crate::crypto::{RootKey, RootKeyConfig, RootKeyError};
use crate::domain::KeySnapshot;
use crate::keyring::WatchKeyring;
use crate::metering::OperationMetrics;
use crate::proto::kmsv2::key_management_service_server::KeyManagementServiceServer;
use crate::telemetry::{self, Health};
use crate::usage::k8s::UsageConfig;
use service::KmsPlugin;
use socket::{PluginSocket, SocketError};

/// How the plugin runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub namespace: String,
    pub name: String,
    pub socket: PathBuf,
    /// Where the root key is (a file or a PKCS#11 token).
    pub root_key: RootKeyConfig,
    pub state_dir: PathBuf,
    /// Where audit lines go ("-" for standard output).
    pub audit_log: PathBuf,
    /// How the audit log file rotates.
    pub audit_rotation: Rotation,
    /// The /healthz, /readyz and /metrics endpoints, if wanted.
    pub metrics_addr: Option<SocketAddr>,
    /// How it reports the use of the key's versions.
    pub usage: UsageConfig,
}

/// Why the plugin stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("failed to load the root key")]
    RootKey(#[source] RootKeyError),
    #[error("failed to open the audit log")]
    Audit(#[source] AuditError),
    #[error("failed to create the state directory {0}")]
    StateDir(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("failed to listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
}

/// Runs the plugin until `shutdown`. `client` is `None` when no API server configuration
/// could be found; the plugin then serves from its cache only.
pub async fn run(
    config: Config,
    client: Option<kube::Client>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let root = Arc::new(RootKey::open_config(&config.root_key).map_err(RunError::RootKey)?);
    tracing::info!(root_key = root.fingerprint(), previous_root_keys = ?root.previous_fingerprints().collect::<Vec<_>>(), key = %format!("{}/{}", config.namespace, config.name), "starting the KMS v2 plugin");
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&config.state_dir)
        .map_err(|e| RunError::StateDir(config.state_dir.clone(), e))?;
    let audit = Arc::new(
        AuditLog::open_with(&config.audit_log, &root, AuditLimits::default(), config.audit_rotation)
            .map_err(RunError::Audit)?,
    );

    let initial = watch::from_cache(&root, &config.state_dir, &config.namespace, &config.name);
    let (tx, rx) = tokio::sync::watch::channel::<Option<Arc<KeySnapshot>>>(initial);
    let mut registry = Registry::default();
    let (usage, usage_task) = crate::usage::k8s::start(
        &config.usage,
        crate::domain::ReporterKind::StoragePlugin,
        client.clone(),
        &mut registry,
        shutdown.clone(),
    );
    if let Some(client) = client {
        let key_watch = watch::KeyWatch {
            client,
            namespace: config.namespace.clone(),
            name: config.name.clone(),
            root: root.clone(),
            state_dir: config.state_dir.clone(),
        };
        tokio::spawn(key_watch.run(tx, shutdown.clone()));
    } else {
        tracing::warn!("no API server configuration: serving from the cache only");
    }

    let metrics = OperationMetrics::register(&mut registry);
    audit.register(&mut registry);
    let health = Health::new(i64::MAX);
    let server_task =
        telemetry::spawn_endpoints(config.metrics_addr, registry, health.clone(), shutdown.clone())
            .await
            .map_err(|source| RunError::Listen {
                addr: config.metrics_addr.unwrap_or(([0, 0, 0, 0], 0).into()),
                source,
            })?;

    let socket = PluginSocket::bind(&config.socket).await?;
    tracing::info!(socket = %socket.path().display(), "serving KMS v2");
    let (listener, guard) = socket.into_parts();
    health.set_ready(true);
    let service = KmsPlugin::new(WatchKeyring(rx), audit, metrics, usage);
    let served = tonic::transport::Server::builder()
        // kube-apiserver's requests are small (a ciphertext of 1 KiB, annotations of 32 KiB).
        .add_service(KeyManagementServiceServer::new(service).max_decoding_message_size(64 * 1024))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown.clone().cancelled_owned())
        .await;
    drop(guard);
    shutdown.cancel();
    if let Some(task) = server_task {
        let _ = task.await;
    }
    if let Some(task) = usage_task {
        let _ = task.await;
    }
    tracing::info!("stopped; removed the socket");
    served.map_err(RunError::Serve)
}

#[cfg(test)]
mod component_tests;

#[cfg(test)]
mod property_tests;
