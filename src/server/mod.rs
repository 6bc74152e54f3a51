//! The key API for workloads: gRPC over TLS, callers authenticated by ServiceAccount token
//! (TokenReview), authorized by key policy, RBAC and KmsGrant, every call audited.

pub mod auth;
pub mod authz;
pub mod aws;
pub mod blob;
pub mod cache;
#[cfg(test)]
mod component_tests;
pub mod connections;
pub mod directory;
pub mod grant_request;
pub mod k8s;
pub mod limit;
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

use crate::audit::{AuditError, AuditLimits, AuditLog, Rotation};
use crate::crypto::{RootKey, RootKeyConfig, RootKeyError};
use crate::metering::OperationMetrics;
use crate::proto::keyapi::key_service_server::KeyServiceServer;
use crate::telemetry::{self, Health};
use crate::usage::k8s::UsageConfig;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// Where the root key is (a file or a PKCS#11 token).
    pub root_key: RootKeyConfig,
    /// Audiences, and how TokenReview results are kept.
    pub auth: auth::Settings,
    /// How SubjectAccessReview results are kept.
    pub rbac_cache: authz::CacheSettings,
    pub audit_log: PathBuf,
    /// How long a call waits for its audit line, and how many lines may wait.
    pub audit: AuditLimits,
    /// How the audit log file rotates.
    pub audit_rotation: Rotation,
    pub metrics_addr: Option<SocketAddr>,
    /// How it reports the use of key versions.
    pub usage: UsageConfig,
    /// The AWS KMS API (and STS), on a port of its own; none if not given.
    pub aws: Option<aws::Settings>,
    /// How many connections each port (gRPC, AWS) holds at once.
    pub max_connections: std::num::NonZeroUsize,
    /// How many grants CreateGrant lets a key have.
    pub max_grants_per_key: std::num::NonZeroUsize,
}

/// Why a configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("the {cache} cache lifetime must not be negative")]
    NegativeTtl { cache: &'static str, ttl: SignedDuration },
    #[error("the audit timeout must be positive")]
    AuditTimeout(SignedDuration),
}

impl Config {
    /// A cache lifetime (of TokenReview or SubjectAccessReview results) from a signed
    /// duration, as a command line gives it: a result cannot be reused for a negative time.
    pub fn cache_ttl(cache: &'static str, ttl: SignedDuration) -> Result<Duration, ConfigError> {
        Duration::try_from(ttl).map_err(|_| ConfigError::NegativeTtl { cache, ttl })
    }

    /// How long a call waits for its audit line, from a signed duration: more than zero.
    pub fn audit_timeout(timeout: SignedDuration) -> Result<Duration, ConfigError> {
        Duration::try_from(timeout).ok().filter(|t| !t.is_zero()).ok_or(ConfigError::AuditTimeout(timeout))
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
    #[error("failed to set up TLS for the AWS API: {0}")]
    AwsTls(String),
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
    let root = Arc::new(RootKey::open_config(&config.root_key).map_err(RunError::RootKey)?);
    tracing::info!(root_key = root.fingerprint(), previous_root_keys = ?root.previous_fingerprints().collect::<Vec<_>>(), listen = %config.listen, "starting the key API server");
    let audit = Arc::new(
        AuditLog::open_with(&config.audit_log, &root, config.audit, config.audit_rotation)
            .map_err(RunError::Audit)?,
    );
    let read = |what, path: &PathBuf| {
        std::fs::read(path).map_err(|source| RunError::Tls { what, path: path.clone(), source })
    };
    let tls = ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(
            read("certificate", &config.tls_cert)?,
            read("key", &config.tls_key)?,
        ))
        .timeout(HANDSHAKE_TIMEOUT);

