//! Importing your own key material into a KmsKey with origin EXTERNAL.
//!
//! The material is read into memory, wrapped by the root key on the machine that runs the
//! import, and stored as version 1; the controller then moves the key from PendingImport
//! to Enabled. Run it where the root key lives (a control-plane node), as an identity
//! allowed to create `kmskeymaterials`.

use std::io::Read;

use jiff::Timestamp;
use kube::{Api, Client, ResourceExt};
use zeroize::Zeroizing;

use super::material::{MaterialError, Owner, new_material};
use super::store::MaterialStore;
use crate::api::{KeyState, KmsKey, KmsKeyMaterial, Origin, VersionTrigger};
use crate::crypto::{KEY_LEN, KeyMaterial, RootKey};

/// Why an import was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("failed to read KmsKey {0}")]
    GetKey(String, #[source] kube::Error),
    #[error("KmsKey {0} has origin KUBEKMS; only keys with origin EXTERNAL take imported material")]
    NotExternal(String),
    #[error("KmsKey {0} is {1}, not PendingImport; import material into a new EXTERNAL key instead")]
    NotPendingImport(String, &'static str),
    #[error("KmsKey {0} has no status yet; wait for the controller to mark it PendingImport")]
    NoStatus(String),
    #[error("failed to read the key material")]
    Read(#[source] std::io::Error),
    #[error("the key material must be exactly {KEY_LEN} bytes of raw binary; got {0} bytes")]
    Length(usize),
    #[error(transparent)]
    Material(#[from] MaterialError),
}

/// Reads exactly 32 bytes of material from `input`, refusing anything else.
pub fn read_material(mut input: impl Read) -> Result<KeyMaterial, ImportError> {
    let mut buf = Zeroizing::new(Vec::with_capacity(KEY_LEN + 1));
    input.by_ref().take(KEY_LEN as u64 + 1).read_to_end(&mut buf).map_err(ImportError::Read)?;
    KeyMaterial::from_slice(&buf).ok_or(ImportError::Length(buf.len()))
}

/// The owner of the material to import into `key`, if `key` may take imported material
/// (EXTERNAL and PendingImport).
pub fn check_importable(key: &KmsKey) -> Result<Owner, ImportError> {
    let (namespace, name) = (key.namespace().unwrap_or_default(), key.name_any());
    let display = format!("{namespace}/{name}");
    if key.spec.origin != Origin::External {
        return Err(ImportError::NotExternal(display));
    }
    match key.status.as_ref().and_then(|s| s.state) {
        Some(KeyState::PendingImport) => {}
        Some(other) => return Err(ImportError::NotPendingImport(display, other.as_str())),
        None => return Err(ImportError::NoStatus(display)),
    }
    Ok(Owner { namespace, name, uid: key.uid().unwrap_or_default() })
}

/// Refuses an import into a key that has a material object already (imported, or
/// destroyed): someone else's material must not pass for ours.
pub fn check_no_material(owner: &Owner, existing: Option<&KmsKeyMaterial>) -> Result<(), ImportError> {
    match existing {
        None => Ok(()),
        Some(existing) => {
            let state = if existing.spec.destroyed_at.is_some() { "Destroyed" } else { "already imported" };
            Err(ImportError::NotPendingImport(format!("{}/{}", owner.namespace, owner.name), state))
        }
    }
}

/// Imports `material` as version 1 of the EXTERNAL key `namespace/name`.
pub async fn import(
    client: Client,
    root: &RootKey,
    namespace: &str,
    name: &str,
    material: &KeyMaterial,
) -> Result<String, ImportError> {
    let keys: Api<KmsKey> = Api::namespaced(client.clone(), namespace);
    let key = keys.get(name).await.map_err(|e| ImportError::GetKey(format!("{namespace}/{name}"), e))?;
    let owner = check_importable(&key)?;
    let store = MaterialStore::new(client);
    check_no_material(&owner, store.get(&owner.uid).await?.as_ref())?;
    let object = new_material(
        &owner,
        Origin::External,
        root,
        Some((material, VersionTrigger::Imported, None)),
        None,
        Timestamp::now(),
    )?;
    store.create(&owner, &object).await?;
    Ok(owner.uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn material_must_be_exactly_32_bytes() {
        assert!(read_material(&[7u8; 32][..]).is_ok());
        assert!(matches!(read_material(&[7u8; 31][..]), Err(ImportError::Length(31))));
        assert!(matches!(read_material(&[7u8; 33][..]), Err(ImportError::Length(33))));
        assert!(matches!(read_material(&b""[..]), Err(ImportError::Length(0))));
        // A hex or base64 text file is refused, not silently truncated.
        assert!(read_material(&[b'a'; 64][..]).is_err());
    }

    fn key(origin: Origin, state: Option<KeyState>) -> KmsKey {
        let mut key = KmsKey::new("byok", serde_json::from_value(serde_json::json!({})).unwrap());
        key.spec.origin = origin;
        key.metadata.namespace = Some("apps".into());
        key.metadata.uid = Some("uid-1".into());
        key.status = state.map(|s| crate::api::KmsKeyStatus { state: Some(s), ..Default::default() });
        key
    }

    #[test]
    fn only_a_pending_external_key_without_material_takes_an_import() {
        let owner = check_importable(&key(Origin::External, Some(KeyState::PendingImport))).unwrap();
        assert_eq!(
            (owner.namespace.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("apps", "byok", "uid-1")
        );
        let refused = |k: &KmsKey| check_importable(k).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused(&key(Origin::Kubekms, Some(KeyState::PendingImport))).contains("origin KUBEKMS"));
        assert!(
            refused(&key(Origin::External, Some(KeyState::Enabled)))
                .contains("is Enabled, not PendingImport")
        );
        assert!(refused(&key(Origin::External, None)).contains("has no status yet"));
        let root = RootKey::from_material(KeyMaterial::generate().unwrap());
        let destroyed = new_material(
            &owner,
            Origin::External,
            &root,
            None,
            Some(Timestamp::UNIX_EPOCH),
            Timestamp::UNIX_EPOCH,
        )
        .unwrap();
        assert!(check_no_material(&owner, None).is_ok());
        let err = check_no_material(&owner, Some(&destroyed)).unwrap_err().to_string();
        assert!(err.contains("apps/byok is Destroyed"), "{err}");
        let imported = new_material(
            &owner,
            Origin::External,
            &root,
            Some((&KeyMaterial::generate().unwrap(), VersionTrigger::Imported, None)),
            None,
            Timestamp::UNIX_EPOCH,
        )
        .unwrap();
        let err = check_no_material(&owner, Some(&imported)).unwrap_err().to_string();
        assert!(err.contains("is already imported"), "{err}");
    }
}
