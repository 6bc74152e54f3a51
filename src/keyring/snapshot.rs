//! The one place a [`KeySnapshot`] is made: a key's [`KeyInfo`] and its stored, wrapped
//! versions unwrapped by the root key (reusing what an earlier snapshot of the same key
//! already unwrapped).

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use super::material::MaterialError;
use crate::crypto::{KeyMaterial, RootKey, WrapContext};
use crate::domain::{KeyInfo, KeySnapshot, WrappedMaterial};

/// Unwraps `wrapped`, reusing material already unwrapped in `previous` (same key).
fn unwrap_all(
    root: &RootKey,
    wrapped: &WrappedMaterial,
    previous: Option<&KeySnapshot>,
) -> Result<BTreeMap<u32, Arc<KeyMaterial>>, MaterialError> {
    if wrapped.root_key_fingerprint != root.fingerprint() {
        return Err(MaterialError::RootKeyMismatch {
            name: wrapped.key_id.clone(),
            found: wrapped.root_key_fingerprint.clone(),
            expected: root.fingerprint().to_owned(),
        });
    }
    let reuse = previous.filter(|p| p.info.key_id == wrapped.key_id);
    let mut out = BTreeMap::new();
    for (version, b64) in &wrapped.versions {
        if let Some(m) = reuse.and_then(|p| p.versions.get(version)) {
            out.insert(*version, m.clone());
            continue;
        }
        let bytes = B64
            .decode(b64)
            .map_err(|_| MaterialError::Encoding { name: wrapped.key_id.clone(), version: *version })?;
        let material =
            root.unwrap(&bytes, WrapContext { key_id: &wrapped.key_id, version: *version }).map_err(
                |source| MaterialError::Unwrap { name: wrapped.key_id.clone(), version: *version, source },
            )?;
        out.insert(*version, Arc::new(material));
    }
    Ok(out)
}

/// A snapshot of the key `info` with the versions of `material`, when that is this key's
/// and not destroyed (otherwise the snapshot holds no version).
pub fn snapshot(
    root: &RootKey,
    info: KeyInfo,
    material: Option<&WrappedMaterial>,
    previous: Option<&KeySnapshot>,
) -> Result<KeySnapshot, MaterialError> {
    let versions = match material.filter(|m| m.key_id == info.key_id && !m.destroyed) {
        Some(m) => unwrap_all(root, m, previous)?,
        None => BTreeMap::new(),
    };
    Ok(KeySnapshot { info, versions })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::KeyState;

    fn info(key_id: &str) -> KeyInfo {
        KeyInfo {
            namespace: "ns".into(),
            name: "k".into(),
            key_id: key_id.into(),
            uid: key_id.into(),
            state: KeyState::Enabled,
            current_version: Some(2),
            refused_versions: Default::default(),
        }
    }

    fn wrapped(root: &RootKey, key_id: &str, materials: &[&KeyMaterial]) -> WrappedMaterial {
        let versions = materials
            .iter()
            .zip(1..)
            .map(|(m, v)| (v, B64.encode(root.wrap(m, WrapContext { key_id, version: v }).unwrap())))
            .collect();
        WrappedMaterial {
            key_id: key_id.into(),
            uid: key_id.into(),
            root_key_fingerprint: root.fingerprint().into(),
            destroyed: false,
            deletion_time: None,
            versions,
            revision: None,
            ..Default::default()
        }
    }

    #[test]
    fn unwraps_every_version_of_its_own_key_only() {
        let root = RootKey::from_material(KeyMaterial::generate().unwrap());
        let (one, two) = (KeyMaterial::generate().unwrap(), KeyMaterial::generate().unwrap());
        let stored = wrapped(&root, "uid-1", &[&one, &two]);
        let snap = snapshot(&root, info("uid-1"), Some(&stored), None).unwrap();
        assert!(snap.versions[&1].ct_eq(&one) && snap.versions[&2].ct_eq(&two));
        assert_eq!(snap.current().map(|(v, _)| v), Some(2));

        // Another key's material, or destroyed material, gives no version.
        assert!(snapshot(&root, info("uid-2"), Some(&stored), None).unwrap().versions.is_empty());
        let gone = WrappedMaterial { destroyed: true, versions: Vec::new(), ..stored.clone() };
        assert!(snapshot(&root, info("uid-1"), Some(&gone), None).unwrap().versions.is_empty());

        let other = RootKey::from_material(KeyMaterial::generate().unwrap());
        let err = snapshot(&other, info("uid-1"), Some(&stored), None).unwrap_err();
        assert!(matches!(err, MaterialError::RootKeyMismatch { .. }));
        let mut garbled = stored.clone();
        garbled.versions[1].1 = "%%%".into();
        let err = snapshot(&root, info("uid-1"), Some(&garbled), None).unwrap_err();
        assert!(matches!(err, MaterialError::Encoding { version: 2, .. }));
    }

    #[test]
    fn reuses_what_the_previous_snapshot_of_the_same_key_unwrapped() {
        let root = RootKey::from_material(KeyMaterial::generate().unwrap());
        let one = KeyMaterial::generate().unwrap();
        let first = snapshot(&root, info("uid-1"), Some(&wrapped(&root, "uid-1", &[&one])), None).unwrap();
        // The stored bytes of version 1 are garbled: the previous snapshot's copy is used.
        let mut next = wrapped(&root, "uid-1", &[&one, &KeyMaterial::generate().unwrap()]);
        next.versions[0].1 = "%%%".into();
        let second = snapshot(&root, info("uid-1"), Some(&next), Some(&first)).unwrap();
        assert!(Arc::ptr_eq(&first.versions[&1], &second.versions[&1]));
        // Not for another key.
        let mut other = wrapped(&root, "uid-2", &[&one]);
        other.versions[0].1 = "%%%".into();
        assert!(snapshot(&root, info("uid-2"), Some(&other), Some(&first)).is_err());
    }
}
