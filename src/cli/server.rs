//! `kubekms server`: its flags, and the key API server's configuration built from them.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;

use anyhow::Context;
use jiff::SignedDuration;

use kubekms::audit::AuditLimits;
use kubekms::server::limit::Rate;
use kubekms::server::service::DEFAULT_MAX_GRANTS_PER_KEY;
use kubekms::server::{Config, auth, authz, aws};

use super::args::{AuditRotationArgs, KubeArgs, RootKeyArgs, UsageArgs};

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
    /// How many valid tokens' TokenReview results are kept; the least recently used makes
    /// room.
    #[arg(long, value_name = "N", default_value_t = auth::Settings::default().cache_size)]
    token_cache_size: usize,
    /// How many rejected tokens are remembered (10 s each), apart from valid ones, so that a
    /// flood of junk tokens cannot push a valid one out.
    #[arg(long, value_name = "N", default_value_t = auth::Settings::default().rejected_cache_size)]
    rejected_token_cache_size: usize,
    /// How many tokens without a cached answer one client (IP address; IPv6 by /64) may have
    /// reviewed, as REVIEWS/DURATION (in bursts of up to REVIEWS). Past it the client gets
    /// RESOURCE_EXHAUSTED with `retry-after` and `grpc-retry-pushback-ms`.
    #[arg(long, value_name = "RATE", default_value_t = auth::Settings::default().reviews_per_client)]
    token_reviews_per_client: Rate,
    /// How many tokens without a cached answer all clients together may have reviewed, as
    /// REVIEWS/DURATION. Past it callers get UNAVAILABLE with the same retry hint.
    #[arg(long, value_name = "RATE", default_value_t = auth::Settings::default().reviews)]
    token_reviews: Rate,
    /// How long a SubjectAccessReview result is reused, and so how long an RBAC change takes
    /// to apply.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    rbac_cache_ttl: SignedDuration,
    /// How many "allowed" SubjectAccessReview results are kept; the least recently used
    /// makes room.
    #[arg(long, value_name = "N", default_value_t = authz::CacheSettings::default().size)]
    rbac_cache_size: usize,
    /// How many "denied" SubjectAccessReview results are kept, apart from allowed ones.
    #[arg(long, value_name = "N", default_value_t = authz::CacheSettings::default().denied_size)]
    rbac_denied_cache_size: usize,
    /// The audit log: one JSON line per call ("-" for standard output).
    #[arg(long, value_name = "FILE", default_value = "-")]
    audit_log: PathBuf,
    #[command(flatten)]
    audit_rotation: AuditRotationArgs,
    /// How long a call waits for its audit line to be written; past it the call fails
    /// closed (UNAVAILABLE "the audit log cannot be written") instead of waiting on a slow or
    /// stalled sink.
    #[arg(long, value_name = "DURATION", default_value = "2s")]
    audit_timeout: SignedDuration,
    /// How many audit lines may wait to be written; a call finding them all taken fails
    /// closed at once.
    #[arg(long, value_name = "N", default_value_t = AuditLimits::default().queue)]
    audit_queue: usize,
    /// How many connections each port (gRPC, and the AWS API's) holds at once, counted from
    /// accept (before TLS); past it a new connection is closed at once
    /// (kubekms_server_connections_refused_total). TLS handshakes time out after 10 s.
    #[arg(long, value_name = "N", default_value_t = kubekms::server::connections::DEFAULT_MAX)]
    max_connections: std::num::NonZeroUsize,
    /// How many grants a key may have: past it CreateGrant (gRPC and AWS) is refused with
    /// RESOURCE_EXHAUSTED / LimitExceededException. Every grant object of the key counts
    /// until it is deleted, retired and expired ones too; every call of a key reads its
    /// grants, so the bound keeps calls fast. Grants made with kubectl are bounded by a
    /// ResourceQuota on count/kmsgrants.kms.kubekms.io instead.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_GRANTS_PER_KEY)]
    max_grants_per_key: NonZeroUsize,
    /// Address of the /healthz, /readyz and /metrics endpoints; none if not given.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    #[command(flatten)]
    usage: UsageArgs,
    /// Address to serve the AWS KMS API (AWS JSON 1.1, SigV4) and STS
    /// AssumeRoleWithWebIdentity on, over TLS with the same certificate; none if not given.
    #[arg(long, value_name = "ADDR")]
    aws_listen: Option<SocketAddr>,
    /// The region the AWS API serves: SigV4 signatures must be scoped to it, and key ARNs
    /// carry it (arn:aws:kms:<REGION>:<namespace>:key/<keyId>).
    #[arg(long, value_name = "REGION", default_value = "kubekms")]
    aws_region: String,
    /// Token audience STS AssumeRoleWithWebIdentity accepts web identity tokens for
    /// (repeatable).
    #[arg(long = "sts-audience", value_name = "AUDIENCE", default_value = "kubekms")]
    sts_audiences: Vec<String>,
    /// The longest session STS issues (15m to 12h); a session never outlives the token it
    /// came from.
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    sts_max_session: SignedDuration,
}

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        self.kube.init_logging();
        let config = Config {
            listen: self.listen,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            root_key: self.root_key.source()?,
            auth: auth::Settings {
                audiences: self.audiences,
                cache_ttl: Config::cache_ttl("token", self.token_cache_ttl)
                    .context("invalid --token-cache-ttl")?,
                cache_size: self.token_cache_size,
                rejected_cache_size: self.rejected_token_cache_size,
                reviews_per_client: self.token_reviews_per_client,
                reviews: self.token_reviews,
            },
            rbac_cache: authz::CacheSettings {
                ttl: Config::cache_ttl("RBAC", self.rbac_cache_ttl).context("invalid --rbac-cache-ttl")?,
                size: self.rbac_cache_size,
                denied_size: self.rbac_denied_cache_size,
            },
            audit_log: self.audit_log,
            audit_rotation: self.audit_rotation.rotation(),
            audit: AuditLimits {
                timeout: Config::audit_timeout(self.audit_timeout).context("invalid --audit-timeout")?,
                queue: self.audit_queue,
            },
            metrics_addr: self.metrics_addr,
            max_connections: self.max_connections,
            max_grants_per_key: self.max_grants_per_key,
            usage: self.usage.config("server", Some("POD_NAME")),
            aws: match self.aws_listen {
                None => None,
                Some(listen) => Some(aws::Settings {
                    listen,
                    region: aws::region(self.aws_region).context("invalid --aws-region")?,
                    sts_audiences: self.sts_audiences,
                    max_session: aws::max_session(self.sts_max_session)
                        .context("invalid --sts-max-session")?,
                }),
            },
        };
        let client = self.kube.client().await?;
        kubekms::server::run(config, client, super::shutdown_on_signal()).await?;
        Ok(())
    }
}
