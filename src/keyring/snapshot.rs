//! A key as the plugin and the key API use it: its state, current version and every
//! version's material unwrapped in memory (zeroized when the snapshot is dropped).

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use super::material::MaterialError;
use crate::api::{KeyState, KmsKey, KmsKeyMaterial};
use crate::crypto::{KeyMaterial, RootKey, WrapContext};

/// One key, ready for cryptographic operations.
#[derive(Debug, Clone)]
pub struct KeySnapshot {
    pub namespace: String,
    pub name: String,
    /// The key's keyId (its UID).
    pub key_id: String,
    pub state: KeyState,
    /// The version new encryptions use.
    pub current_version: Option<u32>,
    /// Every version the key holds, unwrapped.
    pub versions: BTreeMap<u32, Arc<KeyMaterial>>,
}

impl KeySnapshot {
    /// `namespace/name`.
    pub fn display(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The current version and its material, if the key has one.
    pub fn current(&self) -> Option<(u32, &Arc<KeyMaterial>)> {
        let v = self.current_version?;
        Some((v, self.versions.get(&v)?))
    }

    /// Whether two snapshots describe the same key, state and versions.
    pub fn same_as(&self, other: &KeySnapshot) -> bool {
        self.key_id == other.key_id
            && self.state == other.state
            && self.current_version == other.current_version
            && self.versions.keys().eq(other.versions.keys())
    }
}

/// Wrapped versions as stored (in a KmsKeyMaterial, or in the plugin's cache).
pub struct WrappedVersions<'a> {
    pub key_id: &'a str,
    pub root_key_fingerprint: &'a str,
    /// (version, base64 of the wrapped bytes)
    pub versions: Vec<(u32, &'a str)>,
}

impl<'a> WrappedVersions<'a> {
    pub fn from_material(m: &'a KmsKeyMaterial) -> Self {
        WrappedVersions {
            key_id: &m.spec.owner.uid,
            root_key_fingerprint: &m.spec.root_key_fingerprint,
            versions: m.spec.versions.iter().map(|v| (v.version, v.wrapped.as_str())).collect(),
        }
    }
}

/// Unwraps `wrapped`, reusing material already unwrapped in `previous` (same key).
pub fn unwrap_all(
    root: &RootKey,
    wrapped: &WrappedVersions<'_>,
    previous: Option<&KeySnapshot>,
) -> Result<BTreeMap<u32, Arc<KeyMaterial>>, MaterialError> {
    if wrapped.root_key_fingerprint != root.fingerprint() {
        return Err(MaterialError::RootKeyMismatch {
            name: wrapped.key_id.to_owned(),
            found: wrapped.root_key_fingerprint.to_owned(),
            expected: root.fingerprint().to_owned(),
        });
    }
    let reuse = previous.filter(|p| p.key_id == wrapped.key_id);
    let mut out = BTreeMap::new();
    for (version, b64) in &wrapped.versions {
        if let Some(m) = reuse.and_then(|p| p.versions.get(version)) {
            out.insert(*version, m.clone());
            continue;
        }
        let bytes = B64
            .decode(b64)
            .map_err(|_| MaterialError::Encoding { name: wrapped.key_id.to_owned(), version: *version })?;
        let material =
            root.unwrap(&bytes, WrapContext { key_id: wrapped.key_id, version: *version }).map_err(
                |source| MaterialError::Unwrap { name: wrapped.key_id.to_owned(), version: *version, source },
            )?;
        out.insert(*version, Arc::new(material));
    }
    Ok(out)
}

/// A snapshot of `key` with the material of `material` (which must be the key's).
pub fn snapshot(
    root: &RootKey,
    key: &KmsKey,
    material: Option<&KmsKeyMaterial>,
    previous: Option<&KeySnapshot>,
) -> Result<KeySnapshot, MaterialError> {
    let status = key.status.clone().unwrap_or_default();
    let key_id = key.metadata.uid.clone().unwrap_or_default();
    let versions = match material.filter(|m| m.spec.owner.uid == key_id && m.spec.destroyed_at.is_none()) {
        Some(m) => unwrap_all(root, &WrappedVersions::from_material(m), previous)?,
        None => BTreeMap::new(),
    };
    Ok(KeySnapshot {
        namespace: key.metadata.namespace.clone().unwrap_or_default(),
        name: key.metadata.name.clone().unwrap_or_default(),
        key_id,
        state: status.state.unwrap_or(KeyState::Creating),
        current_version: status.current_version,
        versions,
    })
}
