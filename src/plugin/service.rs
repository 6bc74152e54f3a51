//! The KMS v2 gRPC service. It depends only on a [`Keyring`]: where the key comes from is
//! the wiring's business.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use super::format::{self, FormatError, KeyVersionId};
use crate::audit::{AuditEvent, AuditLog};
use crate::call::{CallError, CallPipeline};
use crate::crypto::{KeyMaterial, SealError};
use crate::domain::{KeySnapshot, KeyState, UseKind, VersionRefusal};
use crate::keyring::Keyring;
use crate::metering::OperationMetrics;
use crate::proto::kmsv2::key_management_service_server::KeyManagementService;
use crate::proto::kmsv2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use crate::usage::UseRecorder;

/// How long a health self-test result is reused by Status.
const HEALTH_TTL: Duration = Duration::from_secs(30);

/// Every way a call can fail, each named by its cause, mapped to a gRPC status in one
/// place ([`CallError::status`]).
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("uid is required")]
    MissingUid,
    #[error("plaintext is empty")]
    EmptyPlaintext,
    #[error("plaintext is {len} bytes; the most is {max}")]
    PlaintextTooLarge { len: usize, max: usize },
    #[error("key_id is required")]
    MissingKeyId,
    #[error("key_id is {len} bytes; the most is {max}")]
    KeyIdTooLong { len: usize, max: usize },
    #[error("key_id {0:?} is not a kubekms key id")]
    MalformedKeyId(String),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("key_id {0:?} names a key version this plugin does not hold")]
    UnknownKeyId(String),
    /// `version`: the one the call would have used (the current one for Encrypt, the
    /// ciphertext's for Decrypt), for the usage record.
    #[error("key {key} is {state}; it refuses every operation until it is Enabled")]
    NotEnabled { key: String, state: &'static str, version: Option<u32> },
    #[error("version {version} of key {key} is {state}; it refuses to decrypt")]
    VersionNotEnabled { key: String, version: u32, state: &'static str },
    #[error(
        "the key is not available yet: waiting for the KmsKey and its material (API server unreachable and no cache)"
    )]
    NoKey,
    #[error("the key is not available yet: the key has no current version yet")]
    NoCurrentVersion,
    #[error("decryption failed")]
    DecryptionFailed,
    #[error("failed to encrypt")]
    Seal(#[source] SealError),
}

impl CallError for PluginError {
    /// Authentication failures all say "decryption failed"; details of internal failures
    /// go to the log only.
    fn status(&self) -> Status {
        match self {
            PluginError::MissingUid
            | PluginError::EmptyPlaintext
            | PluginError::PlaintextTooLarge { .. }
            | PluginError::MissingKeyId
            | PluginError::KeyIdTooLong { .. }
            | PluginError::MalformedKeyId(_)
            | PluginError::Format(_) => Status::invalid_argument(self.to_string()),
            PluginError::UnknownKeyId(_) => Status::not_found(self.to_string()),
            PluginError::NotEnabled { .. } | PluginError::VersionNotEnabled { .. } => {
                Status::failed_precondition(self.to_string())
            }
            PluginError::NoKey | PluginError::NoCurrentVersion => Status::unavailable(self.to_string()),
            PluginError::DecryptionFailed => Status::invalid_argument("decryption failed"),
            PluginError::Seal(_) => Status::internal("failed to encrypt"),
        }
    }

    fn is_internal(&self) -> bool {
        matches!(self, PluginError::Seal(_))
    }
}

/// A self-test result: when, for which key id, and what it found.
type HealthCheck = (Instant, String, Result<(), String>);

/// The plugin.
pub struct KmsPlugin<K> {
    keyring: K,
    calls: CallPipeline,
    usage: Arc<dyn UseRecorder>,
    health: Mutex<Option<HealthCheck>>,
}

impl<K: Keyring> KmsPlugin<K> {
    /// The plugin, recording every use of a version in `usage`.
    pub fn new(
        keyring: K,
        audit: Arc<AuditLog>,
        metrics: OperationMetrics,
        usage: Arc<dyn UseRecorder>,
    ) -> Self {
        KmsPlugin {
            keyring,
            calls: CallPipeline::new("plugin", audit, metrics),
            usage,
            health: Mutex::new(None),
        }
    }

    /// The key, if its state lets it be used; `version` says which version a refused call
    /// would have used.
    fn usable(
        &self,
        version: impl FnOnce(&KeySnapshot) -> Option<u32>,
    ) -> Result<Arc<KeySnapshot>, PluginError> {
        let key = self.keyring.snapshot().ok_or(PluginError::NoKey)?;
        // Imported material past its validTo is refused at once, also from the cache.
        let state = key.info.state_at(jiff::Timestamp::now());
        if state != KeyState::Enabled {
            let (key, state, version) = (key.display(), state.as_str(), version(&key));
            return Err(PluginError::NotEnabled { key, state, version });
        }
        Ok(key)
    }

