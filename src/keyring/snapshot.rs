//! The one place a [`KeySnapshot`] is made: a key's [`KeyInfo`] and its stored, wrapped
//! versions unwrapped by the root key (reusing what an earlier snapshot of the same key
//! already unwrapped).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::material::{MaterialError, unwrap_encoded};
use crate::crypto::{KeyMaterial, RootKey};
use crate::domain::{KeyInfo, KeySnapshot, WrappedMaterial};

/// Unwraps `wrapped`, each version under the root key that wrapped it, reusing material
/// already unwrapped in `previous` (same key).
fn unwrap_all(
    root: &RootKey,
    wrapped: &WrappedMaterial,
    previous: Option<&KeySnapshot>,
) -> Result<BTreeMap<u32, Arc<KeyMaterial>>, MaterialError> {
    let reuse = previous.filter(|p| p.info.key_id == wrapped.key_id);
    let mut out = BTreeMap::new();
    for (version, b64) in &wrapped.versions {
        if let Some(m) = reuse.and_then(|p| p.versions.get(version)) {
            out.insert(*version, m.clone());
            continue;
        }
        let fingerprint = wrapped.version_roots.get(version).unwrap_or(&wrapped.root_key_fingerprint);
        let id = (wrapped.key_id.as_str(), wrapped.key_id.as_str());
        let material = unwrap_encoded(root, id, *version, fingerprint, b64)?;
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
    use crate::crypto::WrapContext;
    use crate::domain::KeyState;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as B64;

    fn info(key_id: &str) -> KeyInfo {
        KeyInfo {
            namespace: "ns".into(),
            name: "k".into(),
            key_id: key_id.into(),
            uid: key_id.into(),
            state: KeyState::Enabled,
            current_version: Some(2),
            refused_versions: Default::default(),
            valid_to: None,
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
        assert!(
            matches!(&err, MaterialError::RootKeyNotConfigured { version: 1, fingerprint, .. } if *fingerprint == stored.root_key_fingerprint),
            "{err}"
        );
        assert!(err.to_string().contains(&stored.root_key_fingerprint), "{err}");
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

    #[test]
    fn each_version_unwraps_under_the_root_key_it_names() {
        let key = |b: u8| RootKey::from_material(KeyMaterial::from_slice(&[b; 32]).unwrap());
        let (old, new) = (key(1), key(2));
        let (one, two) = (KeyMaterial::generate().unwrap(), KeyMaterial::generate().unwrap());
        // Version 1 under the old root key (the material's), version 2 under the new one.
        let mut stored = wrapped(&old, "uid-1", &[&one]);
        let v2 = new.wrap(&two, WrapContext { key_id: "uid-1", version: 2 }).unwrap();
        stored.versions.push((2, B64.encode(v2)));
        stored.version_roots.insert(2, new.fingerprint().into());

        let ring = key(2).with_previous(key(1)).unwrap();
        let snap = snapshot(&ring, info("uid-1"), Some(&stored), None).unwrap();
        assert!(snap.versions[&1].ct_eq(&one) && snap.versions[&2].ct_eq(&two));
        // Without the old root key, version 1 names it; without the new one, version 2.
        let err = snapshot(&new, info("uid-1"), Some(&stored), None).unwrap_err();
        assert!(
            matches!(&err, MaterialError::RootKeyNotConfigured { version: 1, fingerprint, .. } if fingerprint == old.fingerprint()),
            "{err}"
        );
        let err = snapshot(&old, info("uid-1"), Some(&stored), None).unwrap_err();
        assert!(
            matches!(&err, MaterialError::RootKeyNotConfigured { version: 2, fingerprint, .. } if fingerprint == new.fingerprint()),
            "{err}"
        );
        // A version that names the wrong one of two held root keys does not unwrap.
        stored.version_roots.insert(1, new.fingerprint().into());
        let err = snapshot(&ring, info("uid-1"), Some(&stored), None).unwrap_err();
        assert!(matches!(err, MaterialError::Unwrap { version: 1, .. }), "{err}");
    }
}
