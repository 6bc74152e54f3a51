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
    #[error(
        "KmsKeyMaterial {name} version {version} is wrapped by root key {fingerprint}, which is not configured (give it as a previous root key)"
    )]
    RootKeyNotConfigured { name: String, version: u32, fingerprint: String },
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
            MaterialError::RootKeyNotConfigured { .. } => "root_key_not_configured",
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

/// `material` wrapped by `root` for version `version` of `key_id`, as the object stores it.
fn wrapped(
    root: &RootKey,
    material: &KeyMaterial,
    key_id: &str,
    version: u32,
) -> Result<String, MaterialError> {
    let wrapped = root.wrap(material, WrapContext { key_id, version }).map_err(MaterialError::Wrap)?;
    Ok(B64.encode(wrapped))
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
    Ok(MaterialVersion {
        version,
        created: Time(now),
        trigger,
        request,
        wrapped: Some(wrapped(root, material, key_id, version)?),
        // Filled in by the caller when the material names another root key.
        root_key_fingerprint: None,
        deletion_time: None,
        destroyed_at: None,
        expired_at: None,
    })
}

/// What a version says of its root key: nothing when it is the material's.
fn version_root(spec: &KmsKeyMaterialSpec, root: &RootKey) -> Option<String> {
    (spec.root_key_fingerprint != root.fingerprint()).then(|| root.fingerprint().to_owned())
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
            imported: None,
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
    if current.spec.versions.len() >= MAX_VERSIONS {
        return Err(MaterialError::Full { name, versions: current.spec.versions.len() });
    }
    let next = next_version(current)?;
    let mut version = wrap_version(root, current.spec.key_id(), next, material, trigger, request, now)?;
    version.root_key_fingerprint = version_root(&current.spec, root);
    let mut updated = current.clone();
    updated.spec.versions.push(version);
    Ok(updated)
}

/// `current` with the material of every imported version deleted because it expired at
/// `at` (its validTo): the versions stay listed, with `expiredAt`, so that their numbers
/// are kept and the same material can fill them again. `None` when nothing is left to
/// delete.
pub fn with_expired(current: &KmsKeyMaterial, at: Timestamp) -> Option<KmsKeyMaterial> {
    let mut updated = current.clone();
    let mut changed = false;
    for v in updated.spec.versions.iter_mut() {
        if v.trigger == VersionTrigger::Imported && v.wrapped.is_some() && v.destroyed_at.is_none() {
            v.wrapped = None;
            v.root_key_fingerprint = None;
            v.expired_at = Some(Time(at));
            changed = true;
        }
    }
    changed.then_some(updated)
}