    fn encrypt_inner(
        &self,
        req: &EncryptRequest,
    ) -> Result<(EncryptResponse, Arc<KeySnapshot>, u32), PluginError> {
        if req.uid.is_empty() {
            return Err(PluginError::MissingUid);
        }
        match req.plaintext.len() {
            0 => return Err(PluginError::EmptyPlaintext),
            len if len > format::MAX_PLAINTEXT_LEN => {
                return Err(PluginError::PlaintextTooLarge { len, max: format::MAX_PLAINTEXT_LEN });
            }
            _ => {}
        }
        let key = self.usable(|k| k.info.current_version)?;
        let (version, material) = key.current().ok_or(PluginError::NoCurrentVersion)?;
        let id = KeyVersionId::new(&key.info.key_id, version);
        let annotations = format::annotations_for(&key.display());
        let ciphertext =
            format::wrap(material, &id, &annotations, &req.plaintext).map_err(PluginError::Seal)?;
        let response = EncryptResponse {
            ciphertext,
            key_id: id.to_kms(),
            annotations: annotations.into_iter().collect(),
        };
        Ok((response, key.clone(), version))
    }

    fn decrypt_inner(
        &self,
        req: &DecryptRequest,
    ) -> Result<(DecryptResponse, Arc<KeySnapshot>, u32), PluginError> {
        if req.uid.is_empty() {
            return Err(PluginError::MissingUid);
        }
        if req.key_id.is_empty() {
            return Err(PluginError::MissingKeyId);
        }
        if req.key_id.len() > format::MAX_KEY_ID_LEN {
            return Err(PluginError::KeyIdTooLong { len: req.key_id.len(), max: format::MAX_KEY_ID_LEN });
        }
        let id = KeyVersionId::parse(&req.key_id)
            .ok_or_else(|| PluginError::MalformedKeyId(req.key_id.clone()))?;
        let annotations: BTreeMap<String, Vec<u8>> = req.annotations.clone().into_iter().collect();
        format::check_annotations(&annotations)?;
        format::check_ciphertext(&req.ciphertext, &id)?;
        let key = self.usable(|k| (k.info.key_id == id.key_id).then_some(id.version))?;
        if id.key_id != key.info.key_id {
            return Err(PluginError::UnknownKeyId(req.key_id.clone()));
        }
        if let Some(refusal) = key.info.refused_versions.get(&id.version) {
            return Err(PluginError::VersionNotEnabled {
                key: key.display(),
                version: id.version,
                state: refusal.as_str(),
            });
        }
        let material =
            key.versions.get(&id.version).ok_or_else(|| PluginError::UnknownKeyId(req.key_id.clone()))?;
        let plaintext =
            format::unwrap(material, &id, &annotations, &req.ciphertext).map_err(|e| match e {
                SealError::Open => PluginError::DecryptionFailed,
                other => PluginError::Seal(other),
            })?;
        Ok((DecryptResponse { plaintext: plaintext.expose().to_vec() }, key.clone(), id.version))
    }

    /// Records the use, audits, meters and maps the outcome of one operation. A failed
    /// call is audited against the key the plugin serves, without a version.
    async fn finish<T>(
        &self,
        operation: &'static str,
        kind: UseKind,
        principal: String,
        request_id: &str,
        started: Instant,
        outcome: Result<(T, Arc<KeySnapshot>, u32), PluginError>,
    ) -> Result<T, Status> {
        let (key, version) = match &outcome {
            Ok((_, key, v)) => (Some(key.clone()), Some(*v)),
            Err(_) => (self.keyring.snapshot(), None),
        };
        if let (Some(key), Some((version, kind))) = (&key, used(kind, &outcome)) {
            self.usage.record(&key.info, version, kind);
        }
        let event = AuditEvent {
            request_id: request_id.to_owned(),
            principal,
            operation,
            key: key.as_ref().map(|k| k.display()),
            key_id: key.as_ref().map(|k| k.info.key_id.clone()),
            key_version: version,
            ..Default::default()
        };
        self.calls.finish(started, event, outcome.map(|(value, _, _)| value)).await
    }

    /// Whether a real wrap and unwrap through the current version works (cached).
    fn healthz(&self, key: &KeySnapshot, kms_key_id: &str) -> Result<(), String> {
        if let Ok(cache) = self.health.lock()
            && let Some((at, id, result)) = cache.as_ref()
            && id == kms_key_id
            && at.elapsed() < HEALTH_TTL
        {
            return result.clone();
        }
        let result = self_test(key);
        if let Ok(mut cache) = self.health.lock() {
            *cache = Some((Instant::now(), kms_key_id.to_owned(), result.clone()));
        }
        result
    }
}

