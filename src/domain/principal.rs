//! Who calls (an [`Identity`], as the API server authenticated it) and whom a policy
//! statement or a grant names (a [`Principal`]).

use std::collections::BTreeMap;
use std::fmt;

/// Who is calling, as the API server authenticated them (a TokenReview's user).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// A Kubernetes identity that a policy statement or a grant names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A ServiceAccount of any namespace, authenticated by its token.
    ServiceAccount { namespace: String, name: String },
    /// A user, as named by the cluster's authenticator.
    User(String),
    /// A group the authenticated identity belongs to.
    Group(String),
}

impl Principal {
    /// Whether an authenticated identity is this principal.
    pub fn matches(&self, who: &Identity) -> bool {
        match self {
            Principal::ServiceAccount { namespace, name } => {
                service_account_username(namespace, name) == who.username
            }
            Principal::User(name) => *name == who.username,
            Principal::Group(name) => who.groups.iter().any(|g| g == name),
        }
    }
}

/// The user name the API server gives a ServiceAccount.
pub fn service_account_username(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::ServiceAccount { namespace, name } => write!(f, "ServiceAccount:{namespace}/{name}"),
            Principal::User(name) => write!(f, "User:{name}"),
            Principal::Group(name) => write!(f, "Group:{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, groups: &[&str]) -> Identity {
        Identity {
            username: name.into(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            ..Default::default()
        }
    }

    fn sa(namespace: &str, name: &str) -> Principal {
        Principal::ServiceAccount { namespace: namespace.into(), name: name.into() }
    }

    #[test]
    fn service_account_matches_only_its_own_username() {
        let p = sa("apps", "web");
        assert!(p.matches(&user("system:serviceaccount:apps:web", &[])));
        assert!(!p.matches(&user("system:serviceaccount:other:web", &[])));
        assert!(!p.matches(&user("system:serviceaccount:apps:web2", &[])));
    }

    #[test]
    fn group_matches_membership_not_username() {
        let p = Principal::Group("admins".into());
        assert!(p.matches(&user("jane", &["admins"])));
        assert!(!p.matches(&user("admins", &[])));
    }

    #[test]
    fn display_is_readable() {
        assert_eq!(sa("a", "b").to_string(), "ServiceAccount:a/b");
        assert_eq!(Principal::User("jane".into()).to_string(), "User:jane");
        assert_eq!(Principal::Group("ops".into()).to_string(), "Group:ops");
    }
}