/// `current` with every expired version filled again with `material` (the caller has
/// checked that it is the material that expired), under the same version numbers, so
/// that what was encrypted under them decrypts again.
pub fn with_refilled(
    current: &KmsKeyMaterial,
    root: &RootKey,
    material: &KeyMaterial,
) -> Result<KmsKeyMaterial, MaterialError> {
    let mut updated = current.clone();
    let fingerprint = version_root(&current.spec, root);
    let key_id = current.spec.key_id().to_owned();
    for v in updated.spec.versions.iter_mut().filter(|v| v.expired_at.is_some() && v.destroyed_at.is_none()) {
        v.wrapped = Some(wrapped(root, material, &key_id, v.version)?);
        v.root_key_fingerprint = fingerprint.clone();
        v.expired_at = None;
    }
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

/// Unwraps the base64 `encoded` version `version` of key `key_id` under the root key of
/// `fingerprint` (the primary or a previous one); `name` names the material in errors.
pub(super) fn unwrap_encoded(
    root: &RootKey,
    (name, key_id): (&str, &str),
    version: u32,
    fingerprint: &str,
    encoded: &str,
) -> Result<KeyMaterial, MaterialError> {
    let wrapped =
        B64.decode(encoded).map_err(|_| MaterialError::Encoding { name: name.to_owned(), version })?;
    root.unwrap_by(fingerprint, &wrapped, WrapContext { key_id, version }).map_err(|source| match source {
        RootKeyError::NotConfigured { .. } => MaterialError::RootKeyNotConfigured {
            name: name.to_owned(),
            version,
            fingerprint: fingerprint.to_owned(),
        },
        source => MaterialError::Unwrap { name: name.to_owned(), version, source },
    })
}

/// Unwraps one stored version, under the root key that wrapped it.
pub fn unwrap_version(
    root: &RootKey,
    material: &KmsKeyMaterial,
    version: &MaterialVersion,
) -> Result<KeyMaterial, MaterialError> {
    let name = material.metadata.name.clone().unwrap_or_default();
    let Some(encoded) = version.wrapped.as_deref() else {
        return Err(MaterialError::VersionDestroyed { name, version: version.version });
    };
    let fingerprint = material.spec.root_of(version);
    unwrap_encoded(root, (&name, material.spec.key_id()), version.version, fingerprint, encoded)
}

/// `current` with at most `batch` of its versions that a previous root key wraps
/// rewrapped under the primary, oldest first; `None` when every version is under the
/// primary already. Written back with its resourceVersion, so a batch is all or nothing:
/// after a crash each version is wrapped by the old root key or by the new one, and
/// rewrapping resumes where it stopped. The unwrapped material exists only in memory.
pub fn with_rewrapped(
    current: &KmsKeyMaterial,
    root: &RootKey,
    batch: std::num::NonZeroUsize,
) -> Result<Option<KmsKeyMaterial>, MaterialError> {
    let mut updated = current.clone();
    let spec = &current.spec;
    let mut done = 0;
    for (stored, v) in spec.versions.iter().zip(updated.spec.versions.iter_mut()) {
        if done == batch.get() {
            break;
        }
        if stored.wrapped.is_none() || spec.root_of(stored) == root.fingerprint() {
            continue;
        }
        let material = unwrap_version(root, current, stored)?;
        let ctx = WrapContext { key_id: spec.key_id(), version: stored.version };
        let rewrapped = root.wrap(&material, ctx).map_err(MaterialError::Wrap)?;
        v.wrapped = Some(B64.encode(rewrapped));
        v.root_key_fingerprint = version_root(spec, root);
        done += 1;
    }
    Ok((done > 0).then_some(updated))
}

/// How many versions (not destroyed) each root key wraps, by fingerprint.
pub fn versions_by_root(spec: &KmsKeyMaterialSpec) -> std::collections::BTreeMap<&str, u32> {
    let mut out = std::collections::BTreeMap::new();
    for v in spec.versions.iter().filter(|v| v.wrapped.is_some()) {
        *out.entry(spec.root_of(v)).or_insert(0) += 1;
    }
    out
}

/// `spec` as wrapped entirely by the primary root key, naming it once for the material
/// (what a backup holds); `Err` with the fingerprint of another root key that still wraps
/// a version.
pub(super) fn under_primary(spec: KmsKeyMaterialSpec, root: &RootKey) -> Result<KmsKeyMaterialSpec, String> {
    if let Some(other) = versions_by_root(&spec).into_keys().find(|fp| *fp != root.fingerprint()) {
        return Err(other.to_owned());
    }
    let mut spec = spec;
    spec.root_key_fingerprint = root.fingerprint().to_owned();
    for v in &mut spec.versions {
        v.root_key_fingerprint = None;
    }
    Ok(spec)
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
            spec: crate::testing::material_spec(
                KeyOwner { namespace: "ns".into(), name: "k".into(), uid: "uid-1".into() },
                root.fingerprint(),
                vec![version],
            ),
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
        assert!(matches!(unwrap_version(&other, &m, &v), Err(MaterialError::RootKeyNotConfigured { .. })));

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

    fn root(b: u8) -> RootKey {
        RootKey::from_material(KeyMaterial::from_slice(&[b; 32]).unwrap())
    }

    /// Material made under `old` with `n` versions, and their plaintexts.
    fn versions_under(old: &RootKey, n: u32) -> (KmsKeyMaterial, Vec<KeyMaterial>) {
        let first = KeyMaterial::generate().unwrap();
        let mut m = material_with(old, &first);
        let mut keys = vec![first];
        for _ in 1..n {
            let k = KeyMaterial::generate().unwrap();
            m = with_version(&m, old, &k, VersionTrigger::Scheduled, None, Timestamp::UNIX_EPOCH).unwrap();
            keys.push(k);
        }
        (m, keys)
    }

    #[test]
    fn without_a_previous_root_key_new_versions_are_what_they_always_were() {
        let (m, _) = versions_under(&root(1), 3);
        assert!(m.spec.versions.iter().all(|v| v.root_key_fingerprint.is_none()));
        assert_eq!(versions_by_root(&m.spec).into_iter().collect::<Vec<_>>(), [(root(1).fingerprint(), 3)]);
        assert!(with_rewrapped(&m, &root(1), std::num::NonZeroUsize::MIN).unwrap().is_none());
    }

    #[test]
    fn rewrapping_moves_mixed_material_under_the_primary_in_bounded_batches() {
        let old = root(1);
        let (mut m, mut keys) = versions_under(&old, 5);
        // Destroyed versions have nothing to rewrap.
        m = with_version_destroyed(&m, 2, Timestamp::UNIX_EPOCH).unwrap();
        let ring = root(2).with_previous(root(1)).unwrap();
        // A rotation after the root-key rotation: wrapped by the new key, which it names.
        let k6 = KeyMaterial::generate().unwrap();
        m = with_version(&m, &ring, &k6, VersionTrigger::Scheduled, None, Timestamp::UNIX_EPOCH).unwrap();
        keys.push(k6);
        assert_eq!(m.spec.versions[5].root_key_fingerprint.as_deref(), Some(ring.fingerprint()));

        let batch = std::num::NonZeroUsize::new(2).unwrap();
        let first = with_rewrapped(&m, &ring, batch).unwrap().unwrap();
        // Versions 1 and 3: the oldest two still under the old key.
        let named: Vec<_> = first.spec.versions.iter().map(|v| v.root_key_fingerprint.as_deref()).collect();
        let new = Some(ring.fingerprint());
        assert_eq!(named, [new, None, new, None, None, new]);
        // Only the wrapped bytes and the fingerprint changed.
        for (before, after) in m.spec.versions.iter().zip(&first.spec.versions) {
            assert_eq!(
                (before.version, &before.created, before.trigger),
                (after.version, &after.created, after.trigger)
            );
            assert_eq!(before.destroyed_at, after.destroyed_at);
        }
        assert_ne!(first.spec.versions[0].wrapped, m.spec.versions[0].wrapped);
        assert_eq!(first.spec.versions[3].wrapped, m.spec.versions[3].wrapped);
        assert_eq!(first.spec.root_key_fingerprint, old.fingerprint(), "the material's own stays");

        // A crash after the first batch: the next run starts from what was written.
        let second = with_rewrapped(&first, &ring, batch).unwrap().unwrap();
        assert!(with_rewrapped(&second, &ring, batch).unwrap().is_none());
        assert_eq!(versions_by_root(&second.spec).into_iter().collect::<Vec<_>>(), [(ring.fingerprint(), 5)]);
        // Everything unwraps with the new root key alone, and is what it was.
        let alone = root(2);
        for (i, v) in second.spec.versions.iter().enumerate().filter(|(i, _)| *i != 1) {
            assert!(unwrap_version(&alone, &second, v).unwrap().ct_eq(&keys[i]));
            // And it never contains the material.
            let stored = v.wrapped.as_deref().unwrap();
            assert!(!stored.contains(&B64.encode(keys[i].expose())));
        }
        // Each intermediate state unwraps whole with both keys configured.
        for state in [&m, &first, &second] {
            for (i, v) in state.spec.versions.iter().enumerate().filter(|(i, _)| *i != 1) {
                assert!(unwrap_version(&ring, state, v).unwrap().ct_eq(&keys[i]));
            }
        }
        // The old key alone no longer reads what was rewrapped, and says which key it needs.
        let err = unwrap_version(&old, &second, &second.spec.versions[0]).unwrap_err();
        assert!(err.to_string().contains(ring.fingerprint()), "{err}");
    }

    #[test]
    fn a_version_under_an_unknown_root_key_is_named_and_nothing_is_rewrapped() {
        let (mut m, _) = versions_under(&root(1), 2);
        m.spec.versions[1].root_key_fingerprint = Some(root(3).fingerprint().to_owned());
        let ring = root(2).with_previous(root(1)).unwrap();
        let err = with_rewrapped(&m, &ring, std::num::NonZeroUsize::new(10).unwrap()).unwrap_err();
        assert!(
            matches!(&err, MaterialError::RootKeyNotConfigured { version: 2, fingerprint, .. } if fingerprint == root(3).fingerprint()),
            "{err}"
        );
        assert_eq!(err.category(), "root_key_not_configured");
    }

    #[test]
    fn a_backup_takes_material_only_once_it_is_all_under_the_primary() {
        let (m, _) = versions_under(&root(1), 2);
        let ring = root(2).with_previous(root(1)).unwrap();
        let err = under_primary(m.spec.clone(), &ring).unwrap_err();
        assert_eq!(err, root(1).fingerprint());
        let done = with_rewrapped(&m, &ring, std::num::NonZeroUsize::new(10).unwrap()).unwrap().unwrap();
        let spec = under_primary(done.spec, &ring).unwrap();
        assert_eq!(spec.root_key_fingerprint, ring.fingerprint());
        assert!(spec.versions.iter().all(|v| v.root_key_fingerprint.is_none()));
    }
}