/// Which version a call used, and how: the one it served, or the one it was refused because
/// the key is pending deletion or the version pending destruction (a use that postpones
/// the destruction). Other failures used nothing.
fn used<T>(
    kind: UseKind,
    outcome: &Result<(T, Arc<KeySnapshot>, u32), PluginError>,
) -> Option<(u32, UseKind)> {
    match outcome {
        Ok((_, _, version)) => Some((*version, kind)),
        Err(PluginError::NotEnabled { state, version: Some(version), .. })
            if *state == KeyState::PendingDeletion.as_str() =>
        {
            Some((*version, UseKind::Refused))
        }
        Err(PluginError::VersionNotEnabled { state, version, .. })
            if *state == VersionRefusal::PendingDestruction.as_str() =>
        {
            Some((*version, UseKind::Refused))
        }
        Err(_) => None,
    }
}

fn self_test(key: &KeySnapshot) -> Result<(), String> {
    let (version, material): (u32, &KeyMaterial) =
        key.current().map(|(v, m)| (v, m.as_ref())).ok_or("the key has no current version")?;
    let id = KeyVersionId::new(&key.info.key_id, version);
    let probe = crate::crypto::random_bytes::<32>().map_err(|_| "no randomness")?;
    let annotations = format::annotations_for(&key.display());
    let ct = format::wrap(material, &id, &annotations, &probe).map_err(|_| "wrap failed")?;
    let back = format::unwrap(material, &id, &annotations, &ct).map_err(|_| "unwrap failed")?;
    if back.expose() != probe {
        return Err("the self-test round trip returned other bytes".into());
    }
    Ok(())
}

fn principal<T>(req: &Request<T>) -> String {
    match req.extensions().get::<tonic::transport::server::UdsConnectInfo>().and_then(|i| i.peer_cred) {
        Some(cred) => match cred.pid() {
            Some(pid) => format!("unix:uid={},pid={pid}", cred.uid()),
            None => format!("unix:uid={}", cred.uid()),
        },
        None => "unix:unknown".to_owned(),
    }
}

#[tonic::async_trait]
impl<K: Keyring> KeyManagementService for KmsPlugin<K> {
    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        // The state is read once, so that the answer cannot mix two moments (validTo may
        // pass between two reads).
        let snapshot = self.keyring.snapshot().map(|key| (key.info.state_at(jiff::Timestamp::now()), key));
        let response = match snapshot {
            None => StatusResponse {
                version: "v2".into(),
                healthz: "waiting for the KmsKey and its material".into(),
                key_id: String::new(),
            },
            Some((state, key)) if state != KeyState::Enabled => StatusResponse {
                version: "v2".into(),
                healthz: format!("key {} is {}", key.display(), state.as_str()),
                // No key id while the key refuses to encrypt: kube-apiserver keeps using
                // its current DEK seed for writes as long as Status repeats that seed's key
                // id, even when unhealthy. Without one, its writes stop within minutes.
                key_id: String::new(),
            },
            Some((_, key)) => {
                let key_id = key
                    .info
                    .current_version
                    .map(|v| KeyVersionId::new(&key.info.key_id, v).to_kms())
                    .unwrap_or_default();
                let healthz = match self.healthz(&key, &key_id) {
                    Ok(()) => "ok".to_owned(),
                    Err(e) => format!("self-test failed: {e}"),
                };
                StatusResponse { version: "v2".into(), healthz, key_id }
            }
        };
        Ok(Response::new(response))
    }

    async fn encrypt(&self, request: Request<EncryptRequest>) -> Result<Response<EncryptResponse>, Status> {
        let started = Instant::now();
        let who = principal(&request);
        let mut req = request.into_inner();
        let outcome = self.encrypt_inner(&req);
        // The DEK seed is key material: wipe the request's copy.
        zeroize::Zeroize::zeroize(&mut req.plaintext);
        self.finish("Encrypt", UseKind::Encrypt, who, &req.uid, started, outcome).await.map(Response::new)
    }

    async fn decrypt(&self, request: Request<DecryptRequest>) -> Result<Response<DecryptResponse>, Status> {
        let started = Instant::now();
        let who = principal(&request);
        let req = request.into_inner();
        let outcome = self.decrypt_inner(&req);
        self.finish("Decrypt", UseKind::Decrypt, who, &req.uid, started, outcome).await.map(Response::new)
    }
}
