//! Who a key policy statement or a grant names.

use std::fmt;

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

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

    /// Whether an authenticated identity (user name and groups, as a TokenReview returns
    /// them) is this principal.
    pub fn matches(&self, username: &str, groups: &[String]) -> bool {
        match self.kind {
            PrincipalKind::ServiceAccount => {
                let namespace = self.namespace.as_deref().unwrap_or_default();
                service_account_username(namespace, &self.name) == username
            }
            PrincipalKind::User => self.name == username,
            PrincipalKind::Group => groups.iter().any(|g| g == &self.name),
        }
    }
}

/// The user name the API server gives a ServiceAccount.
pub fn service_account_username(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.kind, &self.namespace) {
            (PrincipalKind::ServiceAccount, Some(ns)) => write!(f, "ServiceAccount:{ns}/{}", self.name),
            (kind, _) => write!(f, "{kind:?}:{}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_matches_only_its_own_username() {
        let p = Principal::service_account("apps", "web");
        assert!(p.matches("system:serviceaccount:apps:web", &[]));
        assert!(!p.matches("system:serviceaccount:other:web", &[]));
        assert!(!p.matches("system:serviceaccount:apps:web2", &[]));
    }

    #[test]
    fn group_matches_membership_not_username() {
        let p = Principal { kind: PrincipalKind::Group, name: "admins".into(), namespace: None };
        assert!(p.matches("jane", &["admins".to_owned()]));
        assert!(!p.matches("admins", &[]));
    }

    #[test]
    fn display_is_readable() {
        assert_eq!(Principal::service_account("a", "b").to_string(), "ServiceAccount:a/b");
        let u = Principal { kind: PrincipalKind::User, name: "jane".into(), namespace: None };
        assert_eq!(u.to_string(), "User:jane");
    }
}
