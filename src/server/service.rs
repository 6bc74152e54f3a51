//! The key API service: authenticate, resolve the key, authorize, check the key's state,
//! do the cryptography — in that order, for every call — and hand the outcome to the call
//! pipeline, which audits, meters and maps it to the wire.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::BackendError;
use super::auth::{AuthError, Authenticator, TokenReviewer};
use super::authz::{Authorizer, AuthzError, RbacChecker};
use super::aws::protocol::Caller as AwsCaller;
use super::blob::{self, BlobError};
use super::directory::KeyDirectory;
use super::grant_request::{GrantRequestError, requested_grant};
use super::limit::{Throttled, whole_seconds};
use crate::audit::{AuditEvent, AuditLog};
use crate::call::{CallError, CallPipeline};
use crate::crypto::{KeyMaterial, SealError, SecretBytes};
use crate::domain::{
    Creator, Grant, GrantAuthority, Identity, Key, KeyOperation, KeyState, Origin, UseKind, VersionRefusal,
};
use crate::keyring::MaterialError;
use crate::metering::OperationMetrics;
use crate::proto::keyapi::key_service_server::KeyService;
use crate::proto::keyapi::*;
use crate::usage::UseRecorder;

/// The most bytes GenerateDataKey and GenerateRandom return.
pub const MAX_RANDOM_BYTES: u32 = 1024;
/// The longest key name or keyId a request may give.
const MAX_KEY_NAME_LEN: usize = 320;