    let mut registry = Registry::default();
    let metrics = OperationMetrics::register(&mut registry);
    audit.register(&mut registry);
    let (grpc_slots, aws_slots) =
        (connections::Slots::new(config.max_connections), connections::Slots::new(config.max_connections));
    let auth_metrics = auth::AuthMetrics::register(&mut registry);
    let rbac_metrics = authz::RbacCacheMetrics::register(&mut registry);
    grpc_slots.register(&mut registry, "grpc");
    aws_slots.register(&mut registry, "aws");
    let (usage, usage_task) = crate::usage::k8s::start(
        &config.usage,
        crate::domain::ReporterKind::KeyApi,
        Some(client.clone()),
        &mut registry,
        shutdown.clone(),
    );
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
    tracing::info!("keys, material, grants and aliases are in sync; serving");
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
    let api = Arc::new(
        service::KeyApi::new(
            auth::Authenticator::new(k8s::KubeTokenReviewer(client.clone()), config.auth.clone())
                .with_metrics("key-api", auth_metrics.clone()),
            authz::CachedRbac::new(k8s::KubeSar(client.clone()), &config.rbac_cache)
                .with_metrics("key-api", rbac_metrics.clone()),
            directory.clone(),
            k8s::KubeGrantWriter(client.clone()),
            audit.clone(),
            metrics.clone(),
            usage,
        )
        .with_max_grants_per_key(config.max_grants_per_key),
    );
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| RunError::Listen { addr: config.listen, source })?;
    if let Some(settings) = config.aws.clone() {
        let aws_tls =
            aws::tls_config(&read("certificate", &config.tls_cert)?, &read("key", &config.tls_key)?)
                .map_err(RunError::AwsTls)?;
        let aws_listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .map_err(|source| RunError::Listen { addr: settings.listen, source })?;
        tracing::info!(listen = %settings.listen, region = %settings.region, "serving the AWS KMS API and STS");
        let sts_auth = auth::Authenticator::new(
            k8s::KubeTokenReviewer(client.clone()),
            auth::Settings { audiences: settings.sts_audiences.clone(), ..config.auth.clone() },
        )
        .with_metrics("sts", auth_metrics);
        let front = Arc::new(aws::AwsApi::new(
            api.clone(),
            directory,
            authz::CachedRbac::new(k8s::KubeSar(client.clone()), &config.rbac_cache)
                .with_metrics("aws", rbac_metrics),
            sts_auth,
            aws::sts::SessionKeys::from_root(&root),
            settings,
            crate::call::CallPipeline::new("server", audit, metrics),
            Some(Arc::new(aws::k8s::KubeKeyAdmin(client.clone()))),
        ));
        tokio::spawn(aws::serve(front, Some(aws_tls), aws_listener, aws_slots, shutdown.clone()));
    }
    health.set_ready(true);
    let served = serve(
        api,
        Some(tls),
        listener,
        grpc_slots,
        CallLimits::default(),
        shutdown.clone().cancelled_owned(),
    )
    .await;
    shutdown.cancel();
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    if let Some(task) = usage_task {
        let _ = task.await;
    }
    served.map_err(RunError::Serve)
}

/// The most bytes of a request the server decodes. Requests are small (4 KiB of plaintext,
/// 8 KiB of context): anything larger is refused before it is decoded.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// What one call and one connection may hold of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallLimits {
    /// How long one call may take before the transport ends it (`CANCELLED`, "Timeout
    /// expired").
    pub timeout: Duration,
    /// How many calls one connection may have in flight; more wait for one to end.
    pub per_connection: usize,
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits { timeout: Duration::from_secs(30), per_connection: 256 }
    }
}

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `api` on `listener` until `shutdown`, with the transport's limits (request size,
/// `calls`, connections held in `slots`) — the one construction of the server, which the
/// component tests serve too. Without `tls` (tests), plain HTTP/2.
pub async fn serve<T, R, D, G>(
    api: impl Into<Arc<service::KeyApi<T, R, D, G>>>,
    tls: Option<ServerTlsConfig>,
    listener: tokio::net::TcpListener,
    slots: connections::Slots,
    calls: CallLimits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error>
where
    T: auth::TokenReviewer,
    R: authz::RbacChecker,
    D: directory::KeyDirectory,
    G: service::GrantWriter,
{
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server
        .timeout(calls.timeout)
        .concurrency_limit_per_connection(calls.per_connection)
        .add_service(KeyServiceServer::from_arc(api.into()).max_decoding_message_size(MAX_REQUEST_BYTES))
        .serve_with_incoming_shutdown(slots.incoming(listener), shutdown)
        .await
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

    #[test]
    fn the_audit_timeout_is_positive() {
        assert_eq!(Config::audit_timeout(SignedDuration::from_secs(2)), Ok(Duration::from_secs(2)));
        for bad in [SignedDuration::ZERO, SignedDuration::from_secs(-1)] {
            assert_eq!(Config::audit_timeout(bad), Err(ConfigError::AuditTimeout(bad)));
        }
    }
}
