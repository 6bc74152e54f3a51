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

use super::material::{MaterialError, MaterialStore, Owner};
use crate::api::{KeyState, KmsKey, Origin};
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

/// Imports `material` as version 1 of the EXTERNAL key `namespace/name`.
pub async fn import(
    client: Client,
    root: &RootKey,
    namespace: &str,
    name: &str,
    material: &KeyMaterial,
) -> Result<String, ImportError> {
    let display = format!("{namespace}/{name}");
    let keys: Api<KmsKey> = Api::namespaced(client.clone(), namespace);
    let key = keys.get(name).await.map_err(|e| ImportError::GetKey(display.clone(), e))?;
    if key.spec.origin != Origin::External {
        return Err(ImportError::NotExternal(display));
    }
    match key.status.as_ref().and_then(|s| s.state) {
        Some(KeyState::PendingImport) => {}
        Some(other) => return Err(ImportError::NotPendingImport(display, other.as_str())),
        None => return Err(ImportError::NoStatus(display)),
    }
    let owner =
        Owner { namespace: namespace.to_owned(), name: name.to_owned(), uid: key.uid().unwrap_or_default() };
    let store = MaterialStore::new(client);
    if let Some(existing) = store.get(&owner.uid).await? {
        let state = if existing.spec.destroyed_at.is_some() { "Destroyed" } else { "already imported" };
        return Err(ImportError::NotPendingImport(display, state));
    }
    store.import(&owner, None, root, material, Timestamp::now()).await?;
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
}
