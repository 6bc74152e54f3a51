//! Who a key policy statement or a grant names.

use std::fmt;

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use crate::domain;

/// A Kubernetes identity: a ServiceAccount (of any namespace), a user or a group, as
/// authenticated by the API server (TokenReview).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "self.kind == 'ServiceAccount' ? has(self.__namespace__) : !has(self.__namespace__)"
).message("namespace is required for a ServiceAccount and not allowed for a User or Group"))]
pub struct Principal {
    /// What kind of identity this is: ServiceAccount, User or Group.
    pub kind: PrincipalKind,
    /// The ServiceAccount's name, the user name or the group name, exactly as the API server
    /// authenticates it (for example `jane@example.com` or `system:serviceaccounts:apps`).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The ServiceAccount's namespace; it may differ from the namespace of the key
    /// (cross-namespace access). Required for a ServiceAccount, not allowed otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

/// The kind of a [`Principal`].
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum PrincipalKind {
    /// A ServiceAccount, authenticated by its token.
    ServiceAccount,
    /// A user, as named by the cluster's authenticator.
    User,
    /// A group the authenticated identity belongs to.
    Group,
}

impl Principal {
    /// A ServiceAccount principal.
    pub fn service_account(namespace: &str, name: &str) -> Self {
        Self {
            kind: PrincipalKind::ServiceAccount,
            name: name.to_owned(),
            namespace: Some(namespace.to_owned()),
        }
    }
}

impl From<&Principal> for domain::Principal {
    fn from(p: &Principal) -> Self {
        match p.kind {
            PrincipalKind::ServiceAccount => domain::Principal::ServiceAccount {
                namespace: p.namespace.clone().unwrap_or_default(),
                name: p.name.clone(),
            },
            PrincipalKind::User => domain::Principal::User(p.name.clone()),
            PrincipalKind::Group => domain::Principal::Group(p.name.clone()),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        domain::Principal::from(self).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_and_displays_as_the_domain_principal() {
        assert_eq!(Principal::service_account("a", "b").to_string(), "ServiceAccount:a/b");
        let u = Principal { kind: PrincipalKind::User, name: "jane".into(), namespace: None };
        assert_eq!(u.to_string(), "User:jane");
        assert_eq!(domain::Principal::from(&u), domain::Principal::User("jane".into()));
        let g = Principal { kind: PrincipalKind::Group, name: "ops".into(), namespace: None };
        assert_eq!(domain::Principal::from(&g), domain::Principal::Group("ops".into()));
    }
}
