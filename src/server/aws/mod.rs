//! The AWS KMS API of the key API server: AWS JSON 1.1 (`TrentService`) signed with SigV4,
//! and an STS `AssumeRoleWithWebIdentity` that turns a ServiceAccount token into the
//! temporary credentials that sign it — on a TLS port of its own, with the gRPC API's
//! certificate. Every KMS call is the gRPC API's call ([`ops`]), so it is authorized,
//! audited and metered exactly as the same ServiceAccount's call over gRPC.
//!
//! [`sigv4`], [`sts`] and [`protocol`] are pure; this file is the HTTP shell: TLS, HTTP/1.1
//! (hyper), bounded bodies, and the dispatch between KMS and STS.

pub mod admin;
pub mod k8s;
pub mod ops;
pub mod protocol;
pub mod sigv4;
pub mod sts;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use jiff::Timestamp;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use self::protocol::AwsFault;
use self::sts::{SessionKeys, StsError};
use super::auth::{AuthError, Authenticator, TokenReviewer};
use super::authz::RbacChecker;
use super::directory::KeyDirectory;
use super::service::{GrantWriter, KeyApi};
use crate::audit::AuditEvent;
use crate::call::CallPipeline;
use crate::domain::Identity;

/// How the AWS API is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub listen: SocketAddr,
    /// The region name signatures must be scoped to and ARNs carry.
    pub region: String,
    /// The audiences STS accepts web identity tokens for.
    pub sts_audiences: Vec<String>,
    /// The longest session STS issues (never past the web identity token's expiry).
    pub max_session: Duration,
}

/// Why an AWS API setting is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the longest STS session must be from 15 minutes to 12 hours, not {0}")]
pub struct SessionLengthError(jiff::SignedDuration);

/// The longest session, from a signed duration: within AWS's bounds of DurationSeconds.
pub fn max_session(d: jiff::SignedDuration) -> Result<Duration, SessionLengthError> {
    let seconds = d.as_secs();
    if d.subsec_nanos() != 0 || !(sts::MIN_DURATION_SECONDS..=sts::MAX_DURATION_SECONDS).contains(&seconds) {
        return Err(SessionLengthError(d));
    }
    Ok(Duration::from_secs(seconds.unsigned_abs()))
}

/// Why a region name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a region is 1 to 63 lowercase letters, digits and '-', starting with a letter or digit; not {0:?}")]
pub struct RegionError(String);

/// A region name, as it goes into credential scopes and ARNs.
pub fn region(name: String) -> Result<String, RegionError> {
    let ok = (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok { Ok(name) } else { Err(RegionError(name)) }
}

/// The most bytes of a request body read (a 4 KiB plaintext is 5.5 KiB of base64).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// How long a TLS handshake and a request's headers may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The AWS front end of one key API.
pub struct AwsApi<T, R, D, G> {
    api: Arc<KeyApi<T, R, D, G>>,
    keys: D,
    rbac: R,
    sts_auth: Authenticator<T>,
    sessions: SessionKeys,
    settings: Settings,
    calls: CallPipeline,
    /// Where management operations change objects; none: they are refused.
    admin: Option<Arc<dyn admin::KeyAdmin>>,
}

/// The operation name an audit line carries (static, so that metric labels stay bounded).
fn audited_operation(op: &str) -> &'static str {
    ops::OPERATIONS.iter().chain(admin::OPERATIONS).find(|o| **o == op).copied().unwrap_or("Unknown")
}

