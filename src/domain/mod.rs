//! The kube-free core: keys, versions, grants, principals, policy evaluation and the key
//! snapshot the data paths use, as plain types. CRD objects (`crate::api`) are converted
//! into these once, where they are watched; nothing here imports `kube` or `k8s_openapi`.

mod grant;
mod key;
mod policy;
mod principal;
mod snapshot;

pub use grant::{Constraints, Grant, GrantState};
pub use key::{Key, KeyInfo, KeyState, Origin};
pub use policy::{Effect, KeyOperation, Policy, Statement, Verdict};
pub use principal::{Identity, Principal, service_account_username};
pub use snapshot::{KeySnapshot, WrappedMaterial};
