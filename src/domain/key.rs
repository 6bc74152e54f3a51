//! Keys as the data paths and the controller decide with them.

use serde::{Deserialize, Serialize};

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
