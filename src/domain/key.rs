//! Keys as the data paths and the controller decide with them.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::policy::Policy;
use super::snapshot::WrappedMaterial;

/// Which key, in which state, encrypting under which version: what every data path must
/// know of a key besides its material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub namespace: String,
    pub name: String,
    /// The key's keyId (its UID).
    pub key_id: String,
    pub state: KeyState,
    /// The version new encryptions use.
    pub current_version: Option<u32>,
}

impl KeyInfo {
    /// `namespace/name`.
    pub fn display(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What a key's spec asks for, and whether it is being deleted: with the key's material,
/// all that decides whether it may be used. Status is never asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyIntent {
    pub origin: Origin,
    /// `spec.enabled`.
    pub enabled: bool,
    /// `spec.deletion.scheduled`.
    pub deletion_scheduled: bool,
    /// The KmsKey is being deleted (metadata.deletionTimestamp).
    pub deleting: bool,
}

impl KeyIntent {
    /// The key's state and current version, from the spec and the material object as only
    /// kubekms writes it: destroyed material is Destroyed; a deletion requested in the spec
    /// or promised in the material is PendingDeletion (refused at once, before the
    /// controller has seen it); without a version the key is Creating or PendingImport; a
    /// key its spec disables is Disabled. The current version is the newest.
    pub fn state(&self, material: Option<&WrappedMaterial>) -> (KeyState, Option<u32>) {
        let material =
            material.filter(|m| m.destroyed || !m.versions.is_empty() || m.deletion_time.is_some());
        let current = material.and_then(|m| m.versions.iter().map(|(v, _)| *v).max());
        let state = match material {
            Some(m) if m.destroyed => KeyState::Destroyed,
            _ if self.deletion_scheduled || self.deleting => KeyState::PendingDeletion,
            Some(m) if m.deletion_time.is_some() => KeyState::PendingDeletion,
            _ if current.is_none() => match self.origin {
                Origin::Kubekms => KeyState::Creating,
                Origin::External => KeyState::PendingImport,
            },
            _ if !self.enabled => KeyState::Disabled,
            _ => KeyState::Enabled,
        };
        (state, current)
    }
}

impl Key {
    /// The key with its state, current version, versions and deletion time derived anew
    /// from `material` (its own material object, if any).
    pub fn with_material(mut self, material: Option<&WrappedMaterial>) -> Key {
        let own = material.filter(|m| m.key_id == self.info.key_id);
        let (state, current) = self.intent.state(own);
        self.info.state = state;
        self.info.current_version = current;
        self.versions = own.map(|m| m.versions.iter().map(|(v, _)| *v).collect()).unwrap_or_default();
        self.deletion = own.and_then(|m| m.deletion_time);
        self
    }
}

/// A key as the key API finds it: everything but its material, which is unwrapped only
/// once a caller is authorized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// Which key, and its state and current version as [`KeyIntent::state`] derives them
    /// from the spec and the material.
    pub info: KeyInfo,
    pub intent: KeyIntent,
    pub description: String,
    pub origin: Origin,
    /// Every version the key has had.
    pub versions: Vec<u32>,
    pub created: Option<Timestamp>,
    /// As status reports it (a report, decided by nothing).
    pub next_rotation: Option<Timestamp>,
    /// When the material will be destroyed, as the material object records it.
    pub deletion: Option<Timestamp>,
    pub automatic_rotation: bool,
    pub rotation_period_days: u16,
    pub policy: Policy,
}

/// Where the key material comes from.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum Origin {
    /// kubekms generates the material from the operating system's CSPRNG.
    #[default]
    #[serde(rename = "KUBEKMS")]
    Kubekms,
    /// You import the material; the key waits in PendingImport until you do.
    #[serde(rename = "EXTERNAL")]
    External,
}

/// A key's lifecycle state.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum KeyState {
    /// The controller is creating version 1.
    Creating,
    /// The key can be used.
    Enabled,
    /// The key refuses every cryptographic operation until it is enabled again.
    Disabled,
    /// The key's material will be destroyed at status.deletionTime unless deletion is
    /// cancelled; it refuses every cryptographic operation meanwhile.
    PendingDeletion,
    /// The key waits for imported material (origin EXTERNAL).
    PendingImport,
    /// The key's material has been destroyed; the object can be deleted.
    Destroyed,
}

impl KeyState {
    /// Every state, for metrics that report zero counts too.
    pub const ALL: [KeyState; 6] = [
        KeyState::Creating,
        KeyState::Enabled,
        KeyState::Disabled,
        KeyState::PendingDeletion,
        KeyState::PendingImport,
        KeyState::Destroyed,
    ];

    /// The state's name as written in status.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Creating => "Creating",
            KeyState::Enabled => "Enabled",
            KeyState::Disabled => "Disabled",
            KeyState::PendingDeletion => "PendingDeletion",
            KeyState::PendingImport => "PendingImport",
            KeyState::Destroyed => "Destroyed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intent(origin: Origin, enabled: bool, scheduled: bool, deleting: bool) -> KeyIntent {
        KeyIntent { origin, enabled, deletion_scheduled: scheduled, deleting }
    }

    fn material(versions: &[u32], promised: bool, destroyed: bool) -> WrappedMaterial {
        WrappedMaterial {
            key_id: "k".into(),
            root_key_fingerprint: "rk".into(),
            destroyed,
            deletion_time: promised.then_some(Timestamp::UNIX_EPOCH),
            versions: versions.iter().map(|v| (*v, String::new())).collect(),
            revision: None,
        }
    }

    #[test]
    fn the_state_follows_the_spec_and_the_material_only() {
        let kubekms = |enabled, scheduled, deleting| intent(Origin::Kubekms, enabled, scheduled, deleting);
        let two = material(&[1, 2], false, false);
        assert_eq!(kubekms(true, false, false).state(Some(&two)), (KeyState::Enabled, Some(2)));
        assert_eq!(kubekms(false, false, false).state(Some(&two)), (KeyState::Disabled, Some(2)));
        // Refused at once when the spec asks for deletion, before the controller saw it.
        assert_eq!(kubekms(true, true, false).state(Some(&two)).0, KeyState::PendingDeletion);
        assert_eq!(kubekms(true, false, true).state(Some(&two)).0, KeyState::PendingDeletion);
        // Still pending while a cancellation has not been carried out.
        let promised = material(&[1, 2], true, false);
        assert_eq!(kubekms(true, false, false).state(Some(&promised)).0, KeyState::PendingDeletion);
        let gone = material(&[], true, true);
        assert_eq!(kubekms(true, false, false).state(Some(&gone)).0, KeyState::Destroyed);
        assert_eq!(kubekms(true, false, false).state(None), (KeyState::Creating, None));
        let external = intent(Origin::External, true, false, false);
        assert_eq!(external.state(None), (KeyState::PendingImport, None));
        assert_eq!(external.state(Some(&material(&[], false, false))), (KeyState::PendingImport, None));
        assert_eq!(external.state(Some(&material(&[1], false, false))), (KeyState::Enabled, Some(1)));
    }
}