/// Every way a call fails, each named by its cause, mapped to a gRPC status in one place
/// ([`CallError::status`]).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("key is required (namespace/name or keyId)")]
    KeyRequired,
    #[error("key name is too long")]
    KeyNameTooLong,
    #[error("plaintext is empty")]
    EmptyPlaintext,
    #[error(
        "plaintext is {len} bytes; Encrypt takes at most {max} (use GenerateDataKey and encrypt locally)"
    )]
    PlaintextTooLarge { len: usize, max: usize },
    #[error("number_of_bytes is {requested}; the most is {max}")]
    DataKeyTooLarge { requested: u32, max: u32 },
    #[error("number_of_bytes is {requested}; it must be from 1 to {max}")]
    RandomBytesOutOfRange { requested: u32, max: u32 },
    #[error("the ciphertext is under key {actual}, not {expected}")]
    WrongKey { actual: String, expected: String },
    #[error("grant is required (namespace/name or grantId)")]
    GrantRequired,
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// The caller named a key (or sent a ciphertext naming one) that does not exist or that
    /// it may not use for `op`: it is told the same either way, so that it learns neither
    /// whether the key exists nor its name; the cause goes to the audit line.
    #[error("key {name:?} does not exist or you may not use it for {}", op.as_str())]
    KeyRefused { name: String, op: KeyOperation, cause: Refusal },
    /// The same for a grant the caller would retire.
    #[error("grant {name:?} does not exist or you may not retire it")]
    GrantRefused { name: String, cause: Refusal },
    #[error("key {key} does not hold version {version}")]
    VersionNotHeld { key: String, version: u32 },
    #[error("version {version} of key {key} is {state}; it refuses to decrypt")]
    VersionNotEnabled { key: String, version: u32, state: &'static str },
    #[error("failed to authorize the call with Kubernetes RBAC")]
    Rbac(#[source] BackendError),
    #[error("key {key} is {state}; it refuses cryptographic operations until it is Enabled")]
    KeyNotEnabled { key: String, state: &'static str },
    #[error("key {0} has no usable current version yet")]
    NoCurrentVersion(String),
    #[error("key {0} has no valid keyId")]
    InvalidKeyId(String),
    #[error("decryption failed")]
    DecryptionFailed,
    #[error("the key's material cannot be used")]
    Material(#[source] MaterialError),
    #[error("failed to encrypt")]
    Seal(#[source] SealError),
    #[error("failed to read random bytes from the operating system")]
    Random,
    #[error("failed to update the grant")]
    GrantWrite(#[source] BackendError),
    #[error(transparent)]
    GrantRequest(#[from] GrantRequestError),
    #[error("grant {0} already exists")]
    GrantExists(String),
    #[error(
        "key {key} has {held} grants, and a key may have at most {max} (--max-grants-per-key): retire or delete some first (retired and expired grants count until deleted)"
    )]
    TooManyGrants { key: String, held: usize, max: usize },
    #[error("the API server refused the grant: {0}")]
    GrantRejected(String),
    #[error("failed to create the grant")]
    GrantCreate(#[source] BackendError),
}

impl CallError for ApiError {
    /// The status the caller sees; internal details stay in the log.
    fn status(&self) -> Status {
        match self {
            ApiError::Auth(AuthError::Backend(_)) => {
                Status::unavailable("cannot authenticate callers right now")
            }
            ApiError::Auth(AuthError::Throttled(t @ Throttled::Client { .. })) => {
                with_retry_hint(Status::resource_exhausted(t.to_string()), t.retry_after())
            }
            ApiError::Auth(AuthError::Throttled(t @ Throttled::Everyone { .. })) => {
                with_retry_hint(Status::unavailable(t.to_string()), t.retry_after())
            }
            ApiError::Auth(e) => Status::unauthenticated(e.to_string()),
            ApiError::KeyRequired
            | ApiError::KeyNameTooLong
            | ApiError::EmptyPlaintext
            | ApiError::PlaintextTooLarge { .. }
            | ApiError::DataKeyTooLarge { .. }
            | ApiError::RandomBytesOutOfRange { .. }
            | ApiError::WrongKey { .. }
            | ApiError::GrantRequired
            | ApiError::GrantRequest(_)
            | ApiError::GrantRejected(_)
            | ApiError::Blob(_) => Status::invalid_argument(self.to_string()),
            ApiError::GrantExists(_) => Status::already_exists(self.to_string()),
            ApiError::TooManyGrants { .. } => Status::resource_exhausted(self.to_string()),
            ApiError::VersionNotHeld { .. } => Status::not_found(self.to_string()),
            ApiError::Rbac(_) => Status::unavailable("cannot check Kubernetes RBAC right now"),
            ApiError::KeyRefused { .. } | ApiError::GrantRefused { .. } => {
                Status::permission_denied(self.to_string())
            }
            ApiError::KeyNotEnabled { .. }
            | ApiError::VersionNotEnabled { .. }
            | ApiError::NoCurrentVersion(_)
            | ApiError::InvalidKeyId(_) => Status::failed_precondition(self.to_string()),
            ApiError::DecryptionFailed => Status::invalid_argument("decryption failed"),
            ApiError::Material(_) | ApiError::Seal(_) | ApiError::Random => {
                Status::internal(self.to_string())
            }
            ApiError::GrantWrite(_) => Status::unavailable("failed to update the grant"),
            ApiError::GrantCreate(_) => Status::unavailable("failed to create the grant"),
        }
    }

    /// What the audit line says: for a refusal, why — which the caller is not told.
    fn reason(&self) -> String {
        match self {
            ApiError::KeyRefused { name, cause: Refusal::NotFound, .. } => format!("key {name:?} not found"),
            ApiError::GrantRefused { name, cause: Refusal::NotFound } => format!("grant {name:?} not found"),
            ApiError::KeyRefused { cause: Refusal::Authz(e), .. }
            | ApiError::GrantRefused { cause: Refusal::Authz(e), .. } => e.to_string(),
            other => other.status().message().to_owned(),
        }
    }

    fn is_internal(&self) -> bool {
        matches!(
            self,
            ApiError::Auth(AuthError::Backend(_))
                | ApiError::Rbac(_)
                | ApiError::Material(_)
                | ApiError::Seal(_)
                | ApiError::Random
                | ApiError::GrantWrite(_)
                | ApiError::GrantCreate(_)
        )
    }
}

/// Why a caller was refused a key or a grant: for the audit line, never for the caller.
#[derive(Debug)]
pub enum Refusal {
    /// There is no such key or grant.
    NotFound,
    /// There is, and the caller may not use it so.
    Authz(Box<AuthzError>),
}

impl ApiError {
    /// Refuses the key `name` for `op` with the answer that tells nothing, keeping why. An
    /// RBAC outage is no refusal: it stays `unavailable`.
    fn key_refused(name: &str, op: KeyOperation, cause: Refusal) -> ApiError {
        Self::refused(cause, |cause| ApiError::KeyRefused { name: name.to_owned(), op, cause })
    }

    /// The same for the grant `name`.
    fn grant_refused(name: &str, cause: Refusal) -> ApiError {
        Self::refused(cause, |cause| ApiError::GrantRefused { name: name.to_owned(), cause })
    }

    fn refused(cause: Refusal, refusal: impl FnOnce(Refusal) -> ApiError) -> ApiError {
        match cause {
            Refusal::Authz(e) => match *e {
                AuthzError::Rbac(e) => ApiError::Rbac(e),
                other => refusal(Refusal::Authz(Box::new(other))),
            },
            Refusal::NotFound => refusal(Refusal::NotFound),
        }
    }
}

/// `status` with when to retry: `retry-after` (whole seconds, as in HTTP) and gRPC's
/// `grpc-retry-pushback-ms`, which gRPC clients with a retry policy honour.
fn with_retry_hint(mut status: Status, retry_after: Duration) -> Status {
    let seconds = whole_seconds(retry_after);
    let meta = status.metadata_mut();
    if let Ok(v) = seconds.to_string().parse() {
        meta.insert("retry-after", v);
    }
    if let Ok(v) = seconds.saturating_mul(1000).to_string().parse() {
        meta.insert("grpc-retry-pushback-ms", v);
    }
    status
}

/// The key API's writes of grants: a retirement, and the grants CreateGrant makes.
#[tonic::async_trait]
pub trait GrantWriter: Send + Sync + 'static {
    /// Marks a grant Retired by `by`.
    async fn retire(&self, grant: &Grant, by: &str) -> Result<(), BackendError>;
    /// Creates `grant` — its namespace, name (generated when empty), terms and creator —
    /// and returns its id and name.
    async fn create(&self, grant: &Grant) -> Result<(String, String), CreateGrantError>;
}

/// Why the API server did not create a grant.
#[derive(Debug, thiserror::Error)]
pub enum CreateGrantError {
    #[error("a grant of that name already exists")]
    Exists,
    #[error("the API server refused the grant as invalid: {0}")]
    Invalid(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// What an audit line records of a call, filled in as the call proceeds.
#[derive(Default)]
struct Trail {
    key: Option<Arc<Key>>,
    version: Option<u32>,
    source: Option<(Arc<Key>, u32)>,
    grant_id: Option<String>,
    created_grant_id: Option<String>,
    context_keys: Vec<String>,
    source_context_keys: Vec<String>,
    /// The versions the call went on to use, in order, once the caller was authorized for
    /// each (see [`used`]).
    uses: Vec<(Arc<Key>, u32, UseKind)>,
}

impl ApiError {
    /// Whether this refuses a use that must postpone a destruction: of a key pending
    /// deletion, or of a version pending destruction.
    fn refuses_pending_destruction(&self) -> bool {
        match self {
            ApiError::KeyNotEnabled { state, .. } => *state == KeyState::PendingDeletion.as_str(),
            ApiError::VersionNotEnabled { state, .. } => {
                *state == VersionRefusal::PendingDestruction.as_str()
            }
            _ => false,
        }
    }
}

/// What a call used, once it is over. A call goes on to its next use only once the one
/// before went through, so every use but the last went through; the last did if the call
/// succeeded, and was refused (recorded as such) if the call ended in a refusal of a key
/// pending deletion or a version pending destruction. A use is only ever noted after the
/// caller was authorized for it, so a caller without the right cannot postpone anything.
fn used<T>(
    uses: Vec<(Arc<Key>, u32, UseKind)>,
    outcome: &Result<T, ApiError>,
) -> impl Iterator<Item = (Arc<Key>, u32, UseKind)> {
    let n = uses.len();
    uses.into_iter().enumerate().filter_map(move |(i, (key, version, kind))| match outcome {
        _ if i + 1 < n => Some((key, version, kind)),
        Ok(_) => Some((key, version, kind)),
        Err(e) if e.refuses_pending_destruction() => Some((key, version, UseKind::Refused)),
        Err(_) => None,
    })
}

/// The key API.
pub struct KeyApi<T, R, D, G> {
    auth: Authenticator<T>,
    authz: Authorizer<R>,
    keys: D,
    grant_writer: G,
    calls: CallPipeline,
    usage: Arc<dyn UseRecorder>,
    /// How many grants CreateGrant lets a key have.
    max_grants_per_key: NonZeroUsize,
}

/// How many grants a key may have before CreateGrant refuses more (`--max-grants-per-key`).
/// Every call of a key reads its grants, so the bound keeps calls fast as well as etcd
/// small.
pub const DEFAULT_MAX_GRANTS_PER_KEY: NonZeroUsize = match NonZeroUsize::new(1_000) {
    Some(n) => n,
    None => NonZeroUsize::MIN,
};

fn request_id(meta: &MetadataMap) -> String {
    meta.get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

fn context_map(map: &std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn version_ref(key: &Key, version: u32) -> Option<KeyVersionRef> {
    Some(KeyVersionRef { key: key.info.display(), key_id: key.info.key_id.clone(), version })
}

impl<T, R, D, G> KeyApi<T, R, D, G>
where
    T: TokenReviewer,
    R: RbacChecker,
    D: KeyDirectory,
    G: GrantWriter,
{
    pub fn new(
        auth: Authenticator<T>,
        rbac: R,
        keys: D,
        grant_writer: G,
        audit: Arc<AuditLog>,
        metrics: OperationMetrics,
        usage: Arc<dyn UseRecorder>,
    ) -> Self {
        KeyApi {
            auth,
            authz: Authorizer::new(rbac),
            keys,
            grant_writer,
            calls: CallPipeline::new("server", audit, metrics),
            usage,
            max_grants_per_key: DEFAULT_MAX_GRANTS_PER_KEY,
        }
    }

    /// Lets CreateGrant give a key at most `max` grants (counting every grant object of the
    /// key that is not being deleted: retired and expired ones too).
    pub fn with_max_grants_per_key(self, max: NonZeroUsize) -> Self {
        KeyApi { max_grants_per_key: max, ..self }
    }

    /// Authenticates, runs `body`, then hands the outcome to the call pipeline.
    async fn call<Req, Resp, F>(
        &self,
        operation: &'static str,
        request: Request<Req>,
        body: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: AsyncFnOnce(&Identity, Req, &mut Trail) -> Result<Resp, ApiError>,
    {
        let started = Instant::now();
        let id = request_id(request.metadata());
        let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
        // Without a peer address (not over TCP), every such caller counts as one client.
        let client = request.remote_addr().map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
        let mut trail = Trail::default();
        // A call over the AWS API comes authenticated (SigV4 and its session), and takes
        // its typed error back for an AWS answer.
        let aws = request.extensions().get::<AwsCaller>().cloned();
        let (principal, outcome) = match (&aws, Authenticator::<T>::bearer(header.as_deref())) {
            (Some(caller), _) => {
                let out = body(&caller.identity, request.into_inner(), &mut trail).await;
                (caller.identity.username.clone(), out)
            }
            (None, Err(e)) => (String::new(), Err(ApiError::from(e))),
            (None, Ok(token)) => {
                match self.auth.authenticate(token, Timestamp::now().as_second(), client).await {
                    Err(e) => (String::new(), Err(ApiError::from(e))),
                    Ok(who) => {
                        let out = body(&who, request.into_inner(), &mut trail).await;
                        (who.username, out)
                    }
                }
            }
        };
        if let (Some(caller), Err(e)) = (&aws, &outcome) {
            caller.record(e);
        }
        let event = AuditEvent {
            request_id: id.clone(),
            principal,
            operation,
            key: trail.key.as_ref().map(|k| k.info.display()),
            key_id: trail.key.as_ref().map(|k| k.info.key_id.clone()),
            key_version: trail.version,
            source_key: trail.source.as_ref().map(|(k, _)| k.info.display()),
            source_key_id: trail.source.as_ref().map(|(k, _)| k.info.key_id.clone()),
            source_key_version: trail.source.as_ref().map(|(_, v)| *v),
            grant_id: trail.grant_id,
            created_grant_id: trail.created_grant_id,
            encryption_context_keys: trail.context_keys,
            source_encryption_context_keys: trail.source_context_keys,
            ..Default::default()
        };
        for (key, version, kind) in used(trail.uses, &outcome) {
            self.usage.record(&key.info, version, kind);
        }
        let mut response = self.calls.finish(started, event, outcome).await.map(Response::new)?;
        if let Ok(v) = id.parse() {
            response.metadata_mut().insert("x-request-id", v);
        }
        Ok(response)
    }

    /// The key the caller names for `op`, once the caller is authorized for it.
    async fn authorized_key(
        &self,
        who: &Identity,
        name: &str,
        op: KeyOperation,
        context: &BTreeMap<String, String>,
        trail: &mut Trail,
    ) -> Result<Arc<Key>, ApiError> {
        if name.is_empty() {
            return Err(ApiError::KeyRequired);
        }
        if name.len() > MAX_KEY_NAME_LEN {
            return Err(ApiError::KeyNameTooLong);
        }
        let key =
            self.keys.resolve(name).ok_or_else(|| ApiError::key_refused(name, op, Refusal::NotFound))?;
        trail.key = Some(key.clone());
        self.authorize(who, &key, name, op, context, trail).await?;
        Ok(key)
    }

    /// Authorizes `op` on `key` (named `name` by the caller), recording the grant that
    /// allowed it.
    async fn authorize(
        &self,
        who: &Identity,
        key: &Key,
        name: &str,
        op: KeyOperation,
        context: &BTreeMap<String, String>,
        trail: &mut Trail,
    ) -> Result<(), ApiError> {
        let grants = self.keys.grants(&key.info.namespace, &key.info.name);
        let allowed = self
            .authz
            .authorize(who, key, op, context, &grants, Timestamp::now())
            .await
            .map_err(|e| ApiError::key_refused(name, op, Refusal::Authz(Box::new(e))))?;
        if let Some(grant_id) = allowed.grant_id() {
            trail.grant_id = Some(grant_id);
        }
        Ok(())
    }

    /// The key's state must let it be used as `kind` of `version` (the current one when
    /// none is given): the trail notes the use, which the caller is authorized for.
    fn usable(
        key: &Arc<Key>,
        version: Option<u32>,
        kind: UseKind,
        trail: &mut Trail,
    ) -> Result<(), ApiError> {
        if let Some(version) = version.or(key.info.current_version) {
            trail.uses.push((key.clone(), version, kind));
        }
        // Imported material past its validTo is refused at once, before the controller has
        // deleted it.
        let state = key.info.state_at(Timestamp::now());
        if state != KeyState::Enabled {
            return Err(ApiError::KeyNotEnabled { key: key.info.display(), state: state.as_str() });
        }
        Ok(())
    }

    /// The key's current version and its material (unwrapped only now, after the caller
    /// was authorized).
    fn current(&self, key: &Key) -> Result<(u32, Arc<KeyMaterial>), ApiError> {
        let versions = self.keys.material(key).map_err(ApiError::Material)?;
        key.info
            .current_version
            .and_then(|v| Some((v, versions.versions.get(&v)?.clone())))
            .ok_or_else(|| ApiError::NoCurrentVersion(key.info.display()))
    }

    fn seal(
        key: &Key,
        version: u32,
        material: &KeyMaterial,
        context: &BTreeMap<String, String>,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, ApiError> {
        let key_id = uuid::Uuid::parse_str(&key.info.key_id)
            .map_err(|_| ApiError::InvalidKeyId(key.info.display()))?;
        blob::seal_blob(material, &key_id, version, context, plaintext).map_err(ApiError::Seal)
    }

    fn check_context(context: &BTreeMap<String, String>, trail: &mut Trail) -> Result<(), ApiError> {
        trail.context_keys = context.keys().cloned().collect();
        blob::check_context(context)?;
        Ok(())
    }

    /// The key a ciphertext names, once the caller is authorized for `op` on it; the
    /// ciphertext's header names the key (by keyId) and the version. A key the caller gives
    /// with the ciphertext must be that key; it is compared, not looked up, so that naming
    /// another key tells nothing of it.
    async fn ciphertext_key(
        &self,
        who: &Identity,
        ciphertext: &[u8],
        context: &BTreeMap<String, String>,
        expected_key: &str,
        op: KeyOperation,
        trail: &mut Trail,
    ) -> Result<(Arc<Key>, u32), ApiError> {
        let header = blob::parse_header(ciphertext)?;
        let key = self
            .keys
            .resolve(&header.key_id)
            .ok_or_else(|| ApiError::key_refused(&header.key_id, op, Refusal::NotFound))?;
        // ReEncrypt's audit line names the ciphertext's key as its source.
        match op {
            KeyOperation::ReEncryptFrom => trail.source = Some((key.clone(), header.version)),
            _ => (trail.key, trail.version) = (Some(key.clone()), Some(header.version)),
        }
        self.authorize(who, &key, &header.key_id, op, context, trail).await?;
        if !expected_key.is_empty() && expected_key != key.info.display() && expected_key != key.info.key_id {
            return Err(ApiError::WrongKey { actual: key.info.display(), expected: expected_key.to_owned() });
        }
        Ok((key, header.version))
    }

    /// Opens a ciphertext under `version` of `key`, which must be usable.
    fn open(
        &self,
        key: &Arc<Key>,
        version: u32,
        context: &BTreeMap<String, String>,
        ciphertext: &[u8],
        trail: &mut Trail,
    ) -> Result<SecretBytes, ApiError> {
        Self::usable(key, Some(version), UseKind::Decrypt, trail)?;
        if let Some(refusal) = key.info.refused_versions.get(&version) {
            return Err(ApiError::VersionNotEnabled {
                key: key.info.display(),
                version,
                state: refusal.as_str(),
            });
        }
        let versions = self.keys.material(key).map_err(ApiError::Material)?;
        let material = versions
            .versions
            .get(&version)
            .cloned()
            .ok_or_else(|| ApiError::VersionNotHeld { key: key.info.display(), version })?;
        blob::open_blob(&material, context, ciphertext).map_err(|e| match e {
            SealError::Open => ApiError::DecryptionFailed,
            other => ApiError::Seal(other),
        })
    }

    async fn generate(
        &self,
        who: &Identity,
        key: &str,
        context: &BTreeMap<String, String>,
        bytes: u32,
        op: KeyOperation,
        trail: &mut Trail,
    ) -> Result<(SecretBytes, Vec<u8>, Option<KeyVersionRef>), ApiError> {
        Self::check_context(context, trail)?;
        let n = match bytes {
            0 => 32,
            requested if requested > MAX_RANDOM_BYTES => {
                return Err(ApiError::DataKeyTooLarge { requested, max: MAX_RANDOM_BYTES });
            }
            n => n,
        };
        let key = self.authorized_key(who, key, op, context, trail).await?;
        Self::usable(&key, None, UseKind::Encrypt, trail)?;
        let (version, material) = self.current(&key)?;
        trail.version = Some(version);
        let mut data_key = vec![0u8; n as usize];
        getrandom::fill(&mut data_key).map_err(|_| ApiError::Random)?;
        let data_key = SecretBytes::new(data_key);
        let blob = Self::seal(&key, version, &material, context, data_key.expose())?;
        Ok((data_key, blob, version_ref(&key, version)))
    }
}

pub fn describe(key: &Key) -> KeyMetadata {
    let time = |t: Option<Timestamp>| t.map(|t| t.to_string()).unwrap_or_default();
    KeyMetadata {
        key: key.info.display(),
        key_id: key.info.key_id.clone(),
        description: key.description.clone(),
        state: key.info.state_at(Timestamp::now()).as_str().to_owned(),
        key_spec: "SYMMETRIC_DEFAULT".into(),
        key_usage: "ENCRYPT_DECRYPT".into(),
        origin: match key.origin {
            Origin::Kubekms => "KUBEKMS".into(),
            Origin::External => "EXTERNAL".into(),
        },
        current_version: key.info.current_version.unwrap_or(0),
        versions: key.versions.clone(),
        creation_time: time(key.created),
        next_rotation_time: time(key.next_rotation),
        deletion_time: time(key.deletion),
        automatic_rotation: key.automatic_rotation,
        rotation_period_days: u32::from(key.rotation_period_days),
        valid_to: time(key.info.valid_to),
    }
}

#[tonic::async_trait]
impl<T, R, D, G> KeyService for KeyApi<T, R, D, G>
where
    T: TokenReviewer,
    R: RbacChecker,
    D: KeyDirectory,
    G: GrantWriter,
{
    async fn encrypt(&self, request: Request<EncryptRequest>) -> Result<Response<EncryptResponse>, Status> {
        self.call("Encrypt", request, async |who, req, trail| {
            let context = context_map(&req.encryption_context);
            Self::check_context(&context, trail)?;
            match req.plaintext.len() {
                0 => return Err(ApiError::EmptyPlaintext),
                len if len > blob::MAX_PLAINTEXT_LEN => {
                    return Err(ApiError::PlaintextTooLarge { len, max: blob::MAX_PLAINTEXT_LEN });
                }
                _ => {}
            }
            let key = self.authorized_key(who, &req.key, KeyOperation::Encrypt, &context, trail).await?;
            Self::usable(&key, None, UseKind::Encrypt, trail)?;
            let (version, material) = self.current(&key)?;
            trail.version = Some(version);
            let mut plaintext = req.plaintext;
            let sealed = Self::seal(&key, version, &material, &context, &plaintext);
            zeroize::Zeroize::zeroize(&mut plaintext);
            Ok(EncryptResponse { ciphertext_blob: sealed?, key: version_ref(&key, version) })
        })
        .await
    }

    async fn decrypt(&self, request: Request<DecryptRequest>) -> Result<Response<DecryptResponse>, Status> {
        self.call("Decrypt", request, async |who, req, trail| {
            let context = context_map(&req.encryption_context);
            Self::check_context(&context, trail)?;
            let (key, version) = self
                .ciphertext_key(who, &req.ciphertext_blob, &context, &req.key, KeyOperation::Decrypt, trail)
                .await?;
            let plaintext = self.open(&key, version, &context, &req.ciphertext_blob, trail)?;
            Ok(DecryptResponse { plaintext: plaintext.expose().to_vec(), key: version_ref(&key, version) })
        })
        .await
    }

    async fn re_encrypt(
        &self,
        request: Request<ReEncryptRequest>,
    ) -> Result<Response<ReEncryptResponse>, Status> {
        self.call("ReEncrypt", request, async |who, req, trail| {
            let source_context = context_map(&req.source_encryption_context);
            let context = context_map(&req.destination_encryption_context);
            trail.source_context_keys = source_context.keys().cloned().collect();
            blob::check_context(&source_context)?;
            Self::check_context(&context, trail)?;
            // Both sides are authorized before anything is decrypted.
            let (source, source_version) = self
                .ciphertext_key(
                    who,
                    &req.ciphertext_blob,
                    &source_context,
                    &req.source_key,
                    KeyOperation::ReEncryptFrom,
                    trail,
                )
                .await?;
            let key = self
                .authorized_key(who, &req.destination_key, KeyOperation::ReEncryptTo, &context, trail)
                .await?;
            let plaintext =
                self.open(&source, source_version, &source_context, &req.ciphertext_blob, trail)?;
            Self::usable(&key, None, UseKind::Encrypt, trail)?;
            let (version, material) = self.current(&key)?;
            trail.version = Some(version);
            let ciphertext_blob = Self::seal(&key, version, &material, &context, plaintext.expose())?;
            Ok(ReEncryptResponse {
                ciphertext_blob,
                source_key: version_ref(&source, source_version),
                key: version_ref(&key, version),
            })
        })
        .await
    }

    async fn generate_data_key(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyResponse>, Status> {
        self.call("GenerateDataKey", request, async |who, req, trail| {
            let context = context_map(&req.encryption_context);
            let (data_key, ciphertext_blob, key) = self
                .generate(who, &req.key, &context, req.number_of_bytes, KeyOperation::GenerateDataKey, trail)
                .await?;
            Ok(GenerateDataKeyResponse { plaintext: data_key.expose().to_vec(), ciphertext_blob, key })
        })
        .await
    }

    async fn generate_data_key_without_plaintext(
        &self,
        request: Request<GenerateDataKeyWithoutPlaintextRequest>,
    ) -> Result<Response<GenerateDataKeyWithoutPlaintextResponse>, Status> {
        self.call("GenerateDataKeyWithoutPlaintext", request, async |who, req, trail| {
            let context = context_map(&req.encryption_context);
            let (_, ciphertext_blob, key) = self
                .generate(
                    who,
                    &req.key,
                    &context,
                    req.number_of_bytes,
                    KeyOperation::GenerateDataKeyWithoutPlaintext,
                    trail,
                )
                .await?;
            Ok(GenerateDataKeyWithoutPlaintextResponse { ciphertext_blob, key })
        })
        .await
    }

    async fn generate_random(
        &self,
        request: Request<GenerateRandomRequest>,
    ) -> Result<Response<GenerateRandomResponse>, Status> {
        self.call("GenerateRandom", request, async |_who, req, _trail| {
            let n = req.number_of_bytes;
            if n == 0 || n > MAX_RANDOM_BYTES {
                return Err(ApiError::RandomBytesOutOfRange { requested: n, max: MAX_RANDOM_BYTES });
            }
            let mut plaintext = vec![0u8; n as usize];
            getrandom::fill(&mut plaintext).map_err(|_| ApiError::Random)?;
            Ok(GenerateRandomResponse { plaintext })
        })
        .await
    }

    async fn describe_key(
        &self,
        request: Request<DescribeKeyRequest>,
    ) -> Result<Response<DescribeKeyResponse>, Status> {
        self.call("DescribeKey", request, async |who, req, trail| {
            let key = self
                .authorized_key(who, &req.key, KeyOperation::DescribeKey, &BTreeMap::new(), trail)
                .await?;
            Ok(DescribeKeyResponse { metadata: Some(describe(&key)) })
        })
        .await
    }

    async fn retire_grant(
        &self,
        request: Request<RetireGrantRequest>,
    ) -> Result<Response<RetireGrantResponse>, Status> {
        self.call("RetireGrant", request, async |who, req, trail| {
            if req.grant.is_empty() {
                return Err(ApiError::GrantRequired);
            }
            let grant = self
                .keys
                .grant(&req.grant)
                .ok_or_else(|| ApiError::grant_refused(&req.grant, Refusal::NotFound))?;
            trail.grant_id = Some(grant.grant_id.clone());
            trail.key = self.keys.resolve(&format!("{}/{}", grant.namespace, grant.key_name));
            self.authz
                .authorize_retire(who, trail.key.as_deref(), &grant)
                .await
                .map_err(|e| ApiError::grant_refused(&req.grant, Refusal::Authz(Box::new(e))))?;
            if grant.retired_by.is_none() {
                self.grant_writer.retire(&grant, &who.username).await.map_err(ApiError::GrantWrite)?;
            }
            Ok(RetireGrantResponse { grant_id: grant.grant_id.clone() })
        })
        .await
    }

    async fn create_grant(
        &self,
        request: Request<CreateGrantRequest>,
    ) -> Result<Response<CreateGrantResponse>, Status> {
        self.call("CreateGrant", request, async |who, req, trail| {
            let op = KeyOperation::CreateGrant;
            if req.key.is_empty() {
                return Err(ApiError::KeyRequired);
            }
            if req.key.len() > MAX_KEY_NAME_LEN {
                return Err(ApiError::KeyNameTooLong);
            }
            let key = self
                .keys
                .resolve(&req.key)
                .ok_or_else(|| ApiError::key_refused(&req.key, op, Refusal::NotFound))?;
            trail.key = Some(key.clone());
            let grants = self.keys.grants(&key.info.namespace, &key.info.name);
            let mut grant = match requested_grant(&req, &key) {
                Ok(grant) => grant,
                // Only a caller with some right to grant on the key learns what is wrong with
                // its request (and so that the key exists).
                Err(e) => {
                    self.authorize(who, &key, &req.key, op, &BTreeMap::new(), trail).await?;
                    return Err(e.into());
                }
            };
            let authority = self
                .authz
                .authorize_grant(who, &key, &grant, &grants, Timestamp::now())
                .await
                .map_err(|e| ApiError::key_refused(&req.key, op, Refusal::Authz(Box::new(e))))?;
            // The grant that gave the right to grant is recorded with the creator: the
            // controller checks the new grant against that grant only.
            let parent_grant = match authority {
                GrantAuthority::Grant(id) => Some(id),
                GrantAuthority::Policy(_) | GrantAuthority::Rbac => None,
            };
            trail.grant_id = parent_grant.clone();
            // Checked once the caller is known to have the right to grant: only such a
            // caller learns how many grants the key has. Concurrent calls may pass it
            // together, by at most the calls in flight.
            let held = grants.iter().filter(|g| !g.deleting).count();
            let max = self.max_grants_per_key.get();
            if held >= max {
                return Err(ApiError::TooManyGrants { key: key.info.display(), held, max });
            }
            let identity =
                Identity { username: who.username.clone(), groups: who.groups.clone(), ..Default::default() };
            grant.creator = Some(Creator { identity, parent_grant });
            let (grant_id, name) = self.grant_writer.create(&grant).await.map_err(|e| match e {
                CreateGrantError::Exists if grant.name.is_empty() => {
                    // A generated name that was taken: worth another try.
                    ApiError::GrantCreate(BackendError::new(std::io::Error::other(
                        "a generated grant name was taken",
                    )))
                }
                CreateGrantError::Exists => ApiError::GrantExists(grant.display()),
                CreateGrantError::Invalid(reason) => ApiError::GrantRejected(reason),
                CreateGrantError::Backend(e) => ApiError::GrantCreate(e),
            })?;
            trail.created_grant_id = Some(grant_id.clone());
            Ok(CreateGrantResponse { grant_id, grant: format!("{}/{name}", key.info.namespace) })
        })
        .await
    }
}
