//! The key API service: authenticate, resolve the key, authorize, check the key's state,
//! do the cryptography, audit and meter — in that order, for every call.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use jiff::Timestamp;
use kube::ResourceExt;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::auth::{AuthError, Authenticator, Identity, TokenReviewer};
use super::authz::{PolicyVerdict, RbacChecker, grant_allows, policy_verdict};
use super::blob::{self, BlobError};
use super::keys::{DirectoryError, KeyDirectory, KeyEntry};
use crate::api::{KeyOperation, KeyState, KmsGrant};
use crate::audit::{AuditEvent, AuditLog};
use crate::crypto::{KeyMaterial, SealError};
use crate::metering::{OperationMetrics, code_name};
use crate::proto::keyapi::key_service_server::KeyService;
use crate::proto::keyapi::*;

/// The most bytes GenerateDataKey and GenerateRandom return.
pub const MAX_RANDOM_BYTES: u32 = 1024;

/// Every way a call fails, mapped to a gRPC status in one place ([`ApiError::status`]).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("decryption failed")]
    DecryptionFailed,
    #[error("failed to authorize the call with Kubernetes RBAC")]
    Rbac(#[source] super::authz::RbacError),
    #[error("the key's material cannot be used")]
    Material(#[source] DirectoryError),
    #[error("failed to encrypt")]
    Seal(#[source] SealError),
    #[error("failed to read random bytes from the operating system")]
    Random,
    #[error("failed to write the audit log")]
    Audit(#[source] crate::audit::AuditError),
    #[error("failed to update the grant")]
    GrantWrite(#[source] kube::Error),
}

impl ApiError {
    /// The status the caller sees; internal details stay in the log.
    pub fn status(&self) -> Status {
        match self {
            ApiError::Auth(AuthError::Backend(_)) => {
                Status::unavailable("cannot authenticate callers right now")
            }
            ApiError::Auth(e) => Status::unauthenticated(e.to_string()),
            ApiError::InvalidArgument(_) | ApiError::Blob(_) => Status::invalid_argument(self.to_string()),
            ApiError::NotFound(_) => Status::not_found(self.to_string()),
            ApiError::PermissionDenied(_) => Status::permission_denied(self.to_string()),
            ApiError::FailedPrecondition(_) => Status::failed_precondition(self.to_string()),
            ApiError::DecryptionFailed => Status::invalid_argument("decryption failed"),
            ApiError::Rbac(_) => Status::unavailable("cannot check Kubernetes RBAC right now"),
            ApiError::Material(_) | ApiError::Seal(_) | ApiError::Random => {
                Status::internal(self.to_string())
            }
            ApiError::Audit(_) => Status::unavailable("the audit log cannot be written"),
            ApiError::GrantWrite(_) => Status::unavailable("failed to update the grant"),
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
                | ApiError::Audit(_)
                | ApiError::GrantWrite(_)
        )
    }
}

/// Marks a grant Retired (the server's only write).
#[tonic::async_trait]
pub trait GrantRetirer: Send + Sync + 'static {
    async fn retire(&self, grant: &KmsGrant, by: &str) -> Result<(), kube::Error>;
}

/// Retires grants through the API server (status subresource, field manager `kubekms-server`).
pub struct KubeGrantRetirer(pub kube::Client);

#[tonic::async_trait]
impl GrantRetirer for KubeGrantRetirer {
    async fn retire(&self, grant: &KmsGrant, by: &str) -> Result<(), kube::Error> {
        let api: kube::Api<KmsGrant> =
            kube::Api::namespaced(self.0.clone(), &grant.namespace().unwrap_or_default());
        // retiredBy is the server's field and final; the controller, which owns state,
        // turns it into Retired.
        let patch = serde_json::json!({
            "apiVersion": "kms.kubekms.io/v1alpha1",
            "kind": "KmsGrant",
            "status": {"retiredBy": by},
        });
        api.patch_status(
            &grant.name_any(),
            &kube::api::PatchParams::apply("kubekms-server"),
            &kube::api::Patch::Apply(patch),
        )
        .await
        .map(|_| ())
    }
}

/// What an audit line records of a call, filled in as the call proceeds.
#[derive(Default)]
struct Trail {
    key: Option<KeyEntry>,
    version: Option<u32>,
    source: Option<(KeyEntry, u32)>,
    grant_id: Option<String>,
    context_keys: Vec<String>,
}

/// The key API.
pub struct KeyApi<T, R, D, G> {
    auth: Authenticator<T>,
    rbac: R,
    keys: D,
    retirer: G,
    audit: Arc<AuditLog>,
    metrics: OperationMetrics,
}

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

fn version_ref(entry: &KeyEntry, version: u32) -> Option<KeyVersionRef> {
    Some(KeyVersionRef { key: entry.display(), key_id: entry.key_id(), version })
}

impl<T, R, D, G> KeyApi<T, R, D, G>
where
    T: TokenReviewer,
    R: RbacChecker,
    D: KeyDirectory,
    G: GrantRetirer,
{
    pub fn new(
        auth: Authenticator<T>,
        rbac: R,
        keys: D,
        retirer: G,
        audit: Arc<AuditLog>,
        metrics: OperationMetrics,
    ) -> Self {
        KeyApi { auth, rbac, keys, retirer, audit, metrics }
    }

    /// Authenticates, runs `body`, then audits, meters and maps the result.
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
        let mut trail = Trail::default();
        let (principal, outcome) = match Authenticator::<T>::bearer(header.as_deref()) {
            Err(e) => (String::new(), Err(ApiError::from(e))),
            Ok(token) => match self.auth.authenticate(token, Timestamp::now().as_second()).await {
                Err(e) => (String::new(), Err(ApiError::from(e))),
                Ok(who) => {
                    let out = body(&who, request.into_inner(), &mut trail).await;
                    (who.username, out)
                }
            },
        };
        let status = outcome.as_ref().err().map(ApiError::status);
        if let Err(e) = &outcome
            && e.is_internal()
        {
            tracing::error!(error = %crate::telemetry::error_chain(e), operation, request_id = %id, "call failed");
        }
        let result = status.as_ref().map_or("OK", |s| code_name(s.code()));
        let event = AuditEvent {
            component: "server",
            request_id: id.clone(),
            principal,
            operation,
            key: trail.key.as_ref().map(KeyEntry::display),
            key_id: trail.key.as_ref().map(KeyEntry::key_id),
            key_version: trail.version,
            source_key: trail.source.as_ref().map(|(k, _)| k.display()),
            source_key_id: trail.source.as_ref().map(|(k, _)| k.key_id()),
            source_key_version: trail.source.as_ref().map(|(_, v)| *v),
            grant_id: trail.grant_id.clone(),
            encryption_context_keys: trail.context_keys,
            result,
            reason: status.as_ref().map(|s| s.message().to_owned()),
        };
        let audited = self.audit.record(&event);
        let key_label = event.key.clone().unwrap_or_default();
        let (result, reply) = match (outcome, audited) {
            (Ok(resp), Ok(())) => (result, Ok(resp)),
            (Ok(_), Err(e)) => {
                let err = ApiError::Audit(e);
                tracing::error!(error = %crate::telemetry::error_chain(&err), "refusing a call that cannot be audited");
                ("Unavailable", Err(err.status()))
            }
            (Err(e), _) => (result, Err(e.status())),
        };
        self.metrics.observe("server", key_label, operation, result, started.elapsed().as_secs_f64());
        let mut response = reply.map(Response::new)?;
        if let Ok(v) = id.parse() {
            response.metadata_mut().insert("x-request-id", v);
        }
        Ok(response)
    }

    fn resolve(&self, name: &str) -> Result<KeyEntry, ApiError> {
        if name.is_empty() {
            return Err(ApiError::InvalidArgument("key is required (namespace/name or keyId)".into()));
        }
        if name.len() > 320 {
            return Err(ApiError::InvalidArgument("key name is too long".into()));
        }
        self.keys.resolve(name).ok_or_else(|| ApiError::NotFound(format!("key {name:?} not found")))
    }

    /// Key policy (explicit deny wins), then grants, then RBAC when the policy delegates.
    async fn authorize(
        &self,
        who: &Identity,
        entry: &KeyEntry,
        op: KeyOperation,
        context: &BTreeMap<String, String>,
        trail: &mut Trail,
    ) -> Result<(), ApiError> {
        let key = &entry.key;
        let (ns, name) = (key.namespace().unwrap_or_default(), key.name_any());
        match policy_verdict(&key.spec.policy, who, op) {
            PolicyVerdict::Deny(sid) => {
                let by = sid.map(|s| format!(" (statement {s:?})")).unwrap_or_default();
                return Err(ApiError::PermissionDenied(format!(
                    "{} is denied {} on key {ns}/{name} by the key policy{by}",
                    who.username,
                    op.as_str()
                )));
            }
            PolicyVerdict::Allow(_) => return Ok(()),
            PolicyVerdict::NoMatch => {}
        }
        let now = Timestamp::now();
        let key_id = entry.key_id();
        if let Some(grant) =
            self.keys.grants(&ns, &name).iter().find(|g| grant_allows(g, &key_id, who, op, context, now))
        {
            trail.grant_id = grant.uid();
            return Ok(());
        }
        if key.spec.policy.delegate_to_rbac
            && self.rbac.allowed(who, op.rbac_verb(), &ns, &name).await.map_err(ApiError::Rbac)?
        {
            return Ok(());
        }
        Err(ApiError::PermissionDenied(format!(
            "{} may not {} with key {ns}/{name}: no key policy statement, grant{} allows it",
            who.username,
            op.as_str(),
            if key.spec.policy.delegate_to_rbac { " or RBAC rule" } else { "" },
        )))
    }

    /// The key's state must let it be used.
    fn usable(entry: &KeyEntry) -> Result<(), ApiError> {
        let state = entry.key.status.as_ref().and_then(|s| s.state).unwrap_or(KeyState::Creating);
        if state != KeyState::Enabled {
            return Err(ApiError::FailedPrecondition(format!(
                "key {} is {}; it refuses cryptographic operations until it is Enabled",
                entry.display(),
                state.as_str()
            )));
        }
        Ok(())
    }

    /// The key's current version and its material (unwrapped only now, after the caller
    /// was authorized).
    fn current(&self, entry: &KeyEntry) -> Result<(u32, Arc<KeyMaterial>), ApiError> {
        let version = entry.key.status.as_ref().and_then(|s| s.current_version);
        let versions = self.keys.material(entry).map_err(ApiError::Material)?;
        version.and_then(|v| Some((v, versions.versions.get(&v)?.clone()))).ok_or_else(|| {
            ApiError::FailedPrecondition(format!("key {} has no usable current version yet", entry.display()))
        })
    }

    fn seal(
        entry: &KeyEntry,
        version: u32,
        material: &KeyMaterial,
        context: &BTreeMap<String, String>,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, ApiError> {
        let key_id = uuid::Uuid::parse_str(&entry.key_id()).map_err(|_| {
            ApiError::FailedPrecondition(format!("key {} has no valid keyId", entry.display()))
        })?;
        blob::seal_blob(material, &key_id, version, context, plaintext).map_err(ApiError::Seal)
    }

    fn check_context(context: &BTreeMap<String, String>, trail: &mut Trail) -> Result<(), ApiError> {
        trail.context_keys = context.keys().cloned().collect();
        blob::check_context(context)?;
        Ok(())
    }

    /// Opens a blob after authorizing `op` on the key it names.
    async fn open(
        &self,
        who: &Identity,
        ciphertext: &[u8],
        context: &BTreeMap<String, String>,
        expected_key: &str,
        op: KeyOperation,
        trail: &mut Trail,
    ) -> Result<(KeyEntry, u32, crate::crypto::SecretBytes), ApiError> {
        let header = blob::parse_header(ciphertext)?;
        let entry = self.keys.resolve(&header.key_id).ok_or_else(|| {
            ApiError::NotFound(format!(
                "the key that made this ciphertext ({}) does not exist",
                header.key_id
            ))
        })?;
        trail.version = Some(header.version);
        trail.key = Some(entry.clone());
        self.authorize(who, &entry, op, context, trail).await?;
        // Only an authorized caller learns which key a ciphertext is under.
        if !expected_key.is_empty() {
            let expected = self.resolve(expected_key)?;
            if expected.key_id() != entry.key_id() {
                return Err(ApiError::InvalidArgument(format!(
                    "the ciphertext is under key {}, not {expected_key}",
                    entry.display()
                )));
            }
        }
        Self::usable(&entry)?;
        let versions = self.keys.material(&entry).map_err(ApiError::Material)?;
        let material = versions.versions.get(&header.version).cloned().ok_or_else(|| {
            ApiError::NotFound(format!("key {} does not hold version {}", entry.display(), header.version))
        })?;
        let plaintext = blob::open_blob(&material, context, ciphertext).map_err(|e| match e {
            SealError::Open => ApiError::DecryptionFailed,
            other => ApiError::Seal(other),
        })?;
        Ok((entry, header.version, plaintext))
    }

    async fn generate(
        &self,
        who: &Identity,
        key: &str,
        context: &BTreeMap<String, String>,
        bytes: u32,
        op: KeyOperation,
        trail: &mut Trail,
    ) -> Result<(crate::crypto::SecretBytes, Vec<u8>, Option<KeyVersionRef>), ApiError> {
        let n = match bytes {
            0 => 32,
            n if n > MAX_RANDOM_BYTES => {
                return Err(ApiError::InvalidArgument(format!(
                    "number_of_bytes is {n}; the most is {MAX_RANDOM_BYTES}"
                )));
            }
            n => n,
        };
        Self::check_context(context, trail)?;
        let entry = self.resolve(key)?;
        trail.key = Some(entry.clone());
        self.authorize(who, &entry, op, context, trail).await?;
        Self::usable(&entry)?;
        let (version, material) = self.current(&entry)?;
        trail.version = Some(version);
        let mut data_key = vec![0u8; n as usize];
        getrandom::fill(&mut data_key).map_err(|_| ApiError::Random)?;
        let data_key = crate::crypto::SecretBytes::new(data_key);
        let blob = Self::seal(&entry, version, &material, context, data_key.expose())?;
        Ok((data_key, blob, version_ref(&entry, version)))
    }
}

fn describe(entry: &KeyEntry) -> KeyMetadata {
    let key = &entry.key;
    let status = key.status.clone().unwrap_or_default();
    let time = |t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
        t.map(|t| t.0.to_string()).unwrap_or_default()
    };
    KeyMetadata {
        key: entry.display(),
        key_id: entry.key_id(),
        description: key.spec.description.clone(),
        state: status.state.unwrap_or(KeyState::Creating).as_str().to_owned(),
        key_spec: "SYMMETRIC_DEFAULT".into(),
        key_usage: "ENCRYPT_DECRYPT".into(),
        origin: match key.spec.origin {
            crate::api::Origin::Kubekms => "KUBEKMS".into(),
            crate::api::Origin::External => "EXTERNAL".into(),
        },
        current_version: status.current_version.unwrap_or(0),
        versions: status.versions.iter().map(|v| v.version).collect(),
        creation_time: time(key.metadata.creation_timestamp.as_ref()),
        next_rotation_time: time(status.next_rotation_time.as_ref()),
        deletion_time: time(status.deletion_time.as_ref()),
        automatic_rotation: key.spec.rotation.automatic,
        rotation_period_days: u32::from(key.spec.rotation.period_days),
    }
}

#[tonic::async_trait]
impl<T, R, D, G> KeyService for KeyApi<T, R, D, G>
where
    T: TokenReviewer,
    R: RbacChecker,
    D: KeyDirectory,
    G: GrantRetirer,
{
    async fn encrypt(&self, request: Request<EncryptRequest>) -> Result<Response<EncryptResponse>, Status> {
        self.call("Encrypt", request, async |who, req, trail| {
            let context = context_map(&req.encryption_context);
            Self::check_context(&context, trail)?;
            match req.plaintext.len() {
                0 => return Err(ApiError::InvalidArgument("plaintext is empty".into())),
                n if n > blob::MAX_PLAINTEXT_LEN => {
                    return Err(ApiError::InvalidArgument(format!(
                        "plaintext is {n} bytes; Encrypt takes at most {} (use GenerateDataKey and encrypt locally)",
                        blob::MAX_PLAINTEXT_LEN
                    )));
                }
                _ => {}
            }
            let entry = self.resolve(&req.key)?;
            trail.key = Some(entry.clone());
            self.authorize(who, &entry, KeyOperation::Encrypt, &context, trail).await?;
            Self::usable(&entry)?;
            let (version, material) = self.current(&entry)?;
            trail.version = Some(version);
            let mut plaintext = req.plaintext;
            let sealed = Self::seal(&entry, version, &material, &context, &plaintext);
            zeroize::Zeroize::zeroize(&mut plaintext);
            Ok(EncryptResponse { ciphertext_blob: sealed?, key: version_ref(&entry, version) })
        })
        .await
    }

    async fn decrypt(&self, request: Request<DecryptRequest>) -> Result<Response<DecryptResponse>, Status> {
        self.call("Decrypt", request, async |who, req, trail| {
            let context = context_map(&req.encryption_context);
            Self::check_context(&context, trail)?;
            let (entry, version, plaintext) = self
                .open(who, &req.ciphertext_blob, &context, &req.key, KeyOperation::Decrypt, trail)
                .await?;
            Ok(DecryptResponse { plaintext: plaintext.expose().to_vec(), key: version_ref(&entry, version) })
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
            blob::check_context(&source_context)?;
            Self::check_context(&context, trail)?;
            let (source, source_version, plaintext) = self
                .open(
                    who,
                    &req.ciphertext_blob,
                    &source_context,
                    &req.source_key,
                    KeyOperation::ReEncryptFrom,
                    trail,
                )
                .await?;
            trail.source = Some((source.clone(), source_version));
            trail.key = None;
            trail.version = None;
            let entry = self.resolve(&req.destination_key)?;
            trail.key = Some(entry.clone());
            self.authorize(who, &entry, KeyOperation::ReEncryptTo, &context, trail).await?;
            Self::usable(&entry)?;
            let (version, material) = self.current(&entry)?;
            trail.version = Some(version);
            let ciphertext_blob = Self::seal(&entry, version, &material, &context, plaintext.expose())?;
            Ok(ReEncryptResponse {
                ciphertext_blob,
                source_key: version_ref(&source, source_version),
                key: version_ref(&entry, version),
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
                return Err(ApiError::InvalidArgument(format!(
                    "number_of_bytes is {n}; it must be from 1 to {MAX_RANDOM_BYTES}"
                )));
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
            let entry = self.resolve(&req.key)?;
            trail.key = Some(entry.clone());
            self.authorize(who, &entry, KeyOperation::DescribeKey, &BTreeMap::new(), trail).await?;
            Ok(DescribeKeyResponse { metadata: Some(describe(&entry)) })
        })
        .await
    }

    async fn retire_grant(
        &self,
        request: Request<RetireGrantRequest>,
    ) -> Result<Response<RetireGrantResponse>, Status> {
        self.call("RetireGrant", request, async |who, req, trail| {
            if req.grant.is_empty() {
                return Err(ApiError::InvalidArgument(
                    "grant is required (namespace/name or grantId)".into(),
                ));
            }
            let grant = self
                .keys
                .grant(&req.grant)
                .ok_or_else(|| ApiError::NotFound(format!("grant {:?} not found", req.grant)))?;
            trail.grant_id = grant.uid();
            let ns = grant.namespace().unwrap_or_default();
            if let Some(entry) = self.keys.resolve(&format!("{ns}/{}", grant.spec.key_ref.name)) {
                trail.key = Some(entry);
            }
            let may = grant.spec.grantee.matches(&who.username, &who.groups)
                || grant
                    .spec
                    .retiring_principal
                    .as_ref()
                    .is_some_and(|p| p.matches(&who.username, &who.groups));
            if !may {
                return Err(ApiError::PermissionDenied(format!(
                    "{} is neither the grantee nor the retiring principal of grant {ns}/{}",
                    who.username,
                    grant.name_any()
                )));
            }
            if grant.status.as_ref().and_then(|s| s.retired_by.as_ref()).is_none() {
                self.retirer.retire(&grant, &who.username).await.map_err(ApiError::GrantWrite)?;
            }
            Ok(RetireGrantResponse { grant_id: grant.uid().unwrap_or_default() })
        })
        .await
    }
}
