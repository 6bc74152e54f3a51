//! The kube-free core: keys, versions, grants, principals, policy evaluation, the right to
//! grant, names and the key snapshot the data paths use, as plain types. CRD objects (`crate::api`) are
//! converted into these once, where they are watched; nothing here imports `kube` or
//! `k8s_openapi` (a test checks).

mod alias;
mod grant;
mod key;
mod name;
mod policy;
mod principal;
mod right;
mod snapshot;
mod usage;

pub use alias::{ALIAS_PREFIX, Alias};
pub use grant::{Constraints, Creator, Grant, GrantState};
pub use key::{Key, KeyInfo, KeyIntent, KeyState, Origin, VersionRefusal};
pub use name::{NamespacedName, NamespacedNameError};
#[cfg(test)]
pub(crate) use policy::DENY_TABLE;
pub use policy::{Denial, Effect, KeyOperation, Policy, Statement, Verdict};
pub use principal::{Identity, Principal, service_account_username};
pub use right::{GrantAuthority, GrantRefusal, right_to_grant};
pub use snapshot::{KeySnapshot, VersionCause, VersionMade, WrappedMaterial};
pub use usage::{ReporterKind, ReporterUse, Usage, UseKind, VersionUse};
