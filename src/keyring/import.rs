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

use super::material::{MaterialError, Owner, new_material, with_version};
use super::store::MaterialStore;
use crate::api::{KeyState, KmsKey, KmsKeyMaterial, Origin, VersionTrigger};
use crate::crypto::{KEY_LEN, KeyMaterial, RootKey};
use crate::domain::WrappedMaterial;

/// Why an import was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("failed to read KmsKey {0}")]
    GetKey(String, #[source] kube::Error),
    #[error("KmsKey {0} has origin KUBEKMS; only keys with origin EXTERNAL take imported material")]
    NotExternal(String),
    #[error("KmsKey {0} is {1}, not PendingImport; import material into a new EXTERNAL key instead")]
    NotPendingImport(String, &'static str),
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

/// The owner of the material to import into `key`, if `key` may take imported material:
/// EXTERNAL and PendingImport as its spec and its material object (`existing`, if any)
/// decide — no version yet, not destroyed, no deletion requested or promised.
pub fn check_importable(key: &KmsKey, existing: Option<&KmsKeyMaterial>) -> Result<Owner, ImportError> {
    let (namespace, name) = (key.namespace().unwrap_or_default(), key.name_any());
    let display = format!("{namespace}/{name}");
    if key.spec.origin != Origin::External {
        return Err(ImportError::NotExternal(display));
    }
    let (state, _) = key.intent().state(existing.map(WrappedMaterial::from).as_ref());
    if state != KeyState::PendingImport {
        return Err(ImportError::NotPendingImport(display, state.as_str()));
    }
    Ok(Owner { namespace, name, uid: key.uid().unwrap_or_default() })
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
    let store = MaterialStore::new(client);
    let existing = store.get(&key.uid().unwrap_or_default()).await?;
    let owner = check_importable(&key, existing.as_ref())?;
    let (imported, now) = ((material, VersionTrigger::Imported, None), Timestamp::now());
    match existing {
        // An object without versions, left by a deletion that was cancelled.
        Some(empty) => {
            let (material, trigger, request) = imported;
            store.replace(&with_version(&empty, root, material, trigger, request, now)?).await?;
        }
        None => {
            let object = new_material(&owner, Origin::External, root, Some(imported), None, now)?;
            store.create(&owner, &object).await?;
        }
    }
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

    fn key(origin: Origin, scheduled: bool) -> KmsKey {
        let mut key = KmsKey::new("byok", serde_json::from_value(serde_json::json!({})).unwrap());
        key.spec.origin = origin;
        key.spec.deletion.scheduled = scheduled;
        key.metadata.namespace = Some("apps".into());
        key.metadata.uid = Some("uid-1".into());
        key
    }

    #[test]
    fn only_a_pending_external_key_takes_an_import() {
        let pending = key(Origin::External, false);
        let owner = check_importable(&pending, None).unwrap();
        assert_eq!(
            (owner.namespace.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("apps", "byok", "uid-1")
        );
        let refused = |k: &KmsKey, existing: Option<&KmsKeyMaterial>| {
            check_importable(k, existing).err().map(|e| e.to_string()).unwrap_or_default()
        };
        assert!(refused(&key(Origin::Kubekms, false), None).contains("origin KUBEKMS"));
        assert!(
            refused(&key(Origin::External, true), None).contains("is PendingDeletion, not PendingImport")
        );
        // Whatever its status says: the material object decides.
        let mut forged = pending.clone();
        forged.status =
            Some(crate::api::KmsKeyStatus { state: Some(KeyState::PendingImport), ..Default::default() });
        let root = RootKey::from_material(KeyMaterial::generate().unwrap());
        let imported = new_material(
            &owner,
            Origin::External,
            &root,
            Some((&KeyMaterial::generate().unwrap(), VersionTrigger::Imported, None)),
            None,
            Timestamp::UNIX_EPOCH,
        )
        .unwrap();
        assert!(refused(&forged, Some(&imported)).contains("is Enabled, not PendingImport"));
        let destroyed = new_material(
            &owner,
            Origin::External,
            &root,
            None,
            Some(Timestamp::UNIX_EPOCH),
            Timestamp::UNIX_EPOCH,
        )
        .unwrap();
        assert!(refused(&pending, Some(&destroyed)).contains("is Destroyed, not PendingImport"));
        // An object without versions or promise (a cancelled deletion) still takes one.
        let empty = new_material(&owner, Origin::External, &root, None, None, Timestamp::UNIX_EPOCH).unwrap();
        assert!(check_importable(&pending, Some(&empty)).is_ok());
        let promised = crate::keyring::with_deletion_time(&empty, Some(Timestamp::UNIX_EPOCH));
        assert!(refused(&pending, Some(&promised)).contains("is PendingDeletion"));
    }
}
