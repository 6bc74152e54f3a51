//! A key ready for cryptographic operations: its [`KeyInfo`] and every version's material
//! unwrapped in memory (zeroized when the last snapshot holding it is dropped), and the
//! stored, wrapped form that a snapshot is made from.

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::Timestamp;

use super::key::KeyInfo;
use crate::crypto::KeyMaterial;

/// One key, ready for cryptographic operations. `keyring::snapshot` makes it from the
/// key's [`WrappedMaterial`].
#[derive(Debug, Clone)]
pub struct KeySnapshot {
    pub info: KeyInfo,
    /// Every version the key holds, unwrapped.
    pub versions: BTreeMap<u32, Arc<KeyMaterial>>,
}

impl KeySnapshot {
    /// `namespace/name`.
    pub fn display(&self) -> String {
        self.info.display()
    }

    /// The current version and its material, if the key has one.
    pub fn current(&self) -> Option<(u32, &Arc<KeyMaterial>)> {
        let v = self.info.current_version?;
        Some((v, self.versions.get(&v)?))
    }

    /// Whether two snapshots describe the same key, state and versions.
    pub fn same_as(&self, other: &KeySnapshot) -> bool {
        self.info == other.info && self.versions.keys().eq(other.versions.keys())
    }
}

/// A key's versions as stored (in a `KmsKeyMaterial`, or in the plugin's cache): each
/// version's material wrapped by the root key, base64-encoded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WrappedMaterial {
    /// The keyId of the key the material belongs to, which its wrapping is bound to.
    pub key_id: String,
    /// The UID of the KmsKey it belongs to in this cluster (the material object's name);
    /// differs from `key_id` only for a key restored from a backup.
    pub uid: String,
    pub root_key_fingerprint: String,
    /// The material was destroyed (and `versions` is empty).
    pub destroyed: bool,
    /// When the material will be destroyed, as the controller promised it.
    pub deletion_time: Option<Timestamp>,
    /// (version, base64 of the wrapped bytes), oldest first.
    pub versions: Vec<(u32, String)>,
    /// The versions wrapped by another root key than `root_key_fingerprint` (made or
    /// rewrapped after a root-key rotation), with its fingerprint.
    pub version_roots: BTreeMap<u32, String>,
    /// Versions destroyed one by one.
    pub destroyed_versions: Vec<u32>,
    /// (version, when it will be destroyed), as the controller promised it.
    pub version_deletions: Vec<(u32, Timestamp)>,
    /// The controller refused the deletion the spec asks for (without force).
    pub deletion_refused: bool,
    /// When imported material expires (while it has not yet been deleted).
    pub valid_to: Option<Timestamp>,
    /// Changes whenever the stored object does (its resourceVersion), when known.
    pub revision: Option<String>,
    /// When and why each version was made, oldest first (destroyed versions too); empty
    /// where the store does not record it (the plugin's cache).
    pub history: Vec<VersionMade>,
}

/// When and why a key version was made, as the material object records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionMade {
    pub version: u32,
    pub created: Timestamp,
    pub cause: VersionCause,
}

/// What made a key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionCause {
    /// Version 1, with the key.
    Created,
    /// An automatic rotation on the key's schedule.
    Scheduled,
    /// A rotation on demand.
    OnDemand,
    /// Imported material.
    Imported,
}
