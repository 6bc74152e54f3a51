//! Grants: temporary, constrained use of a key by one principal.

use serde::{Deserialize, Serialize};

/// A grant's state.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum GrantState {
    /// The grant allows its operations.
    Active,
    /// expiresAt has passed.
    Expired,
    /// The grantee or the retiring principal retired the grant.
    Retired,
    /// The key does not exist or cannot be used; the condition says why.
    Invalid,
}
