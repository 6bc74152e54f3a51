//! Keys as the data paths and the controller decide with them.

use std::collections::BTreeMap;

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
    /// The key's keyId, which ciphertexts, ARNs and the audit log name: its material's
    /// (the key's UID until the material is known, and for keys made in this cluster).
    pub key_id: String,
    /// The KmsKey's UID in this cluster: it names the key's material and usage records and
    /// binds its grants.
    pub uid: String,
    pub state: KeyState,
    /// The version new encryptions use.
    pub current_version: Option<u32>,
    /// Versions that refuse to decrypt while the key is Enabled, and why (never the
    /// current version).
    pub refused_versions: BTreeMap<u32, VersionRefusal>,
    /// When the key's imported material expires: from then on the key is PendingImport,
    /// whatever `state` says, without waiting for the controller to delete the material.
    pub valid_to: Option<Timestamp>,
}

/// Why one version of an Enabled key refuses to decrypt.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionRefusal {
    /// The spec disables it.
    Disabled,
    /// Its destruction is requested or scheduled.
    PendingDestruction,
    /// Its material was destroyed.
    Destroyed,
}

impl VersionRefusal {
    /// The name status uses for it.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionRefusal::Disabled => "Disabled",
            VersionRefusal::PendingDestruction => "PendingDestruction",
            VersionRefusal::Destroyed => "Destroyed",
        }
    }
}

impl KeyInfo {
    /// `namespace/name`.
    pub fn display(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The key's state at `now`: imported material past its validTo makes an Enabled or
    /// Disabled key PendingImport (a key pending deletion or destroyed stays so).
    pub fn state_at(&self, now: Timestamp) -> KeyState {
        match self.state {
            KeyState::Enabled | KeyState::Disabled if self.valid_to.is_some_and(|t| t <= now) => {
                KeyState::PendingImport
            }
            state => state,
        }
    }
}

/// What a key's spec asks for, and whether it is being deleted: with the key's material,
/// all that decides whether it may be used. Status is never asked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyIntent {
    pub origin: Origin,
    /// `spec.enabled`.
    pub enabled: bool,
    /// `spec.deletion.scheduled`.
    pub deletion_scheduled: bool,
    /// `spec.deletion.force`: the deletion is wanted even though something needs the key.
    pub deletion_forced: bool,
    /// The KmsKey is being deleted (metadata.deletionTimestamp).
    pub deleting: bool,
    /// Versions `spec.versions` disables.
    pub disabled_versions: Vec<u32>,
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
        // A deletion the controller refused (something still needs the key) leaves the key
        // usable while the spec asks for the same, without force.
        let refused = material.is_some_and(|m| m.deletion_refused && m.deletion_time.is_none())
            && !self.deletion_forced;
        let state = match material {
            Some(m) if m.destroyed => KeyState::Destroyed,
            _ if (self.deletion_scheduled || self.deleting) && !refused => KeyState::PendingDeletion,
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

    /// The versions other than `current` that refuse to decrypt: destroyed ones (as the
    /// material records them), those whose destruction the material promises, and those
    /// the spec disables (at once). A destruction the spec requests takes effect when the
    /// controller promises it — it may refuse, for data that still needs the version;
    /// `enabled: false` beside it refuses the version at once.
    pub fn refused_versions(
        &self,
        material: Option<&WrappedMaterial>,
        current: Option<u32>,
    ) -> BTreeMap<u32, VersionRefusal> {
        let mut out = BTreeMap::new();
        let not_current = |v: &u32| Some(*v) != current;
        for v in self.disabled_versions.iter().filter(|v| not_current(v)) {
            out.insert(*v, VersionRefusal::Disabled);
        }
        let promised = material.into_iter().flat_map(|m| m.version_deletions.iter().map(|(v, _)| v));
        for v in promised.filter(|v| not_current(v)) {
            out.insert(*v, VersionRefusal::PendingDestruction);
        }
        for v in material.into_iter().flat_map(|m| m.destroyed_versions.iter()) {
            out.insert(*v, VersionRefusal::Destroyed);
        }
        out
    }
}

impl Key {
    /// The key with its state, current version, versions and deletion time derived anew
    /// from `material` (its own material object, if any).
    /// The keyId becomes the material's.
    pub fn with_material(mut self, material: Option<&WrappedMaterial>) -> Key {
        let own = material.filter(|m| m.uid == self.info.uid);
        if let Some(m) = own {
            self.info.key_id = m.key_id.clone();
        }
        let (state, current) = self.intent.state(own);
        self.info.state = state;
        self.info.current_version = current;
        self.info.refused_versions = self.intent.refused_versions(own, current);
        self.info.valid_to = own.and_then(|m| m.valid_to);
        self.versions = own.map(|m| m.versions.iter().map(|(v, _)| *v).collect()).unwrap_or_default();
        self.history = own.map(|m| m.history.clone()).unwrap_or_default();
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
    /// When and why each version was made, as the material object records it.
    pub history: Vec<super::VersionMade>,
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
        KeyIntent { origin, enabled, deletion_scheduled: scheduled, deleting, ..Default::default() }
    }

