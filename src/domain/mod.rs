//! Plain types of the key service's domain, with no Kubernetes client in them.

mod name;
pub use name::{NamespacedName, NamespacedNameError};