impl<T, R, D, G> AwsApi<T, R, D, G>
where
    T: TokenReviewer,
    R: RbacChecker,
    D: KeyDirectory + Clone,
    G: GrantWriter,
{
    /// `api`, its `keys` and an RBAC checker (for ListKeys), the authenticator of web
    /// identity tokens, the session keys, the pipeline that audits what only this front
    /// end decides (a refused signature, ListKeys, management operations), and where
    /// management operations change objects.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        api: Arc<KeyApi<T, R, D, G>>,
        keys: D,
        rbac: R,
        sts_auth: Authenticator<T>,
        sessions: SessionKeys,
        settings: Settings,
        calls: CallPipeline,
        admin: Option<Arc<dyn admin::KeyAdmin>>,
    ) -> Self {
        AwsApi { api, keys, rbac, sts_auth, sessions, settings, calls, admin }
    }

    /// Audits and meters a call this front end answers itself.
    async fn finish<V>(
        &self,
        started: Instant,
        event: AuditEvent,
        outcome: Result<V, AwsFault>,
    ) -> Result<V, AwsFault> {
        let fault = outcome.as_ref().err().cloned();
        self.calls.finish(started, event, outcome).await.map_err(|status| match fault {
            Some(f) if crate::call::CallError::status(&f).code() == status.code() => f,
            _ => AwsFault::new(503, "DependencyTimeoutException", status.message()),
        })
    }

    /// Answers one HTTP request.
    pub async fn handle(&self, request: Request<Body>, peer: IpAddr) -> Response<Body> {
        let request_id = uuid::Uuid::new_v4().to_string();
        let (parts, body) = request.into_parts();
        let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
            Ok(b) => b,
            Err(_) => {
                let fault = AwsFault::new(
                    413,
                    "ValidationException",
                    format!("the request body exceeds {MAX_BODY_BYTES} bytes"),
                );
                return kms_response(&request_id, Err(fault));
            }
        };
        let target = parts.headers.get("x-amz-target").and_then(|v| v.to_str().ok());
        let is_form = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if target.is_none() && (parts.method == Method::GET || is_form) {
            let params = if parts.method == Method::GET {
                sts::parse_params(parts.uri.query().unwrap_or("").as_bytes())
            } else {
                sts::parse_params(&body)
            };
            return sts_response(&request_id, self.assume_role(&params, peer, &request_id).await);
        }
        if parts.method != Method::POST {
            let fault = AwsFault::client("UnknownOperationException", "KMS operations are POST /");
            return kms_response(&request_id, Err(fault));
        }
        let op = match protocol::operation(target) {
            Ok(op) => op.to_owned(),
            Err(fault) => return kms_response(&request_id, Err(fault)),
        };
        let started = Instant::now();
        let who = match self.authenticate(&parts, &body) {
            Ok(who) => who,
            Err(fault) => {
                let event = AuditEvent {
                    request_id: request_id.clone(),
                    operation: audited_operation(&op),
                    ..Default::default()
                };
                let answer = self.finish::<()>(started, event, Err(fault)).await;
                return kms_response(&request_id, answer.map(|()| serde_json::Value::Null));
            }
        };
        let outcome = match tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.operation(&op, &who, &request_id, &body),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => Err(AwsFault::new(503, "DependencyTimeoutException", "the call took too long")),
        };
        kms_response(&request_id, outcome)
    }

    /// Who signed a KMS request: its SigV4 signature checked under the secret of its
    /// session, which must be open and current.
    fn authenticate(&self, parts: &http::request::Parts, body: &[u8]) -> Result<Identity, AwsFault> {
        let now = Timestamp::now().as_second();
        let sig = |e: sigv4::SigError| AwsFault::client(e.code(), e.to_string());
        let auth =
            sigv4::Authorization::parse(&parts.headers, "kms", &self.settings.region, now).map_err(sig)?;
        let token =
            parts.headers.get(sigv4::SECURITY_TOKEN_HEADER).and_then(|v| v.to_str().ok()).ok_or_else(
                || {
                    AwsFault::client(
                        "UnrecognizedClientException",
                        "The security token included in the request is invalid (kubekms serves temporary \
                     credentials from AssumeRoleWithWebIdentity only: send X-Amz-Security-Token).",
                    )
                },
            )?;
        let (session, secret) = self
            .sessions
            .open(token, &auth.access_key_id, now)
            .map_err(|e| AwsFault::client(e.code(), e.to_string()))?;
        auth.verify(&parts.method, &parts.uri, &parts.headers, body, secret.as_bytes()).map_err(sig)?;
        Ok(session.identity())
    }

    /// `AssumeRoleWithWebIdentity`: the token reviewed for the STS audiences, the role the
    /// token's own ServiceAccount, a session no longer than the token nor the maximum.
    async fn assume_role(
        &self,
        params: &std::collections::BTreeMap<String, String>,
        peer: IpAddr,
        request_id: &str,
    ) -> Result<String, StsError> {
        let started = Instant::now();
        let mut event = AuditEvent {
            request_id: request_id.to_owned(),
            operation: "AssumeRoleWithWebIdentity",
            ..Default::default()
        };
        let outcome = self.assume_role_inner(params, peer, request_id, &mut event).await;
        let fault = outcome.as_ref().err().map(|e| AwsFault::new(e.status, e.code, e.message.clone()));
        let code = outcome.as_ref().err().map(|e| e.code);
        let audited = self
            .finish(started, event, outcome.map_err(|e| AwsFault::new(e.status, e.code, e.message)))
            .await;
        audited.map_err(|f| match (fault, code) {
            (Some(original), Some(code)) if original == f => StsError::new(f.status, code, f.message),
            _ => StsError::new(503, "ServiceUnavailable", f.message),
        })
    }

    async fn assume_role_inner(
        &self,
        params: &std::collections::BTreeMap<String, String>,
        peer: IpAddr,
        request_id: &str,
        event: &mut AuditEvent,
    ) -> Result<String, StsError> {
        let request = sts::assume_request(params)?;
        let now = Timestamp::now().as_second();
        let token_expiry = super::auth::jwt_expiry(&request.token);
        if token_expiry.is_some_and(|exp| exp <= now) {
            return Err(StsError::new(400, "ExpiredTokenException", "Token expired"));
        }
        let who = self.sts_auth.authenticate(&request.token, now, peer).await.map_err(|e| match e {
            AuthError::Backend(_) => StsError::new(
                400,
                "IDPCommunicationError",
                "cannot review the token with the Kubernetes API server right now",
            ),
            AuthError::Throttled(t) => StsError::new(400, "Throttling", t.to_string()),
            _ => StsError::new(
                400,
                "InvalidIdentityToken",
                format!(
                    "the token is not a valid Kubernetes token for audience {:?}",
                    self.sts_auth.audiences().join(",")
                ),
            ),
        })?;
        event.principal = who.username.clone();
        if !request.role.names(&who) {
            return Err(StsError::new(
                403,
                "AccessDenied",
                format!(
                    "Not authorized to perform sts:AssumeRoleWithWebIdentity: {} is not {}",
                    who.username, request.role_arn
                ),
            ));
        }
        let max = i64::try_from(self.settings.max_session.as_secs()).unwrap_or(i64::MAX);
        let expires = sts::session_expiry(now, request.duration_seconds, max, token_expiry);
        let credentials = self
            .sessions
            .issue(&who, expires)
            .map_err(|_| StsError::new(500, "InternalFailure", "failed to seal the session"))?;
        let audience = self.sts_auth.audiences().first().cloned().unwrap_or_default();
        Ok(sts::assume_response(&request, &credentials, &who.username, &audience, request_id))
    }
}

