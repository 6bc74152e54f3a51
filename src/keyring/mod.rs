//! Key versions: how material is wrapped, numbered and checked (`material`, pure), where it
//! is stored (`store`, a thin adapter for `KmsKeyMaterial`), how it is read back into
//! memory (`snapshot`), importing your own, and backing every key up and restoring it in
//! another cluster (`backup`, pure; `restore`, its adapter), and what a root-key rotation
//! has left to rewrap (`rotation`).

mod backup;
mod import;
mod material;
mod restore;
mod rotation;
mod snapshot;
mod store;

pub use backup::{
    Backup, BackupError, BackupKey, Existing, MAX_BACKUP_LEN, Step, open_backup, plan_restore, seal_backup,
};
pub use restore::{RESTORE_ANNOTATION, RestoreError, Restored, collect, restore};

pub use import::{
    ImportError, MAX_FAILED_DECRYPTIONS, Refusal, check_importable, check_reimport, commitment, new_wrapping,
    read_material, token_for, unwrap_submission, with_imported, wrapping_spent,
};
pub use material::{
    MaterialError, Owner, destroyed, new_material, unwrap_version, versions_by_root, with_deletion_refused,
    with_deletion_time, with_expired, with_refilled, with_rewrapped, with_rotation, with_version,
    with_version_deletion, with_version_destroyed,
};
pub use rotation::{RootUse, RotationReport};
pub use snapshot::snapshot;
pub use store::MaterialStore;

use std::sync::Arc;

use crate::domain::KeySnapshot;

/// Where the plugin and the key API get keys from. Only the wiring knows whether that is a
/// watch on the API server, a local cache, or (in tests) a fixed set.
pub trait Keyring: Send + Sync + 'static {
    /// The latest snapshot of the key, if one is known yet.
    fn snapshot(&self) -> Option<Arc<KeySnapshot>>;
}

/// A keyring that always returns the same snapshot (tests, benchmarks).
#[derive(Debug, Clone)]
pub struct FixedKeyring(pub Option<Arc<KeySnapshot>>);

impl Keyring for FixedKeyring {
    fn snapshot(&self) -> Option<Arc<KeySnapshot>> {
        self.0.clone()
    }
}

/// A keyring fed by a `tokio::sync::watch` channel (the plugin's key watch).
#[derive(Debug, Clone)]
pub struct WatchKeyring(pub tokio::sync::watch::Receiver<Option<Arc<KeySnapshot>>>);

impl Keyring for WatchKeyring {
    fn snapshot(&self) -> Option<Arc<KeySnapshot>> {
        self.0.borrow().clone()
    }
}
