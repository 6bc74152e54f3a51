//! Key versions as `KmsKeyMaterial` holds them: the only place that turns plaintext key
//! material into stored bytes, and only through the root key. Pure: it builds and checks
//! objects; [`super::store`] reads and writes them.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::ObjectMeta;

use crate::api::{
    DeletionRefusal, KeyOwner, KmsKeyMaterial, KmsKeyMaterialSpec, MAX_VERSIONS, MaterialVersion, Origin,
    VersionTrigger,
};
use crate::crypto::{KeyMaterial, RootKey, RootKeyError, WrapContext};

/// Why reading or writing key material failed.
#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    #[error("failed to read KmsKeyMaterial {name}")]
    Get {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to create KmsKeyMaterial {name}")]
    Create {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to update KmsKeyMaterial {name}")]
    Update {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to delete KmsKeyMaterial {name}")]
    Delete {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("KmsKeyMaterial {name} belongs to {found}, not to {expected}")]
    Owner { name: String, found: String, expected: String },
    #[error("failed to generate key material")]
    Random(#[source] getrandom::Error),
    #[error("failed to wrap key material")]
    Wrap(#[source] RootKeyError),
    #[error("KmsKeyMaterial {name} version {version} cannot be unwrapped by this root key")]
    Unwrap {
        name: String,
        version: u32,
        #[source]
        source: RootKeyError,
    },
    #[error("KmsKeyMaterial {name} version {version} is not valid base64")]
    Encoding { name: String, version: u32 },
    #[error("KmsKeyMaterial {name} version {version} was destroyed")]
    VersionDestroyed { name: String, version: u32 },
    #[error("KmsKeyMaterial {name} is wrapped by root key {found}, but this root key is {expected}")]
    RootKeyMismatch { name: String, found: String, expected: String },
    #[error("KmsKeyMaterial {name} has {versions} versions, the most a key can hold")]
    Full { name: String, versions: usize },
}

impl MaterialError {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            MaterialError::Get { .. } => "material_get",
            MaterialError::Create { .. } => "material_create",
            MaterialError::Update { .. } => "material_update",
            MaterialError::Delete { .. } => "material_delete",
            MaterialError::Owner { .. } => "material_owner",
            MaterialError::Random(_) => "random",
            MaterialError::Wrap(_) => "wrap",
            MaterialError::Unwrap { .. } | MaterialError::Encoding { .. } => "unwrap",
            MaterialError::VersionDestroyed { .. } => "version_destroyed",
            MaterialError::RootKeyMismatch { .. } => "root_key_mismatch",
            MaterialError::Full { .. } => "material_full",
        }
    }

    /// Whether the root key could not be reached (its token failed or went away), rather
    /// than the material being wrong: worth trying again later.
    pub fn root_key_unavailable(&self) -> bool {
        matches!(
            self,
            MaterialError::Wrap(RootKeyError::Pkcs11(_))
                | MaterialError::Unwrap { source: RootKeyError::Pkcs11(_), .. }
        )
    }

    /// Whether the API server refused a write because the object changed meanwhile.
    pub fn is_conflict(&self) -> bool {
        matches!(self, MaterialError::Update { source: kube::Error::Api(e), .. } if e.code == 409)
    }
}

/// The KmsKey a material object belongs to.
#[derive(Debug, Clone)]
pub struct Owner {
    pub namespace: String,
    pub name: String,
    /// The key's UID: the material object's name, and the keyId of material made here.
    pub uid: String,
}

impl Owner {
    pub(super) fn to_api(&self) -> KeyOwner {
        KeyOwner { namespace: self.namespace.clone(), name: self.name.clone(), uid: self.uid.clone() }
    }
}

fn wrap_version(
    root: &RootKey,
    key_id: &str,
    version: u32,
    material: &KeyMaterial,
    trigger: VersionTrigger,
    request: Option<String>,
    now: Timestamp,
) -> Result<MaterialVersion, MaterialError> {
    let wrapped = root.wrap(material, WrapContext { key_id, version }).map_err(MaterialError::Wrap)?;
    Ok(MaterialVersion {
        version,
        created: Time(now),
        trigger,
        request,
        wrapped: Some(B64.encode(wrapped)),
        deletion_time: None,
        destroyed_at: None,
    })
}

/// The material object of `owner`, with `first` as version 1 when given (generated or
/// imported material), or with no version (a destroyed key that never had any, when
/// `destroyed` is set).
pub fn new_material(
    owner: &Owner,
    origin: Origin,
    root: &RootKey,
    first: Option<(&KeyMaterial, VersionTrigger, Option<String>)>,
    destroyed: Option<Timestamp>,
    now: Timestamp,
) -> Result<KmsKeyMaterial, MaterialError> {
    let versions = match first {
        Some((material, trigger, request)) => {
            vec![wrap_version(root, &owner.uid, 1, material, trigger, request, now)?]
        }
        None => Vec::new(),
    };
    Ok(KmsKeyMaterial {
        metadata: material_metadata(owner),
        spec: KmsKeyMaterialSpec {
            owner: owner.to_api(),
            origin,
            key_id: Some(owner.uid.clone()),
            root_key_fingerprint: root.fingerprint().to_owned(),
            versions,
            deletion_time: None,
            destroyed_at: destroyed.map(Time),
            storage: None,
            deletion_refused: None,
            import_wrapping: None,
        },
    })
}

/// The name and labels of the material object of `owner`.
pub(super) fn material_metadata(owner: &Owner) -> ObjectMeta {
    ObjectMeta {
        name: Some(owner.uid.clone()),
        labels: Some(
            [
                ("kms.kubekms.io/key-namespace".to_owned(), owner.namespace.clone()),
                ("kms.kubekms.io/key-name".to_owned(), owner.name.clone()),
            ]
            .into(),
        ),
        ..Default::default()
    }
}

/// `current` with the next version added, generated from the OS CSPRNG. Written back with
/// its resourceVersion, so two writers can never both add a version.
pub fn with_rotation(
    current: &KmsKeyMaterial,
    root: &RootKey,
    trigger: VersionTrigger,
    request: Option<String>,
    now: Timestamp,
) -> Result<KmsKeyMaterial, MaterialError> {
    let material = KeyMaterial::generate().map_err(MaterialError::Random)?;
    with_version(current, root, &material, trigger, request, now)
}

/// `current` with `material` added as the next version.
pub fn with_version(
    current: &KmsKeyMaterial,
    root: &RootKey,
    material: &KeyMaterial,
    trigger: VersionTrigger,
    request: Option<String>,
    now: Timestamp,
) -> Result<KmsKeyMaterial, MaterialError> {
    let name = current.metadata.name.clone().unwrap_or_default();
    check_root(current, root)?;
    if current.spec.versions.len() >= MAX_VERSIONS {
        return Err(MaterialError::Full { name, versions: current.spec.versions.len() });
    }
    let next = next_version(current)?;
    let version = wrap_version(root, current.spec.key_id(), next, material, trigger, request, now)?;
    let mut updated = current.clone();
    updated.spec.versions.push(version);
    Ok(updated)
}

/// `current` with its deletion promised for `at` (which also ends a refusal), or (with
/// `None`) cancelled.
pub fn with_deletion_time(current: &KmsKeyMaterial, at: Option<Timestamp>) -> KmsKeyMaterial {
    let mut updated = current.clone();
    updated.spec.deletion_time = at.map(Time);
    if at.is_some() {
        updated.spec.deletion_refused = None;
    }
    updated
}

/// `current` recording that the deletion its key asks for is refused (`Some`), or no
/// longer (`None`).
pub fn with_deletion_refused(
    current: &KmsKeyMaterial,
    refusal: Option<(String, Timestamp)>,
) -> KmsKeyMaterial {
    let mut updated = current.clone();
    updated.spec.deletion_refused = refusal.map(|(message, at)| DeletionRefusal { at: Time(at), message });
    updated
}

/// `current` with the destruction of `version` promised for `at`, or (with `None`)
/// cancelled. `None` when the material has no such version left to destroy.
pub fn with_version_deletion(
    current: &KmsKeyMaterial,
    version: u32,
    at: Option<Timestamp>,
) -> Option<KmsKeyMaterial> {
    let mut updated = current.clone();
    let v = updated.spec.versions.iter_mut().find(|v| v.version == version && v.destroyed_at.is_none())?;
    v.deletion_time = at.map(Time);
    Some(updated)
}

/// `current` with `version`'s wrapped material removed and its destruction recorded.
/// `None` when there is no such version left to destroy.
pub fn with_version_destroyed(
    current: &KmsKeyMaterial,
    version: u32,
    now: Timestamp,
) -> Option<KmsKeyMaterial> {
    let mut updated = current.clone();
    let v = updated.spec.versions.iter_mut().find(|v| v.version == version && v.destroyed_at.is_none())?;
    v.wrapped = None;
    v.destroyed_at = Some(Time(now));
    Some(updated)
}

/// `current` with every version destroyed: the wrapped bytes removed and the time of
/// destruction recorded.
pub fn destroyed(current: &KmsKeyMaterial, now: Timestamp) -> KmsKeyMaterial {
    let mut updated = current.clone();
    updated.spec.versions.clear();
    updated.spec.destroyed_at = Some(Time(now));
    updated
}

/// The number of the version after the newest (refusing an object that claims the last one).
fn next_version(current: &KmsKeyMaterial) -> Result<u32, MaterialError> {
    let newest = current.spec.versions.iter().map(|v| v.version).max().unwrap_or(0);
    newest.checked_add(1).ok_or_else(|| MaterialError::Full {
        name: current.metadata.name.clone().unwrap_or_default(),
        versions: current.spec.versions.len(),
    })
}

pub(super) fn check_owner(existing: &KmsKeyMaterial, owner: &Owner) -> Result<(), MaterialError> {
    let found = &existing.spec.owner;
    if found.uid != owner.uid || found.namespace != owner.namespace || found.name != owner.name {
        return Err(MaterialError::Owner {
            name: owner.uid.clone(),
            found: format!("{}/{} ({})", found.namespace, found.name, found.uid),
            expected: format!("{}/{} ({})", owner.namespace, owner.name, owner.uid),
        });
    }
    Ok(())
}

fn check_root(current: &KmsKeyMaterial, root: &RootKey) -> Result<(), MaterialError> {
    if current.spec.root_key_fingerprint != root.fingerprint() {
        return Err(MaterialError::RootKeyMismatch {
            name: current.metadata.name.clone().unwrap_or_default(),
            found: current.spec.root_key_fingerprint.clone(),
            expected: root.fingerprint().to_owned(),
        });
    }
    Ok(())
}

/// Unwraps one stored version.
pub fn unwrap_version(
    root: &RootKey,
    material: &KmsKeyMaterial,
    version: &MaterialVersion,
) -> Result<KeyMaterial, MaterialError> {
    let name = material.metadata.name.clone().unwrap_or_default();
    check_root(material, root)?;
    let Some(encoded) = version.wrapped.as_deref() else {
        return Err(MaterialError::VersionDestroyed { name, version: version.version });
    };
    let wrapped = B64
        .decode(encoded)
        .map_err(|_| MaterialError::Encoding { name: name.clone(), version: version.version })?;
    root.unwrap(&wrapped, WrapContext { key_id: material.spec.key_id(), version: version.version })
        .map_err(|source| MaterialError::Unwrap { name, version: version.version, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn material_with(root: &RootKey, key: &KeyMaterial) -> KmsKeyMaterial {
        let version =
            wrap_version(root, "uid-1", 1, key, VersionTrigger::Created, None, Timestamp::UNIX_EPOCH)
                .unwrap();
        KmsKeyMaterial {
            metadata: ObjectMeta { name: Some("uid-1".into()), ..Default::default() },
            spec: KmsKeyMaterialSpec {
                owner: KeyOwner { namespace: "ns".into(), name: "k".into(), uid: "uid-1".into() },
                origin: Origin::Kubekms,
                key_id: None,
                root_key_fingerprint: root.fingerprint().into(),
                versions: vec![version],
                deletion_time: None,
                destroyed_at: None,
                storage: None,
                deletion_refused: None,
                import_wrapping: None,
            },
        }
    }

    #[test]
    fn stored_versions_unwrap_only_with_their_root_key_and_identity() {
        let root = RootKey::from_material(KeyMaterial::generate().unwrap());
        let key = KeyMaterial::generate().unwrap();
        let mut m = material_with(&root, &key);
        let v = m.spec.versions[0].clone();
        assert!(unwrap_version(&root, &m, &v).unwrap().ct_eq(&key));

        // The stored form never contains the material, raw or base64.
        let yaml = serde_json::to_string(&m).unwrap();
        assert!(!yaml.contains(&B64.encode(key.expose())));

        let other = RootKey::from_material(KeyMaterial::generate().unwrap());
        assert!(matches!(unwrap_version(&other, &m, &v), Err(MaterialError::RootKeyMismatch { .. })));

        // Moved to another key or version, the same bytes do not unwrap.
        m.spec.owner.uid = "uid-2".into();
        assert!(matches!(unwrap_version(&root, &m, &v), Err(MaterialError::Unwrap { .. })));
        m.spec.owner.uid = "uid-1".into();
        // Restored into another cluster: another UID, the same keyId, the same bytes.
        let mut restored = m.clone();
        (restored.spec.owner.uid, restored.spec.key_id) = ("uid-9".into(), Some("uid-1".into()));
        assert!(unwrap_version(&root, &restored, &v).unwrap().ct_eq(&key));
        restored.spec.key_id = Some("uid-9".into());
        assert!(matches!(unwrap_version(&root, &restored, &v), Err(MaterialError::Unwrap { .. })));
        let renumbered = MaterialVersion { version: 2, ..v.clone() };
        assert!(matches!(unwrap_version(&root, &m, &renumbered), Err(MaterialError::Unwrap { .. })));
        let garbled = MaterialVersion { wrapped: Some("%%%".into()), ..v };
        assert!(matches!(unwrap_version(&root, &m, &garbled), Err(MaterialError::Encoding { .. })));
    }
}