fn with_request_id(mut response: Response<Body>, request_id: &str) -> Response<Body> {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-amzn-requestid", v);
    }
    response
}

fn response(status: u16, content_type: &'static str, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn kms_response(request_id: &str, outcome: Result<serde_json::Value, AwsFault>) -> Response<Body> {
    let r = match outcome {
        Ok(v) => response(200, protocol::CONTENT_TYPE, v.to_string().into_bytes()),
        Err(fault) => {
            let mut r = response(fault.status, protocol::CONTENT_TYPE, fault.body());
            if let Ok(v) = HeaderValue::from_str(fault.code) {
                r.headers_mut().insert("x-amzn-errortype", v);
            }
            r
        }
    };
    with_request_id(r, request_id)
}

fn sts_response(request_id: &str, outcome: Result<String, StsError>) -> Response<Body> {
    let r = match outcome {
        Ok(xml) => response(200, "text/xml", xml.into_bytes()),
        Err(e) => response(e.status, "text/xml", e.xml(request_id).into_bytes()),
    };
    with_request_id(r, request_id)
}

/// The TLS configuration of the AWS port: the server's certificate, HTTP/1.1.
pub fn tls_config(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<tokio_rustls::rustls::ServerConfig>, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("failed to read the certificate chain: {e}"))?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("failed to read the private key: {e}"))?;
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("failed to use the certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `aws` on `listener` until `shutdown`: TLS (when `tls` is given; tests serve
/// plain HTTP), HTTP/1.1, one task per connection, as many connections as `slots` holds.
pub async fn serve<T, R, D, G>(
    aws: Arc<AwsApi<T, R, D, G>>,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    listener: tokio::net::TcpListener,
    slots: super::connections::Slots,
    shutdown: CancellationToken,
) where
    T: TokenReviewer,
    R: RbacChecker,
    D: KeyDirectory + Clone,
    G: GrantWriter,
{
    let acceptor = tls.map(TlsAcceptor::from);
    loop {
        let (stream, peer, slot) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = slots.accept(&listener) => accepted,
        };
        let aws = aws.clone();
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match acceptor {
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => connection(aws, tls, peer, shutdown).await,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed on the AWS port")
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out on the AWS port"),
                    }
                }
                None => connection(aws, stream, peer, shutdown).await,
            }
        });
    }
}

async fn connection<T, R, D, G, S>(
    aws: Arc<AwsApi<T, R, D, G>>,
    stream: S,
    peer: SocketAddr,
    shutdown: CancellationToken,
) where
    T: TokenReviewer,
    R: RbacChecker,
    D: KeyDirectory + Clone,
    G: GrantWriter,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let aws = aws.clone();
        async move { Ok::<_, Infallible>(aws.handle(request.map(Body::new), peer.ip()).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, %peer, "connection on the AWS port ended with an error");
            }
        }
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        assert_eq!(region("kubekms-local".into()), Ok("kubekms-local".into()));
        for bad in ["", "-a", "Us-East-1", "a:b", "a/b", &"a".repeat(64)] {
            assert!(region(bad.to_owned()).is_err(), "{bad}");
        }
        assert_eq!(max_session(jiff::SignedDuration::from_hours(1)), Ok(Duration::from_secs(3600)));
        for bad in [
            jiff::SignedDuration::from_mins(14),
            jiff::SignedDuration::from_hours(13),
            jiff::SignedDuration::from_millis(900_500),
        ] {
            assert!(max_session(bad).is_err(), "{bad:?}");
        }
        assert_eq!(audited_operation("Encrypt"), "Encrypt");
        assert_eq!(audited_operation("CreateKey"), "CreateKey");
        assert_eq!(audited_operation("Nonsense"), "Unknown");
    }
}