    fn material(versions: &[u32], promised: bool, destroyed: bool) -> WrappedMaterial {
        WrappedMaterial {
            key_id: "k".into(),
            root_key_fingerprint: "rk".into(),
            destroyed,
            deletion_time: promised.then_some(Timestamp::UNIX_EPOCH),
            versions: versions.iter().map(|v| (*v, String::new())).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_refused_deletion_leaves_the_key_usable_until_forced() {
        let mut wanted = intent(Origin::Kubekms, true, true, false);
        let refused = WrappedMaterial { deletion_refused: true, ..material(&[1], false, false) };
        assert_eq!(wanted.state(Some(&refused)).0, KeyState::Enabled);
        wanted.deleting = true;
        assert_eq!(wanted.state(Some(&refused)).0, KeyState::Enabled);
        wanted.deletion_forced = true;
        assert_eq!(wanted.state(Some(&refused)).0, KeyState::PendingDeletion);
        // Once promised, a refusal left behind changes nothing.
        let promised = WrappedMaterial { deletion_refused: true, ..material(&[1], true, false) };
        assert_eq!(
            intent(Origin::Kubekms, true, true, false).state(Some(&promised)).0,
            KeyState::PendingDeletion
        );
    }

    #[test]
    fn single_versions_refuse_by_spec_promise_or_destruction_but_never_the_current_one() {
        let wanted =
            KeyIntent { disabled_versions: vec![1, 4], ..intent(Origin::Kubekms, true, false, false) };
        let stored = WrappedMaterial {
            version_deletions: vec![
                (2, Timestamp::UNIX_EPOCH),
                (3, Timestamp::UNIX_EPOCH),
                (4, Timestamp::UNIX_EPOCH),
            ],
            destroyed_versions: vec![5],
            ..material(&[1, 2, 3, 4, 6], false, false)
        };
        let refused = wanted.refused_versions(Some(&stored), Some(4));
        assert_eq!(
            refused.into_iter().collect::<Vec<_>>(),
            [
                (1, VersionRefusal::Disabled),
                (2, VersionRefusal::PendingDestruction),
                (3, VersionRefusal::PendingDestruction),
                (5, VersionRefusal::Destroyed),
            ]
        );
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

    #[test]
    fn imported_material_past_its_validto_is_pending_import_at_once() {
        let t = Timestamp::from_second(1_800_000_000).unwrap();
        let mut info = KeyInfo {
            namespace: "apps".into(),
            name: "byok".into(),
            key_id: "k".into(),
            uid: "k".into(),
            state: KeyState::Enabled,
            current_version: Some(1),
            refused_versions: BTreeMap::new(),
            valid_to: Some(t),
        };
        let second = jiff::SignedDuration::from_secs(1);
        assert_eq!(info.state_at(t - second), KeyState::Enabled);
        assert_eq!(info.state_at(t), KeyState::PendingImport);
        info.state = KeyState::Disabled;
        assert_eq!(info.state_at(t - second), KeyState::Disabled);
        assert_eq!(info.state_at(t + second), KeyState::PendingImport);
        // Pending deletion and destroyed stay what they are; without validTo nothing expires.
        for state in [KeyState::PendingDeletion, KeyState::Destroyed] {
            info.state = state;
            assert_eq!(info.state_at(t + second), state);
        }
        info.state = KeyState::Enabled;
        info.valid_to = None;
        assert_eq!(info.state_at(t + second), KeyState::Enabled);
    }
}
