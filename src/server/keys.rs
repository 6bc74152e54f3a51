//! Where the key API finds keys, their material and their grants. The service depends on
//! the [`KeyDirectory`] trait; [`WatchedKeys`] implements it with watches on the API
//! server, unwrapping each key's material once and again only when it changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};

use crate::api::{KmsGrant, KmsKey, KmsKeyMaterial};
use crate::crypto::RootKey;
use crate::keyring::{KeySnapshot, MaterialError, WrappedVersions, unwrap_all};

/// A key as the service finds it: the object (spec, status). Its material is unwrapped
/// only once the caller is authorized ([`KeyDirectory::material`]).
#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub key: Arc<KmsKey>,
}

impl KeyEntry {
    /// `namespace/name`.
    pub fn display(&self) -> String {
        format!("{}/{}", self.key.namespace().unwrap_or_default(), self.key.name_any())
    }

    pub fn key_id(&self) -> String {
        self.key.uid().unwrap_or_default()
    }
}

/// Why a key could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error(transparent)]
    Material(#[from] MaterialError),
}

/// Keys and grants, by name or id.
pub trait KeyDirectory: Send + Sync + 'static {
    /// A key by `namespace/name` or keyId, if there is one.
    fn resolve(&self, name: &str) -> Option<KeyEntry>;
    /// Every version the key holds, unwrapped (none when it holds none).
    fn material(&self, entry: &KeyEntry) -> Result<Arc<KeySnapshot>, DirectoryError>;
    /// The grants of one key.
    fn grants(&self, namespace: &str, key_name: &str) -> Vec<Arc<KmsGrant>>;
    /// A grant by `namespace/name` or grantId.
    fn grant(&self, name: &str) -> Option<Arc<KmsGrant>>;
}

/// A key's unwrapped versions and the resourceVersion of the material they came from.
type Unwrapped = (Option<String>, Arc<KeySnapshot>);

/// The directory backed by the server's watches.
pub struct WatchedKeys {
    pub keys: Store<KmsKey>,
    pub materials: Store<KmsKeyMaterial>,
    pub grants: Store<KmsGrant>,
    root: Arc<RootKey>,
    /// Unwrapped versions by keyId, with the material's resourceVersion they came from.
    unwrapped: Mutex<HashMap<String, Unwrapped>>,
    /// keyId → (namespace, name), filled on lookup.
    by_id: Mutex<HashMap<String, (String, String)>>,
}

impl WatchedKeys {
    pub fn new(
        keys: Store<KmsKey>,
        materials: Store<KmsKeyMaterial>,
        grants: Store<KmsGrant>,
        root: Arc<RootKey>,
    ) -> Self {
        WatchedKeys {
            keys,
            materials,
            grants,
            root,
            unwrapped: Mutex::new(HashMap::new()),
            by_id: Mutex::new(HashMap::new()),
        }
    }

    fn find_by_id(&self, key_id: &str) -> Option<Arc<KmsKey>> {
        let known = self.by_id.lock().ok().and_then(|m| m.get(key_id).cloned());
        if let Some((ns, name)) = known
            && let Some(k) = self.keys.get(&ObjectRef::new(&name).within(&ns))
            && k.uid().as_deref() == Some(key_id)
        {
            return Some(k);
        }
        let found = self.keys.find(|k| k.uid().as_deref() == Some(key_id))?;
        if let Ok(mut m) = self.by_id.lock() {
            m.insert(key_id.to_owned(), (found.namespace().unwrap_or_default(), found.name_any()));
        }
        Some(found)
    }

    /// Forgets the unwrapped material of keys that are gone or destroyed (run periodically:
    /// plaintext material must not outlive its key in memory).
    pub fn sweep(&self) {
        let live = |key_id: &String| {
            self.materials
                .get(&ObjectRef::new(key_id))
                .is_some_and(|m| m.spec.destroyed_at.is_none() && self.find_by_id(key_id).is_some())
        };
        if let Ok(mut m) = self.unwrapped.lock() {
            m.retain(|key_id, _| live(key_id));
        }
        if let Ok(mut m) = self.by_id.lock() {
            m.retain(|key_id, _| self.keys.find(|k| k.uid().as_deref() == Some(key_id)).is_some());
        }
    }

    fn versions(&self, key: &KmsKey) -> Result<Arc<KeySnapshot>, DirectoryError> {
        let key_id = key.uid().unwrap_or_default();
        let material = self
            .materials
            .get(&ObjectRef::new(&key_id))
            .filter(|m| m.spec.destroyed_at.is_none() && m.spec.owner.uid == key_id);
        if material.is_none() {
            // Destroyed or gone: drop whatever was unwrapped before.
            if let Ok(mut m) = self.unwrapped.lock() {
                m.remove(&key_id);
            }
        }
        let version_of_material = material.as_ref().and_then(|m| m.meta().resource_version.clone());
        let cached = self.unwrapped.lock().ok().and_then(|m| m.get(&key_id).cloned());
        if let Some((rv, snap)) = &cached
            && *rv == version_of_material
        {
            return Ok(snap.clone());
        }
        let versions = match &material {
            Some(m) => unwrap_all(
                &self.root,
                &WrappedVersions::from_material(m),
                cached.as_ref().map(|(_, s)| s.as_ref()),
            )?,
            None => Default::default(),
        };
        let status = key.status.clone().unwrap_or_default();
        let snap = Arc::new(KeySnapshot {
            namespace: key.namespace().unwrap_or_default(),
            name: key.name_any(),
            key_id: key_id.clone(),
            state: status.state.unwrap_or(crate::api::KeyState::Creating),
            current_version: status.current_version,
            versions,
        });
        if let Ok(mut m) = self.unwrapped.lock() {
            m.insert(key_id, (version_of_material, snap.clone()));
        }
        Ok(snap)
    }
}

impl<T: KeyDirectory> KeyDirectory for Arc<T> {
    fn resolve(&self, name: &str) -> Option<KeyEntry> {
        self.as_ref().resolve(name)
    }
    fn material(&self, entry: &KeyEntry) -> Result<Arc<KeySnapshot>, DirectoryError> {
        self.as_ref().material(entry)
    }
    fn grants(&self, namespace: &str, key_name: &str) -> Vec<Arc<KmsGrant>> {
        self.as_ref().grants(namespace, key_name)
    }
    fn grant(&self, name: &str) -> Option<Arc<KmsGrant>> {
        self.as_ref().grant(name)
    }
}

impl KeyDirectory for WatchedKeys {
    fn resolve(&self, name: &str) -> Option<KeyEntry> {
        let key = match name.split_once('/') {
            Some((ns, n)) => self.keys.get(&ObjectRef::new(n).within(ns)),
            None => self.find_by_id(name),
        };
        key.map(|key| KeyEntry { key })
    }

    fn material(&self, entry: &KeyEntry) -> Result<Arc<KeySnapshot>, DirectoryError> {
        self.versions(&entry.key)
    }

    fn grants(&self, namespace: &str, key_name: &str) -> Vec<Arc<KmsGrant>> {
        self.grants
            .state()
            .into_iter()
            .filter(|g| g.namespace().as_deref() == Some(namespace) && g.spec.key_ref.name == key_name)
            .collect()
    }

    fn grant(&self, name: &str) -> Option<Arc<KmsGrant>> {
        match name.split_once('/') {
            Some((ns, n)) => self.grants.get(&ObjectRef::new(n).within(ns)),
            None => self.grants.find(|g| g.uid().as_deref() == Some(name)),
        }
    }
}
