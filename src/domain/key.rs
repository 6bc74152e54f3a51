//! Keys as the data paths and the controller decide with them.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::policy::Policy;

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

/// A key as the key API finds it: everything but its material, which is unwrapped only
/// once a caller is authorized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub info: KeyInfo,
    pub description: String,
    pub origin: Origin,
    /// Every version the key has had.
    pub versions: Vec<u32>,
    pub created: Option<Timestamp>,
    pub next_rotation: Option<Timestamp>,
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
